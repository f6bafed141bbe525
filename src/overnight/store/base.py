"""The ledger interface. One implementation (ledger.py: SQLLedger) runs on SQLite and on
PostgreSQL (connector.py, sql/), and both pass `tests/test_store_contract.py`.

Only the runner and the job API call a ledger; backends never do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

from ..errors import UsageError
from ..records import Cursor, Fingerprint, Row

State = Literal["pending", "leased", "succeeded", "failed", "invalid", "cancelled", "submitted"]
STATES: tuple[State, ...] = (
    "pending",
    "leased",
    "submitted",
    "succeeded",
    "failed",
    "invalid",
    "cancelled",
)


class ConcurrentIngest(RuntimeError):
    """Two runners read the same input at once; the second one stops ingesting."""


class LedgerError(UsageError):
    """The ledger cannot be used: missing, replaced, read-only, corrupt or locked (exit 2).

    Raised for every error of the database underneath, translated once where it enters."""


class ConnectionLost(LedgerError):
    """The connection to the ledger's database broke: the server restarted, a network blip,
    a connection cut by an administrator or an idle timeout. The ledger connects again and
    runs the operation again (ledger.py, `_replayed`); this reaches callers only when the
    server stays out of reach."""


class Contention(LedgerError):
    """The database chose this transaction to undo so that another could go on (a deadlock
    between workers, a serialization failure). Nothing of it was committed: the ledger runs
    the operation again (ledger.py, `_replayed`)."""


@dataclass(frozen=True)
class Claim:
    """The process running a job: one row per job name, taken before a run touches anything."""

    owner: str  # "host:pid:process-start-time:run", see claim.py
    since: float
    expires: float  # renewed by a heartbeat; a claim past it may be taken over


@dataclass(frozen=True)
class RunRecord:
    """One `overnight run` of a job, as it last reported itself."""

    owner: str
    started_at: float
    updated_at: float  # its last heartbeat
    ended_at: float | None  # None: still running, or it died without a word (kill -9)
    outcome: str | None  # finished | interrupted | cancelled | detached | stopped | error
    processed: int
    seconds: float
    setup_seconds: float

    @property
    def items_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class JobInfo:
    id: int
    name: str
    spec_hash: str
    fingerprint: Fingerprint
    cursor: Cursor  # where ingest resumes
    ingest_done: bool
    created_at: float
    # Batch backends: this job's mark on every provider request (custom_ids, metadata),
    # random, made with the job (a --restart makes a new job, so a new token).
    token: str = ""
    # Provider batches carrying this job's identity key and another token, created before
    # this time, belong to earlier runs that a --restart discarded (0: none discarded).
    discarded_before: float = 0.0
    # The fingerprint was stored before its digest covered how the input is read (the id
    # column, delimiter, format): by an older overnight, as the content hash alone.
    legacy_fingerprint: bool = False
    # The job file it was run from, relative to the ledger's folder; None when unknown (the
    # Python API without a file, older ledgers): two job files of one name must not share a
    # ledger entry.
    origin: str | None = None


@dataclass(frozen=True)
class Lease:
    owner: str  # "host:pid:process-start-time", so a restart can tell a dead owner from a live one
    expires: float
    now: float


@dataclass(slots=True)
class Item:
    seq: int
    custom_id: str
    line: int
    payload: bytes
    attempts: int
    # Batch backends: a follow-up request to send instead of the record's own (a repair).
    follow_up: bytes | None = None
    # The error of the item's last attempt (leases only): "process_died" marks a suspect,
    # an item whose last attempt died with its runner, which the runner computes alone.
    error_class: str | None = None


class Outcome(NamedTuple):
    """What the runner commits for one item, in one transaction with its state.

    A NamedTuple rather than a dataclass: one is built per record on the hot path, and a
    tuple is several times cheaper to build."""

    seq: int
    state: Literal["succeeded", "failed", "invalid", "pending"]
    result: bytes | None = None  # JSON of the output row's fields, when succeeded
    error_class: str | None = None
    message: str | None = None
    not_before: float = 0.0  # for "pending": the earliest time of the next attempt
    # What the answer cost (LLM backends; 0/None elsewhere). `list_cost` is what the same
    # tokens cost at the real-time price: the difference is what batch and cache saved.
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    list_cost: float | None = None
    # An embedding's `output`, as float32 bytes kept beside the JSON result (results.py).
    vector: bytes | None = None
    # Tries this outcome stands for, added to the item's `attempts`: 1, or what a backend that
    # retries on its own counted (the real-time LLM predictor: requests sent; 0: a cache hit).
    attempts: int = 1
    # A "pending" outcome's follow-up request (a batch backend's repair), sent by the next
    # batch instead of the record's own (Item.follow_up).
    follow_up: bytes | None = None


@dataclass(frozen=True)
class RemoteBatch:
    """A chunk of a job's items inside one provider batch."""

    chunk: int
    provider: str
    status: str  # creating (remote id not yet recorded) | live | collected
    remote_id: str | None
    input_file_id: str | None
    remote_status: str | None  # the provider's own status word
    requests: int
    counts: dict[str, int]
    planned_at: float
    ended_at: float | None
    # Until when a create call for this chunk may still land at the provider: 0 while no
    # create was sent; None for a chunk recorded before overnight kept this (unknown).
    create_until: float | None = 0.0
    # The chunk's custom_ids carry the job's token (False: a chunk from before tokens,
    # sent with the old ids: the user's own, or `ovn_<seq>` on Anthropic).
    tagged: bool = True

    def to_dict(self) -> dict[str, object]:
        return {
            "chunk": self.chunk,
            "provider": self.provider,
            "remote_id": self.remote_id,
            "status": self.remote_status or self.status,
            "requests": self.requests,
            "counts": self.counts,
        }


class ItemState(NamedTuple):
    """An item as a results queue publishes it (Ledger.items_page)."""

    seq: int
    custom_id: str
    state: str
    result: bytes | None
    vector: bytes | None
    error_class: str | None
    message: str | None
    attempts: int


@dataclass(frozen=True)
class Failure:
    custom_id: str | None
    line: int
    state: str
    error_class: str
    message: str
    attempts: int


@dataclass
class Counts:
    by_state: dict[str, int] = field(default_factory=dict)
    rejected: int = 0  # records refused at ingest (input errors): failed, not items
    first_started: float | None = None
    last_finished: float | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0  # USD spent on the job's items so far
    list_cost: float = 0.0  # what the same tokens cost at real-time prices

    @property
    def saved(self) -> float:
        return max(0.0, self.list_cost - self.cost)

    def __getitem__(self, state: str) -> int:
        return self.by_state.get(state, 0)

    @property
    def total(self) -> int:
        return sum(self.by_state.values()) + self.rejected

    @property
    def failed(self) -> int:
        return self["failed"] + self.rejected

    @property
    def open(self) -> int:
        """Items that still need work (pending, leased or inside a remote batch)."""
        return self["pending"] + self["leased"] + self["submitted"]


class Ledger(Protocol):
    # claims: which process runs a job (see claim.py)
    def claim(
        self, name: str, owner: str, now: float, expires: float, take_from: str | None = None
    ) -> Claim: ...
    def renew_claim(self, name: str, owner: str, expires: float) -> bool: ...
    def release_claim(self, name: str, owner: str) -> None: ...
    def get_claim(self, name: str) -> Claim | None: ...
    def start_run(self, name: str, owner: str, now: float) -> int: ...
    def update_run(
        self,
        run_id: int,
        now: float,
        processed: int,
        seconds: float,
        setup_seconds: float,
        outcome: str | None = None,
    ) -> None: ...
    def last_run(self, name: str) -> RunRecord | None: ...
    def open_runs(self, name: str) -> list[RunRecord]: ...
    def finished_since(self, job_id: int, since: float) -> int: ...

    # jobs
    def get_job(self, name: str) -> JobInfo | None: ...
    def list_jobs(self) -> list[JobInfo]: ...
    def create_job(
        self,
        name: str,
        spec_hash: str,
        fingerprint: Fingerprint,
        discarded_before: float = 0.0,
        origin: str | None = None,
    ) -> JobInfo: ...
    def delete_job(self, job_id: int) -> None: ...
    def set_fingerprint(self, job_id: int, fingerprint: Fingerprint) -> None: ...
    def set_origin(self, job_id: int, origin: str) -> None: ...

    # incremental runs: the changed input read into a new generation that replaces the job
    def begin_generation(self, job: JobInfo, fingerprint: Fingerprint) -> JobInfo: ...
    def carry_results(self, old_id: int, new_id: int) -> tuple[int, int]: ...
    def replace_generation(self, old: JobInfo, new: JobInfo) -> JobInfo: ...

    # ingest: rows in (pending, or already finished), refusals recorded, cursor saved, one txn
    def add_items(
        self,
        job_id: int,
        first_seq: int,
        rows: list[Row],
        cursor: Cursor,
        outcomes: list[Outcome] | None = None,
    ) -> list[bool]: ...
    def add_succeeded(
        self, job_id: int, first_seq: int, rows: list[Row], cursor: Cursor, results: list[bytes]
    ) -> list[bool]: ...
    def finish_ingest(self, job_id: int) -> None: ...

    # work
    def lease(self, job_id: int, limit: int, lease: Lease) -> list[Item]: ...
    def complete(self, job_id: int, owner: str, outcomes: list[Outcome], now: float) -> int: ...
    def release(self, job_id: int, owner: str, seqs: list[int] | None = None) -> int: ...
    def renew(self, job_id: int, owner: str, expires: float) -> int: ...
    def reclaim_expired(self, job_id: int, now: float) -> int: ...
    def lease_owners(self, job_id: int) -> list[str]: ...

    # attempts counted when they start: what a runner is computing right now (see SQLLedger)
    def mark_inflight(self, job_id: int, owner: str, first_seq: int, last_seq: int) -> None: ...
    def clear_inflight(self, job_id: int, owner: str) -> None: ...
    def inflight(self, job_id: int) -> list[tuple[str, int, int]]: ...
    def release_dead(
        self, job_id: int, owner: str, max_attempts: int, error_class: str, message: str
    ) -> int: ...
    def next_due(self, job_id: int) -> float | None: ...

    # reading and state changes asked for by the user
    def counts(self, job_id: int) -> Counts: ...
    def iter_results(
        self, job_id: int, with_payload: bool = False
    ) -> Iterator[tuple[str, bytes, bytes | None, bytes | None]]: ...
    def iter_result_lines(self, job_id: int, id_name: str) -> Iterator[list[bytes]]: ...
    def iter_failures(self, job_id: int) -> Iterator[Failure]: ...
    def reject_lines(self, job_id: int, limit: int) -> list[int]: ...
    def failure_records(self, job_id: int, limit: int) -> list[tuple[Failure, bytes | None]]: ...
    def finished_per_interval(self, job_id: int, since: float, width: float) -> dict[int, int]: ...
    def retry(self, job_id: int, states: tuple[str, ...]) -> int: ...
    def cancel(self, job_id: int) -> int: ...
    def is_cancelled(self, job_id: int) -> bool: ...
    def reopen(self, job_id: int, before: float = float("inf")) -> int: ...
    def close(self) -> None: ...

    # the LLM response cache kept in the ledger (llm/cache.py: LedgerResponseCache)
    def cache_get(self, scope: str, keys: list[str]) -> list[tuple[str, bytes, int, int]]: ...
    def cache_put(
        self, scope: str, key: str, body: bytes, input_tokens: int, output_tokens: int
    ) -> None: ...
    def cache_clear(self, scope: str) -> int: ...

    # remote batches (provider batch APIs): see SQLLedger's section for the guarantees
    def pending_page(self, job_id: int, after_seq: int, limit: int, now: float) -> list[Item]: ...
    def known_ids(self, job_id: int, custom_ids: list[str]) -> set[str]: ...
    def repeats_seen(self, job_id: int, custom_ids: list[str]) -> set[str]: ...
    def items_page(self, job_id: int, from_seq: int, limit: int) -> list[ItemState]: ...
    def plan_chunk(self, job_id: int, provider: str, seqs: list[int], now: float) -> int: ...
    def set_create_until(self, job_id: int, chunk: int, until: float) -> None: ...
    def set_remote(
        self, job_id: int, chunk: int, remote_id: str, input_file_id: str | None = None
    ) -> None: ...
    def update_chunk(
        self, job_id: int, chunk: int, remote_status: str, counts: dict[str, int]
    ) -> None: ...
    def chunks(self, job_id: int, statuses: tuple[str, ...] | None = None) -> list[RemoteBatch]: ...
    def chunk_items(self, job_id: int, chunk: int) -> list[Item]: ...
    def finish_chunk(
        self,
        job_id: int,
        chunk: int,
        outcomes: list[Outcome],
        now: float,
        *,
        leftover: str = "pending",
        remote_status: str | None = None,
        count_attempt: bool = True,
    ) -> int: ...
