"""The provider batch APIs, on the official SDK clients: submit, find an orphan, poll, read the
results, cancel. Nothing here touches the ledger; `batch_runner.py` does.

Request files are built streaming: a chunk's lines go to a temporary file on disk (OpenAI) or
are serialised one request at a time (Anthropic), never the whole job in memory.

Creating a batch is not idempotent (neither SDK sends an Idempotency-Key), so the SDK never
retries it (`max_retries=0` on that call): a 5xx, a timeout or a dropped connection may hide a
batch that was created, and a blind retry would pay for every line twice. `_create` retries
itself, and before each retry looks for the batch with `find_orphan`, adopting it if found.
Limit: a provider whose batch listing lags its create by more than the backoff could still
show nothing and get a second create.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import orjson

from .realtime import _retry_after

ResultKind = Literal["succeeded", "errored", "expired", "cancelled"]
_ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAPPED_PREFIX = "ovn_"  # ids overnight makes up for Anthropic; user ids with it are mapped too
# Errors of a single request worth another try in a later batch (not the request's fault).
TRANSIENT_ERRORS = {
    "rate_limit_error",
    "api_error",
    "overloaded_error",
    "timeout_error",
    "server_error",
    "batch_expired",
    "batch_cancelled",
}


class TooLarge(Exception):
    """The provider refused a batch as too big (HTTP 413): split it and try again."""


@dataclass(frozen=True)
class Line:
    seq: int
    remote_id: str  # the custom_id sent to the provider
    endpoint: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Poll:
    ended: bool
    status: str  # the provider's own word
    counts: dict[str, int]
    errors: list[dict[str, Any]]  # OpenAI whole-batch validation errors (line, code, message)


@dataclass(frozen=True)
class Result:
    remote_id: str
    kind: ResultKind
    body: dict[str, Any] | None  # the response body when succeeded
    error_type: str | None = None
    message: str | None = None


class BatchService(Protocol):
    provider: str
    max_requests: int
    max_bytes: int

    def remote_id(self, seq: int, custom_id: str) -> str: ...
    def line_bytes(self, line: Line) -> int: ...
    def submit(self, lines: list[Line], tag: str, chunk: int) -> tuple[str, str | None]: ...
    def find_orphan(self, tag: str, chunk: int, requests: int, since: float) -> str | None: ...
    def poll(self, remote_id: str) -> Poll: ...
    def results(self, remote_id: str) -> Iterator[Result]: ...
    def cancel(self, remote_id: str) -> None: ...


def _is_413(exc: Exception) -> bool:
    return getattr(exc, "status_code", None) == 413


CREATE_TRIES = 4  # then the error propagates; the chunk stays `creating` for the next run


def _retryable(exc: Exception) -> bool:
    """Worth another try: throttling, conflicts, server errors, timeouts, lost connections."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return status in (408, 409, 429) or status >= 500
    return any(c.__name__ == "APIConnectionError" for c in type(exc).__mro__)


def _create(
    create: Callable[[], str], find: Callable[[], str | None], tries: int = CREATE_TRIES
) -> str:
    """`create()` at most `tries` times; before each retry, `find()` the batch a lost answer
    may have created (see the module docstring). A 413 becomes TooLarge."""
    for attempt in range(tries):
        try:
            return create()
        except Exception as exc:
            if _is_413(exc):
                raise TooLarge(str(exc)) from None
            if not _retryable(exc) or attempt + 1 == tries:
                raise
            response = getattr(exc, "response", None)
            wait = _retry_after(getattr(response, "headers", None))
            time.sleep(min(60.0, wait) if wait is not None else min(8.0, 0.5 * 2**attempt))
            found = find()
            if found is not None:
                return found
    raise AssertionError("unreachable")


class OpenAIBatch:
    """Files API + Batches API. Each batch carries metadata {overnight_job, overnight_chunk}:
    a batch created by a process killed before it recorded the id is found again by it."""

    provider = "openai"

    def __init__(
        self, *, api_key: str, base_url: str | None, max_requests: int, max_bytes: int
    ) -> None:
        import openai

        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=5)
        self.max_requests, self.max_bytes = max_requests, max_bytes

    def remote_id(self, seq: int, custom_id: str) -> str:
        return custom_id  # OpenAI takes any unique string: keep the user's id

    @staticmethod
    def _encode(line: Line) -> bytes:
        return (
            orjson.dumps(
                {
                    "custom_id": line.remote_id,
                    "method": "POST",
                    "url": line.endpoint,
                    "body": line.body,
                }
            )
            + b"\n"
        )

    def line_bytes(self, line: Line) -> int:
        return len(self._encode(line))

    def submit(self, lines: list[Line], tag: str, chunk: int) -> tuple[str, str | None]:
        fd, path = tempfile.mkstemp(prefix=f"overnight-{chunk}-", suffix=".jsonl")
        try:
            with os.fdopen(fd, "wb") as f:
                for line in lines:
                    f.write(self._encode(line))
            with open(path, "rb") as f:
                try:
                    uploaded = self.client.files.create(
                        file=(f"overnight-chunk-{chunk}.jsonl", f), purpose="batch"
                    )
                except Exception as exc:
                    if _is_413(exc):
                        raise TooLarge(str(exc)) from None
                    raise
        finally:
            os.unlink(path)
        if os.environ.get("OVERNIGHT_TEST_CRASH_AT") == "after_upload":
            _crash()
        since = time.time()

        def create() -> str:
            return (
                self.client.with_options(max_retries=0)
                .batches.create(
                    input_file_id=uploaded.id,
                    endpoint=lines[0].endpoint,  # type: ignore[arg-type]
                    completion_window="24h",
                    metadata={"overnight_job": tag[:512], "overnight_chunk": str(chunk)},
                )
                .id
            )

        remote = _create(create, lambda: self.find_orphan(tag, chunk, len(lines), since))
        return remote, uploaded.id

    def find_orphan(self, tag: str, chunk: int, requests: int, since: float) -> str | None:
        for batch in self.client.batches.list(limit=100):  # newest first; the SDK pages
            if batch.created_at < since - 300:
                break
            meta = batch.metadata or {}
            if meta.get("overnight_job") == tag[:512] and meta.get("overnight_chunk") == str(chunk):
                return batch.id
        return None

    def poll(self, remote_id: str) -> Poll:
        b = self.client.batches.retrieve(remote_id)
        counts = b.request_counts.model_dump() if b.request_counts else {}
        errors = [e.model_dump() for e in (b.errors.data or [])] if b.errors else []
        ended = b.status in ("completed", "failed", "expired", "cancelled")
        return Poll(ended, b.status, counts, errors)

    def results(self, remote_id: str) -> Iterator[Result]:
        b = self.client.batches.retrieve(remote_id)
        for file_id in (b.output_file_id, b.error_file_id):
            if not file_id:
                continue
            # Streamed to a temporary file, then read line by line: bounded memory.
            with tempfile.TemporaryFile() as tmp:
                with self.client.files.with_streaming_response.content(file_id) as resp:
                    for part in resp.iter_bytes():
                        tmp.write(part)
                tmp.seek(0)
                for raw in tmp:
                    if raw.strip():
                        yield self._result(orjson.loads(raw))

    @staticmethod
    def _result(rec: dict[str, Any]) -> Result:
        cid = rec.get("custom_id")
        response, error = rec.get("response"), rec.get("error")
        if response and response.get("status_code") == 200:
            return Result(cid, "succeeded", response.get("body") or {})
        if error:
            code = error.get("code") or "error"
            kind: ResultKind = {"batch_expired": "expired", "batch_cancelled": "cancelled"}.get(
                code, "errored"
            )  # type: ignore[assignment]
            return Result(cid, kind, None, code, error.get("message"))
        status = (response or {}).get("status_code")
        err = ((response or {}).get("body") or {}).get("error") or {}
        etype = (
            "server_error"
            if status and (status >= 500 or status == 429)
            else (err.get("type") or f"http_{status}")
        )
        return Result(cid, "errored", None, etype, f"HTTP {status}: {err.get('message', '')}")

    def cancel(self, remote_id: str) -> None:
        self.client.batches.cancel(remote_id)


class AnthropicBatch:
    """Message Batches API. custom_id must match ^[a-zA-Z0-9_-]{1,64}$: other ids (and ids
    starting with the reserved prefix) are sent as `ovn_<seq>` and mapped back by seq.

    Anthropic batches carry no metadata, so an orphan is recognised by shape: a batch created
    after the chunk was planned (less five minutes of clock skew) with exactly the chunk's
    request count, not already recorded for another chunk. Another client of the same
    workspace creating a batch of the same size in that minute could be mistaken for it; the
    results would then not match the chunk's ids, and its items would go back to pending."""

    provider = "anthropic"

    def __init__(
        self, *, api_key: str, base_url: str | None, max_requests: int, max_bytes: int
    ) -> None:
        import anthropic

        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=5)
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.claimed: set[str] = set()  # remote ids already recorded (set by the runner)

    def remote_id(self, seq: int, custom_id: str) -> str:
        if _ANTHROPIC_ID.match(custom_id) and not custom_id.startswith(MAPPED_PREFIX):
            return custom_id
        return f"{MAPPED_PREFIX}{seq}"

    def line_bytes(self, line: Line) -> int:
        return len(orjson.dumps({"custom_id": line.remote_id, "params": line.body})) + 1

    def submit(self, lines: list[Line], tag: str, chunk: int) -> tuple[str, str | None]:
        since = time.time()

        def create() -> str:
            return (
                self.client.with_options(max_retries=0)
                .messages.batches.create(
                    requests=[{"custom_id": ln.remote_id, "params": ln.body} for ln in lines]
                )
                .id
            )

        return _create(create, lambda: self.find_orphan(tag, chunk, len(lines), since)), None

    def find_orphan(self, tag: str, chunk: int, requests: int, since: float) -> str | None:
        for batch in self.client.messages.batches.list(limit=100):
            if batch.created_at.timestamp() < since - 300:
                break
            c = batch.request_counts
            total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
            if total == requests and batch.id not in self.claimed:
                return batch.id
        return None

    def poll(self, remote_id: str) -> Poll:
        b = self.client.messages.batches.retrieve(remote_id)
        return Poll(
            b.processing_status == "ended", b.processing_status, b.request_counts.model_dump(), []
        )

    def results(self, remote_id: str) -> Iterator[Result]:
        for rec in self.client.messages.batches.results(remote_id):
            r = rec.result
            if r.type == "succeeded":
                yield Result(rec.custom_id, "succeeded", r.message.model_dump(mode="json"))
            elif r.type == "errored":
                err = r.error.error
                yield Result(rec.custom_id, "errored", None, err.type, err.message)
            elif r.type == "canceled":
                yield Result(rec.custom_id, "cancelled", None, "batch_cancelled", "cancelled")
            else:
                yield Result(rec.custom_id, "expired", None, "batch_expired", "expired")

    def cancel(self, remote_id: str) -> None:
        self.client.messages.batches.cancel(remote_id)


def _crash() -> None:
    """Test hook: die like `kill -9` at a named point (OVERNIGHT_TEST_CRASH_AT)."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
