"""A faithful local fake of the OpenAI and Anthropic APIs, over real HTTP on loopback.

Tests and benchmarks point the official SDKs at it, so they exercise the real wire protocol
(`shared/specs/provider-batch-apis.md`):

    with FakeProvider(Knobs(latency=0.05)) as fake:        # or fake.start() / fake.stop()
        oai = openai.OpenAI(base_url=fake.openai_url, api_key="any")          # .../v1
        ant = anthropic.Anthropic(base_url=fake.anthropic_url, api_key="any")  # no /v1
        fake.knobs.fail_next = 2          # the live Knobs: change them at any time
        fake.stats.batch_items["r1"]      # what was seen (Stats)
        fake.stats.realtime[0].arrived    # each real-time request: arrival, answer, status
        fake.complete_batches()           # every live batch ends at its next read

Served: POST /v1/chat/completions, /v1/embeddings, /v1/messages (real time: the fault knobs
apply); OpenAI /v1/files (upload, get, content, delete, list) and /v1/batches (create, get,
cancel, list); Anthropic /v1/messages/batches (create, get, results, cancel, delete, list).
Any key is accepted (Bearer or x-api-key) unless `knobs.require_key` is set; `?beta=true` and
anthropic-beta headers are ignored. Answers are deterministic (see `fake_answers`); batches
follow the life cycles in `fake_openai` and `fake_anthropic`. The model "missing-model" does
not exist (404).

Or as a server, until Ctrl-C:
    python -m overnight.testing.fake_provider --port 8000 [--latency 0.05] [--rpm 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from overnight.testing.fake_answers import (
    answer_chat,
    answer_embeddings,
    answer_message,
    prompt_of,
)
from overnight.testing.fake_anthropic import AnthropicBatches
from overnight.testing.fake_openai import OpenAIBatches
from overnight.testing.fake_state import (
    Ids,
    Knobs,
    Provider,
    ProviderError,
    Seen,
    Stats,
    json_body,
)

__all__ = ["FakeProvider", "Knobs", "Seen", "Stats"]

Handler = Callable[[Request], Awaitable[Response]]


class FakeProvider:
    """The fake server. Bound to its port at construction (so the URLs are known before
    `start`); `stop` then `start` again comes back on the same port with the same state."""

    def __init__(self, knobs: Knobs | None = None, host: str = "127.0.0.1", port: int = 0):
        self.knobs = knobs or Knobs()
        self.stats = Stats()
        self.ids = Ids()
        self.lock = threading.RLock()  # batch state: the server thread and complete_batches
        self.host = host
        self._sock: socket.socket | None = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._rng = random.Random(1234)  # fail_rate draws: the same run fails the same calls
        self._window: collections.deque[float] = collections.deque()  # rpm_limit
        self.openai = OpenAIBatches(self)
        self.anthropic = AnthropicBatches(self)
        self.app: Any = Starlette(
            routes=self._routes(),
            exception_handlers={HTTPException: self._no_route},  # type: ignore[dict-item]
        )
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def openai_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def anthropic_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeProvider:
        if self._server is not None:
            return self
        sock = self._sock or _bind(self.host, self.port)
        self._sock = None
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=_refusing(self),
        )
        server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fake-provider"
        )
        self._server = server
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self._server = None
                raise RuntimeError("the fake provider did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Stop serving at once: requests in flight (a hang) are dropped, not waited for."""
        server, self._server = self._server, None
        if server is not None:
            server.should_exit = server.force_exit = True
            if self._thread is not None:
                self._thread.join(timeout=5)
        if self._sock is not None:  # never started
            self._sock.close()
            self._sock = None

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def complete_batches(self) -> None:
        """End every live batch (both providers) now, completed or expired as the knobs say
        (a cancelling one: cancelled)."""
        with self.lock:
            self.openai.complete_all()
            self.anthropic.complete_all()

    # -- routing ----------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        oa, an = self.openai, self.anthropic

        def route(path: str, method: str, handler: Handler, realtime: bool = False) -> Route:
            provider: Provider = "anthropic" if path.startswith("/v1/messages") else "openai"
            wrapped = self._wrap(handler, provider, realtime)
            return Route(path, wrapped, methods=[method])

        batches = "/v1/messages/batches"
        return [
            route("/v1/chat/completions", "POST", self._chat, realtime=True),
            route("/v1/embeddings", "POST", self._embeddings, realtime=True),
            route("/v1/messages", "POST", self._messages, realtime=True),
            route("/v1/files", "POST", oa.upload),
            route("/v1/files", "GET", oa.list_files),
            route("/v1/files/{id}", "GET", oa.get_file),
            route("/v1/files/{id}", "DELETE", oa.delete_file),
            route("/v1/files/{id}/content", "GET", oa.file_content),
            route("/v1/batches", "POST", oa.create_batch),
            route("/v1/batches", "GET", oa.list_batches),
            route("/v1/batches/{id}", "GET", oa.get_batch),
            route("/v1/batches/{id}/cancel", "POST", oa.cancel_batch),
            route(batches, "POST", an.create),
            route(batches, "GET", an.list),
            route(batches + "/{id}", "GET", an.get),
            route(batches + "/{id}", "DELETE", an.delete),
            route(batches + "/{id}/results", "GET", an.results),
            route(batches + "/{id}/cancel", "POST", an.cancel),
        ]

    def _wrap(self, handler: Handler, provider: Provider, realtime: bool) -> Handler:
        async def endpoint(request: Request) -> Response:
            rid = self.ids.new("req_")
            arrived = time.monotonic()
            if realtime:
                self.stats.bump("requests", request.url.path)
                self._entered(1)
            try:
                self._auth(request)
                response = (await self._faults()) if realtime else None
                if response is None:
                    response = await handler(request)
                if self.knobs.after_acting is not None:
                    self.knobs.after_acting(request.method, request.url.path)
            except ProviderError as exc:
                response = JSONResponse(exc.body(provider, rid), exc.status, headers=exc.headers)
            finally:
                if realtime:
                    self._entered(-1)
            response.headers["request-id" if provider == "anthropic" else "x-request-id"] = rid
            if realtime:
                self._rate_headers(response, provider)
                self._record(request.url.path, arrived, response)
            self.stats.bump("status_counts", response.status_code)
            return response

        return endpoint

    def _entered(self, n: int) -> None:
        with self.stats.lock:
            self.stats.in_flight += n
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self.stats.in_flight)

    def _record(self, path: str, arrived: float, response: Response) -> None:
        tokens = 0
        if response.status_code == 200:
            with contextlib.suppress(orjson.JSONDecodeError):
                usage = orjson.loads(bytes(response.body)).get("usage") or {}
                tokens = usage.get("total_tokens") or sum(
                    int(usage.get(k) or 0)
                    for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")
                )
        seen = Seen(path, arrived, time.monotonic(), response.status_code, tokens)
        with self.stats.lock:
            self.stats.realtime.append(seen)

    async def _no_route(self, request: Request, exc: HTTPException) -> Response:
        """Unknown paths and methods, in the provider's error shape (not starlette's text)."""
        provider: Provider = (
            "anthropic" if request.url.path.startswith("/v1/messages") else "openai"
        )
        message = f"Invalid URL ({request.method} {request.url.path})"
        self.stats.bump("status_counts", exc.status_code)
        return JSONResponse(ProviderError(exc.status_code, message).body(provider), exc.status_code)

    def _auth(self, request: Request) -> None:
        key = self.knobs.require_key
        if key is None:
            return
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if key not in (request.headers.get("x-api-key"), bearer):
            raise ProviderError(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
                type="invalid_request_error",
            )

    # -- real-time faults -------------------------------------------------------------------

    def _throttled(self, wait: float, why: str) -> ProviderError:
        self.stats.bump("rate_limited")
        headers = {"retry-after-ms": str(int(wait * 1000)), "retry-after": f"{wait:.3f}"}
        return ProviderError(
            429,
            f"Rate limit reached ({why})",
            code="rate_limit_exceeded",
            type="requests",
            headers=headers,
        )

    async def _faults(self) -> Response | None:
        """Apply the fault knobs to one real-time request: raise a 429 or 500, answer a
        malformed 200, or return None to let the handler answer (after any hang and latency)."""
        k = self.knobs
        with self.lock:
            now = time.monotonic()
            if k.rpm_limit is not None:
                while self._window and now - self._window[0] >= 60.0:
                    self._window.popleft()
                if len(self._window) >= k.rpm_limit:  # the wait: until the oldest slot frees
                    raise self._throttled(max(0.001, 60.0 - (now - self._window[0])), "rpm")
                self._window.append(now)
            if k.throttle_next > 0:
                k.throttle_next -= 1
                raise self._throttled(k.throttle_seconds, "throttle_next")
            if k.out_of_quota:  # OpenAI's words; no retry-after: waiting will not help
                self.stats.bump("rate_limited")
                raise ProviderError(
                    429,
                    "You exceeded your current quota, please check your plan and billing details.",
                    code="insufficient_quota",
                    type="insufficient_quota",
                )
            fail = k.fail_next > 0 or (k.fail_rate > 0 and self._rng.random() < k.fail_rate)
            k.fail_next = max(0, k.fail_next - 1)
            hang, malformed = k.timeout_next > 0, k.malformed_next > 0
            k.timeout_next = max(0, k.timeout_next - 1)
            k.malformed_next = max(0, k.malformed_next - 1)
        if hang:
            await asyncio.sleep(k.hang_seconds)
        if k.latency:
            await asyncio.sleep(k.latency)
        if fail:
            status = k.fail_status
            message = "The server had an error while processing your request."
            raise ProviderError(status, message if status >= 500 else f"HTTP {status} (fail_next)")
        if malformed:  # what a confused proxy sends
            return Response(b"<html>502 Bad Gateway</html>", 200, media_type="application/json")
        return None

    def _rate_headers(self, response: Response, provider: Provider) -> None:
        limit = self.knobs.rpm_limit
        if limit is None:
            return
        left = str(max(0, limit - len(self._window)))
        if provider == "anthropic":
            response.headers["anthropic-ratelimit-requests-limit"] = str(limit)
            response.headers["anthropic-ratelimit-requests-remaining"] = left
        else:
            response.headers["x-ratelimit-limit-requests"] = str(limit)
            response.headers["x-ratelimit-remaining-requests"] = left

    # -- real-time answers ------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        body = await json_body(request)
        self.stats.bump("prompts", prompt_of(body))
        status, answer = answer_chat(body, invalid_rate=self.knobs.invalid_json_rate, ids=self.ids)
        return self._answered(body, status, answer)

    async def _embeddings(self, request: Request) -> Response:
        body = await json_body(request)
        self.stats.bump("prompts", prompt_of(body))
        status, answer = answer_embeddings(body)
        return self._answered(body, status, answer)

    async def _messages(self, request: Request) -> Response:
        body = await json_body(request)
        self.stats.bump("prompts", prompt_of(body))
        rate = self.knobs.invalid_json_rate
        status, answer = answer_message(body, invalid_rate=rate, ids=self.ids)
        return self._answered(body, status, answer)

    def _answered(self, body: dict[str, Any], status: int, answer: dict[str, Any]) -> Response:
        if status == 200:
            self.stats.bump("billed", prompt_of(body))
        return JSONResponse(answer, status)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound now (port 0: a free one), listened on by uvicorn at start. Binding
    here, not picking a free number for uvicorn to bind later, leaves no race between tests."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


_CREATES = (b"POST /v1/batches ", b"POST /v1/batches?", b"POST /v1/messages/batches ")
_CREATES += (b"POST /v1/messages/batches?",)


class _AnswerLost:
    """A transport that resets the connection instead of writing the answer."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_REALTIME_REQUEST_LINES = (
    b"POST /v1/chat/completions ",
    b"POST /v1/embeddings ",
    b"POST /v1/messages ",
    b"POST /v1/messages?",
)


def _refusing(fake: FakeProvider) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, resetting connections while `refuse_connections` is set, the
    batch creates that `reset_creates` picks, and those of the next `drop_next` real-time
    requests once they are read."""

    class Refusing(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if fake.knobs.refuse_connections:
                fake.stats.bump("connections_refused")
                transport.abort()

        def data_received(self, data: bytes) -> None:
            if fake.knobs.refuse_connections:  # a kept-alive connection from before
                fake.stats.bump("connections_refused")
                self.transport.abort()
                return
            if data.startswith(_CREATES) and self._reset_this_create():
                if not fake.knobs.reset_after_acting:
                    self.transport.abort()
                    return
                # The request goes through (the request cycle takes the transport from
                # here); its answer resets the connection instead.
                self.transport = _AnswerLost(self.transport)
            if fake.knobs.drop_next > 0 and data.startswith(_REALTIME_REQUEST_LINES):
                with fake.lock:
                    drop = fake.knobs.drop_next > 0
                    fake.knobs.drop_next -= drop
                if drop:  # the request arrived; its answer never leaves
                    path = data.split(b" ", 2)[1].split(b"?")[0].decode()
                    fake.stats.bump("requests", path)
                    fake.stats.bump("connections_dropped")
                    self.transport.abort()
                    return
            super().data_received(data)

        def _reset_this_create(self) -> bool:
            with fake.lock:
                if fake.knobs.reset_creates <= 0:
                    return False
                fake.knobs.reset_creates -= 1
            fake.stats.bump("creates_reset")
            return True

    return Refusing


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve the fake OpenAI + Anthropic APIs.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per real-time request")
    ap.add_argument("--rpm", type=int, default=None, help="real-time requests per minute")
    ap.add_argument("--batch-seconds", type=float, default=2.0, help="how long a batch runs")
    a = ap.parse_args(argv)
    knobs = Knobs(latency=a.latency, rpm_limit=a.rpm, batch_seconds=a.batch_seconds)
    fake = FakeProvider(knobs, a.host, a.port).start()
    print(
        f"OpenAI:    {fake.openai_url}\nAnthropic: {fake.anthropic_url}\nCtrl-C stops.", flush=True
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
