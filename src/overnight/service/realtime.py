"""The real-time endpoints: `/v1/embeddings` and `/v1/chat/completions` (OpenAI's shapes) and
`/v1/messages` (Anthropic's), over serve.toml's models, micro-batched (microbatch.py).

- A python function gets each request as a line like a batch's (`custom_id`, `method`,
  `url`, `body`) and returns one value per line, so one function serves both APIs: the
  message content (a string as is, anything else as JSON), or for `/v1/embeddings` the
  vector (or a list of vectors).
- The local model embeds each string of `input` (a string or a list of strings); every
  string is one input of the micro-batch. Given `labels` in serve.toml it also classifies:
  `/v1/chat/completions` and `/v1/messages` answer with the label nearest the last user
  message (zero-shot, as a job's `[task] kind = "classify"`). Without labels those two
  endpoints refuse it with a 400.

Each model has its own batcher, made at its first request (the local model loads then).
Requests beyond the bounded queue get 429 with `Retry-After`; the batch API's jobs on the
same model wait between their commits while real-time requests are waiting or computed
(`wait_idle`, given to batches.Batches).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import math
import secrets
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batches import as_text, response_body
from .bodies import json_body
from .config import ServeConfig, ServedModel
from .microbatch import MicroBatcher, Overloaded

Call = Callable[[list[Any]], list[Any]]  # a model call: inputs -> one output per input
MAX_BODY = 8 * 1024 * 1024  # bytes of one real-time request's body

# Anthropic's error types by status; OpenAI's (type, code) by status.
_ANTHROPIC = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}
_OPENAI = {
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
}


class _Refused(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def _error(exc: _Refused, anthropic: bool) -> Response:
    if anthropic:
        kind = _ANTHROPIC.get(exc.status, "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": exc.message}}
    else:
        kind, code = _OPENAI.get(exc.status, ("server_error", None))
        body = {"error": {"message": exc.message, "type": kind, "param": exc.param, "code": code}}
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def _overloaded(exc: Overloaded, model: str) -> _Refused:
    seconds = max(exc.retry_after, 0.001)
    return _Refused(
        429,
        f"The queue of model {model!r} is full; retry after {seconds:.2f} s.",
        headers={
            "retry-after": str(max(1, math.ceil(seconds))),
            "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
        },
    )


async def _body(request: Request) -> dict[str, Any]:
    body = await json_body(request, MAX_BODY, _Refused)
    if not isinstance(body, dict):
        raise _Refused(400, "The body must be a JSON object.")
    return body


def _text_of(messages: Any) -> str:
    """The last user message's text (a string, or the text of its text parts)."""
    if not isinstance(messages, list) or not messages:
        raise _Refused(400, "messages: a non-empty list of messages", "messages")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = [
                    p["text"]
                    for p in content
                    if isinstance(p, dict)
                    and p.get("type") == "text"
                    and isinstance(p.get("text"), str)
                ]
                if parts:
                    return "\n".join(parts)
            break
    raise _Refused(400, "messages: the last user message has no text to classify", "messages")


class Realtime:
    """The batchers of one server's models, and the routes that feed them."""

    def __init__(
        self, config: ServeConfig, observe: Callable[[str, int, float], None] | None = None
    ) -> None:
        """`observe(model, n, seconds)`: each model call's size and duration, for /metrics."""
        self.config = config
        self._observe = observe
        self.intake = config.spec.intake
        self._batchers: dict[str, MicroBatcher] = {}
        self._heads: dict[str, Any] = {}
        self._lock = threading.Lock()

    def batcher(self, name: str) -> MicroBatcher:
        with self._lock:
            found = self._batchers.get(name)
            if found is None:
                found = self._batchers[name] = MicroBatcher(
                    name,
                    self._loader(name, self.config.models[name]),
                    self.intake.max_batch_size,
                    self.intake.max_wait_ms,
                    self.intake.max_queue,
                    None if self._observe is None else functools.partial(self._observe, name),
                )
            return found

    def queue_depths(self) -> dict[str, int]:
        """Inputs waiting per model (the /metrics gauge, read at each scrape)."""
        return {name: b.queued() for name, b in self.batchers().items()}

    def batchers(self) -> dict[str, MicroBatcher]:
        with self._lock:
            return dict(self._batchers)

    def _loader(
        self, name: str, model: ServedModel
    ) -> Callable[[], Callable[[list[Any]], list[Any]]]:
        base_dir = self.config.base_dir

        def python() -> Callable[[list[Any]], list[Any]]:
            from ..backends.python import PythonFunction, load_function

            fn = PythonFunction(load_function(model.function or "", base_dir))
            return lambda lines: fn.process(lines, len(lines))

        def local() -> Callable[[list[Any]], list[Any]]:
            from ..backends.local import LocalModel

            encoder = LocalModel(model.name or "all-MiniLM-L6-v2", device=model.device)
            if model.labels is not None:
                from ..backends.classify_head import ClassifierHead

                self._heads[name] = ClassifierHead.zero_shot(encoder, model.label_descriptions())
            encoder.embed(["warm up"])  # the first call pays for lazy initialisation
            # A micro-batch is encoded sorted by length, in sub-batches of at most [run]
            # batch_size when it is a number (less padding than one batch of mixed lengths),
            # else whole. The sub-batches are of equal size: 34 texts as 17 + 17 ran at 230
            # texts/s, as 32 + 2 at 184 (all-MiniLM-L6-v2, 2 cores), a small batch's fixed
            # cost paid for two texts.
            size = self.config.spec.run.batch_size
            if not isinstance(size, int):
                return lambda texts: list(encoder.embed(texts))

            def embed(texts: list[Any]) -> list[Any]:
                parts = -(-len(texts) // size)  # ceil
                return list(encoder.embed(texts, batch_size=-(-len(texts) // max(parts, 1))))

            return embed

        return python if model.backend == "python" else local

    def wait_idle(self, model: str, stop: threading.Event) -> None:
        """For the batch API's jobs: returns once real-time work on `model` is quiet (or the
        server stops)."""
        batcher = self.batchers().get(model)
        if batcher is None:
            return
        while not stop.is_set() and not batcher.wait_idle(0.5):
            pass

    def close(self) -> None:
        for batcher in self.batchers().values():
            batcher.close()

    # -- the routes ---------------------------------------------------------------------

    def routes(self, tenant: Callable[[Request], str]) -> list[Route]:
        def model_of(body: dict[str, Any], anthropic: bool) -> tuple[str, ServedModel]:
            name = body.get("model")
            if not isinstance(name, str) or not name:
                raise _Refused(400, "model: required (a string)", "model")
            model = self.config.models.get(name)
            if model is None:
                message = (
                    f"model: {name}"
                    if anthropic
                    else f"The model `{name}` does not exist or you do not have access to it."
                )
                raise _Refused(404, message, "model")
            if model.backend not in ("local", "python"):
                raise _Refused(
                    400,
                    f"model {name!r} (backend {model.backend!r}) is served through batches"
                    " here (/v1/batches, /v1/messages/batches)",
                    "model",
                )
            return name, model

        async def compute(name: str, inputs: list[Any]) -> list[Any]:
            try:
                future = self.batcher(name).submit(inputs)
            except Overloaded as exc:
                raise _overloaded(exc, name) from None
            try:
                return await asyncio.wrap_future(future)
            except Exception as exc:
                raise _Refused(
                    500, f"The model {name!r} failed: {type(exc).__name__}: {exc}"
                ) from None

        def line(url: str, body: dict[str, Any]) -> dict[str, Any]:
            return {
                "custom_id": "rt_" + secrets.token_hex(8),
                "method": "POST",
                "url": url,
                "body": body,
            }

        async def classify(name: str, model: ServedModel, messages: Any, endpoint: str) -> str:
            if model.labels is None:
                raise _Refused(
                    400,
                    f"model {name!r} is the local embedding model: it serves /v1/embeddings;"
                    f" give it `labels` in serve.toml to classify through {endpoint}",
                    "model",
                )
            (vector,) = await compute(name, [_text_of(messages)])
            label, _ = self._heads[name].predict(np.asarray([vector]))[0]
            return str(label)

        def endpoint(
            handler: Callable[[Request, dict[str, Any]], Any], anthropic: bool = False
        ) -> Callable[[Request], Any]:
            async def route(request: Request) -> Response:
                tenant(request)  # 401 without a key (app.py's error shapes)
                try:
                    answer = await handler(request, await _body(request))
                except _Refused as exc:
                    return _error(exc, anthropic)
                return Response(
                    orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json",
                )

            return route

        async def embeddings(request: Request, body: dict[str, Any]) -> dict[str, Any]:
            name, model = model_of(body, anthropic=False)
            fmt = body.get("encoding_format", "float")
            if fmt not in ("float", "base64"):
                raise _Refused(400, "encoding_format: 'float' or 'base64'", "encoding_format")
            given = body.get("input")
            texts = [given] if isinstance(given, str) else given
            if (
                not isinstance(texts, list)
                or not texts
                or not all(isinstance(t, str) and t for t in texts)
            ):
                raise _Refused(
                    400, "input: a non-empty string, or a list of non-empty strings", "input"
                )
            if len(texts) > self.intake.max_queue:
                raise _Refused(
                    400, f"input: at most {self.intake.max_queue} strings in one request", "input"
                )
            if model.backend == "local":
                vectors = await compute(name, texts)
            else:
                (output,) = await compute(name, [line("/v1/embeddings", body)])
                vectors = output if _is_matrix(output) else [output]
            dims = body.get("dimensions")
            if dims is not None and vectors and dims != len(vectors[0]):
                raise _Refused(
                    400, f"dimensions: model {name!r} gives {len(vectors[0])}", "dimensions"
                )
            return {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": _vector(v, fmt)}
                    for i, v in enumerate(vectors)
                ],
                "model": name,
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }

        async def chat(request: Request, body: dict[str, Any]) -> dict[str, Any]:
            name, model = model_of(body, anthropic=False)
            if body.get("stream"):
                raise _Refused(400, "stream: not served here; ask without it", "stream")
            if model.backend == "local":
                output: Any = await classify(
                    name, model, body.get("messages"), "/v1/chat/completions"
                )
            else:
                if not isinstance(body.get("messages"), list):
                    raise _Refused(400, "messages: a list of messages", "messages")
                (output,) = await compute(name, [line("/v1/chat/completions", body)])
            rid = "rt_" + secrets.token_hex(12)
            return response_body({"id": rid, "endpoint": "/v1/chat/completions"}, rid, name, output)

        async def messages(request: Request, body: dict[str, Any]) -> dict[str, Any]:
            name, model = model_of(body, anthropic=True)
            max_tokens = body.get("max_tokens")
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
                raise _Refused(400, "max_tokens: a whole number of at least 1")
            if body.get("stream"):
                raise _Refused(400, "stream: not served here; ask without it")
            if model.backend == "local":
                output: Any = await classify(name, model, body.get("messages"), "/v1/messages")
            else:
                if not isinstance(body.get("messages"), list):
                    raise _Refused(400, "messages: a list of messages")
                (output,) = await compute(name, [line("/v1/messages", body)])
            return {
                "id": "msg_" + secrets.token_hex(12),
                "type": "message",
                "role": "assistant",
                "model": name,
                "content": [{"type": "text", "text": as_text(output)}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }

        return [
            Route("/v1/embeddings", endpoint(embeddings), methods=["POST"]),
            Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
            Route("/v1/messages", endpoint(messages, anthropic=True), methods=["POST"]),
        ]


def _is_matrix(output: Any) -> bool:
    return (
        isinstance(output, list)
        and len(output) > 0
        and all(isinstance(v, list | tuple | np.ndarray) for v in output)
    )


def _vector(v: Any, fmt: str) -> Any:
    if fmt == "base64":
        return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
    return np.asarray(v, dtype=np.float32)
