"""The provider batch APIs, on the official SDK clients: submit, find an orphan, poll, read the
results, cancel, and list the batches that carry a job's identity. Nothing here touches the
ledger; `batch_runner.py` does.

Identity. Every request carries its job's mark: custom_id `<key>-<token>-<seq>` (`JobTag`):
the key is a short hash of the ledger's location and the job's name (the same for every run
of that job there, even after the ledger was deleted), the token is random per job (a
--restart makes a new one), seq is the item. OpenAI batches also carry the three in their
metadata. The runner accepts a result line only if its custom_id is one it sent in that batch.

Request files (OpenAI) are written to an anonymous temporary file in the job's state folder
(`.overnight/tmp/`), streamed line by line: the operating system removes it when it is closed,
and when the process is killed (O_TMPFILE, or unlinked at once where that is missing), so a
kill during the upload leaves no file of prompts anywhere. Anthropic's create takes the
requests in its body; they are serialised by the SDK.

Creating a batch is not idempotent (neither SDK sends an Idempotency-Key), so the SDK never
retries it (`max_retries=0` on that call, with an explicit timeout): a 5xx, a timeout or a
dropped connection may hide a batch that was created, and a blind retry would pay for every
line twice. Before each attempt the caller records until when the attempt could still land
(`landing`: start + timeout + as long again, up to a minute, + the body's upload at 1 MB/s);
`_create` retries itself, and before each retry looks for the batch with `find_orphan`; when
the failure may hide a batch, it waits until that time has passed and looks again before it
creates anything. A rerun after a kill does the same with the time recorded in the ledger.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import orjson

from ..retry import Fault, RetryPolicy
from .providers import sdk_failure

log = logging.getLogger(__name__)

ResultKind = Literal["succeeded", "errored", "expired", "cancelled"]
_ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAPPED_PREFIX = "ovn_"  # old (untagged) chunks: ids overnight made up for Anthropic
_TAGGED_ID = re.compile(r"^([0-9a-f]{4,32})-([a-z0-9]{4,32})-([0-9]{1,15})$")
# Errors of a single request worth another try in a later batch (not the request's fault).
# Its other errors (invalid_request_error, ...) are the request's own: they fail it at once.
TRANSIENT_ERRORS = {
    "rate_limit_error",
    "api_error",
    "overloaded_error",
    "timeout_error",
    "server_error",
    "batch_expired",
    "batch_cancelled",
    "unreadable_result",  # its result line came back garbled (see _read_line)
}
SKEW = 300.0  # seconds a provider's clock may differ from ours
LOOKBACK = 3 * 86_400.0  # how far back `tagged` looks for a job's batches
PEEK_MOST = 20  # Anthropic: ended batches whose first result line `tagged` reads, at most
SCAN_MOST = 2_000  # batches `tagged` looks at, at most
UPLOAD_RATE = 1 << 20  # bytes per second a create's body is assumed to go at, at least


class TooLarge(Exception):
    """The provider refused a batch as too big (HTTP 413): split it and try again."""


@dataclass(frozen=True)
class JobTag:
    """What marks a job's requests and batches at the provider (see the module docstring)."""

    name: str
    key: str  # identity_key(ledger location, name)
    token: str  # JobInfo.token
    legacy: str = ""  # OpenAI metadata `overnight_job` of batches made before tokens

    @property
    def prefix(self) -> str:
        return f"{self.key}-{self.token}-"

    def custom_id(self, seq: int) -> str:
        return f"{self.prefix}{seq}"


def identity_key(location: str, name: str) -> str:
    """12 hex digits naming a job in a ledger, stable across runs, restarts and a deleted
    ledger file (not a secret: it only tells this job's batches from others')."""
    return hashlib.blake2b(f"{location}\0{name}".encode(), digest_size=6).hexdigest()


def parse_custom_id(custom_id: str) -> tuple[str, str, int] | None:
    """(key, token, seq) of a tagged custom_id; None for anything else."""
    m = _TAGGED_ID.match(custom_id or "")
    return (m[1], m[2], int(m[3])) if m else None


def request_key(custom_id: str) -> str:
    """What identifies a request of a job: `<token>-<seq>`, without the identity key, which
    follows the ledger's location (a project folder moved while its batches run must still
    collect them). Other ids (old chunks) as they are."""
    parsed = parse_custom_id(custom_id)
    return f"{parsed[1]}-{parsed[2]}" if parsed else custom_id


@dataclass(frozen=True)
class Line:
    seq: int
    remote_id: str  # the custom_id sent to the provider
    endpoint: str
    body: dict[str, Any]
    key: str | None = None  # its response-cache key (None: a repair follow-up, not cached)


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


# A custom_id in a results line that is not JSON any more (cut short, mangled).
_CUSTOM_ID_FIELD = re.compile(r'"custom_id"\s*:\s*"([A-Za-z0-9_.:-]{1,128})"')


def _read_line(raw: str | bytes, to_result: Callable[[dict[str, Any]], Result]) -> Result | None:
    """One line of a batch's results. A line that cannot be read (not JSON, or not the shape
    the API documents: a download cut short, a proxy that mangles) must not stop the others
    being collected: it becomes an `unreadable_result` error of its request (tried again in
    a later batch, like a server error) when its custom_id can still be seen, else None (its
    request has no line, and is tried again too)."""
    rec: Any = None
    try:
        rec = orjson.loads(raw)
        if not isinstance(rec, dict):
            raise TypeError("not a JSON object")
        return to_result(rec)
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        problem = str(exc)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    cid = rec.get("custom_id") if isinstance(rec, dict) else None
    if not isinstance(cid, str):
        found = _CUSTOM_ID_FIELD.search(text)
        cid = found.group(1) if found else None
    log.warning("a batch result line cannot be read (%s): %.100s", problem, text)
    if cid is None:
        return None
    message = f"the provider's result line cannot be read ({problem})"
    return Result(cid, "errored", None, "unreadable_result", message)


@dataclass(frozen=True)
class Tagged:
    """A provider batch that carries a job's identity key."""

    remote_id: str
    status: str
    requests: int
    token: str
    created_at: float
    live: bool
    chunk: int | None = None  # OpenAI: from the metadata


class BatchService(Protocol):
    provider: str
    max_requests: int
    max_bytes: int
    one_model_per_batch: bool  # a batch's lines must all name the same model

    def legacy_remote_id(self, seq: int, custom_id: str) -> str: ...
    def line_bytes(self, line: Line) -> int: ...
    def submit(
        self, lines: list[Line], tag: JobTag, chunk: int, on_attempt: Callable[[float], None]
    ) -> tuple[str, str | None]: ...
    def find_orphan(
        self, tag: JobTag, chunk: int, ids: set[str], since: float, until: float | None
    ) -> str | None:
        """The batch a lost create of `chunk` made, if any: `ids` are the request_keys of its
        lines; created at or after `since`, and by `until` if known (both less and more
        SKEW)."""

    def tagged(self, key: str, since: float) -> list[Tagged]: ...
    def poll(self, remote_id: str) -> Poll: ...
    def results(self, remote_id: str) -> Iterator[Result]: ...
    def cancel(self, remote_id: str) -> bool: ...


def _is_413(exc: Exception) -> bool:
    failure = sdk_failure(exc)
    return failure is not None and failure.status == 413


CREATE_TRIES = 4  # then the error propagates; the chunk stays `creating` for the next run
# A create's retries: backoff 0.5, 1, 2 s (equal jitter: half of it random), at least as long
# as the server asks (at most 120 s); a 429 is a failed attempt here (the create is not sent
# in a loop for half an hour); a refused key or an account out of credit is not retried (the
# error propagates).
CREATE_POLICY = RetryPolicy(CREATE_TRIES, 0.5, max_throttled=None)


def result_fault(result: Result) -> Fault:
    """A failed batch line: expired, cancelled or a TRANSIENT_ERRORS type is tried again in a
    later batch (see BatchRunner); anything else is the request's fault."""
    transient = result.kind in ("expired", "cancelled") or result.error_type in TRANSIENT_ERRORS
    return Fault("transient" if transient else "permanent")


def landing(timeout: float, body_bytes: int) -> float:
    """Seconds after a create call starts during which its batch may still appear: the
    upload (at UPLOAD_RATE or faster), the call's timeout, and as long again (at most a
    minute) for a provider that acts after the client gave up."""
    return body_bytes / UPLOAD_RATE + timeout + min(60.0, timeout)


def _create(
    create: Callable[[], str],
    find: Callable[[float], str | None],
    on_attempt: Callable[[float], None],
    allowance: float,
    policy: RetryPolicy = CREATE_POLICY,
) -> str:
    """`create()` while `policy` says retry. Before each: `on_attempt(until)`, until when it
    may land. Before each retry: `find(until)` the batch a lost answer may have created; when
    the failure may hide one, also once that time has passed (see the module docstring). A
    413 becomes TooLarge."""
    attempt = 0
    while True:
        attempt += 1
        until = time.time() + allowance
        on_attempt(until)
        try:
            return create()
        except Exception as exc:
            failure = sdk_failure(exc)
            if failure is not None and failure.status == 413:
                raise TooLarge(str(exc)) from None
            if failure is None:
                raise
            decision = policy.decide(attempt, failure, time.time())
            if not decision.retry:
                raise
            time.sleep(decision.wait)
            found = find(until)
            if found is not None:
                return found
            # A failure that may hide a batch the provider created.
            if failure.may_have_acted and until > time.time():
                log.info(
                    "a batch create failed (%s); it may still land for %.0fs: waiting before"
                    " looking again",
                    type(exc).__name__,
                    until - time.time(),
                )
                time.sleep(until - time.time())
                found = find(until)
                if found is not None:
                    return found


def _anonymous_file(folder: Path | None) -> Any:
    """A temporary file with no name (see the module docstring)."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryFile(dir=folder)


class OpenAIBatch:
    """Files API + Batches API. Each batch carries metadata {overnight_job, overnight_key,
    overnight_token, overnight_chunk}: a batch created by a process killed before it recorded
    the id is found again, and a run finds the batches of earlier runs of its job."""

    provider = "openai"
    one_model_per_batch = True

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        max_requests: int,
        max_bytes: int,
        timeout: float = 60.0,
        tmp_dir: Path | None = None,
    ) -> None:
        import openai

        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=5)
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.timeout, self.tmp_dir = timeout, tmp_dir

    def legacy_remote_id(self, seq: int, custom_id: str) -> str:
        return custom_id  # before tokens, OpenAI was sent the user's own id

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

    def submit(
        self, lines: list[Line], tag: JobTag, chunk: int, on_attempt: Callable[[float], None]
    ) -> tuple[str, str | None]:
        with _anonymous_file(self.tmp_dir) as f:
            for line in lines:
                f.write(self._encode(line))
            f.seek(0)
            try:
                uploaded = self.client.files.create(
                    file=(f"overnight-{tag.key}-{chunk}.jsonl", f), purpose="batch"
                )
            except Exception as exc:
                if _is_413(exc):
                    raise TooLarge(str(exc)) from None
                raise
        since = time.time()
        metadata = {
            "overnight_job": tag.name[:512],
            "overnight_key": tag.key,
            "overnight_token": tag.token,
            "overnight_chunk": str(chunk),
        }

        def create() -> str:
            return (
                self.client.with_options(max_retries=0, timeout=self.timeout)
                .batches.create(
                    input_file_id=uploaded.id,
                    endpoint=lines[0].endpoint,  # type: ignore[arg-type]
                    completion_window="24h",
                    metadata=metadata,
                )
                .id
            )

        ids = {request_key(ln.remote_id) for ln in lines}
        remote = _create(
            create,
            lambda until: self.find_orphan(tag, chunk, ids, since, until),
            on_attempt,
            landing(self.timeout, 0),
        )
        return remote, uploaded.id

    def find_orphan(
        self, tag: JobTag, chunk: int, ids: set[str], since: float, until: float | None
    ) -> str | None:
        """The batch of this job's chunk, by its metadata (token and chunk: exact)."""
        for batch in self.client.batches.list(limit=100):  # newest first; the SDK pages
            if batch.created_at < since - SKEW:
                break
            meta = batch.metadata or {}
            if meta.get("overnight_chunk") != str(chunk):
                continue
            legacy = bool(tag.legacy) and meta.get("overnight_job") == tag.legacy[:512]
            if meta.get("overnight_token") == tag.token or legacy:
                return batch.id
        return None

    def tagged(self, key: str, since: float) -> list[Tagged]:
        out: list[Tagged] = []
        for n, batch in enumerate(self.client.batches.list(limit=100)):
            if batch.created_at < since or n >= SCAN_MOST:
                break
            meta = batch.metadata or {}
            if meta.get("overnight_key") != key:
                continue
            chunk = meta.get("overnight_chunk", "")
            out.append(
                Tagged(
                    batch.id,
                    batch.status,
                    batch.request_counts.total if batch.request_counts else 0,
                    meta.get("overnight_token", ""),
                    float(batch.created_at),
                    batch.status not in ("completed", "failed", "expired", "cancelled"),
                    int(chunk) if chunk.isdigit() else None,
                )
            )
        return out

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
            with _anonymous_file(self.tmp_dir) as tmp:
                with self.client.files.with_streaming_response.content(file_id) as resp:
                    for part in resp.iter_bytes():
                        tmp.write(part)
                tmp.seek(0)
                for raw in tmp:
                    if raw.strip() and (result := _read_line(raw, self._result)) is not None:
                        yield result

    @staticmethod
    def _result(rec: dict[str, Any]) -> Result:
        cid = str(rec.get("custom_id"))
        response, error = rec.get("response"), rec.get("error")
        if response and response.get("status_code") == 200:
            body = response.get("body") or {}
            if not isinstance(body, dict):
                raise TypeError("the response body is not a JSON object")
            return Result(cid, "succeeded", body)
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

    def cancel(self, remote_id: str) -> bool:
        """Cancel a batch; True if it was running (it is now being cancelled)."""
        return self.client.batches.cancel(remote_id).status in ("cancelling", "cancelled")


class AnthropicBatch:
    """Message Batches API (custom_id: ^[a-zA-Z0-9_-]{1,64}$; ours are ~30 characters).

    Anthropic batches carry no metadata, and their custom_ids show only in the results of an
    ended batch. So an orphan is recognised by shape: created while the chunk's create could
    have landed (less and more five minutes of clock skew), with the chunk's request count,
    not recorded for another chunk; an ended one must also have one of the chunk's custom_ids
    on its first result line. An in-progress batch of another client of the same size in
    that window can still be taken for it: its result lines are then refused one by one
    (not ours), and the chunk's items go back to pending, without counting an attempt."""

    provider = "anthropic"
    one_model_per_batch = False

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        max_requests: int,
        max_bytes: int,
        timeout: float = 60.0,
        tmp_dir: Path | None = None,
    ) -> None:
        import anthropic

        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=5)
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self.timeout = timeout
        self.claimed: set[str] = set()  # remote ids already recorded (set by the runner)

    def legacy_remote_id(self, seq: int, custom_id: str) -> str:
        if _ANTHROPIC_ID.match(custom_id) and not custom_id.startswith(MAPPED_PREFIX):
            return custom_id
        return f"{MAPPED_PREFIX}{seq}"

    def line_bytes(self, line: Line) -> int:
        return len(orjson.dumps({"custom_id": line.remote_id, "params": line.body})) + 1

    def submit(
        self, lines: list[Line], tag: JobTag, chunk: int, on_attempt: Callable[[float], None]
    ) -> tuple[str, str | None]:
        since = time.time()

        def create() -> str:
            return (
                self.client.with_options(max_retries=0, timeout=self.timeout)
                .messages.batches.create(
                    requests=[{"custom_id": ln.remote_id, "params": ln.body} for ln in lines]
                )
                .id
            )

        ids = {request_key(ln.remote_id) for ln in lines}
        size = sum(self.line_bytes(ln) for ln in lines)
        remote = _create(
            create,
            lambda until: self.find_orphan(tag, chunk, ids, since, until),
            on_attempt,
            landing(self.timeout, size),
        )
        return remote, None

    def find_orphan(
        self, tag: JobTag, chunk: int, ids: set[str], since: float, until: float | None
    ) -> str | None:
        unsure: list[str] = []
        for batch in self.client.messages.batches.list(limit=100):  # newest first
            created = batch.created_at.timestamp()
            if created < since - SKEW:
                break
            if until is not None and created > until + SKEW:
                continue
            c = batch.request_counts
            total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
            if total != len(ids) or batch.id in self.claimed:
                continue
            if batch.processing_status != "ended":
                unsure.append(batch.id)  # its custom_ids cannot be seen yet
            elif request_key(self._first_custom_id(batch.id) or "") in ids:
                return batch.id  # certainly this chunk's
        if unsure:
            log.info("chunk %s: adopting batch %s by its size and time alone", chunk, unsure[0])
        return unsure[0] if unsure else None

    def _first_custom_id(self, remote_id: str) -> str | None:
        try:
            decoder = self.client.messages.batches.results(remote_id)
        except Exception as exc:
            failure = sdk_failure(exc)
            status = failure.status if failure is not None else None
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                return None  # no results (archived, deleted): nothing to tell
            raise
        try:
            for raw in decoder.http_response.iter_lines():
                if raw.strip():
                    result = _read_line(raw, self._result)
                    return result.remote_id if result is not None else None
            return None
        finally:
            decoder.close()

    def tagged(self, key: str, since: float) -> list[Tagged]:
        """Ended batches whose first result line carries `key` (the newest PEEK_MOST ended
        ones at most): in-progress batches show no custom_id, so they are not found."""
        out: list[Tagged] = []
        peeked = 0
        for n, batch in enumerate(self.client.messages.batches.list(limit=100)):
            if batch.created_at.timestamp() < since or n >= SCAN_MOST or peeked >= PEEK_MOST:
                break
            if batch.processing_status != "ended":
                continue
            peeked += 1
            parsed = parse_custom_id(self._first_custom_id(batch.id) or "")
            if parsed is None or parsed[0] != key:
                continue
            c = batch.request_counts
            total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
            out.append(
                Tagged(batch.id, "ended", total, parsed[1], batch.created_at.timestamp(), False)
            )
        return out

    def poll(self, remote_id: str) -> Poll:
        b = self.client.messages.batches.retrieve(remote_id)
        return Poll(
            b.processing_status == "ended", b.processing_status, b.request_counts.model_dump(), []
        )

    def results(self, remote_id: str) -> Iterator[Result]:
        # The lines are read here, not by the SDK's decoder, which stops at the first line it
        # cannot parse: one garbled line would leave every other result uncollected.
        decoder = self.client.messages.batches.results(remote_id)
        try:
            for raw in decoder.http_response.iter_lines():
                if raw.strip() and (result := _read_line(raw, self._result)) is not None:
                    yield result
        finally:
            decoder.close()

    @staticmethod
    def _result(rec: dict[str, Any]) -> Result:
        cid, r = rec["custom_id"], rec["result"]
        if not isinstance(cid, str):
            raise TypeError("custom_id is not a string")
        if r["type"] == "succeeded":
            if not isinstance(r["message"], dict):
                raise TypeError("the message is not a JSON object")
            return Result(cid, "succeeded", r["message"])
        if r["type"] == "errored":
            err = (r.get("error") or {}).get("error") or {}
            return Result(cid, "errored", None, err.get("type") or "error", err.get("message"))
        if r["type"] == "canceled":
            return Result(cid, "cancelled", None, "batch_cancelled", "cancelled")
        return Result(cid, "expired", None, "batch_expired", "expired")

    def cancel(self, remote_id: str) -> bool:
        """Cancel a batch; True if it was running (it is now being cancelled)."""
        return self.client.messages.batches.cancel(remote_id).processing_status == "canceling"
