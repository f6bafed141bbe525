"""Tasks turn a record into a backend input and a backend answer into an output row.

A task never talks to a model: `build` (record -> input) runs before the backend, `parse`
(answer -> row fields) after it, and `validate` checks the output against the user's schema.
"""

from __future__ import annotations

from typing import Any, Protocol

import jinja2

from .errors import InputError


class Task(Protocol):
    kind: str

    def build(self, record: dict[str, Any]) -> Any: ...
    def parse(self, answer: Any) -> dict[str, Any]: ...


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)


class Template:
    """A Jinja2 template over the record's fields; a missing field is that record's input error."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._template = _ENV.from_string(source)

    def render(self, record: dict[str, Any]) -> str:
        try:
            return self._template.render(record)
        except jinja2.UndefinedError as exc:
            raise InputError(f"template field missing: {exc.message}") from None
        except Exception as exc:  # a filter choking on a value (e.g. None | upper)
            raise InputError(f"template failed: {type(exc).__name__}: {exc}") from None


class MapTask:
    """backend = "python": the function gets the records and returns the outputs."""

    kind = "map"

    def build(self, record: dict[str, Any]) -> Any:
        return record

    def parse(self, answer: Any) -> dict[str, Any]:
        return {"output": answer}


class EmbedTask:
    kind = "embed"

    def __init__(self, text: str) -> None:
        self.template = Template(text)

    def build(self, record: dict[str, Any]) -> str:
        return self.template.render(record)

    def parse(self, answer: Any) -> dict[str, Any]:
        return {"output": answer}  # a numpy row; the runner serialises numpy natively


class ClassifyTask:
    kind = "classify"

    def __init__(self, text: str, labels: list[str]) -> None:
        self.template = Template(text)
        self.labels = labels

    def build(self, record: dict[str, Any]) -> str:
        return self.template.render(record)

    def parse(self, answer: tuple[str, dict[str, float]]) -> dict[str, Any]:
        label, scores = answer
        return {"output": label, "scores": scores}


def make_task(kind: str, text: str, labels: list[str] | None = None) -> Task:
    if kind == "map":
        return MapTask()
    if kind == "embed":
        return EmbedTask(text)
    if kind == "classify":
        return ClassifyTask(text, list(labels or []))
    raise ValueError(f"unknown task kind {kind!r}")
