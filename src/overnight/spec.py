"""The job file: pydantic models, TOML loading, and one clear message per mistake."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any, Literal

import jinja2
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import JobFileError

FORMATS = ("jsonl", "csv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class _Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent coercion.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SourceSpec(_Section):
    path: str
    id: str | None = None
    format: Literal["jsonl", "csv", "parquet"] | None = None


class TaskSpec(_Section):
    kind: Literal["map", "embed", "classify"] = "map"
    text: str = "{{ text }}"
    system: str | None = None
    labels: list[str] | dict[str, str] | None = None
    examples: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.kind == "classify" and not self.labels:
            raise ValueError(
                "kind = 'classify' needs `labels` (a list, or a table label = description)"
            )
        if self.kind != "classify" and (self.labels or self.examples):
            raise ValueError("`labels` and `examples` only apply to kind = 'classify'")
        try:
            jinja2.Environment().parse(self.text)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"`text` is not a valid Jinja2 template: {exc.message}") from None
        return self

    def label_descriptions(self) -> dict[str, str]:
        """Labels with the text zero-shot classification compares against."""
        if isinstance(self.labels, dict):
            return dict(self.labels)
        return {label: label for label in self.labels or []}


class ModelSpec(_Section):
    backend: Literal["local", "python"]
    name: str | None = None
    function: str | None = None
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.backend == "python" and not self.function:
            raise ValueError("backend = 'python' needs `function = \"module:function\"`")
        if self.function and ":" not in self.function:
            raise ValueError(f"`function` must look like module:function, got {self.function!r}")
        if self.backend != "python" and self.function:
            raise ValueError("`function` only applies to backend = 'python'")
        return self


class RunSpec(_Section):
    batch_size: int | Literal["auto"] = "auto"
    max_attempts: int = Field(3, ge=1)
    lease_seconds: float = Field(300.0, gt=0)
    backoff_base: float = Field(0.5, ge=0)
    backoff_max: float = Field(60.0, ge=0)
    memory_limit_mb: int = Field(2048, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError('`batch_size` must be a positive number or "auto"')
        return self


class OutputSpec(_Section):
    path: str | None = None
    errors: str | None = None
    include: list[str] = []
    schema_: str | dict[str, Any] | None = Field(None, alias="schema")


class JobSpec(_Section):
    name: str | None = None
    source: SourceSpec
    task: TaskSpec = TaskSpec()
    model: ModelSpec
    run: RunSpec = RunSpec()
    output: OutputSpec = OutputSpec()

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        kind, backend = self.task.kind, self.model.backend
        if backend == "python" and kind != "map":
            raise ValueError(f"backend = 'python' runs kind = 'map', not {kind!r}")
        if backend == "local" and kind not in ("embed", "classify"):
            raise ValueError(f"backend = 'local' runs kind = 'embed' or 'classify', not {kind!r}")
        return self


# Parts of a pydantic error location that name a union branch or a validator, not a key.
_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


def _is_key(part: object) -> bool:
    if isinstance(part, int):
        return True
    text = str(part)
    return not (
        text in _TYPE_TAGS
        or "[" in text
        or text.startswith(("function-", "literal", "json-or-python", "lax-or-strict"))
    )


def _where(loc: tuple[Any, ...]) -> str:
    """`('task', 'labels', 0)` -> `[task] labels[0]`; top-level keys stay bare."""
    parts = [str(p) for p in loc if _is_key(p)]
    if not parts:
        return "(top level)"
    head, rest = parts[0], parts[1:]
    sections = {"source", "task", "model", "run", "output"}
    if head in sections and rest:
        key = rest[0] + "".join(f"[{p}]" for p in rest[1:])
        return f"[{head}] {key}"
    return ".".join(parts)


def format_validation_error(origin: str, exc: ValidationError) -> str:
    """One line per key: the branches of a union ("a number or 'auto'") are joined."""
    problems: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for err in exc.errors():
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if not err["type"].startswith("value_error"):
                got[where] = f" (got {err['input']!r})"
        if msg not in problems.setdefault(where, []):
            problems[where].append(msg)
    return "\n".join(
        f"{origin}: {where}: {'; or '.join(msgs)}{got.get(where, '')}"
        for where, msgs in problems.items()
    )


def parse_spec(data: dict[str, Any], origin: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(format_validation_error(origin, exc)) from None


def load_job_file(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobFileError(f"{path}: job file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JobFileError(f"{path}: not valid TOML: {exc}") from None
    return parse_spec(data, str(path))


def source_format(source: SourceSpec, path: Path) -> str:
    if source.format:
        return source.format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise JobFileError(
            f"[source] path: cannot tell the format of {path.name!r} from its suffix; "
            f"set [source] format to one of {', '.join(FORMATS)}"
        )
    return fmt


def semantic_hash(spec: JobSpec, extra: bytes = b"") -> str:
    """Hash of what decides an item's result (task + model); run/output settings may change."""
    payload = orjson.dumps(
        {"task": spec.task.model_dump(), "model": spec.model.model_dump(exclude={"device"})},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.blake2b(payload + extra, digest_size=16).hexdigest()
