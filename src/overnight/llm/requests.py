"""Record → provider request body, provider response body → output. Pure: no I/O.

One `Request` is what would be sent (OpenAI chat completions or embeddings, Anthropic
messages), whichever backend sends it: the real-time clients post its body, the batch files
carry it as a line. Its `key` covers everything that decides the answer (provider, endpoint,
model, parameters, rendered messages, schema), so identical requests are sent once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson

from ..errors import InputError, InvalidOutput, UsageError
from ..tasks import Template
from . import providers
from .providers import EMBEDDINGS
from .tokens import count_request_tokens, encoding_note

LLM_KINDS = ("generate", "extract", "classify", "embed", "passthrough")


class ContextExceeded(InputError):
    """The request is longer than the model's context window: the provider would refuse it
    (after billing nothing, or worse, after a long upload), so it is not sent."""

    error_class = "context_exceeded"


def cache_key(provider: str, endpoint: str, body: dict[str, Any]) -> str:
    """Changes when anything that decides the answer changes: the body holds the model, every
    parameter, the rendered messages (so every template variable) and the schema."""
    blob = orjson.dumps([provider, endpoint, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(blob, digest_size=20).hexdigest()


@dataclass(frozen=True)
class Request:
    endpoint: str
    body: dict[str, Any]
    key: str


@dataclass(frozen=True)
class Answer:
    body: dict[str, Any]  # the provider's raw response JSON
    input_tokens: int
    output_tokens: int
    cached: bool = False  # served from the cache: costs nothing now
    attempts: int = 1  # requests sent for it (retries and 429s included; 0: from the cache)


def answer_from_body(provider: str, endpoint: str, body: dict[str, Any]) -> Answer:
    """An answer body of that provider, with its usage read."""
    return Answer(body, *providers.provider(provider).usage(body))


def _usage(answer: Answer) -> dict[str, int]:
    return {"input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens}


class LLMTask:
    """One task kind for one provider: builds requests, parses answers, asks for repairs."""

    def __init__(
        self,
        kind: str,
        provider: str,
        model: str,
        *,
        text: str = "{{ text }}",
        system: str | None = None,
        params: dict[str, Any] | None = None,
        schema: dict[str, Any] | None = None,
        labels: list[str] | None = None,
        structured: str = "json_schema",
        context: Callable[[str], int | None] | None = None,
    ) -> None:
        self.kind, self.provider, self.model = kind, provider, model
        self.api = providers.provider(provider)
        self.structured = structured
        self.context = context  # model id -> its context window in tokens, None if unknown
        self.template = Template(text)
        self.system = Template(system) if system else None
        self.params = dict(params or {})
        self.labels = labels
        if kind == "classify":
            schema = {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": list(labels or [])}},
                "required": ["label"],
                "additionalProperties": False,
            }
        self.schema = schema
        self._validator = (
            jsonschema.validators.validator_for(schema)(schema) if schema is not None else None
        )
        if self.api.default_max_tokens is not None:
            self.params.setdefault("max_tokens", self.api.default_max_tokens)
        self.endpoint = EMBEDDINGS if kind == "embed" else self.api.chat_endpoint

    # -- record → request ------------------------------------------------------------------

    def build(self, record: dict[str, Any]) -> Request:
        if self.kind == "passthrough":
            return self._passthrough(record)
        user = self.template.render(record)
        if self.kind == "embed":
            body: dict[str, Any] = {"model": self.model, "input": user, **self.params}
            return self._request(EMBEDDINGS, body)
        system = self.system.render(record) if self.system else None
        body = self.api.chat_body(
            self.model, user, system, self.params, self.schema, self.structured
        )
        return self._request(self.api.chat_endpoint, body)

    def _request(self, endpoint: str, body: dict[str, Any]) -> Request:
        self._check_context(endpoint, body)
        return Request(endpoint, body, cache_key(self.provider, endpoint, body))

    def _check_context(self, endpoint: str, body: dict[str, Any]) -> None:
        """Refuse a request whose estimated input is over the model's context window, where
        the price table knows the window (an unknown model is not checked)."""
        if self.context is None:
            return
        model = str(body.get("model") or self.model)
        limit = self.context(model)
        if limit is None:
            return
        blob = orjson.dumps(body)
        # Cheap bound first: a token is at least one byte of the JSON body, except an image
        # block, which counts as a fixed number of tokens however short its JSON.
        if len(blob) <= limit and b'"image' not in blob:
            return
        tokens = count_request_tokens(endpoint, body, model)
        if tokens > limit:
            raise ContextExceeded(
                f"the request has about {tokens:,} input tokens, over the {limit:,} of "
                f"{model}'s context window; it was not sent (counted with "
                f"{encoding_note(model)})"
            )

    def _passthrough(self, record: dict[str, Any]) -> Request:
        """An OpenAI batch input line, sent as is (vLLM's run-batch format is the same)."""
        method, url, body = record.get("method", "POST"), record.get("url"), record.get("body")
        if str(method).upper() != "POST":
            raise InputError(f"passthrough: method must be POST, got {method!r}")
        allowed = self.api.endpoints
        if url not in allowed:
            raise InputError(
                f"passthrough: url {url!r} is not one of {', '.join(allowed)} ({self.provider})"
            )
        if not isinstance(body, dict):
            raise InputError("passthrough: `body` must be a JSON object")
        if body.get("stream"):
            raise InputError("passthrough: stream = true cannot be batched")
        if "model" not in body:
            if not self.model:
                raise InputError("passthrough: the line has no body.model and [model] no name")
            body = {**body, "model": self.model}
        return self._request(url, body)

    # -- answer → output -------------------------------------------------------------------

    def parse(self, answer: Answer) -> dict[str, Any]:
        body = answer.body
        if self.kind == "passthrough":
            return {"output": body, "usage": _usage(answer)}
        if self.kind == "embed":
            try:
                vector = body["data"][0]["embedding"]
            except (KeyError, IndexError, TypeError):
                raise InvalidOutput("embeddings answer has no data[0].embedding", answer) from None
            return {"output": vector, "usage": _usage(answer)}
        if self.schema is None:
            return {"output": self.api.text(answer), "usage": _usage(answer)}
        value = self.api.structured(answer)
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            err = jsonschema.exceptions.best_match(errors)
            where = "/".join(str(p) for p in err.absolute_path) or "output"
            raise InvalidOutput(f"schema: {where}: {err.message}{self.api.cut_note(body)}", answer)
        if self.kind == "classify":
            out = {"output": value["label"], "usage": _usage(answer)}
            if isinstance(body.get("scores"), dict):  # a self-hosted model scored every label
                out["scores"] = body["scores"]
            return out
        return {"output": value, "usage": _usage(answer)}

    # -- repair ----------------------------------------------------------------------------

    def repair(self, request: Request, answer: Answer, reason: str) -> Request:
        """The same conversation, the model's answer, and the validation error: ask again."""
        body = dict(request.body)
        ask = (
            f"That answer is invalid: {reason}. Reply again with a corrected answer that "
            "matches the required schema exactly."
        )
        body["messages"] = [*body["messages"], *self.api.repair_messages(answer, ask)]
        return self._request(request.endpoint, body)


def make_llm_task(
    kind: str,
    provider: str,
    model: str,
    *,
    text: str = "{{ text }}",
    system: str | None = None,
    params: dict[str, Any] | None = None,
    schema: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    structured: str = "json_schema",
    context: Callable[[str], int | None] | None = None,
) -> LLMTask:
    api = providers.provider(provider)
    if kind == "embed" and kind not in api.kinds:
        raise UsageError(
            f"kind: {api.title} has no embeddings endpoint; use an OpenAI-compatible one"
        )
    if kind not in LLM_KINDS:
        raise UsageError(f"kind: {kind!r} does not run on an LLM backend")
    if kind not in api.kinds:
        raise UsageError(f"kind: {kind!r} does not run on {api.title}")
    if kind == "extract" and schema is None:
        raise UsageError("schema: kind = 'extract' needs a schema")
    if kind == "classify" and not labels:
        raise UsageError("labels: kind = 'classify' needs labels")
    return LLMTask(
        kind,
        provider,
        model,
        text=text,
        system=system,
        params=params,
        schema=schema,
        labels=labels,
        structured=structured,
        context=context,
    )
