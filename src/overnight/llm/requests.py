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
from typing import Any, Literal

import jsonschema
import orjson

from ..errors import InputError, InvalidOutput, UsageError
from ..tasks import Template
from .tokens import count_request_tokens, encoding_note

Provider = Literal["openai", "anthropic"]
CHAT, EMBEDDINGS, MESSAGES = "/v1/chat/completions", "/v1/embeddings", "/v1/messages"
PASSTHROUGH_URLS = {
    "openai": (CHAT, EMBEDDINGS, "/v1/completions", "/v1/responses", "/v1/moderations"),
    "anthropic": (MESSAGES,),
}
TOOL_NAME = "record_output"  # the one tool an Anthropic structured request forces
ANTHROPIC_MAX_TOKENS = 1024  # Anthropic requires max_tokens; used when params do not set it


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
    """Usage read from an OpenAI chat/embeddings body or an Anthropic message body."""
    usage = body.get("usage") or {}
    if provider == "anthropic":
        tin = (
            int(usage.get("input_tokens") or 0)
            + int(usage.get("cache_read_input_tokens") or 0)
            + int(usage.get("cache_creation_input_tokens") or 0)
        )
        return Answer(body, tin, int(usage.get("output_tokens") or 0))
    tin = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
    tout = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
    return Answer(body, tin, tout)


def _usage(answer: Answer) -> dict[str, int]:
    return {"input_tokens": answer.input_tokens, "output_tokens": answer.output_tokens}


def _strict_ok(schema: Any) -> bool:
    """OpenAI's strict mode needs every object closed and every property required; a schema
    that is not so is sent with strict = false rather than rewritten behind the user's back."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            props = schema.get("properties", {})
            if schema.get("additionalProperties") is not False:
                return False
            if set(schema.get("required", [])) != set(props):
                return False
        return all(_strict_ok(v) for v in schema.values())
    if isinstance(schema, list):
        return all(_strict_ok(v) for v in schema)
    return True


class LLMTask:
    """One task kind for one provider: builds requests, parses answers, asks for repairs."""

    def __init__(
        self,
        kind: str,
        provider: Provider,
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
        if provider == "anthropic":
            self.params.setdefault("max_tokens", ANTHROPIC_MAX_TOKENS)
        self.endpoint = {"embed": EMBEDDINGS}.get(
            kind, MESSAGES if provider == "anthropic" else CHAT
        )

    # -- record → request ------------------------------------------------------------------

    def build(self, record: dict[str, Any]) -> Request:
        if self.kind == "passthrough":
            return self._passthrough(record)
        user = self.template.render(record)
        if self.kind == "embed":
            body: dict[str, Any] = {"model": self.model, "input": user, **self.params}
            return self._request(EMBEDDINGS, body)
        system = self.system.render(record) if self.system else None
        if self.provider == "anthropic":
            body = {"model": self.model, "messages": [{"role": "user", "content": user}]}
            if system:
                body["system"] = system
            body.update(self.params)
            if self.schema is not None:
                body["tools"] = [
                    {
                        "name": TOOL_NAME,
                        "description": "Record the answer in the required structure.",
                        "input_schema": self.schema,
                    }
                ]
                body["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
            return self._request(MESSAGES, body)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        body = {"model": self.model, "messages": messages, **self.params}
        if self.schema is not None and self.structured == "json_object":
            # llama.cpp's server (and other older OpenAI-compatible servers) take the schema
            # this way; it constrains the grammar the same.
            body["response_format"] = {"type": "json_object", "schema": self.schema}
        elif self.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "output",
                    "schema": self.schema,
                    "strict": _strict_ok(self.schema),
                },
            }
        return self._request(CHAT, body)

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
        allowed = PASSTHROUGH_URLS[self.provider]
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
            return {"output": self._text(answer), "usage": _usage(answer)}
        value = self._structured(answer)
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            err = jsonschema.exceptions.best_match(errors)
            where = "/".join(str(p) for p in err.absolute_path) or "output"
            raise InvalidOutput(f"schema: {where}: {err.message}{_cut(body)}", answer)
        if self.kind == "classify":
            out = {"output": value["label"], "usage": _usage(answer)}
            if isinstance(body.get("scores"), dict):  # a self-hosted model scored every label
                out["scores"] = body["scores"]
            return out
        return {"output": value, "usage": _usage(answer)}

    def _text(self, answer: Answer) -> str:
        body = answer.body
        if self.provider == "anthropic":
            parts = [b.get("text", "") for b in body.get("content", []) if b.get("type") == "text"]
            return "".join(parts)
        try:
            message = body["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise InvalidOutput("chat answer has no choices[0].message", answer) from None
        if message.get("refusal"):
            raise InvalidOutput(f"the model refused: {message['refusal']}", answer)
        return message.get("content") or ""

    def _structured(self, answer: Answer) -> Any:
        body = answer.body
        if self.provider == "anthropic":
            reason = body.get("stop_reason")
            if reason == "refusal":
                raise InvalidOutput("the model refused", answer)
            for block in body.get("content", []):
                if block.get("type") == "tool_use":
                    return block.get("input")
            raise InvalidOutput(f"no tool_use block in the answer (stop_reason {reason})", answer)
        text = self._text(answer)
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            raise InvalidOutput(f"not JSON{_cut(body)}: {text[:80]!r}", answer) from None

    # -- repair ----------------------------------------------------------------------------

    def repair(self, request: Request, answer: Answer, reason: str) -> Request:
        """The same conversation, the model's answer, and the validation error: ask again."""
        body = dict(request.body)
        ask = (
            f"That answer is invalid: {reason}. Reply again with a corrected answer that "
            "matches the required schema exactly."
        )
        if self.provider == "anthropic":
            content = answer.body.get("content") or [{"type": "text", "text": ""}]
            tool = next((b for b in content if b.get("type") == "tool_use"), None)
            reply: list[dict[str, Any]] = [{"type": "text", "text": ask}]
            if tool is not None:
                reply = [
                    {
                        "type": "tool_result",
                        "tool_use_id": tool.get("id"),
                        "is_error": True,
                        "content": ask,
                    }
                ]
            body["messages"] = [
                *body["messages"],
                {"role": "assistant", "content": content},
                {"role": "user", "content": reply},
            ]
        else:
            try:
                said = self._text(answer)
            except InvalidOutput:
                said = ""
            body["messages"] = [
                *body["messages"],
                {"role": "assistant", "content": said},
                {"role": "user", "content": ask},
            ]
        return self._request(request.endpoint, body)


def _cut(body: dict[str, Any]) -> str:
    """Why an answer may be broken: the model ran into max_tokens."""
    finish = body.get("stop_reason")
    if finish is None:
        choices = body.get("choices") or [{}]
        finish = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
    return " (cut off at max_tokens)" if finish in ("length", "max_tokens") else ""


def make_llm_task(
    kind: str,
    provider: Provider,
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
    if kind == "embed" and provider == "anthropic":
        raise UsageError("kind: Anthropic has no embeddings endpoint; use an OpenAI-compatible one")
    if kind not in ("generate", "extract", "classify", "embed", "passthrough"):
        raise UsageError(f"kind: {kind!r} does not run on an LLM backend")
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
