"""A faithful local fake of the OpenAI and Anthropic APIs, over real HTTP on loopback.

Tests and benchmarks point the official SDKs at it, so they exercise the real wire protocol:
chat completions, embeddings, Anthropic messages, files, batches and message batches, in the
shapes of `shared/specs/provider-batch-apis.md`. Knobs inject latency, rate limits (429 with
retry-after), 500s, hangs, malformed bodies, invalid structured answers, batches that expire
half done and whole-batch validation failures. Answers are deterministic.

    with FakeProvider(Knobs(latency=0.05)) as fake:
        client = openai.OpenAI(base_url=fake.openai_url, api_key="test")

Or as a server: `python -m overnight.testing.fake_provider --port 8000`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import itertools
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ANTHROPIC_ID = __import__("re").compile(r"^[a-zA-Z0-9_-]{1,64}$")
FINISHED = ("completed", "failed", "expired", "cancelled")


@dataclass
class Knobs:
    """Faults and timing; every field may be changed while the server runs."""

    latency: float = 0.0  # seconds per real-time request
    rpm_limit: int | None = None  # real-time requests per minute, sliding window; over → 429
    throttle_next: int = 0  # the next N real-time requests get 429 with retry-after ...
    throttle_seconds: float = 0.2  # ... this long
    fail_rate: float = 0.0  # fraction of real-time requests answered 500 (seeded)
    fail_next: int = 0  # the next N real-time requests get a 500
    timeout_next: int = 0  # the next N real-time requests hang `hang_seconds` first
    hang_seconds: float = 5.0
    malformed_next: int = 0  # the next N answer 200 with a body that is not JSON
    invalid_json_rate: float = 0.0  # structured answers that break the schema (by hash)
    batch_seconds: float = 0.5  # how long a batch runs before it ends
    expire_batches: bool = False  # batches end expired instead of completed
    expire_fraction: float = 0.5  # of an expired batch, the part that finished
    fail_validation: bool = False  # the next OpenAI batch fails validation as a whole
    max_batch_bytes: int | None = None  # Anthropic create body / OpenAI upload over → 413
    max_batch_requests: int | None = None  # more requests in one batch → 400
    require_key: str | None = None  # requests without this key get 401


@dataclass
class Stats:
    requests: collections.Counter = field(default_factory=collections.Counter)  # by endpoint
    status_counts: collections.Counter = field(default_factory=collections.Counter)
    batch_creations: int = 0
    batch_items: collections.Counter = field(default_factory=collections.Counter)  # custom_id
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    rate_limited: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def bump(self, counter: str, key: Any, n: int = 1) -> None:
        with self.lock:
            getattr(self, counter)[key] += n


# -- deterministic answers ----------------------------------------------------------------


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        return _resolve(node, root)
    return schema


def instance(schema: dict[str, Any], seed: str, root: dict[str, Any] | None = None) -> Any:
    """A value valid against `schema`, chosen deterministically from `seed`."""
    root = root or schema
    schema = _resolve(schema, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return instance(schema[key][0], seed, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][_digest(seed) % len(schema["enum"])]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: instance(v, f"{seed}/{k}", root) for k, v in props.items()}
    if kind == "array":
        item = schema.get("items", {"type": "string"})
        return [instance(item, f"{seed}/0", root) for _ in range(max(1, schema.get("minItems", 1)))]
    if kind == "string":
        return f"value {_digest(seed) % 1000}"
    if kind == "integer":
        return max(schema.get("minimum", 0), _digest(seed) % 100)
    if kind == "number":
        return float(max(schema.get("minimum", 0), _digest(seed) % 100)) / 2
    if kind == "boolean":
        return bool(_digest(seed) % 2)
    return None


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            parts = []
            for block in content or []:
                if block.get("type") == "text":
                    parts.append(block.get("text", ""))
                elif block.get("type") == "tool_result":
                    inner = block.get("content")
                    parts.append(inner if isinstance(inner, str) else str(inner))
            return " ".join(parts)
    return ""


def _structured(schema: dict[str, Any], prompt: str, invalid_rate: float) -> tuple[Any, bool]:
    """The structured answer, and whether it was deliberately broken. A follow-up that quotes
    a validation error (a repair) always gets a valid answer."""
    repair = "invalid" in prompt.lower() or "validation" in prompt.lower()
    broken = not repair and invalid_rate > 0 and (_digest(prompt) % 10_000) < invalid_rate * 10_000
    if broken:
        return {"unexpected": "field"}, True
    return instance(schema, prompt), False


# -- the server -----------------------------------------------------------------------------


class _Error(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def _now_rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


class FakeProvider:
    def __init__(self, knobs: Knobs | None = None, host: str = "127.0.0.1", port: int = 0):
        self.knobs = knobs or Knobs()
        self.stats = Stats()
        self.host = host
        self.port = port or _free_port(host)
        self._lock = threading.Lock()
        self._rng = random.Random(1234)
        self._window: collections.deque[float] = collections.deque()
        self._files: dict[str, dict[str, Any]] = {}
        self._file_data: dict[str, bytes] = {}
        self._batches: dict[str, dict[str, Any]] = {}  # OpenAI
        self._abatches: dict[str, dict[str, Any]] = {}  # Anthropic
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(routes=self._routes())

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def openai_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeProvider:
        config = uvicorn.Config(
            self.app, host=self.host, port=self.port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="fake")
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def complete_batches(self) -> None:
        """End every live batch now (its results are computed at the next read)."""
        with self._lock:
            for b in [*self._batches.values(), *self._abatches.values()]:
                b["_ends_at"] = 0.0

    # -- plumbing -----------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        r = self._wrap
        return [
            Route("/v1/chat/completions", r(self.chat, "openai", True), methods=["POST"]),
            Route("/v1/embeddings", r(self.embeddings, "openai", True), methods=["POST"]),
            Route("/v1/messages", r(self.messages, "anthropic", True), methods=["POST"]),
            Route("/v1/files", r(self.upload, "openai"), methods=["POST"]),
            Route("/v1/files", r(self.list_files, "openai"), methods=["GET"]),
            Route("/v1/files/{id}", r(self.get_file, "openai"), methods=["GET"]),
            Route("/v1/files/{id}", r(self.delete_file, "openai"), methods=["DELETE"]),
            Route("/v1/files/{id}/content", r(self.file_content, "openai"), methods=["GET"]),
            Route("/v1/batches", r(self.create_batch, "openai"), methods=["POST"]),
            Route("/v1/batches", r(self.list_batches, "openai"), methods=["GET"]),
            Route("/v1/batches/{id}", r(self.get_batch, "openai"), methods=["GET"]),
            Route("/v1/batches/{id}/cancel", r(self.cancel_batch, "openai"), methods=["POST"]),
            Route("/v1/messages/batches", r(self.a_create, "anthropic"), methods=["POST"]),
            Route("/v1/messages/batches", r(self.a_list, "anthropic"), methods=["GET"]),
            Route("/v1/messages/batches/{id}", r(self.a_get, "anthropic"), methods=["GET"]),
            Route("/v1/messages/batches/{id}", r(self.a_delete, "anthropic"), methods=["DELETE"]),
            Route(
                "/v1/messages/batches/{id}/results", r(self.a_results, "anthropic"), methods=["GET"]
            ),
            Route(
                "/v1/messages/batches/{id}/cancel", r(self.a_cancel, "anthropic"), methods=["POST"]
            ),
        ]

    def _wrap(self, handler: Any, provider: str, realtime: bool = False) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                self._auth(request, provider)
                if realtime:
                    self.stats.bump("requests", request.url.path)
                    fault = await self._faults(provider)
                    if fault is not None:
                        self.stats.bump("status_counts", fault.status_code)
                        return fault
                response = await handler(request)
            except _Error as exc:
                response = self._error(provider, exc)
            self.stats.bump("status_counts", response.status_code)
            return response

        return endpoint

    def _auth(self, request: Request, provider: str) -> None:
        key = self.knobs.require_key
        if key is None:
            return
        got = request.headers.get("x-api-key") or request.headers.get(
            "authorization", ""
        ).removeprefix("Bearer ")
        if got != key:
            kind = "authentication_error" if provider == "anthropic" else "invalid_api_key"
            raise _Error(
                401,
                kind,
                "invalid x-api-key" if provider == "anthropic" else "Incorrect API key provided.",
            )

    @staticmethod
    def _error(provider: str, exc: _Error) -> Response:
        if provider == "anthropic":
            body: dict[str, Any] = {
                "type": "error",
                "error": {"type": exc.kind, "message": exc.message},
                "request_id": "req_fake",
            }
        else:
            body = {
                "error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.kind}
            }
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    async def _faults(self, provider: str) -> Response | None:
        k = self.knobs
        with self._lock:
            now = time.monotonic()
            if k.rpm_limit is not None:
                while self._window and now - self._window[0] >= 60.0:
                    self._window.popleft()
                if len(self._window) >= k.rpm_limit:
                    wait = max(0.001, 60.0 - (now - self._window[0]))
                    self.stats.rate_limited += 1
                    headers = {
                        "retry-after-ms": str(int(wait * 1000)),
                        "retry-after": f"{wait:.3f}",
                    }
                    return self._error(
                        provider,
                        _Error(429, "rate_limit_error", "Rate limit reached (rpm)", headers),
                    )
                self._window.append(now)
            if k.throttle_next > 0:
                k.throttle_next -= 1
                self.stats.rate_limited += 1
                wait = k.throttle_seconds
                headers = {"retry-after-ms": str(int(wait * 1000)), "retry-after": f"{wait:.3f}"}
                return self._error(
                    provider, _Error(429, "rate_limit_error", "Rate limit reached", headers)
                )
            fail = k.fail_next > 0 or (k.fail_rate > 0 and self._rng.random() < k.fail_rate)
            if k.fail_next > 0:
                k.fail_next -= 1
            hang = k.timeout_next > 0
            if hang:
                k.timeout_next -= 1
            malformed = k.malformed_next > 0
            if malformed:
                k.malformed_next -= 1
        if hang:
            await asyncio.sleep(k.hang_seconds)
        if k.latency:
            await asyncio.sleep(k.latency)
        if fail:
            kind = "api_error" if provider == "anthropic" else "server_error"
            return self._error(provider, _Error(500, kind, "The server had an error"))
        if malformed:
            return Response(
                b"<html>502 Bad Gateway</html>", status_code=200, media_type="application/json"
            )
        return None

    async def _json(self, request: Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise _Error(400, "invalid_request_error", "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Error(400, "invalid_request_error", "body must be a JSON object")
        return body

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):08d}{_digest(str(time.time())) % 10**6:06d}"

    # -- real-time answers (also used to run batches) ----------------------------------

    def answer_chat(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not body.get("model") or not isinstance(body.get("messages"), list):
            return 400, {
                "error": {
                    "message": "'model' and 'messages' are required",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        if body["model"] == "missing-model":
            return 404, {
                "error": {
                    "message": "The model `missing-model` does not exist",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "model_not_found",
                }
            }
        prompt = _last_user_text(body["messages"])
        fmt = body.get("response_format") or {}
        finish = "stop"
        if fmt.get("type") in ("json_schema", "json_object"):
            schema = (fmt.get("json_schema") or {}).get("schema") or fmt.get("schema") or {}
            value, _ = _structured(schema, prompt, self.knobs.invalid_json_rate)
            content = orjson.dumps(value).decode()
        else:
            content = "echo: " + prompt[:60]
            limit = body.get("max_tokens") or body.get("max_completion_tokens")
            if limit and _tokens(content) > limit:
                content, finish = content[: limit * 4], "length"
        pin = sum(_tokens(str(m.get("content", ""))) + 4 for m in body["messages"])
        pout = _tokens(content)
        return 200, {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish,
                    "logprobs": None,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                }
            ],
            "usage": {"prompt_tokens": pin, "completion_tokens": pout, "total_tokens": pin + pout},
        }

    def answer_embeddings(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        inputs = body.get("input")
        if not body.get("model") or inputs is None:
            return 400, {
                "error": {
                    "message": "'model' and 'input' are required",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        dim = int(body.get("dimensions") or 8)
        data = []
        for i, text in enumerate(texts):
            rng = random.Random(_digest(str(text)))
            vec = [rng.gauss(0, 1) for _ in range(dim)]
            norm = sum(v * v for v in vec) ** 0.5 or 1.0
            data.append({"object": "embedding", "index": i, "embedding": [v / norm for v in vec]})
        tokens = sum(_tokens(str(t)) for t in texts)
        return 200, {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def answer_message(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        def err(status: int, kind: str, msg: str) -> tuple[int, dict[str, Any]]:
            return status, {"type": "error", "error": {"type": kind, "message": msg}}

        if not body.get("model") or not isinstance(body.get("messages"), list):
            return err(400, "invalid_request_error", "model and messages: Field required")
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return err(400, "invalid_request_error", "max_tokens: Field required (>= 1)")
        if body["model"] == "missing-model":
            return err(404, "not_found_error", "model: missing-model")
        prompt = _last_user_text(body["messages"])
        tools = body.get("tools") or []
        choice = body.get("tool_choice") or {}
        stop = "end_turn"
        if tools and choice.get("type") == "tool":
            tool = next((t for t in tools if t.get("name") == choice.get("name")), tools[0])
            value, _ = _structured(
                tool.get("input_schema", {}), prompt, self.knobs.invalid_json_rate
            )
            content = [
                {
                    "type": "tool_use",
                    "id": self._new_id("toolu_"),
                    "name": tool["name"],
                    "input": value,
                }
            ]
            out_tokens = _tokens(orjson.dumps(value).decode())
            stop = "tool_use"
        else:
            text = "echo: " + prompt[:60]
            if _tokens(text) > body["max_tokens"]:
                text, stop = text[: body["max_tokens"] * 4], "max_tokens"
            content = [{"type": "text", "text": text}]
            out_tokens = _tokens(text)
        system = body.get("system") or ""
        pin = _tokens(str(system)) + sum(
            _tokens(str(m.get("content", ""))) + 4 for m in body["messages"]
        )
        return 200, {
            "id": self._new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": pin, "output_tokens": out_tokens},
        }

    async def chat(self, request: Request) -> Response:
        status, body = self.answer_chat(await self._json(request))
        return JSONResponse(body, status, headers={"x-request-id": self._new_id("req_")})

    async def embeddings(self, request: Request) -> Response:
        status, body = self.answer_embeddings(await self._json(request))
        return JSONResponse(body, status, headers={"x-request-id": self._new_id("req_")})

    async def messages(self, request: Request) -> Response:
        status, body = self.answer_message(await self._json(request))
        return JSONResponse(body, status, headers={"request-id": self._new_id("req_")})

    # -- OpenAI files ---------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        form = await request.form(max_part_size=1 << 31)
        upload = form.get("file")
        purpose = form.get("purpose")
        if upload is None or isinstance(upload, str) or not purpose:
            raise _Error(400, "invalid_request_error", "'file' and 'purpose' are required")
        data = await upload.read()
        limit = self.knobs.max_batch_bytes
        if limit is not None and len(data) > limit:
            raise _Error(413, "request_too_large", f"file is {len(data)} bytes, over {limit}")
        if purpose == "batch" and not str(upload.filename or "").endswith(".jsonl"):
            raise _Error(
                400, "invalid_request_error", "Invalid file format for Batch API. Must be .jsonl"
            )
        fid = self._new_id("file-")
        obj = self._file_object(fid, str(upload.filename), str(purpose), len(data))
        with self._lock:
            self._files[fid], self._file_data[fid] = obj, data
            self.stats.files_uploaded += 1
            self.stats.bytes_uploaded += len(data)
        return JSONResponse(obj)

    @staticmethod
    def _file_object(fid: str, name: str, purpose: str, size: int) -> dict[str, Any]:
        return {
            "id": fid,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }

    def _file(self, fid: str) -> dict[str, Any]:
        if fid not in self._files:
            raise _Error(404, "invalid_request_error", f"No such File object: {fid}")
        return self._files[fid]

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(self._file(request.path_params["id"]))

    async def delete_file(self, request: Request) -> Response:
        fid = request.path_params["id"]
        self._file(fid)
        with self._lock:
            self._files.pop(fid, None)
            self._file_data.pop(fid, None)
        return JSONResponse({"id": fid, "object": "file", "deleted": True})

    async def list_files(self, request: Request) -> Response:
        files = sorted(self._files.values(), key=lambda f: f["id"], reverse=True)
        return JSONResponse(
            {
                "object": "list",
                "data": files,
                "has_more": False,
                "first_id": files[0]["id"] if files else None,
                "last_id": files[-1]["id"] if files else None,
            }
        )

    async def file_content(self, request: Request) -> Response:
        fid = request.path_params["id"]
        self._file(fid)
        return Response(self._file_data[fid], media_type="application/octet-stream")

    # -- OpenAI batches -------------------------------------------------------------------

    async def create_batch(self, request: Request) -> Response:
        body = await self._json(request)
        for key in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(key):
                raise _Error(400, "invalid_request_error", f"Missing required parameter: {key}")
        if body["completion_window"] != "24h":
            raise _Error(400, "invalid_request_error", "completion_window must be '24h'")
        fid = body["input_file_id"]
        self._file(fid)
        meta = body.get("metadata") or None
        if meta is not None and (len(meta) > 16 or any(len(str(v)) > 512 for v in meta.values())):
            raise _Error(400, "invalid_request_error", "metadata: at most 16 pairs of <=512 chars")
        lines, errors = self._validate_file(self._file_data[fid], body["endpoint"])
        if self.knobs.max_batch_requests and len(lines) > self.knobs.max_batch_requests:
            raise _Error(
                400,
                "invalid_request_error",
                f"too many requests: {len(lines)} > {self.knobs.max_batch_requests}",
            )
        fail = self.knobs.fail_validation
        if fail:
            self.knobs.fail_validation = False
            if not errors:
                errors = [
                    {
                        "code": "invalid_request",
                        "line": 1,
                        "param": "body",
                        "message": "request line 1 is invalid (injected)",
                    }
                ]
        now = int(time.time())
        bid = self._new_id("batch_")
        with self._lock:
            self.stats.batch_creations += 1
            for line in lines:
                self.stats.batch_items[line.get("custom_id")] += 1
        batch: dict[str, Any] = {
            "id": bid,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": fid,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": meta,
            "model": lines[0]["body"].get("model") if lines else None,
            "usage": None,
            "_lines": lines,
            "_ends_at": time.monotonic() + self.knobs.batch_seconds,
            "_expire": self.knobs.expire_batches,
            "_errors": errors,
        }
        with self._lock:
            self._batches[bid] = batch
        return JSONResponse(self._public(batch))

    @staticmethod
    def _validate_file(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
        lines: list[dict] = []
        errors: list[dict] = []
        seen: set[str] = set()
        models: set[str] = set()
        for n, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                errors.append(
                    {
                        "code": "invalid_json_line",
                        "line": n,
                        "param": None,
                        "message": f"line {n} is not valid JSON",
                    }
                )
                continue
            cid = line.get("custom_id")
            if cid in seen:
                errors.append(
                    {
                        "code": "duplicate_custom_id",
                        "line": n,
                        "param": "custom_id",
                        "message": f"duplicate custom_id {cid!r}",
                    }
                )
            seen.add(cid)
            if line.get("url") != endpoint:
                errors.append(
                    {
                        "code": "url_mismatch",
                        "line": n,
                        "param": "url",
                        "message": f"url {line.get('url')!r} != endpoint {endpoint!r}",
                    }
                )
            models.add(str((line.get("body") or {}).get("model")))
            if len(models) > 1:
                errors.append(
                    {
                        "code": "model_mismatch",
                        "line": n,
                        "param": "body.model",
                        "message": "all requests in a batch must use one model",
                    }
                )
            lines.append(line)
        if not lines and not errors:
            errors.append(
                {
                    "code": "empty_file",
                    "line": None,
                    "param": None,
                    "message": "the input file is empty",
                }
            )
        return lines, errors

    @staticmethod
    def _public(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _advance(self, batch: dict[str, Any]) -> None:
        """Move an OpenAI batch along its life: validating → in_progress → completed/expired."""
        if batch["status"] in FINISHED:
            return
        now = int(time.time())
        if batch["status"] == "validating":
            if batch["_errors"]:
                batch.update(
                    status="failed",
                    failed_at=now,
                    errors={"object": "list", "data": batch["_errors"]},
                )
                return
            batch.update(status="in_progress", in_progress_at=now)
        if batch["status"] == "cancelling":
            self._finish_openai(batch, "cancelled", len(batch["_lines"]) // 2)
            return
        if time.monotonic() >= batch["_ends_at"]:
            if batch["_expire"]:
                done = int(len(batch["_lines"]) * self.knobs.expire_fraction)
                self._finish_openai(batch, "expired", done)
            else:
                self._finish_openai(batch, "completed", len(batch["_lines"]))

    def _finish_openai(self, batch: dict[str, Any], status: str, done: int) -> None:
        outputs: list[bytes] = []
        errors: list[bytes] = []
        tin = tout = 0
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        for i, line in enumerate(batch["_lines"]):
            rid = self._new_id("batch_req_")
            if i >= done:
                errors.append(
                    orjson.dumps(
                        {
                            "id": rid,
                            "custom_id": line["custom_id"],
                            "response": None,
                            "error": {
                                "code": code,
                                "message": f"This request could not be executed "
                                f"before the batch was {status}.",
                            },
                        }
                    )
                )
                continue
            if batch["endpoint"] == "/v1/embeddings":
                st, body = self.answer_embeddings(line.get("body") or {})
            else:
                st, body = self.answer_chat(line.get("body") or {})
            rec = {
                "id": rid,
                "custom_id": line["custom_id"],
                "response": {"status_code": st, "request_id": self._new_id("req_"), "body": body},
                "error": None,
            }
            if st == 200:
                usage = body.get("usage", {})
                tin += usage.get("prompt_tokens", 0)
                tout += usage.get("completion_tokens", 0)
                outputs.append(orjson.dumps(rec))
            else:
                errors.append(orjson.dumps(rec))
        random.Random(batch["id"]).shuffle(outputs)  # the output file is not in input order
        now = int(time.time())
        out_id = err_id = None
        if outputs:
            out_id = self._store_output(batch["id"] + "_output.jsonl", outputs)
        if errors:
            err_id = self._store_output(batch["id"] + "_error.jsonl", errors)
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[
            status
        ]
        batch.update(
            status=status,
            output_file_id=out_id,
            error_file_id=err_id,
            finalizing_at=now,
            **{stamp: now},
            request_counts={
                "total": len(batch["_lines"]),
                "completed": len(outputs),
                "failed": len(errors),
            },
            usage={
                "input_tokens": tin,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": tout,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": tin + tout,
            },
        )

    def _store_output(self, name: str, lines: list[bytes]) -> str:
        fid = self._new_id("file-")
        data = b"".join(x + b"\n" for x in lines)
        self._files[fid] = self._file_object(fid, name, "batch_output", len(data))
        self._file_data[fid] = data
        return fid

    def _batch(self, bid: str) -> dict[str, Any]:
        batch = self._batches.get(bid)
        if batch is None:
            raise _Error(404, "invalid_request_error", f"No batch found with id '{bid}'.")
        return batch

    async def get_batch(self, request: Request) -> Response:
        with self._lock:
            batch = self._batch(request.path_params["id"])
            self._advance(batch)
            return JSONResponse(self._public(batch))

    async def cancel_batch(self, request: Request) -> Response:
        with self._lock:
            batch = self._batch(request.path_params["id"])
            self._advance(batch)
            if batch["status"] in ("validating", "in_progress"):
                batch.update(status="cancelling", cancelling_at=int(time.time()))
            return JSONResponse(self._public(batch))

    async def list_batches(self, request: Request) -> Response:
        limit = int(request.query_params.get("limit", 20))
        after = request.query_params.get("after")
        with self._lock:
            for b in self._batches.values():
                self._advance(b)
            items = sorted(self._batches.values(), key=lambda b: b["id"], reverse=True)
        if after:
            items = [b for b in items if b["id"] < after]
        page = [self._public(b) for b in items[:limit]]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "has_more": len(items) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    # -- Anthropic message batches --------------------------------------------------------

    async def a_create(self, request: Request) -> Response:
        raw = await request.body()
        limit = self.knobs.max_batch_bytes
        if limit is not None and len(raw) > limit:
            raise _Error(413, "request_too_large", f"request is {len(raw)} bytes, over {limit}")
        body = await self._json(request)
        reqs = body.get("requests")
        if not isinstance(reqs, list) or not 1 <= len(reqs) <= 100_000:
            raise _Error(400, "invalid_request_error", "requests: 1 to 100,000 items")
        if self.knobs.max_batch_requests and len(reqs) > self.knobs.max_batch_requests:
            raise _Error(400, "invalid_request_error", "requests: too many")
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id")
            if not isinstance(cid, str) or not ANTHROPIC_ID.match(cid):
                raise _Error(
                    400,
                    "invalid_request_error",
                    f"requests.{i}.custom_id: String should match pattern "
                    "'^[a-zA-Z0-9_-]{1,64}$'",
                )
            if cid in seen:
                raise _Error(400, "invalid_request_error", f"duplicate custom_id {cid!r}")
            seen.add(cid)
        now = time.time()
        bid = self._new_id("msgbatch_")
        with self._lock:
            self.stats.batch_creations += 1
            for r in reqs:
                self.stats.batch_items[r["custom_id"]] += 1
            self._abatches[bid] = {
                "id": bid,
                "type": "message_batch",
                "processing_status": "in_progress",
                "request_counts": {
                    "processing": len(reqs),
                    "succeeded": 0,
                    "errored": 0,
                    "canceled": 0,
                    "expired": 0,
                },
                "ended_at": None,
                "created_at": _now_rfc3339(now),
                "expires_at": _now_rfc3339(now + 86400),
                "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": None,
                "_requests": reqs,
                "_ends_at": time.monotonic() + self.knobs.batch_seconds,
                "_expire": self.knobs.expire_batches,
                "_results": None,
                "_created": now,
            }
            return JSONResponse(self._public(self._abatches[bid]))

    def _a_advance(self, b: dict[str, Any]) -> None:
        if b["processing_status"] == "ended":
            return
        if b["processing_status"] == "canceling":
            self._a_finish(b, "canceled", len(b["_requests"]) // 2)
        elif time.monotonic() >= b["_ends_at"]:
            n = len(b["_requests"])
            if b["_expire"]:
                self._a_finish(b, "expired", int(n * self.knobs.expire_fraction))
            else:
                self._a_finish(b, None, n)

    def _a_finish(self, b: dict[str, Any], rest: str | None, done: int) -> None:
        results: list[bytes] = []
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for i, r in enumerate(b["_requests"]):
            if i >= done and rest is not None:
                result: dict[str, Any] = {"type": rest}
                counts[rest] += 1
            else:
                st, body = self.answer_message(r.get("params") or {})
                if st == 200:
                    result = {"type": "succeeded", "message": body}
                    counts["succeeded"] += 1
                else:
                    result = {"type": "errored", "error": body}
                    counts["errored"] += 1
            results.append(orjson.dumps({"custom_id": r["custom_id"], "result": result}))
        random.Random(b["id"]).shuffle(results)
        b.update(
            processing_status="ended",
            request_counts=counts,
            ended_at=_now_rfc3339(time.time()),
            results_url=f"/v1/messages/batches/{b['id']}/results",
            _results=b"".join(x + b"\n" for x in results),
        )

    def _abatch(self, bid: str) -> dict[str, Any]:
        b = self._abatches.get(bid)
        if b is None:
            raise _Error(404, "not_found_error", f"message batch {bid} not found")
        return b

    async def a_get(self, request: Request) -> Response:
        with self._lock:
            b = self._abatch(request.path_params["id"])
            self._a_advance(b)
            return JSONResponse(self._public(b))

    async def a_results(self, request: Request) -> Response:
        with self._lock:
            b = self._abatch(request.path_params["id"])
            self._a_advance(b)
            if b["_results"] is None:
                raise _Error(400, "invalid_request_error", "batch has not ended yet")
            return Response(b["_results"], media_type="application/binary")

    async def a_cancel(self, request: Request) -> Response:
        with self._lock:
            b = self._abatch(request.path_params["id"])
            self._a_advance(b)
            if b["processing_status"] == "in_progress":
                b.update(
                    processing_status="canceling", cancel_initiated_at=_now_rfc3339(time.time())
                )
            return JSONResponse(self._public(b))

    async def a_delete(self, request: Request) -> Response:
        with self._lock:
            b = self._abatch(request.path_params["id"])
            self._a_advance(b)
            if b["processing_status"] != "ended":
                raise _Error(400, "invalid_request_error", "cancel the batch before deleting")
            del self._abatches[b["id"]]
        return JSONResponse({"id": b["id"], "type": "message_batch_deleted"})

    async def a_list(self, request: Request) -> Response:
        q = request.query_params
        limit = int(q.get("limit", 20))
        with self._lock:
            for b in self._abatches.values():
                self._a_advance(b)
            items = sorted(self._abatches.values(), key=lambda b: b["id"], reverse=True)
        if q.get("after_id"):
            items = [b for b in items if b["id"] < q["after_id"]]
        if q.get("before_id"):
            items = [b for b in items if b["id"] > q["before_id"]][-limit:]
        page = [self._public(b) for b in items[:limit]]
        return JSONResponse(
            {
                "data": page,
                "has_more": len(items) > limit,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve the fake OpenAI + Anthropic APIs.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--rpm", type=int, default=None)
    ap.add_argument("--batch-seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    fake = FakeProvider(
        Knobs(latency=a.latency, rpm_limit=a.rpm, batch_seconds=a.batch_seconds), a.host, a.port
    )
    fake.start()
    print(f"OpenAI:    {fake.openai_url}\nAnthropic: {fake.anthropic_url}\nCtrl-C stops.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
