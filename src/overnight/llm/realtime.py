"""backend = "openai" | "anthropic": real-time APIs through the official async SDK clients.

A `Predictor`: `process(requests)` returns one `Answer` per request, or an exception for that
request alone. One event loop in a background thread owns the client, the rate limiter and
the AIMD concurrency, so they carry over from one call to the next.

Retries live here, not in the SDK (`max_retries=0`), so that every try goes through the
limiter, and the limiter is the last thing a request passes before it is sent. Whether and
when to try again is `retry.RetryPolicy.decide`'s answer, for every failure: 408/409/5xx,
timeouts, connection errors and unreadable bodies are failed attempts, retried up to
`max_attempts` with exponential, jittered backoff, at least as late as the server asked
(`retry-after-ms`, `retry-after`; at most 120 s); `x-should-retry` overrides the status. A
wait the server asks for holds back every request to the endpoint, including those that were
already waiting for a concurrency slot. A 429 is not a failed attempt: it halves concurrency
(AIMD) and is retried for as long as the server keeps answering 429, up to `MAX_THROTTLED`
seconds in a row for one request; then the job pauses (`EndpointDown`), items pending, as it
does at once for OpenAI's `insufficient_quota`.
What still fails comes back as a permanent error ("gave up after N attempts"), so the runner
does not multiply the tries; every answer and error carries `attempts`, the requests sent
for it, which the ledger records. Other 4xx fail the item at once with the server's message.

`down_after` connection failures in a row (refused, DNS, connect timeouts; not read timeouts,
which mean a slow server) raise `EndpointDown` from `process()`, after cancelling what is in
flight: the job pauses with its items pending.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from typing import Any

from ..errors import EndpointDown, InvalidOutput, KeyRefused, PermanentError, TransientError, redact
from ..retry import MAX_THROTTLED, Fault, RetryPolicy
from . import providers
from .cache import ResponseCache
from .limits import AIMD, RateLimiter
from .providers import Failure, sdk_failure, transport_failure
from .requests import Answer, LLMTask, Request, answer_from_body
from .tokens import count_request_tokens


class APIError(PermanentError):
    """The server refused the request (a 4xx other than 408/409/429): not worth a retry."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.error_class = f"http_{status}"


class RetriesExhausted(PermanentError):
    error_class = "retries_exhausted"


@dataclass
class RealtimeStats:
    sent: int = 0  # HTTP requests, retries and repairs included
    ok: int = 0
    throttled: int = 0  # 429s seen
    retries: int = 0
    cache_hits: int = 0
    deduplicated: int = 0  # identical requests in flight, sent once
    repairs: int = 0
    concurrency: int = 0  # the AIMD limit now


def _safe_url(url: str) -> str:
    """The URL without user:password@ or a query string (either may hold a key)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


class RealtimePredictor:
    auto_start = auto_max = window = 256  # the job sets its own window from `concurrency`
    commit_each_call = True

    def __init__(
        self,
        provider: str,
        *,
        base_url: str | None,
        api_key: str,
        rpm: int | None = None,
        tpm: int | None = None,
        concurrency: int = 16,
        timeout: float = 60.0,
        max_attempts: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        cache: ResponseCache | None = None,
        task: LLMTask | None = None,
        repair: bool = False,
        down_after: int = 20,
        max_throttled: float = MAX_THROTTLED,
    ) -> None:
        self.provider, self.base_url = provider, base_url
        self.api = providers.provider(provider)
        self.policy = RetryPolicy(
            max_attempts, backoff_base, backoff_max, max_throttled=max_throttled
        )
        self.cache, self.task, self.repair, self.down_after = cache, task, repair, down_after
        self.model = task.model if task is not None else ""
        self._secret = api_key
        self.stats = RealtimeStats(concurrency=concurrency)
        self.limiter_args = (rpm, tpm)
        self.aimd = AIMD(concurrency, maximum=concurrency)
        self._consecutive_down = 0
        self._down: str | None = None
        self._refused: KeyRefused | None = None  # the key was refused: nothing more is sent
        self._down_event = asyncio.Event()
        self._inflight: dict[str, asyncio.Future[Answer | BaseException]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="llm")
        self._thread.start()
        self._client = self._call(self._make_client(api_key, timeout))
        self.limiter: RateLimiter = self._call(self._make_limiter())

    # -- lifecycle ----------------------------------------------------------------------

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _make_limiter(self) -> RateLimiter:
        return RateLimiter(*self.limiter_args)

    async def _make_client(self, api_key: str, timeout: float) -> Any:
        return self.api.async_client(api_key, self.base_url, timeout)

    def close(self) -> None:
        if not self._loop.is_running():
            return

        async def shutdown() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await self._client.close()

        try:
            self._call(shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    # -- the predictor ------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        """Environment secrets and this client's own key (it may not come from the
        environment, or from a variable whose name does not look secret), in every form."""
        return redact(text, self._secret)

    def process(self, inputs: list[Request], batch_size: int = 0) -> list[Any]:
        if not self._loop.is_running():
            raise RuntimeError("RealtimePredictor.process() after close()")
        future = asyncio.run_coroutine_threadsafe(self._process(inputs), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C: stop sending; what was answered is in the cache
            raise

    async def _process(self, requests: list[Request]) -> list[Any]:
        if self._refused:
            raise self._refused
        if self._down:
            raise EndpointDown(self._down)
        cached = self.cache.get_many([r.key for r in requests]) if self.cache else {}
        self.stats.cache_hits += len(cached)
        tasks: dict[str, asyncio.Future[Answer | BaseException]] = {}
        for r in requests:
            if r.key in cached or r.key in tasks:
                if r.key in tasks:
                    self.stats.deduplicated += 1
                continue
            if r.key in self._inflight:  # identical request in flight from an earlier call
                tasks[r.key] = self._inflight[r.key]
                continue
            tasks[r.key] = asyncio.ensure_future(self._one(r))
            self._inflight[r.key] = tasks[r.key]
        try:
            await self._wait(list(tasks.values()))
        finally:
            for key in tasks:
                self._inflight.pop(key, None)
        if self._refused:
            raise self._refused
        if self._down:
            raise EndpointDown(self._down)
        out: list[Any] = []
        paid: set[str] = set()
        for r in requests:
            if r.key in cached:
                out.append(replace(cached[r.key], attempts=0))  # nothing sent for it
                continue
            future = tasks[r.key]
            result = future.exception() or future.result()  # a bug fails its item, not all
            if isinstance(result, Answer) and r.key in paid:
                result = replace(result, cached=True, attempts=0)  # sent once, paid once
            paid.add(r.key)
            out.append(result)
        return out

    async def _wait(self, futures: list[asyncio.Future[Any]]) -> None:
        """All done, or the endpoint went down: then cancel the rest (no point waiting for
        their timeouts; their items stay pending)."""
        if not futures:
            return
        everything = asyncio.gather(*futures, return_exceptions=True)
        down = asyncio.ensure_future(self._down_event.wait())
        try:
            await asyncio.wait({everything, down}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            everything.cancel()  # process() was cancelled (Ctrl-C): stop sending
            raise
        finally:
            down.cancel()
        if not everything.done():
            for future in futures:
                future.cancel()
            await asyncio.wait({everything})

    async def _one(self, request: Request) -> Answer | BaseException:
        answer = await self._send(request)
        if isinstance(answer, BaseException) or not self.repair or self.task is None:
            return answer
        try:
            self.task.parse(answer)
            return answer
        except InvalidOutput as exc:
            self.stats.repairs += 1
            second = await self._send(self.task.repair(request, answer, exc.reason), cache=False)
            tries = answer.attempts + _attempts(second)
            if isinstance(second, BaseException):
                # The first answer stands, and will be recorded invalid.
                return replace(answer, attempts=tries)
            fixed = Answer(
                second.body,
                answer.input_tokens + second.input_tokens,
                answer.output_tokens + second.output_tokens,
                attempts=tries,
            )
            if self.cache is not None:  # the repaired answer is the answer to this request
                self.cache.put(request.key, fixed.body, fixed.input_tokens, fixed.output_tokens)
            return fixed

    async def _send(self, request: Request, cache: bool = True) -> Answer | BaseException:
        estimate = count_request_tokens(request.endpoint, request.body, self.model)
        estimate += int(request.body.get("max_tokens") or 0)
        tries = failures = throttles = 0  # requests sent; failed attempts; 429s in a row
        throttled_since: float | None = None
        while True:
            async with self.aimd.slot():
                # The limiter last, right before the send: a retry-after that came back while
                # this request waited for its slot holds it back too.
                await self.limiter.acquire(estimate)
                if self._down:  # it went down while this request waited
                    return _tried(TransientError(self._down), tries)
                tries += 1
                self.stats.sent += 1
                try:
                    body = await self._post(request)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failure = self._failure(exc)
                    if isinstance(failure, BaseException):
                        return _tried(failure, tries)
                    last = self._describe(failure, exc)
                else:
                    self._consecutive_down = 0
                    self.stats.ok += 1
                    self.aimd.on_success()
                    self.stats.concurrency = self.aimd.limit
                    answer = answer_from_body(self.provider, request.endpoint, body)
                    self.limiter.settle(estimate, answer.input_tokens + answer.output_tokens)
                    if cache and self.cache is not None:
                        self.cache.put(request.key, body, answer.input_tokens, answer.output_tokens)
                    return replace(answer, attempts=tries)
            now = time.monotonic()
            if failure.kind == "throttled":  # not a failed attempt (see RetryPolicy)
                throttles += 1
                throttled_since = throttled_since or now
            else:
                throttles, throttled_since = 0, None
                failures += 1
            decision = self.policy.decide(
                throttles or failures, failure, now, since=throttled_since
            )
            if decision.retry:
                if decision.hint is not None:
                    self.limiter.penalize(decision.hint)  # everyone waits, not this one only
                self.stats.retries += 1
                await asyncio.sleep(decision.wait)
                continue
            if decision.reason == "exhausted":
                message = f"gave up after {tries} attempts"
                if tries > failures:
                    message += (
                        f" ({tries - failures} answered 429, not counted toward max_attempts)"
                    )
                return _tried(RetriesExhausted(self._redact(f"{message}: {last}")), tries)
            return _tried(
                self._stop(decision.reason, failure, last, now - (throttled_since or now)), tries
            )

    async def _post(self, request: Request) -> dict[str, Any]:
        path = request.endpoint.removeprefix(self.api.base_url_path)
        body = await self._client.post(path, cast_to=object, body=request.body)
        if not isinstance(body, dict):
            raise ValueError(f"the answer is not a JSON object: {str(body)[:80]!r}")
        return body

    def _failure(self, exc: Exception) -> Failure | Fault | BaseException:
        """The failure to decide about, or the exception that ends the item's tries (a bug).
        Counts what the endpoint's health needs: connection failures in a row, 429s."""
        failure = sdk_failure(exc) or _own_failure(exc)
        if failure is None:
            if isinstance(exc, json.JSONDecodeError | ValueError):  # a proxy's HTML page, say
                self._consecutive_down = 0
                return Fault("unreadable")
            return PermanentError(self._redact(f"{type(exc).__name__}: {exc}"))
        if failure.kind == "unreachable":
            self._unreachable(failure.cause)
            return failure
        self._consecutive_down = 0
        if failure.kind == "throttled":
            self.stats.throttled += 1
            self.aimd.on_throttle()
            self.stats.concurrency = self.aimd.limit
        return failure

    def _describe(self, failure: Failure | Fault, exc: Exception) -> str:
        """The failure in the words of the item's error."""
        if isinstance(failure, Fault):  # unreadable
            return f"unreadable answer: {self._redact(str(exc))[:120]}"
        if failure.kind == "unreachable":
            return f"connection error: {self._redact(failure.cause)}"
        if failure.status is None:  # timed out: a slow answer, the server is up
            return failure.cause
        return f"HTTP {failure.status}: {self._redact(failure.message)}"

    def _stop(
        self, reason: str, failure: Failure | Fault, last: str, throttled_for: float
    ) -> BaseException:
        """The error that ends an item's tries without exhausting them (RetryPolicy's
        give_up or pause): the job pauses for a refused key, no credit, or 429s too long."""
        status = getattr(failure, "status", None) or 0
        message = self._redact(getattr(failure, "message", "") or last)
        if reason == "key_refused":  # the key, not this record: stop sending
            if self._refused is None:
                self._refused = KeyRefused(status, message)
            self._pause(last)
            return KeyRefused(status, message)
        if reason == "out_of_quota":
            self._pause(
                f"{last} (the account is out of credit); the job is paused,"
                " items stay pending: run it again once the quota is raised"
            )
            return TransientError(self._down or message)
        if reason == "throttled_too_long":
            self._pause(
                f"rate limited for {throttled_for:.0f} s in a row ({last}); "
                "the job is paused, items stay pending: run it again later"
            )
            return TransientError(self._down or last)
        return APIError(status, message)

    def _unreachable(self, detail: str) -> None:
        """One more connection failure in a row; `down_after` of them: the endpoint is down."""
        self._consecutive_down += 1
        detail = self._redact(detail)
        if self._down is None and self._consecutive_down >= self.down_after:
            where = _safe_url(self.base_url) if self.base_url else f"the {self.provider} API"
            self._pause(
                f"cannot reach {where}: {detail} ({self._consecutive_down} requests in a row); "
                "the job is paused, items stay pending: run it again to resume"
            )

    def _pause(self, reason: str) -> None:
        """Stop sending: what is in flight is cancelled, `process()` raises EndpointDown."""
        if self._down is None:
            self._down = self._redact(reason)
            self._down_event.set()


def _own_failure(exc: Exception) -> Failure | None:
    """The standard library's timeouts and connection errors, as the SDK's would be."""
    if isinstance(exc, TimeoutError):
        return transport_failure(exc, timeout=True)
    if isinstance(exc, ConnectionError | OSError):
        return transport_failure(exc, timeout=False)
    return None


def _tried(exc: BaseException, tries: int) -> BaseException:
    """The error, marked with the requests sent for the item (the ledger counts them)."""
    exc.attempts = tries  # type: ignore[attr-defined]
    return exc


def _attempts(result: Answer | BaseException) -> int:
    return result.attempts if isinstance(result, Answer) else getattr(result, "attempts", 1)
