"""Knobs, counters, ids, error bodies and small HTTP helpers shared by the fake's modules."""

from __future__ import annotations

import collections
import copy
import hashlib
import itertools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse

Provider = Literal["openai", "anthropic"]
DAY = 86_400


@dataclass
class Knobs:
    """Faults and timing. Every field may be changed while the server runs.

    "Real-time" requests are chat completions, embeddings and Anthropic messages; the files,
    batches and message-batches endpoints only see `require_key`, the batch knobs and
    `refuse_connections`. "Batch creates" are POST /v1/batches and POST /v1/messages/batches."""

    latency: float = 0.0  # seconds added to each real-time request (asyncio.sleep)
    rpm_limit: int | None = None  # real-time requests per sliding minute; over it → 429
    throttle_next: int = 0  # the next N real-time requests get 429 with retry-after ...
    throttle_seconds: float = 0.2  # ... of this many seconds
    out_of_quota: bool = False  # every real-time request: 429 insufficient_quota, no retry-after
    fail_rate: float = 0.0  # fraction of real-time requests answered 500 (seeded RNG)
    fail_next: int = 0  # the next N real-time requests get a 500 ...
    fail_status: int = 500  # ... or this status (408, 409, 503, ...) instead
    timeout_next: int = 0  # the next N real-time requests hang `hang_seconds`, then answer
    hang_seconds: float = 5.0
    malformed_next: int = 0  # the next N real-time requests get 200 with a non-JSON body
    invalid_json_rate: float = 0.0  # structured answers that break their schema (by hash)
    # Every new connection, and the next request on a kept-alive one, is reset with no
    # answer: the SDKs raise APIConnectionError. (A listening port that is gone, ECONNREFUSED,
    # is `fake.stop()`; `fake.start()` comes back on the same port with the same state.)
    refuse_connections: bool = False
    # The next N real-time requests are read, then their connection is closed with no answer
    # (an answer lost on the way: the SDKs raise APIConnectionError).
    drop_next: int = 0
    batch_seconds: float = 0.5  # a batch runs this long, then ends
    expire_batches: bool = False  # batches end expired instead of completed ...
    expire_fraction: float = 0.5  # ... with this fraction of their requests finished
    cancel_fraction: float = 0.5  # of a cancelled batch, the part that finished anyway
    fail_validation: bool = False  # the next OpenAI batch fails validation (line 1), once
    max_batch_bytes: int | None = None  # Anthropic create body / OpenAI upload over → 413
    max_batch_requests: int | None = None  # more requests in one batch → 400 at create
    # The next N batch creates get no answer: their connection is reset, after the batch was
    # created (`reset_after_acting`, an answer lost on the way back) or before it reached
    # the handler (nothing created). The SDKs raise APIConnectionError.
    reset_creates: int = 0
    reset_after_acting: bool = True
    # Every batch create takes this long before its batch exists; the batch is created when
    # the delay ends even if the client has gone (killed, timed out) in the meantime.
    create_delay: float = 0.0
    upload_delay: float = 0.0  # every OpenAI file upload hangs this long before it is read
    # The next N batch lines that run fail with this HTTP status (500: OpenAI server_error,
    # Anthropic api_error; 429: rate limit; 529: Anthropic overloaded_error).
    fail_batch_lines: int = 0
    fail_batch_status: int = 500
    require_key: str | None = None  # requests without this exact key get 401
    # The next N lines written to batch results (OpenAI output files, Anthropic results) are
    # cut in half: not JSON, as a truncated download or a mangling proxy would leave them.
    garble_result_lines: int = 0
    # Called with (method, path) once the server has acted on a request, before its answer
    # is sent. A test kills its client here: the upload, create or poll took effect and the
    # answer is never read (kill -9 between a create and its record, with no hook in the
    # client).
    after_acting: Callable[[str, str], None] | None = None


@dataclass(frozen=True)
class Seen:
    """One real-time request as the fake saw it (times are `time.monotonic()` of the fake's
    process: comparable with a test's own when the fake runs inside it)."""

    path: str
    arrived: float
    answered: float  # when its answer left
    status: int
    tokens: int  # what its answer billed: input + output tokens (0 for an error)


@dataclass
class Stats:
    """What the fake saw. Counters are plain Counters (read them freely); the server updates
    them under `lock`, and `snapshot()` gives a consistent copy."""

    requests: collections.Counter[str] = field(default_factory=collections.Counter)  # by path
    status_counts: collections.Counter[int] = field(default_factory=collections.Counter)
    batch_creations: int = 0  # OpenAI and Anthropic batches created
    creates_received: int = 0  # batch creates that reached a handler (before create_delay)
    creates_reset: int = 0  # batch creates whose connection reset_creates reset
    uploads_received: int = 0  # OpenAI file uploads that reached the handler
    batch_items: collections.Counter[str] = field(default_factory=collections.Counter)
    # What was sent, by prompt (the last user message; an embedding's input): every real-time
    # request that reached its handler and every line of a created batch. A record sent twice
    # (paid twice) counts 2 here whatever custom_id or job token it went under.
    prompts: collections.Counter[str] = field(default_factory=collections.Counter)
    # What was paid for, by prompt: real-time requests answered 200, and batch lines that ran
    # and succeeded (a line of a cancelled or expired batch that never ran costs nothing).
    billed: collections.Counter[str] = field(default_factory=collections.Counter)
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    rate_limited: int = 0  # 429s sent (rpm_limit and throttle_next)
    connections_refused: int = 0  # connections reset by refuse_connections
    connections_dropped: int = 0  # requests read, then closed unanswered (drop_next)
    realtime: list[Seen] = field(default_factory=list)  # every answered real-time request
    in_flight: int = 0  # real-time requests inside the fake now ...
    peak_in_flight: int = 0  # ... and the most there were at once
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def bump(self, counter: str, key: Any = None, n: int = 1) -> None:
        """Add `n` to a Counter field (with `key`) or to an int field (without)."""
        with self.lock:
            if key is None:
                setattr(self, counter, getattr(self, counter) + n)
            else:
                getattr(self, counter)[key] += n

    def batch_created(self, custom_ids: list[str], prompts: list[str] | None = None) -> None:
        with self.lock:
            self.batch_creations += 1
            self.batch_items.update(custom_ids)
            self.prompts.update(prompts or [])

    def snapshot(self) -> Stats:
        with self.lock:
            return Stats(
                **{f.name: copy.copy(getattr(self, f.name)) for f in fields(self) if f.compare}
            )


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


class ProviderError(Exception):
    """An HTTP error, rendered in the shape of whichever provider the route belongs to.
    `type` and `code` are OpenAI's (Anthropic's type follows from the status)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self, provider: Provider, request_id: str | None = None) -> dict[str, Any]:
        if provider == "anthropic":
            kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
            out: dict[str, Any] = {
                "type": "error",
                "error": {"type": kind, "message": self.message},
            }
            if request_id:
                out["request_id"] = request_id
            return out
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class Ids:
    """Ids that sort by creation (list endpoints order by them) and differ between
    instances (a client that remembers an id from another fake gets a 404, not a mix-up)."""

    def __init__(self) -> None:
        self._seq = itertools.count(1)  # next() on a count is atomic in CPython
        self._salt = os.urandom(8)

    def new(self, prefix: str) -> str:
        n = next(self._seq)
        tail = hashlib.blake2b(n.to_bytes(8, "big"), key=self._salt, digest_size=6).hexdigest()
        return f"{prefix}{n:08d}{tail}"


def rfc3339(ts: float) -> str:
    """Anthropic's timestamp form: 2024-08-20T18:37:24.100435Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Owner(Protocol):
    """What the batch stores need from the FakeProvider (read at each use: a test may swap
    `fake.knobs` for a new Knobs)."""

    knobs: Knobs
    stats: Stats
    ids: Ids
    lock: threading.RLock


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise ProviderError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ProviderError(400, "The request body must be a JSON object.")
    return body


def limit_param(request: Request, default: int, most: int) -> int:
    try:
        limit = int(request.query_params.get("limit", str(default)))
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        raise ProviderError(400, f"limit must be an integer from 1 to {most}", param="limit")
    return limit


def list_page(items: list[dict[str, Any]], has_more: bool, openai: bool) -> JSONResponse:
    """A list page: both providers' clients page on has_more; Anthropic's needs first_id and
    last_id, OpenAI's uses the last item's id."""
    body = {
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }
    return JSONResponse({"object": "list", **body} if openai else body)


def take_batch_failure(owner: Owner) -> int | None:
    """The status a batch line fails with under `fail_batch_lines`, or None (under lock)."""
    k = owner.knobs
    if k.fail_batch_lines <= 0:
        return None
    k.fail_batch_lines -= 1
    return k.fail_batch_status


def jsonl(records: list[dict[str, Any]], owner: Owner | None = None) -> bytes:
    """JSON lines, each ending in a newline, no blank lines (the Anthropic SDK's decoder
    fails on one). With `owner`: results, garbled as its `garble_result_lines` knob says."""
    lines = [orjson.dumps(r) for r in records]
    if owner is not None:
        with owner.lock:
            n = min(owner.knobs.garble_result_lines, len(lines))
            owner.knobs.garble_result_lines -= n
        lines[:n] = [line[: len(line) // 2] for line in lines[:n]]
    return b"".join(line + b"\n" for line in lines)
