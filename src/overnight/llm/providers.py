"""The providers overnight sends requests to, as adapters in one registry.

A `Provider` holds what differs between the OpenAI API (and the servers that speak it: vLLM,
llama.cpp's) and Anthropic's: the key's variable, the batch limits, the endpoints, the task
kinds it runs, a chat task's request body (where the system prompt goes, how a schema is
forced, a default max_tokens), how an answer is read (usage, text, structured output), the
real-time SDK client and the batch service. The SDKs' errors are translated into overnight's
kinds here, once (`sdk_failure`), for the real-time predictor, the batch services, the batch
runner and the job.

`PROVIDERS` is the registry, `provider(name)` the lookup; `BACKENDS` derives the job file's
LLM backends from it (`openai`, `openai-batch`, ..., `auto`). Nothing here imports an SDK
or another overnight module but `errors` at load time: `spec.py` reads the registry for its
vocabulary.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from ..errors import InvalidOutput

if TYPE_CHECKING:
    from .batch import BatchService
    from .requests import Answer

CHAT, EMBEDDINGS, MESSAGES = "/v1/chat/completions", "/v1/embeddings", "/v1/messages"
TOOL_NAME = "record_output"  # the one tool an Anthropic structured request forces


# -- the SDKs' errors, in overnight's words ---------------------------------------------------

FailureKind = Literal[
    "key_refused",  # 401: the key, not the request
    "forbidden",  # 403
    "out_of_quota",  # 429 insufficient_quota: the account is out of credit
    "throttled",  # 429
    "retryable",  # 408, 409, 5xx
    "client_error",  # any other 4xx: the request's own fault
    "timed_out",  # no answer in time, the server was reached
    "unreachable",  # refused, DNS, connect timeout, dropped connection
]


@dataclass(frozen=True)
class Failure:
    """An SDK error, translated: what overnight does about it depends on `kind`."""

    kind: FailureKind
    status: int | None = None  # the HTTP status; None when no answer came
    message: str = ""  # the SDK's words
    said: str | None = None  # the provider's own message, from the answer's error object
    cause: str = ""  # no answer: what stopped it ("connect timed out", "ConnectError: ...")
    headers: Any = None  # the answer's headers
    should_retry: bool | None = None  # the server's x-should-retry, where it says

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.headers)

    @property
    def retryable(self) -> bool:
        """Worth another try: throttling, conflicts, server errors, timeouts, lost connections."""
        return self.kind not in ("key_refused", "forbidden", "client_error")

    @property
    def may_have_acted(self) -> bool:
        """No answer, or a server error: the provider may have done what was asked (a
        proxy's 502 after the provider acted)."""
        return self.status is None or self.status >= 500


def retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait: retry-after-ms, then retry-after (secs or date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_kind(status: int, code: Any) -> FailureKind:
    if status == 401:
        return "key_refused"
    if status == 403:
        return "forbidden"
    if status == 429:
        return "out_of_quota" if code == "insufficient_quota" else "throttled"
    if status in (408, 409) or status >= 500:
        return "retryable"
    return "client_error"


def sdk_failure(exc: BaseException) -> Failure | None:
    """The error of an OpenAI or Anthropic SDK call (both SDKs have the same error classes),
    or None for anything else (a bug, a local file's error: not the provider's)."""
    status = getattr(exc, "status_code", None)
    if status is not None:  # APIStatusError
        headers = getattr(getattr(exc, "response", None), "headers", None)
        should = (headers.get("x-should-retry") or "").lower() if headers is not None else ""
        body = getattr(exc, "body", None)  # the provider's error object, or the whole answer
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            body = body["error"]
        said = body.get("message") if isinstance(body, dict) else None
        return Failure(
            _status_kind(status, getattr(exc, "code", None)),
            status,
            getattr(exc, "message", None) or str(exc),
            str(said) if said else None,
            headers=headers,
            should_retry={"true": True, "false": False}.get(should),
        )
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "APITimeoutError" in names:
        return transport_failure(exc, timeout=True, message=getattr(exc, "message", ""))
    if "APIConnectionError" in names:
        return transport_failure(exc, timeout=False, message=getattr(exc, "message", ""))
    return None


def transport_failure(exc: BaseException, *, timeout: bool, message: str = "") -> Failure:
    """No answer came: a timeout after the server was reached, or the server not reached."""
    cause = exc.__cause__
    if timeout:
        if type(cause).__name__ != "ConnectTimeout":  # a slow answer: the server is up
            return Failure("timed_out", message=message, cause="timed out")
        return Failure("unreachable", message=message, cause="connect timed out")
    detail = cause or exc
    return Failure("unreachable", message=message, cause=f"{type(detail).__name__}: {detail}")


# -- the providers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One provider's adapter. Subclasses give the request and answer shapes and the clients."""

    name: str  # its word in the job file: `backend = "<name>"`, `"<name>-batch"`, `provider`
    title: str  # its name in messages
    key_env: str  # the environment variable holding the key, unless [model] api_key_env
    max_requests: int  # in one batch (OpenAI-compatible servers differ: configurable)
    max_bytes: int
    chat_endpoint: str  # generate, extract, classify
    endpoints: tuple[str, ...]  # what a passthrough line may post to
    kinds: tuple[str, ...]  # the task kinds it runs
    base_url_path: str  # the SDK's base URL ends with it; request paths are relative to it
    starter_model: str  # the model `overnight init` names (priced in prices.toml)
    default_max_tokens: int | None = None  # the API requires max_tokens: used when unset

    # -- requests --------------------------------------------------------------------------

    def chat_body(
        self,
        model: str,
        user: str,
        system: str | None,
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        structured: str,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def repair_messages(self, answer: Answer, ask: str) -> list[dict[str, Any]]:
        """The turns that follow a request's messages to ask for a corrected answer."""
        raise NotImplementedError

    # -- answers ---------------------------------------------------------------------------

    def usage(self, body: dict[str, Any]) -> tuple[int, int]:
        """(input tokens, output tokens) of an answer body."""
        raise NotImplementedError

    def text(self, answer: Answer) -> str:
        raise NotImplementedError

    def structured(self, answer: Answer) -> Any:
        """The object a schema forced; InvalidOutput if there is none."""
        raise NotImplementedError

    def cut_off(self, body: dict[str, Any]) -> bool:
        """The model ran into max_tokens."""
        raise NotImplementedError

    def cut_note(self, body: dict[str, Any]) -> str:
        """Why an answer may be broken, for its error message."""
        return " (cut off at max_tokens)" if self.cut_off(body) else ""

    # -- clients ---------------------------------------------------------------------------

    def async_client(self, api_key: str, base_url: str | None, timeout: float) -> Any:
        """The SDK's async client, retrying nothing itself (`RealtimePredictor` retries)."""
        raise NotImplementedError

    def batch_service(
        self,
        *,
        api_key: str,
        base_url: str | None,
        max_requests: int,
        max_bytes: int,
        timeout: float,
        tmp_dir: Path | None,
    ) -> BatchService:
        raise NotImplementedError


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


class OpenAIProvider(Provider):
    """Chat completions (the system prompt is the first message; a schema goes as
    response_format), embeddings; the OpenAI SDK, whose base URL ends in /v1."""

    def chat_body(
        self,
        model: str,
        user: str,
        system: str | None,
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        structured: str,
    ) -> dict[str, Any]:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        body = {"model": model, "messages": messages, **params}
        if schema is not None and structured == "json_object":
            # llama.cpp's server (and other older OpenAI-compatible servers) take the schema
            # this way; it constrains the grammar the same.
            body["response_format"] = {"type": "json_object", "schema": schema}
        elif schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": schema, "strict": _strict_ok(schema)},
            }
        return body

    def repair_messages(self, answer: Answer, ask: str) -> list[dict[str, Any]]:
        try:
            said = self.text(answer)
        except InvalidOutput:
            said = ""
        return [{"role": "assistant", "content": said}, {"role": "user", "content": ask}]

    def usage(self, body: dict[str, Any]) -> tuple[int, int]:
        usage = body.get("usage") or {}
        tin = int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        tout = int(usage.get("completion_tokens") or usage.get("output_tokens") or 0)
        return tin, tout

    def text(self, answer: Answer) -> str:
        try:
            message = answer.body["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise InvalidOutput("chat answer has no choices[0].message", answer) from None
        if message.get("refusal"):
            raise InvalidOutput(f"the model refused: {message['refusal']}", answer)
        return message.get("content") or ""

    def structured(self, answer: Answer) -> Any:
        text = self.text(answer)
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            cut = self.cut_note(answer.body)
            raise InvalidOutput(f"not JSON{cut}: {text[:80]!r}", answer) from None

    def cut_off(self, body: dict[str, Any]) -> bool:
        choices = body.get("choices") or [{}]
        finish = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
        return finish == "length"

    def async_client(self, api_key: str, base_url: str | None, timeout: float) -> Any:
        import openai

        return openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
        )

    def batch_service(self, **kw: Any) -> BatchService:
        from .batch import OpenAIBatch

        return OpenAIBatch(**kw)


class AnthropicProvider(Provider):
    """Messages (the system prompt is a top-level field; a schema is the input of one tool
    the request forces; max_tokens is required); the Anthropic SDK, whose base URL is the
    host alone. No embeddings."""

    def chat_body(
        self,
        model: str,
        user: str,
        system: str | None,
        params: dict[str, Any],
        schema: dict[str, Any] | None,
        structured: str,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": user}]}
        if system:
            body["system"] = system
        body.update(params)
        if schema is not None:
            body["tools"] = [
                {
                    "name": TOOL_NAME,
                    "description": "Record the answer in the required structure.",
                    "input_schema": schema,
                }
            ]
            body["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
        return body

    def repair_messages(self, answer: Answer, ask: str) -> list[dict[str, Any]]:
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
        return [{"role": "assistant", "content": content}, {"role": "user", "content": reply}]

    def usage(self, body: dict[str, Any]) -> tuple[int, int]:
        usage = body.get("usage") or {}
        tin = (
            int(usage.get("input_tokens") or 0)
            + int(usage.get("cache_read_input_tokens") or 0)
            + int(usage.get("cache_creation_input_tokens") or 0)
        )
        return tin, int(usage.get("output_tokens") or 0)

    def text(self, answer: Answer) -> str:
        blocks = answer.body.get("content", [])
        return "".join(b.get("text", "") for b in blocks if b.get("type") == "text")

    def structured(self, answer: Answer) -> Any:
        reason = answer.body.get("stop_reason")
        if reason == "refusal":
            raise InvalidOutput("the model refused", answer)
        for block in answer.body.get("content", []):
            if block.get("type") == "tool_use":
                return block.get("input")
        raise InvalidOutput(f"no tool_use block in the answer (stop_reason {reason})", answer)

    def cut_off(self, body: dict[str, Any]) -> bool:
        return body.get("stop_reason") == "max_tokens"

    def async_client(self, api_key: str, base_url: str | None, timeout: float) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
        )

    def batch_service(self, **kw: Any) -> BatchService:
        from .batch import AnthropicBatch

        return AnthropicBatch(**kw)


OPENAI = OpenAIProvider(
    name="openai",
    title="OpenAI",
    key_env="OPENAI_API_KEY",
    max_requests=50_000,
    max_bytes=200 * 1024 * 1024,
    chat_endpoint=CHAT,
    endpoints=(CHAT, EMBEDDINGS, "/v1/completions", "/v1/responses", "/v1/moderations"),
    kinds=("generate", "extract", "classify", "embed", "passthrough"),
    base_url_path="/v1",
    starter_model="gpt-4.1-mini",
)
ANTHROPIC = AnthropicProvider(
    name="anthropic",
    title="Anthropic",
    key_env="ANTHROPIC_API_KEY",
    max_requests=100_000,
    max_bytes=256 * 1024 * 1024,
    chat_endpoint=MESSAGES,
    endpoints=(MESSAGES,),
    kinds=("generate", "extract", "classify", "passthrough"),
    base_url_path="",
    starter_model="claude-haiku-4-5",
    default_max_tokens=1024,
)
PROVIDERS: dict[str, Provider] = {p.name: p for p in (OPENAI, ANTHROPIC)}


def provider(name: str) -> Provider:
    try:
        return PROVIDERS[name]
    except KeyError:
        raise ValueError(f"no provider {name!r}: overnight knows {', '.join(PROVIDERS)}") from None


# -- the job file's LLM backends --------------------------------------------------------------

Mode = Literal["realtime", "batch", "auto"]


@dataclass(frozen=True)
class Backend:
    """An LLM `[model] backend`: whose API, and how it is sent."""

    provider: str | None  # None for auto: `[model] provider` names it
    mode: Mode  # realtime: one request at a time; batch: the batch API; auto: both


def _backends() -> dict[str, Backend]:
    table = {name: Backend(name, "realtime") for name in PROVIDERS}
    table.update({f"{name}-batch": Backend(name, "batch") for name in PROVIDERS})
    table["auto"] = Backend(None, "auto")
    return table


BACKENDS: dict[str, Backend] = _backends()
