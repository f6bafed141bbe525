"""The worker loop: lease a batch, build inputs, call the backend, parse, validate, commit.

New records take a short cut. A batch read from the source is computed at once and inserted
in its final state, with its result, in one transaction that also moves the ingest cursor past
it: a record is parsed once and written once. A crash before that commit loses nothing (the
cursor has not moved, so the batch is read and computed again) and a result is never written
twice, exactly as with a lease.

Everything else (items left pending by a crash or Ctrl-C, retries after backoff, `retry`) is
leased from the ledger, batch by batch.

Several workers on one job (claim.py): one of them ingests (`may_ingest`). While it is the
only live worker it takes the short cut; once another is there (`alone` says no more), it
reads the rest of the input in as pending items, which every worker leases. A worker with
nothing to lease waits while the input is still being read (and takes the ingest over if its
ingester dies), or while other live workers hold leases; it looks after dead workers' leases
as it goes, and ends when no item is open and the input is read.

An attempt counts when it starts, not only when it ends (`count_starts`): before computing
a batch, fresh or leased, the runner marks its records in the ledger as in flight. A runner
that dies while computing (a record that crashes the process, kill -9, the OOM killer)
leaves the mark, and the next run counts an attempt for exactly those records. They become
suspects: computed one at a time, so a death names its record, which fails once it has
died `max_attempts` times; every other record goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson
import psutil

from . import results
from .backends.base import Predictor
from .batching import BatchSizer
from .errors import (
    EndpointDown,
    InputError,
    InvalidOutput,
    KeyRefused,
    OutputCountError,
    OvernightError,
    UsageError,
    error_class,
    redact,
)
from .records import Cursor, Row, cursor_after
from .retry import Fault, RetryPolicy
from .store import ConcurrentIngest, JobInfo, Lease, Ledger, Outcome
from .tasks import Task

log = logging.getLogger(__name__)

Reader = Callable[[Cursor], Iterator[list[Row]]]
Validator = Callable[[Any], str | None]  # output -> reason it is invalid, or None


class Usage(NamedTuple):
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None  # USD actually paid (None: price unknown)
    list_cost: float | None = None  # the same tokens at the real-time price
    attempts: int = 1  # requests the answer took (a backend that retries counts its own)


Meter = Callable[[Any], Usage]  # an answer -> what it cost


def outcome(
    seq: int,
    state: str,
    result: bytes | None = None,
    error_class: str | None = None,
    message: str | None = None,
    not_before: float = 0.0,
    usage: Usage = Usage(),  # noqa: B008 - an immutable NamedTuple
    vector: bytes | None = None,
    follow_up: bytes | None = None,
) -> Outcome:
    """An Outcome with what its answer cost, by name (the tuple's order is the ledger's)."""
    return Outcome(
        seq,
        state,  # type: ignore[arg-type]
        result,
        error_class,
        message,
        not_before,
        usage.input_tokens,
        usage.output_tokens,
        usage.cost,
        usage.list_cost,
        vector,
        usage.attempts,
        follow_up,
    )


@dataclass
class Progress:
    succeeded: int = 0
    failed: int = 0  # includes records refused at ingest
    invalid: int = 0
    retries: int = 0  # transient errors sent back for another attempt
    ingested: int = 0  # records read so far (items + refused)
    ingest_done: bool = False
    expected: int = 0  # records in the input, estimated before ingest ends
    processed: int = 0  # items finished by this run
    started: float = field(default_factory=time.monotonic)
    batch_size: int = 0
    setup_seconds: float = 0.0  # loading the model (or importing the function), not processing
    cost: float = 0.0  # USD spent on the job so far (LLM backends)
    list_cost: float = 0.0  # the same tokens at real-time prices
    stop_reason: str | None = None  # why the run stopped early (max_cost, endpoint down)
    in_batches: int = 0  # batch backends: items inside live provider batches ...
    live_batches: int = 0  # ... and how many batches

    def count(self, outcomes: list[Outcome], with_cost: bool = True) -> None:
        """Add committed outcomes; an outcome sent back to pending is a retry, not progress."""
        if with_cost:
            self.cost += sum(o.cost or 0.0 for o in outcomes)
            self.list_cost += sum(o.list_cost or 0.0 for o in outcomes)
        for o in outcomes:
            if o.state == "succeeded":
                self.succeeded += 1
            elif o.state == "failed":
                self.failed += 1
            elif o.state == "invalid":
                self.invalid += 1
            else:
                self.retries += 1
                continue
            self.processed += 1

    def count_succeeded(self, n: int) -> None:
        """Add `n` items committed as succeeded, without usage (the fresh hot path)."""
        self.succeeded += n
        self.processed += n

    def budget_reached(self, max_cost: float | None, what: str) -> bool:
        """True once `max_cost` is spent; records why the run stopped, once."""
        if max_cost is None or self.cost < max_cost:
            return False
        if self.stop_reason is None:
            self.stop_reason = (
                f"max_cost reached: ${self.cost:.4f} spent of ${max_cost:g}; no new {what} was"
                " sent (raise [run] max_cost and run again to go on)"
            )
        return True

    @property
    def total(self) -> int:
        """Records in the job: exact once ingest is done, else the best estimate so far."""
        return self.ingested if self.ingest_done else max(self.expected, self.ingested)

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.invalid

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Work(NamedTuple):
    """One item to compute (a tuple: one is built per record on the hot path)."""

    seq: int
    line: int
    attempts: int
    record: dict[str, Any] | None  # parsed already (fresh from the source), or None
    payload: bytes  # the record as JSON, as stored in the ledger


_tuple = tuple.__new__  # builds a NamedTuple without its Python-level __new__

# The error class of an attempt that died with its runner; such an item is a suspect.
PROCESS_DIED = "process_died"
DIED_MESSAGE = (
    "the process died while computing this record (a crash in the function or the model,"
    " kill -9, or the out-of-memory killer)"
)


def lease_owner() -> str:
    """host:pid:start-time. The start time tells a dead runner from a new one with its pid."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{int(psutil.Process(pid).create_time())}"


def owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host, None when it lives on another host."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return None
    pid_s, _, started = rest.partition(":")
    try:
        return int(psutil.Process(int(pid_s)).create_time()) == int(started)
    except (psutil.NoSuchProcess, ValueError):
        return False


def ingest_only(
    ledger: Ledger,
    job: JobInfo,
    reader: Reader,
    *,
    progress: Progress,
    on_progress: Callable[[Progress], None] = lambda p: None,
    stop: threading.Event | None = None,
) -> bool:
    """Read the whole input into the ledger as pending items, nothing computed: the batch
    backends submit from the ledger. Resumable at the cursor; True once ingest is complete."""
    if job.ingest_done:
        return True
    seq = job.cursor.records
    try:
        for rows in reader(job.cursor):
            if stop is not None and stop.is_set():
                return False
            accepted = ledger.add_items(job.id, seq, rows, cursor_after(rows[-1], seq + len(rows)))
            seq += len(rows)
            progress.ingested += len(rows)
            progress.failed += accepted.count(False)
            on_progress(progress)
    except ConcurrentIngest:
        raise UsageError(
            f"job {job.name!r} is being run by another process right now; let it finish,"
            " and see `overnight status`"
        ) from None
    ledger.finish_ingest(job.id)
    progress.ingest_done = True
    on_progress(progress)
    return True


class _GroupCommit:
    """Buffers computed fresh batches and commits them in one transaction once enough rows
    or time has built up: a slow model commits after every batch, a cheap function every few
    thousand records. A crash loses at most that buffer, which is computed again on rerun.
    (A commit thread was tried and measured slower: it fights the main thread for the GIL.)

    A window comes with its outcomes, or (the hot path, every row read and succeeded) with
    its result rows alone; while every window of the buffer is such, it is committed by
    `add_succeeded`, with no Outcome per record."""

    def __init__(
        self,
        commit: Callable[[int, list[Row], list[Outcome] | None, list[bytes] | None], None],
        max_rows: int = 8192,
        max_seconds: float = 0.5,
    ) -> None:
        self._commit, self.max_rows, self.max_seconds = commit, max_rows, max_seconds
        self._seq = 0
        self._rows: list[Row] = []
        self._outcomes: list[Outcome] = []
        self._results: list[bytes] | None = []  # None: a window came with outcomes
        self._since = 0.0

    def add(
        self,
        seq: int,
        rows: list[Row],
        outcomes: list[Outcome] | None,
        results: list[bytes] | None = None,
    ) -> None:
        if not self._rows:
            self._seq, self._since = seq, time.monotonic()
            self._outcomes, self._results = [], []
        if results is not None and self._results is not None:
            self._results += results
        else:
            if self._results is not None:  # the buffer so far as outcomes: every row is one
                self._outcomes = _succeeded(self._seq, self._results)
                self._results = None
            self._outcomes += outcomes if outcomes is not None else _succeeded(seq, results or [])
        self._rows += rows
        if len(self._rows) >= self.max_rows or time.monotonic() - self._since >= self.max_seconds:
            self.flush()

    def discard(self) -> None:
        self._rows, self._outcomes, self._results = [], [], []

    def ids(self) -> set[str]:
        """The ids of the records buffered (computed, not committed yet)."""
        return {r[1] for r in self._rows if r[4] is None}

    def flush(self) -> None:
        if self._rows:
            rows, outcomes, results = self._rows, self._outcomes, self._results
            self.discard()
            if results is not None:
                self._commit(self._seq, rows, None, results)
            else:
                self._commit(self._seq, rows, outcomes, None)


def _succeeded(seq: int, results: list[bytes]) -> list[Outcome]:
    """Outcomes of items `seq...` that succeeded on their first attempt with `results`."""
    return [
        _tuple(Outcome, (s, "succeeded", r, None, None, 0.0, 0, 0, None, None, None, 1, None))
        for s, r in zip(range(seq, seq + len(results)), results, strict=True)
    ]


class Runner:
    def __init__(
        self,
        ledger: Ledger,
        job: JobInfo,
        task: Task,
        predictor: Callable[[], Predictor],
        *,
        reader: Reader,
        sizer: BatchSizer,
        window: int = 1,
        retry_policy: RetryPolicy,
        lease_seconds: float,
        validate: Validator | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
        progress: Progress | None = None,
        meter: Meter | None = None,
        max_cost: float | None = None,
        commit_each_call: bool = False,
        count_starts: bool = False,
        may_ingest: Callable[[], bool] | None = None,
        alone: Callable[[], bool] | None = None,
    ) -> None:
        self.ledger, self.job, self.task = ledger, job, task
        self.vectors = task.kind == "embed"  # outputs stored as float32 bytes (results.py)
        self.meter, self.max_cost = meter, max_cost
        # Paid answers are committed as soon as their call returns, not grouped.
        self.commit_each_call = commit_each_call
        self._make_predictor, self._predictor = predictor, None
        self._runs_task = False  # the predictor takes records and returns rows, as JSON
        # Mark what is computed before computing it (see the module's docstring). Worth it
        # where a record can kill the process: user code and local models, not HTTP calls.
        self.count_starts = count_starts
        self._suspects: list[tuple[str, int, int]] = []  # dead runners' marks of fresh records
        self.reader, self.sizer, self.retry_policy = reader, sizer, retry_policy
        self.window = window  # items per backend call at least (see Predictor.window)
        self.lease_seconds, self.validate = lease_seconds, validate
        self.on_progress = on_progress or (lambda p: None)
        self.stop = stop or threading.Event()
        self.progress = progress or Progress()
        self.owner = lease_owner()
        self.cancelled = False
        self._cancel_checked = 0.0
        self._renewed = time.time()
        # Several workers (see the module's docstring): may this one ingest now (the ingest
        # claim is its own, or it took it over)? Is it alone on the job?
        self._may_ingest = may_ingest or (lambda: True)
        self._alone = alone or (lambda: True)
        self._shared = False  # another worker was seen: ingest as pending items from then on
        self._alone_checked = 0.0
        self._looked = time.monotonic()  # when dead workers' leases were last looked for
        self._call_seconds = 0.0  # the last leased call's duration (see _lease_size)

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        self._reclaim()
        try:
            if not self.job.ingest_done:
                self._catch_up()
            if not self._stopping():
                self._drain()
        finally:
            # Whatever this runner still holds (Ctrl-C, an error) goes back to pending; an
            # attempt cut short by an exception is not a death, so the mark goes too.
            self.ledger.release(self.job.id, self.owner)
            if self.count_starts:
                self.ledger.clear_inflight(self.job.id, self.owner)
            if self._predictor is not None:
                self._predictor.close()

    def _ingest(self) -> None:
        seq = self.job.cursor.records
        pending = _GroupCommit(self._commit_fresh, max_rows=1 if self.commit_each_call else 8192)
        completed = False
        try:
            for rows in self.reader(self.job.cursor):
                i = 0
                while i < len(rows):
                    if self._stopping():
                        return
                    if self._others_here():  # the rest becomes items, for every worker
                        pending.flush()
                        self._add_pending(seq, rows[i:])
                        seq += len(rows) - i
                        break
                    window = rows[i : i + self._window_size()]
                    i += len(window)
                    t0 = time.perf_counter()
                    last = seq + len(window) - 1
                    if self._suspects and any(f <= last and seq <= t for _, f, t in self._suspects):
                        pending.add(seq, window, self._fresh_with_suspects(seq, window))
                        pending.flush()  # the suspects are items now: their marks can go
                        self._drop_suspects(seq + len(window))
                        seq += len(window)
                        continue
                    repeats = (
                        self._repeats(seq, window, pending) if self.meter is not None else set()
                    )
                    pending.add(seq, window, *self._attempt_fresh(seq, window, repeats))
                    seq += len(window)
                    self.sizer.observe(len(window), time.perf_counter() - t0)
            pending.flush()
            if self.count_starts:
                self.ledger.clear_inflight(self.job.id, self.owner)
            completed = True
        except ConcurrentIngest:
            pending.discard()  # those records are another runner's now
            raise UsageError(
                f"job {self.job.name!r} is being run by another process right now (it moved "
                "the input cursor first); let it finish, and see `overnight status`"
            ) from None
        finally:
            if not completed:  # stopped or failed: what was computed is still kept
                with contextlib.suppress(ConcurrentIngest):
                    pending.flush()
        self.ledger.finish_ingest(self.job.id)
        self.progress.ingest_done = True
        self.on_progress(self.progress)

    def _repeats(self, seq: int, window: list[Row], pending: _GroupCommit) -> set[int]:
        """The seqs of the window's records whose id an earlier record has (an item of the
        job, a record computed but not committed yet, or one before it in the window): they
        are not computed, and their commit refuses them as repeats, naming the first line.
        For models that are metered (paid, or an LLM's tokens): computing them first paid
        for answers that were thrown away. (A cheap function computes them; the commit's
        check is the one that counts, and this one would cost its hot path.)"""
        readable = [(k, r[1]) for k, r in enumerate(window) if r[4] is None]
        earlier = self.ledger.repeats_seen(self.job.id, [cid for _, cid in readable])
        earlier.update(pending.ids())
        out = set()
        for k, cid in readable:
            if cid in earlier:
                out.add(seq + k)
            else:
                earlier.add(cid)
        return out

    def _attempt_fresh(
        self, seq: int, window: list[Row], repeats: set[int]
    ) -> tuple[list[Outcome] | None, list[bytes] | None]:
        """A window of fresh records computed: the outcomes of those that could be read, or,
        when every record was read and succeeded on the hot path, their result rows alone.
        `repeats` (seqs) are not computed: each gets a pending outcome, which the commit
        drops as it refuses the repeat (were the first one gone, it would be leased).

        The hot path of a run: a python function or a local model in its worker process
        (`runs_task`), every record readable, nothing to validate or meter. The records go
        as they were read and the answer rows are the results: no Work nor Outcome per
        record (a Work is built only when a call fails and its batch is split)."""
        self._load()
        plain = self._runs_task and self.validate is None and self.meter is None
        if repeats:
            works = [
                _tuple(Work, (seq + k, r.line, 0, r.record, r.payload))
                for k, r in enumerate(window)
                if r.error is None and seq + k not in repeats
            ]
            if works and self.count_starts:
                self.ledger.mark_inflight(self.job.id, self.owner, seq, seq + len(window) - 1)
            got = {o.seq: o for o in (self._attempt(works) if works else [])}
            return [
                got.get(seq + k) or Outcome(seq + k, "pending")
                for k, r in enumerate(window)
                if r.error is None
            ], None
        if not plain or not all(r[4] is None for r in window):
            works = [
                _tuple(Work, (seq + k, r.line, 0, r.record, r.payload))
                for k, r in enumerate(window)
                if r.error is None
            ]
            if works and self.count_starts:
                self.ledger.mark_inflight(self.job.id, self.owner, seq, seq + len(window) - 1)
            return (self._attempt(works) if works else []), None
        if self.count_starts:
            self.ledger.mark_inflight(self.job.id, self.owner, seq, seq + len(window) - 1)
        assert self._predictor is not None
        payloads = [r[2] for r in window]
        try:
            answers = self._predictor.process(payloads, self.sizer.size)
        except Exception as exc:
            works = [_tuple(Work, (seq + k, r[0], 0, None, r[2])) for k, r in enumerate(window)]
            return self._failed(works, payloads, exc), None
        if len(answers) == len(window) and all(type(a) is bytes for a in answers):
            return None, answers
        works = [_tuple(Work, (seq + k, r[0], 0, None, r[2])) for k, r in enumerate(window)]
        return [self._finish(w, a) for w, a in zip(works, answers, strict=True)], None

    def _fresh_with_suspects(self, seq: int, window: list[Row]) -> list[Outcome]:
        """A window holding records a dead runner was computing: those are not computed but
        inserted with that attempt counted (the drain computes them alone); the others are
        computed in runs between them, each marked as usual."""
        last = seq + len(window) - 1
        suspect = {s for _, f, t in self._suspects for s in range(max(f, seq), min(t, last) + 1)}
        outcomes: dict[int, Outcome] = {}
        run: list[Work] = []

        def compute() -> None:
            if run:
                if self.count_starts:
                    self.ledger.mark_inflight(self.job.id, self.owner, run[0].seq, run[-1].seq)
                outcomes.update((o.seq, o) for o in self._attempt(run))
                run.clear()

        for k, r in enumerate(window):
            if r.error is not None:
                continue
            if seq + k in suspect:
                compute()
                outcomes[seq + k] = self._died(seq + k)
            else:
                run.append(Work(seq + k, r.line, 0, r.record, r.payload))
        compute()
        return [outcomes[seq + k] for k, r in enumerate(window) if r.error is None]

    def _others_here(self) -> bool:
        """Whether another worker works on this job (asked at most twice a second)."""
        now = time.monotonic()
        if not self._shared and now - self._alone_checked >= 0.5:
            self._alone_checked = now
            self._shared = not self._alone()
        return self._shared

    def _add_pending(self, seq: int, rows: list[Row]) -> None:
        """Rows in as pending items, not computed; those a dead runner was computing are
        inserted with that attempt counted (suspects, computed alone)."""
        outcomes = None
        last = seq + len(rows) - 1
        if self._suspects and any(f <= last and seq <= t for _, f, t in self._suspects):
            marks = self._suspects
            suspect = {s for _, f, t in marks for s in range(max(f, seq), min(t, last) + 1)}
            fresh = Outcome(0, "pending", attempts=0)
            outcomes = [
                self._died(seq + k) if seq + k in suspect else fresh._replace(seq=seq + k)
                for k, r in enumerate(rows)
                if r.error is None
            ]
        accepted = self.ledger.add_items(
            self.job.id, seq, rows, cursor_after(rows[-1], seq + len(rows)), outcomes
        )
        self._drop_suspects(seq + len(rows))
        self.progress.ingested += len(rows)
        self.progress.failed += accepted.count(False)
        if outcomes is not None:
            self._count([o for o in outcomes if o.state != "pending"])
        self.on_progress(self.progress)
        self._check_cancel()

    def _died(self, seq: int) -> Outcome:
        if self.retry_policy.decide(1, Fault("transient"), time.time()).retry:
            return Outcome(seq, "pending", None, PROCESS_DIED, DIED_MESSAGE)
        message = f"{DIED_MESSAGE} (gave up after 1 attempts)"
        return Outcome(seq, "failed", None, PROCESS_DIED, message)

    def _drop_suspects(self, cursor: int) -> None:
        """Dead runners' marks whose records are all items now (below the cursor) go."""
        for mark in [m for m in self._suspects if m[2] < cursor]:
            self.ledger.clear_inflight(self.job.id, mark[0])
            self._suspects.remove(mark)

    def _commit_fresh(
        self,
        seq: int,
        window: list[Row],
        outcomes: list[Outcome] | None,
        results: list[bytes] | None = None,
    ) -> None:
        """Insert computed batches and move the ingest cursor past them, in one transaction
        (`results` alone: every row was read and succeeded, see _GroupCommit)."""
        cursor = cursor_after(window[-1], seq + len(window))
        if results is not None:
            accepted = self.ledger.add_succeeded(self.job.id, seq, window, cursor, results)
            self.progress.ingested += len(window)
            done = accepted.count(True)
            self.progress.failed += len(window) - done  # repeated ids
            self.progress.count_succeeded(done)
            self.progress.batch_size = self.sizer.size
            self.on_progress(self.progress)
            self._check_cancel()
            return
        assert outcomes is not None
        accepted = self.ledger.add_items(self.job.id, seq, window, cursor, outcomes)
        self.progress.ingested += len(window)
        if not all(accepted):
            refused = {seq + k for k, ok in enumerate(accepted) if not ok}
            self.progress.failed += len(refused)
            outcomes = [o for o in outcomes if o.seq not in refused]
        self._count(outcomes)
        self._check_cancel()

    def _drain(self) -> None:
        while not self._stopping():
            # Dead workers' items back to pending, now and then (not only when idle): they
            # are done within the lease time even while there is other work.
            if time.monotonic() - self._looked >= min(5.0, self.lease_seconds / 4):
                self._reclaim()
            items = self.ledger.lease(self.job.id, self._lease_size(), self._lease())
            if items:
                self._process(
                    [Work(it.seq, it.line, it.attempts, None, it.payload) for it in items],
                    {it.seq for it in items if it.error_class == PROCESS_DIED},
                )
                continue
            if not self._wait_for_work():
                return

    def _wait_for_work(self) -> bool:
        """Nothing to lease now: wait until something may be due (a retry's backoff, the
        input read on, another runner's lease ended). False when there is nothing left to
        wait for: no item open, none held by anyone, the input read (or the job cancelled)."""
        self._check_cancel()  # (a cancel while waiting on other workers)
        if self.cancelled:
            return False
        due = self.ledger.next_due(self.job.id)
        if due is None:
            if not self.job.ingest_done:
                self._catch_up()  # the input is still being read, by this one or another
                due = time.time() + (0.0 if self.job.ingest_done else 0.1)
            elif not self.ledger.lease_owners(self.job.id):
                return False  # nothing pending, nothing held by anyone, input read: done
            else:
                # Another runner holds items: wait for it to finish or its lease to end.
                self._reclaim()
                due = time.time() + 0.2
        self.stop.wait(min(max(0.0, due - time.time()), 5.0))
        return True

    def _catch_up(self) -> None:
        """The input not fully read: read it on if this worker may (it is the ingester, or
        the ingester is gone), else note whether the ingester has finished."""
        now = self.ledger.get_job(self.job.name)
        if now is None or now.id != self.job.id or now.ingest_done:
            self.job = dataclasses.replace(self.job, ingest_done=True)
            self.progress.ingest_done = True
            return
        if self._may_ingest():
            # Read again now that the ingest is this worker's: the cursor may have moved
            # since, up to the moment the last ingester died.
            now = self.ledger.get_job(self.job.name)
            if now is None or now.id != self.job.id or now.ingest_done:
                return
            self.job = now
            self._reclaim()
            self._ingest()

    def _process(self, works: list[Work], alone: set[int]) -> None:
        """Leased items, a window at a time; suspects (`alone`) one at a time. Their outcomes
        are committed together once the lease is done (a lease is short: see _lease_size),
        or after each call where answers are paid for."""
        done: list[Outcome] = []
        try:
            i = 0
            while i < len(works):
                if self._stopping():
                    return
                batch = works[i : i + self._window_size()]
                if alone:
                    cut = next((k for k, w in enumerate(batch) if w.seq in alone), len(batch))
                    batch = batch[: max(cut, 1)]
                i += len(batch)
                if self.count_starts:  # the leased items this runner holds in this range
                    self.ledger.mark_inflight(self.job.id, self.owner, batch[0].seq, batch[-1].seq)
                t0 = time.perf_counter()
                outcomes = self._attempt(batch)
                self._call_seconds = time.perf_counter() - t0
                self.sizer.observe(len(batch), self._call_seconds)
                done += outcomes
                if self.commit_each_call or batch[0].seq in alone:
                    self._complete(done)
                    done = []
                self._renew()
                self._check_cancel()
        finally:
            if done:
                self._complete(done)

    def _complete(self, outcomes: list[Outcome]) -> None:
        self.ledger.complete(self.job.id, self.owner, outcomes, time.time())
        self._count(outcomes)

    # -- one batch ----------------------------------------------------------------------

    def _load(self) -> None:
        if self._predictor is None:  # the model loads only if there is work
            t0 = time.monotonic()
            self._predictor = self._make_predictor()
            self._runs_task = getattr(self._predictor, "runs_task", False)
            self.progress.setup_seconds += time.monotonic() - t0

    def _attempt(self, batch: list[Work]) -> list[Outcome]:
        """One outcome per item of the batch, in the batch's order."""
        self._load()
        if self._runs_task:  # records go as they are stored; build and parse happen there
            return self._predict(batch, [w.payload for w in batch])
        build, loads = self.task.build, orjson.loads
        try:  # the common case, kept tight: every record builds
            inputs = [build(w.record if w.record is not None else loads(w.payload)) for w in batch]
        except InputError:
            pass
        else:
            return self._predict(batch, inputs)
        outcomes: dict[int, Outcome] = {}
        good, inputs = [], []
        for w in batch:
            try:
                inputs.append(build(w.record if w.record is not None else loads(w.payload)))
                good.append(w)
            except InputError as exc:
                outcomes[w.seq] = Outcome(w.seq, "failed", None, error_class(exc), str(exc))
        if good:
            outcomes.update((o.seq, o) for o in self._predict(good, inputs))
        return [outcomes[w.seq] for w in batch]

    def _predict(self, works: list[Work], inputs: list[Any]) -> list[Outcome]:
        assert self._predictor is not None
        try:
            answers = self._predictor.process(inputs, self.sizer.size)
        except Exception as exc:
            return self._failed(works, inputs, exc)
        return self._settle(works, answers)

    def _settle(self, works: list[Work], answers: list[Any]) -> list[Outcome]:
        """The outcomes of a call's answers, one per item of `works`, in its order."""
        if self._runs_task:  # output rows as JSON bytes (or an exception per record)
            plain = self.validate is None and self.meter is None
            if plain and all(type(a) is bytes for a in answers):
                return [
                    _tuple(
                        Outcome,
                        (w[0], "succeeded", r, None, None, 0.0, 0, 0, None, None, None, 1, None),
                    )
                    for w, r in zip(works, answers, strict=True)
                ]
        elif self.validate is None and self.meter is None and not self.vectors:
            parse, dumps, numpy = self.task.parse, orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
            try:  # the common case again: serialise the whole batch in one comprehension
                rows = [dumps(parse(a), option=numpy) for a in answers]
            except Exception:
                pass
            else:
                return [
                    _tuple(
                        Outcome,
                        (w[0], "succeeded", r, None, None, 0.0, 0, 0, None, None, None, 1, None),
                    )
                    for w, r in zip(works, rows, strict=True)
                ]
        return [self._finish(w, answer) for w, answer in zip(works, answers, strict=True)]

    def _failed(self, works: list[Work], inputs: list[Any], exc: Exception) -> list[Outcome]:
        """The outcomes of a call that raised `exc` for all of `works`."""
        if isinstance(exc, EndpointDown | KeyRefused):
            raise exc  # nothing is wrong with these items: the job stops, they stay pending
        if isinstance(exc, OutputCountError):
            # The batch answered wrongly as a whole: split, each half might "succeed" with
            # outputs that are not its own. The whole batch fails, with the message.
            return [self._error(w, exc) for w in works]
        if len(works) == 1:
            return [self._error(works[0], exc)]
        # One bad input must not sink its batch: split until the poison is alone.
        mid = len(works) // 2
        return self._predict(works[:mid], inputs[:mid]) + self._predict(works[mid:], inputs[mid:])

    def _finish(self, w: Work, answer: Any) -> Outcome:
        if isinstance(answer, BaseException):  # the backend failed this item alone
            return self._error(w, answer)
        usage = self.meter(answer) if self.meter is not None else Usage()
        if self._runs_task:  # the worker's row: JSON, or (JSON, an embedding's bytes)
            result, vector = answer if type(answer) is tuple else (answer, None)
        else:
            try:
                fields = self.task.parse(answer)
                result, vector = results.encode(fields, self.vectors)
            except orjson.JSONEncodeError as exc:
                return outcome(
                    w.seq, "invalid", None, "unserialisable_output", str(exc), usage=usage
                )
            except Exception as exc:
                return self._error(w, exc, usage)
        if self.validate is not None:
            plain = orjson.loads(result).get("output")  # plain JSON, not numpy
            if vector is not None:
                plain = results.decode(result, vector)["output"].tolist()
            reason = self.validate(plain)
            if reason is not None:
                return outcome(w.seq, "invalid", None, "schema_error", reason, usage=usage)
        return outcome(w.seq, "succeeded", result, usage=usage, vector=vector)

    def _error(self, w: Work, exc: BaseException, usage: Usage | None = None) -> Outcome:
        # The tries this error stands for: 1, or what a backend that retries on its own counted.
        usage = usage or Usage(attempts=exc.attempts if isinstance(exc, OvernightError) else 1)
        attempts = w.attempts + usage.attempts
        cls, msg = error_class(exc), redact(str(exc) or error_class(exc))
        if isinstance(exc, InvalidOutput):  # the model answered, wrongly: not a failure to retry
            return outcome(w.seq, "invalid", None, cls, msg, usage=usage)
        decision = self.retry_policy.decide(attempts, Fault.of(exc), time.time())
        if decision.retry:
            return outcome(w.seq, "pending", None, cls, msg, decision.at, usage=usage)
        if decision.reason == "exhausted":
            msg = f"{msg} (gave up after {attempts} attempts)"
        return outcome(w.seq, "failed", None, cls, msg, usage=usage)

    # -- bookkeeping --------------------------------------------------------------------

    def _window_size(self) -> int:
        # While "auto" compares batch sizes, calls stay short so that trying six sizes costs
        # a few hundred items, not thousands; the comparison is fair (same window for all).
        window = self.window if self.sizer.settled else min(self.window, 256)
        return max(self.sizer.size, window)

    # Short calls are leased several at a time, about this long of work per lease: one lease
    # transaction per call would make workers queue for the ledger's lock.
    LEASE_SPAN = 0.2

    def _lease_size(self) -> int:
        calls = int(self.LEASE_SPAN / self._call_seconds) if self._call_seconds > 0 else 1
        return self._window_size() * max(1, min(8, calls))

    def _lease(self) -> Lease:
        now = time.time()
        return Lease(self.owner, now + self.lease_seconds, now)

    def _renew(self) -> None:
        now = time.time()
        if now - self._renewed > self.lease_seconds / 3:
            self.ledger.renew(self.job.id, self.owner, now + self.lease_seconds)
            self._renewed = now

    def _reclaim(self) -> None:
        """Items held by a runner that died (kill -9, crash) go back to pending at once, an
        attempt counted for those it was computing; those of a runner on another host wait
        for their lease to expire. Fresh records a dead runner was computing are noted, to
        be inserted as suspects when ingest reaches them."""
        self._looked = time.monotonic()
        job_id = self.job.id
        marks = self.ledger.inflight(job_id)
        owners = set(self.ledger.lease_owners(job_id)) | {m[0] for m in marks}
        dead = {o for o in owners if o != self.owner and owner_alive(o) is False}
        for owner in sorted(dead):
            counted = self.ledger.release_dead(
                job_id, owner, self.retry_policy.max_attempts, PROCESS_DIED, DIED_MESSAGE
            )
            if counted:
                log.warning("%d item(s) were being computed when runner %s died", counted, owner)
        self._suspects = [m for m in self.ledger.inflight(job_id) if m[0] in dead]
        if self._suspects:
            log.warning(
                "%d record(s) were being computed when a runner died; each is computed alone",
                sum(t - f + 1 for _, f, t in self._suspects),
            )
        self.ledger.reclaim_expired(job_id, time.time())

    def _stopping(self) -> bool:
        if self.progress.budget_reached(self.max_cost, "work"):
            return True
        return self.stop.is_set() or self.cancelled

    def _check_cancel(self) -> None:
        """`overnight cancel` sets a flag in the ledger; look at it about once a second, from
        whichever thread is using the ledger at the time."""
        now = time.monotonic()
        if now - self._cancel_checked >= 1.0:
            self._cancel_checked = now
            self.cancelled = self.ledger.is_cancelled(self.job.id)

    def _count(self, outcomes: list[Outcome]) -> None:
        self.progress.count(outcomes, with_cost=self.meter is not None)
        self.progress.batch_size = self.sizer.size
        self.on_progress(self.progress)
