"""The ledger: the one place an item changes state, for every database (see connector.py).

Speed matters here: a million items must cost little more than reading and writing them. So
an item's row id *is* its key, `job_id << 40 | seq` (seq is the record's position in the
input), which makes "the items of a job in input order" a range scan of the table itself; all
writes are bulk statements; and only pending items are indexed by state (a partial index),
because most items go from ingest straight to a lease and never sit in the queue.

Fresh records that a runner read, computed once and saw succeed (its fast path, most of a
big job) are not item rows at all: each committed batch is one `ranges` row, its ids, lines,
records and results stored together (add_succeeded). Counts, exports and the dashboard read
ranges as they are, merged with item rows in input order; an operation that changes or looks
at one of those records on its own (a retry, an incremental rerun, a results queue) first
turns the ranges it touches back into the item rows the fast path used to write (_explode).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import random
import secrets
import string
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import orjson

from ..records import Cursor, Fingerprint, Row
from .base import (
    Claim,
    ConcurrentIngest,
    ConnectionLost,
    Contention,
    Counts,
    Failure,
    Item,
    ItemState,
    JobInfo,
    Lease,
    LedgerError,
    Outcome,
    RemoteBatch,
    RunRecord,
)
from .connector import Connector
from .idset import IdHashes

SEQ_BITS = 40  # up to a trillion records per job
_SEQ_MASK = (1 << SEQ_BITS) - 1
TOKEN_LENGTH = 10
_REPLAYS = 3  # lost connections in a row one operation lives through
log = logging.getLogger(__name__)
_TOKEN_ALPHABET = string.ascii_lowercase + string.digits


def new_token() -> str:
    """A job's random token: 10 of [a-z0-9], about 52 bits."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


def _usage(o: Outcome) -> tuple[int, int, float | None, float | None]:
    return (o.input_tokens, o.output_tokens, o.cost, o.list_cost)


def _final_params(outcomes: list[Outcome], base: int, now: float, holder: object) -> list[tuple]:
    """Parameters of the statement that commits final outcomes (complete, finish_chunk):
    state, result, vector, error, usage and attempts per item, then its id and `holder` (the
    lease owner or the chunk the item must still be in)."""
    return [
        (
            o.state,
            o.result,
            o.vector,
            o.error_class,
            o.message,
            now,
            *_usage(o),
            o.attempts,
            base + o.seq,
            holder,
        )
        for o in outcomes
        if o.state != "pending"
    ]


def _range(job_id: int) -> tuple[int, int]:
    return job_id << SEQ_BITS, ((job_id + 1) << SEQ_BITS) - 1


def _job(row: tuple) -> JobInfo:
    return JobInfo(
        id=row[0],
        name=row[1],
        spec_hash=row[2],
        fingerprint=Fingerprint(row[3], row[4], row[5]),
        cursor=Cursor(row[6], row[7], row[8], row[15]),
        ingest_done=bool(row[9]),
        created_at=row[10],
        token=row[11],
        discarded_before=row[12],
        legacy_fingerprint=not row[13],
        origin=row[14],
    )


def _item(r: tuple) -> Item:
    return Item(r[0] & _SEQ_MASK, r[1], r[2], r[3], r[4], r[5])


F = TypeVar("F", bound=Callable[..., Any])


def _replayed(landed: Callable[..., Any] | None = None) -> Callable[[F], F]:
    """An operation that lives through a lost connection (a server restart, a network blip,
    an administrator's pg_terminate_backend): on `ConnectionLost` the connector connects
    again and the operation runs again. So does one the database undid to break a deadlock
    between workers (`Contention`: nothing of it committed). This is what keeps an answer
    paid for but not yet committed: without it the run died with the answer in memory, and
    the next run paid for it again.

    Running again is safe because each operation is one transaction whose statements hold
    their own guards (a result is committed only for an item this owner still holds; a chunk
    collected twice writes nothing twice; upserts). A COMMIT whose answer was lost may have
    committed, though, and the operations that insert or take something would do it twice:
    for those, `landed(self, *args)` looks in the ledger for what the cut-off call did and
    returns its result (None: it did not commit, run the operation again)."""

    def wrap(operation: F) -> F:
        @functools.wraps(operation)
        def replaying(self: SQLLedger, *args: Any, **kwargs: Any) -> Any:
            lost = undone = 0
            while True:
                try:
                    if lost and landed is not None:
                        found = landed(self, *args, **kwargs)
                        if found is not None:
                            return found
                    return operation(self, *args, **kwargs)
                except ConnectionLost as exc:
                    lost += 1
                    if lost > _REPLAYS:
                        raise
                    log.warning("%s; connecting again to run %s again", exc, operation.__name__)
                    self._conn.reconnect()
                except Contention as exc:
                    undone += 1
                    if undone > _REPLAYS:
                        raise
                    log.info("%s; running %s again", exc, operation.__name__)
                    time.sleep(random.uniform(0.0, 0.05 * undone))  # not in step again

        return replaying  # type: ignore[return-value]

    return wrap


# What a cut-off operation that inserts or takes something did, if it committed (_replayed).


def _run_started(ledger: SQLLedger, name: str, owner: str, now: float) -> int | None:
    row = ledger._conn.fetchone("run_started", (name, owner, now))
    return None if row is None else int(row[0])


def _items_added(
    ledger: SQLLedger,
    job_id: int,
    first_seq: int,
    rows: list[Row],
    cursor: Cursor,
    outcomes: list[Outcome] | list[bytes] | None = None,
) -> list[bool] | None:
    """Whether the add_items or add_succeeded that was cut off committed: per row, whether
    it is an item (a row, or in a range) now; None when the cursor did not move."""
    at = ledger._conn.fetchone("ingest_position", (job_id,))
    if at is None or tuple(at) != (cursor.records, cursor.line, cursor.offset, cursor.key):
        return None  # the cursor did not move past these rows: they were not added
    ledger._seen.pop(job_id, None)
    first = (job_id << SEQ_BITS) + first_seq
    ids = {r[0] for r in ledger._conn.fetchall("item_ids", (first, first + len(rows) - 1))}
    last_seq = first_seq + len(rows) - 1
    window = (job_id, first_seq - 1, last_seq, len(rows) + 1)
    for r in ledger._conn.fetchall("ranges_page", window):  # runs committed as ranges
        ids.update(range(first - first_seq + r[0], first - first_seq + r[1] + 1))
    return [first + i in ids for i in range(len(rows))]


def _leased(ledger: SQLLedger, job_id: int, limit: int, lease: Lease) -> list[Item] | None:
    lo, hi = _range(job_id)
    rows = ledger._conn.fetchall("leased_at", (lease.owner, lease.now, lo, hi))
    if not rows:
        return None  # nothing taken: lease again
    items = [Item(r[0] & _SEQ_MASK, r[1], r[2], r[3], r[4], None, r[5]) for r in rows]
    return sorted(items, key=lambda it: it.seq)


def _chunk_planned(
    ledger: SQLLedger, job_id: int, provider: str, seqs: list[int], now: float
) -> int | None:
    row = ledger._conn.fetchone("planned_chunk", (job_id, provider, len(seqs), now))
    return None if row is None else int(row[0])


_RANGE_PAGE = 16  # ranges read at a time (each up to a group commit: 8,192 records)
_ALL = _SEQ_MASK  # the last seq of a job


_LINE, _CUSTOM_ID, _PAYLOAD = (operator.itemgetter(i) for i in range(3))  # of a Row
_MIN_RUN = 256  # records in a row that succeeded plainly, worth a ranges row among items


def _plain(o: Outcome) -> bool:
    """Succeeded at the first attempt, with a result and nothing else (no usage, no vector):
    what a ranges row holds. (By position: a field looked up by name costs more.)"""
    return (
        o[1] == "succeeded"
        and o[2] is not None
        and o[11] == 1
        and not o[6]
        and not o[7]
        and o[8] is None
        and o[9] is None
        and o[10] is None
    )


def _one_object_a_line(joined: bytes, n: int) -> bool:
    """Whether `joined`, n results joined by newlines, is n JSON objects, one a line: then a
    range holds them as they are, and an export cuts them apart and splices the ids in with
    bytes methods alone (SQLLedger.iter_result_lines)."""
    return (
        joined[:1] == b"{"
        and joined.count(b"\n") == n - 1
        and joined.count(b"\n{") == n - 1
        and b"\r" not in joined
    )


def _range_args(
    job_id: int, first_seq: int, rows: list[Row], results: list[bytes], now: float
) -> tuple | None:
    """The parameters of insert_range for `rows` from `first_seq`, each succeeded with
    `results[i]`; None when a range cannot hold them as they are (an id that JSON escapes,
    a result that is not one line of a JSON object): they go item by item."""
    id_json = orjson.dumps(list(map(_CUSTOM_ID, rows)))
    joined = b"\n".join(results)
    if b"\\" in id_json or not _one_object_a_line(joined, len(rows)):
        return None
    payloads = list(map(_PAYLOAD, rows))
    return (
        job_id,
        first_seq,
        first_seq + len(rows) - 1,
        now,
        id_json,
        orjson.dumps(list(map(_LINE, rows))),
        orjson.dumps(list(map(len, payloads))),
        b"".join(payloads),
        joined,
    )


def _split(blob: bytes, sizes: list[int]) -> list[bytes]:
    """The parts of a concatenation, given their sizes."""
    parts, pos = [], 0
    for n in sizes:
        end = pos + n
        parts.append(blob[pos:end])
        pos = end
    return parts


class SQLLedger:
    """Every `Ledger` operation as named queries run through a connector (any dialect)."""

    def __init__(self, connector: Connector) -> None:
        self._conn = connector
        # Per job being ingested by this process: (the seq its next batch starts at, the ids
        # of its items so far, as hashes: idset.py). A repeated id is refused against it (the
        # first one wins): ranges have no index on their ids. Read again from the ledger
        # whenever the next batch does not start where this process left off (a resume,
        # another ingester).
        self._seen: dict[int, tuple[int, IdHashes]] = {}
        try:
            self._migrate()
        except BaseException:
            connector.close()
            raise

    # -- schema migrations --------------------------------------------------------------
    # `migration_N` queries, applied in order in one transaction and recorded in
    # `schema_version`. The usual open (nothing to apply) reads one row and takes no lock;
    # otherwise `lock_schema` (with the transaction's own lock) makes a second process
    # wait, and it finds the work done when it reads the version again.

    @property
    def schema_version(self) -> int:
        if not self._conn.fetchone("has_schema_version")[0]:  # type: ignore[index]
            return 0
        return int(self._conn.fetchone("schema_version")[0])  # type: ignore[index]

    def _migrate(self) -> None:
        latest = len(self._conn.names("migration_"))
        if self.schema_version == latest:
            return
        with self._conn.transaction():
            self._conn.execute("lock_schema")
            current = self.schema_version
            if current > latest:
                raise LedgerError(
                    f"ledger {self._conn.url}: written by a newer overnight (schema version"
                    f" {current}; this one knows up to {latest}): upgrade overnight"
                )
            for version in range(current + 1, latest + 1):
                self._conn.script(f"migration_{version}")
                if version == 1:
                    self._adopt_unversioned()
            if current < latest:
                self._conn.execute("set_schema_version", (latest, time.time()))

    def _adopt_unversioned(self) -> None:
        """A ledger written before migrations were versioned gains the columns added since
        (the dialect's `legacy_column <table> <column>` queries); its jobs get a token."""
        have: dict[str, set[str]] = {}
        for name in self._conn.names("legacy_column "):
            _, table, column = name.split()
            if table not in have:
                have[table] = {r[0] for r in self._conn.fetchall("table_columns", (table,))}
            if column not in have[table]:
                self._conn.execute(name)
        untokened = [r[0] for r in self._conn.fetchall("untokened_jobs")]
        self._conn.executemany("set_token", [(new_token(), i) for i in untokened])

    def close(self) -> None:
        self._conn.close()

    # -- claims -------------------------------------------------------------------------

    @_replayed()
    def claim(
        self, name: str, owner: str, now: float, expires: float, take_from: str | None = None
    ) -> Claim:
        """Claim job `name` for `owner`; the claim returned is whoever holds it afterwards.
        An expired claim, or one held by `take_from` (a dead owner), is taken over."""
        with self._conn.transaction():
            self._conn.execute("claim", (name, owner, now, expires, take_from or ""))
            row = self._conn.fetchone("get_claim", (name,))
        return Claim(*row)  # type: ignore[misc]

    @_replayed()
    def renew_claim(self, name: str, owner: str, expires: float) -> bool:
        with self._conn.transaction():
            return bool(self._conn.execute("renew_claim", (expires, name, owner)))

    @_replayed()
    def release_claim(self, name: str, owner: str) -> None:
        with self._conn.transaction():
            self._conn.execute("release_claim", (name, owner))

    @_replayed()
    def get_claim(self, name: str) -> Claim | None:
        row = self._conn.fetchone("get_claim", (name,))
        return Claim(*row) if row else None

    # -- runs: what each run did, for `status` -------------------------------------------

    @_replayed(_run_started)
    def start_run(self, name: str, owner: str, now: float) -> int:
        with self._conn.transaction():
            return int(self._conn.fetchone("start_run", (name, owner, now))[0])  # type: ignore[index]

    @_replayed()
    def update_run(
        self,
        run_id: int,
        now: float,
        processed: int,
        seconds: float,
        setup_seconds: float,
        outcome: str | None = None,
    ) -> None:
        """Progress of a live run (heartbeat), or its end when `outcome` is given."""
        with self._conn.transaction():
            self._conn.execute(
                "update_run", (now, processed, seconds, setup_seconds, outcome, run_id)
            )

    @_replayed()
    def last_run(self, name: str) -> RunRecord | None:
        row = self._conn.fetchone("last_run", (name,))
        return RunRecord(*row) if row else None

    @_replayed()
    def open_runs(self, name: str) -> list[RunRecord]:
        """The runs of job `name` that have not ended: its workers now, and those that died
        without a word (kill -9), which the caller tells apart (claim.worker_alive)."""
        return [RunRecord(*r) for r in self._conn.fetchall("open_runs", (name,))]

    @_replayed()
    def finished_since(self, job_id: int, since: float) -> int:
        """Items finished at or after `since` (a recent throughput)."""
        items = self._conn.fetchone("finished_since", (*_range(job_id), since))[0]  # type: ignore[index]
        ranged = self._conn.fetchone("ranges_finished_since", (job_id, since))[0]  # type: ignore[index]
        return int(items) + int(ranged)

    # -- jobs ---------------------------------------------------------------------------

    @_replayed()
    def get_job(self, name: str) -> JobInfo | None:
        row = self._conn.fetchone("get_job", (name,))
        return None if row is None else _job(row)

    @_replayed()
    def create_job(
        self,
        name: str,
        spec_hash: str,
        fingerprint: Fingerprint,
        discarded_before: float = 0.0,
        origin: str | None = None,
    ) -> JobInfo:
        fp = fingerprint
        with self._conn.transaction():
            self._conn.execute(
                "create_job",
                (
                    name,
                    spec_hash,
                    fp.size,
                    fp.mtime_ns,
                    fp.digest,
                    time.time(),
                    new_token(),
                    discarded_before,
                    origin,
                ),
            )
        job = self.get_job(name)
        assert job is not None
        return job

    @_replayed()
    def list_jobs(self) -> list[JobInfo]:
        """Every job in the ledger, oldest first (read only); not a generation being read
        (see begin_generation)."""
        names = [
            r[0]
            for r in self._conn.fetchall("job_names")
            if not any(c in r[0] for c in self._HIDDEN)
        ]
        return [job for job in map(self.get_job, names) if job is not None]

    @_replayed()
    def delete_job(self, job_id: int) -> None:
        with self._conn.transaction():
            self._conn.execute("lock_job", (job_id,))
            self._conn.execute("delete_items", _range(job_id))
            self._conn.execute("delete_ranges", (job_id,))
            self._conn.execute("delete_rejects", (job_id,))
            self._conn.execute("delete_inflight", (job_id,))
            self._conn.execute("delete_chunks", (job_id,))
            self._conn.execute("delete_job", (job_id,))
        self._seen.pop(job_id, None)

    @_replayed()
    def set_origin(self, job_id: int, origin: str) -> None:
        with self._conn.transaction():
            self._conn.execute("set_origin", (origin, job_id))

    @_replayed()
    def set_fingerprint(self, job_id: int, fingerprint: Fingerprint) -> None:
        fp = fingerprint
        with self._conn.transaction():
            self._conn.execute("set_fingerprint", (fp.size, fp.mtime_ns, fp.digest, job_id))

    # -- incremental runs ---------------------------------------------------------------
    # The input changed since the job started: it is read again into a new generation of the
    # job (a hidden job row), results of records whose id and content are unchanged are
    # carried over, and the new generation replaces the old one in one transaction. Item keys
    # stay `job << 40 | position`, so the output keeps the new input's order. A crash before
    # the swap leaves the old generation as it was; the next run starts the new one again.

    # The hidden generation's name: a control character no job name has. Not NUL, which
    # PostgreSQL's text refuses (older SQLite ledgers may still hold a "\x00next" one).
    _HIDDEN = ("\x1f", "\x00")

    @staticmethod
    def _next_name(name: str) -> str:
        return f"{name}\x1fnext"

    @_replayed()
    def begin_generation(self, job: JobInfo, fingerprint: Fingerprint) -> JobInfo:
        """A new, empty generation of `job` for the changed input (any stale one is dropped)."""
        hidden = self._next_name(job.name)
        stale = self.get_job(hidden)
        if stale is not None:
            self.delete_job(stale.id)
        fp = fingerprint
        with self._conn.transaction():
            self._conn.execute(
                "begin_generation", (hidden, fp.size, fp.mtime_ns, fp.digest, job.id)
            )
        new = self.get_job(hidden)
        assert new is not None
        return new

    @_replayed()
    def carry_results(self, old_id: int, new_id: int) -> tuple[int, int]:
        """Finished items of `old_id` whose id and record are unchanged in `new_id` keep their
        state, result, attempts, usage and times; the rest of `new_id` stays pending.
        Returns (items carried over, ids of `old_id` that `new_id` no longer has)."""
        with self._conn.transaction():
            self._explode(old_id)
            self._explode(new_id)
            gone = self._conn.fetchone("count_gone", (*_range(old_id), new_id))[0]  # type: ignore[index]
            kept = self._conn.execute("carry_results", (*_range(new_id), old_id))
        return kept, gone

    @_replayed()
    def replace_generation(self, old: JobInfo, new: JobInfo) -> JobInfo:
        """Swap: `new` takes the job's name and its remote batch history; `old` is deleted."""
        with self._conn.transaction():
            self._conn.execute("lock_job", (old.id,))
            self._conn.execute("move_chunks", (new.id, old.id))
            self._conn.execute("delete_items", _range(old.id))
            self._conn.execute("delete_ranges", (old.id,))
            self._conn.execute("delete_rejects", (old.id,))
            # In-flight marks name the old positions; the records they name are pending in
            # the new generation (never finished), so they are computed again anyway.
            self._conn.execute("delete_inflight", (old.id,))
            # A cancel made while the new generation was read stands.
            self._conn.execute("copy_cancelled", (old.id, new.id))
            self._conn.execute("delete_job", (old.id,))
            self._conn.execute("rename_job", (old.name, new.id))
        self._seen.pop(old.id, None)
        job = self.get_job(old.name)
        assert job is not None
        return job

    # -- ingest -------------------------------------------------------------------------

    @_replayed(_items_added)
    def add_items(
        self,
        job_id: int,
        first_seq: int,
        rows: list[Row],
        cursor: Cursor,
        outcomes: list[Outcome] | None = None,
    ) -> list[bool]:
        """Insert rows `first_seq...` and move the ingest cursor past them, in one transaction.

        Without outcomes the items are pending. With outcomes (one per readable row, computed
        before the insert: the runner's fast path), each item is inserted in its final state
        with its result, so a fresh item costs one write, not three; runs of _MIN_RUN or more
        that succeeded plainly are ranges rows (see add_succeeded). Rows that cannot be read,
        and repeated ids (the first one wins), go to `rejects`. Returns, per row, whether it
        became an item. Raises ConcurrentIngest when another runner moved the cursor first.
        """
        first = (job_id << SEQ_BITS) + first_seq
        accepted = [r.error is None for r in rows]
        repeats = self._repeats(job_id, first_seq, rows, accepted)
        if repeats and outcomes is not None:  # one outcome per readable row: drop theirs
            readable = [i for i, r in enumerate(rows) if r.error is None]
            outcomes = [o for i, o in zip(readable, outcomes, strict=True) if accepted[i]]
        good = rows if all(accepted) else [r for r, ok in zip(rows, accepted, strict=True) if ok]
        seqs = range(first, first + len(rows))
        if len(good) == len(rows):
            ids: range | list[int] = seqs
        else:
            ids = [i for i, ok in zip(seqs, accepted, strict=True) if ok]
        if outcomes is None:
            outcomes = [Outcome(0, "pending")] * len(good)
            now = None
        else:
            now = time.time()
        ranged: list[tuple] = []
        if now is not None and len(good) >= _MIN_RUN:
            good, ids, outcomes, ranged = self._runs(job_id, good, ids, outcomes, now)
        # (By position: o[6] input_tokens, o[8] cost, o[10] vector, o[11] attempts; a
        # field looked up by name costs more, once per record.)
        if now is not None and all(
            o[1] == "succeeded" and not o[6] and o[8] is None and o[10] is None and o[11] == 1
            for o in outcomes
        ):
            # The common case, and the per-record cost of ingest: bind only what varies.
            query = "insert_succeeded"
            params: list[tuple] = [
                (i, r[1], r[0], r[2], o[2], job_id, now)
                for i, r, o in zip(ids, good, outcomes, strict=True)
            ]
        else:
            query = "insert_item"
            params = [
                (
                    i,
                    job_id,
                    r[1],
                    r[0],
                    r[2],
                    o[1],
                    0 if now is None else o.attempts,
                    o[5],
                    o[3],
                    o[4],
                    o[2],
                    now,
                    None if o[1] == "pending" else now,
                    o[6] or None,
                    o[7] or None,
                    o[8],
                    o[9],
                    o.vector,
                )
                for i, r, o in zip(ids, good, outcomes, strict=True)
            ]
        rejects = [
            (job_id, first_seq + i, r.line, r.custom_id, r.error)
            for i, r in enumerate(rows)
            if r.error is not None
        ]
        rejects = sorted(rejects + repeats, key=operator.itemgetter(1))
        return self._insert(
            job_id, first_seq, rows, cursor, query, params, accepted, rejects, ranged
        )

    def _runs(
        self,
        job_id: int,
        good: list[Row],
        ids: range | list[int],
        outcomes: list[Outcome],
        now: float,
    ) -> tuple[list[Row], list[int], list[Outcome], list[tuple]]:
        """A batch with outcomes: its runs of at least _MIN_RUN consecutive records that
        succeeded plainly become ranges rows (a failure now and then leaves the rest of the
        batch ranged); returns the rows, ids and outcomes left to insert as items, and the
        ranges rows' parameters."""
        # (An id that JSON escapes ends a run: a range holds ids as they are.)
        plain = [
            _plain(o) and b"\\" not in orjson.dumps(r[1])
            for r, o in zip(good, outcomes, strict=True)
        ]
        base = job_id << SEQ_BITS
        keep = [True] * len(good)
        ranged = []
        k = 0
        while k < len(good):
            if not plain[k]:
                k += 1
                continue
            j = k + 1
            while j < len(good) and plain[j] and ids[j] == ids[j - 1] + 1:
                j += 1
            if j - k >= _MIN_RUN:
                results = [o[2] for o in outcomes[k:j]]
                args = _range_args(job_id, ids[k] - base, good[k:j], results, now)
                if args is not None:
                    ranged.append(args)
                    keep[k:j] = [False] * (j - k)
            k = j
        if not ranged:
            return good, list(ids), outcomes, []
        return (
            [r for r, ok in zip(good, keep, strict=True) if ok],
            [i for i, ok in zip(ids, keep, strict=True) if ok],
            [o for o, ok in zip(outcomes, keep, strict=True) if ok],
            ranged,
        )

    @_replayed(_items_added)
    def add_succeeded(
        self, job_id: int, first_seq: int, rows: list[Row], cursor: Cursor, results: list[bytes]
    ) -> list[bool]:
        """`add_items` with outcomes, in the runner's commonest case, bound with the least work
        per record: every row could be read, and each was computed once and succeeded with
        `results[i]` (no usage, no vector). A repeated id is refused as by add_items.

        The rows are committed as one `ranges` row (ids, lines, records and results each
        stored together), not an item row each. A batch that holds a repeated id, an id that
        JSON escapes, or a result that is not one line of a JSON object is inserted item by
        item instead."""
        now = time.time()
        fresh = set(map(_CUSTOM_ID, rows))
        seen = self._seen_ids(job_id, first_seq)
        args = None
        if (
            rows
            and len(fresh) == len(rows)
            and seen.isdisjoint(list(fresh))
            and not self._long_ids(fresh)  # refused one by one (_too_long), as by add_items
        ):
            args = _range_args(job_id, first_seq, rows, results, now)
        if args is None:  # as add_items (its runs of plain records still become ranges)
            outcomes = [
                Outcome(first_seq + k, "succeeded", res, attempts=1)
                for k, res in enumerate(results)
            ]
            add_items = SQLLedger.add_items.__wrapped__  # type: ignore[attr-defined]
            return add_items(self, job_id, first_seq, rows, cursor, outcomes)
        with self._conn.transaction():
            self._move_cursor(job_id, first_seq, cursor)
            self._conn.execute("insert_range", args)
        seen.update(fresh)
        self._seen[job_id] = (first_seq + len(rows), seen)
        return [True] * len(rows)

    def _move_cursor(self, job_id: int, first_seq: int, cursor: Cursor) -> None:
        moved = self._conn.execute(
            "move_cursor",
            (cursor.records, cursor.line, cursor.offset, cursor.key, job_id, first_seq),
        )
        if not moved:
            raise ConcurrentIngest(f"job {job_id}: another runner is ingesting this job")

    def _seen_ids(self, job_id: int, first_seq: int) -> IdHashes:
        """The ids of job `job_id`'s items (rows and ranges), for a batch from `first_seq`:
        their hashes (a hit is confirmed with _first_line)."""
        got = self._seen.get(job_id)
        if got is not None and got[0] == first_seq:
            return got[1]
        seen = IdHashes(r[0] for r in self._conn.fetchall("item_custom_ids", (job_id,)))
        for (ids,) in self._conn.fetchall("range_ids", (job_id,)):
            seen.update(orjson.loads(ids))
        self._seen[job_id] = (first_seq, seen)
        return seen

    def _repeats(
        self, job_id: int, first_seq: int, rows: list[Row], accepted: list[bool]
    ) -> list[tuple[int, int, int, str | None, str]]:
        """Rows whose id an earlier record has (of this batch or of the job): refused, the
        first one wins. Marks them not accepted; returns their rejects. Ids are compared as
        the database stores them (Connector.text): two ids it stores alike are one id, in
        this process as in the next one that reads them back. An id longer than the
        database's index holds is refused too (that record alone, not its batch)."""
        out = self._too_long(job_id, first_seq, rows, accepted)
        text = self._conn.text
        stored = [text(r[1]) if ok else None for r, ok in zip(rows, accepted, strict=True)]  # type: ignore[arg-type]
        maybe = self._seen_ids(job_id, first_seq).maybe(stored)  # type: ignore[arg-type]
        hits = [c for c, hit in zip(stored, maybe, strict=True) if hit and c is not None]
        earlier = self._first_lines(job_id, hits)  # type: ignore[arg-type]
        firsts: dict[str | None, int] = {}
        for i, r in enumerate(rows):
            if not accepted[i]:
                continue
            cid = stored[i]
            line = firsts.get(cid)
            if line is None:
                line = earlier.get(cid)  # type: ignore[arg-type]
            if line is None:
                firsts[cid] = r[0]
                continue
            accepted[i] = False
            out.append(
                (
                    job_id,
                    first_seq + i,
                    r[0],
                    r[1],
                    f"line {r[0]}: duplicate id {r[1]!r} (first seen on line {line})",
                )
            )
        return out

    def _long_ids(self, ids: Iterable[str]) -> bool:
        """Whether any of `ids` is longer than the database's index on ids holds."""
        limit = self._conn.max_id_bytes
        if limit is None:
            return False
        ids = list(ids)
        return max(map(len, ids), default=0) * 4 > limit and any(
            len(c.encode()) > limit for c in ids
        )

    def _too_long(
        self, job_id: int, first_seq: int, rows: list[Row], accepted: list[bool]
    ) -> list[tuple[int, int, int, str | None, str]]:
        """Rows whose id the database's index cannot hold: refused (an input error), and
        marked not accepted; returns their rejects."""
        limit = self._conn.max_id_bytes
        if limit is None:
            return []
        if not self._long_ids([r[1] for r, ok in zip(rows, accepted, strict=True) if ok]):  # type: ignore[misc]
            return []
        out = []
        for i, r in enumerate(rows):
            size = len(r[1].encode()) if accepted[i] else 0  # type: ignore[union-attr]
            if size > limit:
                accepted[i] = False
                out.append(
                    (
                        job_id,
                        first_seq + i,
                        r[0],
                        r[1],
                        f"line {r[0]}: the id is {size:,} bytes long; a PostgreSQL ledger"
                        f" holds ids of up to {limit:,} bytes",
                    )
                )
        return out

    def _first_line(self, job_id: int, custom_id: str) -> int | None:
        """The input line of the job's item `custom_id` (None: no such item)."""
        got = self._conn.fetchone("item_by_custom_id", (job_id, custom_id))
        if got is not None:
            return int(got[1])
        needle = orjson.dumps(custom_id)
        for _, ids, lines in self._conn.fetchall("ranges_with_id", (job_id, needle)):
            held = orjson.loads(ids)
            if custom_id in held:
                return int(orjson.loads(lines)[held.index(custom_id)])
        return None

    def _first_lines(self, job_id: int, custom_ids: list[str]) -> dict[str, int]:
        """The input line of each of `custom_ids` that is an item of the job (_first_line for
        many ids): the ranges are read once for all of them, not once an id (an input file
        concatenated with itself made that a scan of every range per line of its second half)."""
        if len(custom_ids) <= 2:  # a repeat now and then: the database searches the ranges
            found = {c: self._first_line(job_id, c) for c in custom_ids}
            return {c: line for c, line in found.items() if line is not None}
        out: dict[str, int] = {}
        for cid in dict.fromkeys(custom_ids):
            got = self._conn.fetchone("item_by_custom_id", (job_id, cid))
            if got is not None:
                out[cid] = int(got[1])
        wanted = set(custom_ids).difference(out)
        if wanted:
            for page in self._conn.iterate("range_lines", (job_id,), _RANGE_PAGE):
                for _, ids, lines in page:
                    held = orjson.loads(ids)
                    if wanted.isdisjoint(held):
                        continue
                    at = orjson.loads(lines)
                    for k, cid in enumerate(held):
                        if cid in wanted:
                            out[cid] = int(at[k])
                            wanted.discard(cid)
        return out

    def _explode(self, job_id: int, after: int = -1) -> int:
        """Turn the job's ranges holding seqs past `after` back into item rows, as the fast
        path's insert_succeeded made them (in the caller's transaction). Returns the items."""
        base = job_id << SEQ_BITS
        n = 0
        while page := self._conn.fetchall("ranges_page", (job_id, after, _ALL, _RANGE_PAGE)):
            rows = []
            for first, _, at, ids, lines, sizes, payloads, results in page:
                parts = zip(
                    orjson.loads(ids),
                    orjson.loads(lines),
                    _split(payloads, orjson.loads(sizes)),
                    bytes(results).split(b"\n"),
                    strict=True,
                )
                rows += [
                    (base + first + k, job_id, cid, line, payload, "succeeded", 1, 0)
                    + (None, None, result, at, at, None, None, None, None, None)
                    for k, (cid, line, payload, result) in enumerate(parts)
                ]
                self._conn.execute("delete_range", (job_id, first))
            n += self._conn.executemany("insert_item", rows)
        return n

    def _ranges(self, job_id: int) -> Iterator[tuple]:
        """The job's ranges in input order, a page at a time."""
        after = -1
        while page := self._conn.fetchall("ranges_page", (job_id, after, _ALL, _RANGE_PAGE)):
            yield from page
            after = page[-1][1]

    def _merged(
        self,
        job_id: int,
        query: str,
        params: tuple,
        size: int,
        of_item: Callable[[tuple], Any],
        of_range: Callable[[tuple], list],
    ) -> Iterator[list]:
        """Batches of a query over item rows (its first column the item's id), with the
        job's ranges (`of_range`) in their place in input order.

        In one snapshot: another process may turn ranges into item rows (_explode) between
        two reads, and the reads in between would then miss those records or see them twice."""
        with self._conn.snapshot():
            yield from self._merged_now(job_id, query, params, size, of_item, of_range)

    def _merged_now(
        self,
        job_id: int,
        query: str,
        params: tuple,
        size: int,
        of_item: Callable[[tuple], Any],
        of_range: Callable[[tuple], list],
    ) -> Iterator[list]:
        lo = job_id << SEQ_BITS
        ranges = self._ranges(job_id)
        nxt = next(ranges, None)
        for batch in self._conn.iterate(query, params, size):
            if nxt is None or batch[-1][0] < lo + nxt[0]:
                yield [of_item(r) for r in batch]
                continue
            out = []
            for row in batch:
                while nxt is not None and lo + nxt[0] < row[0]:
                    if out:
                        yield out
                        out = []
                    yield of_range(nxt)
                    nxt = next(ranges, None)
                out.append(of_item(row))
            if out:
                yield out
        while nxt is not None:
            yield of_range(nxt)
            nxt = next(ranges, None)

    def _insert(
        self,
        job_id: int,
        first_seq: int,
        rows: list[Row],
        cursor: Cursor,
        query: str,
        params: list[tuple],
        accepted: list[bool],
        rejects: list[tuple] | None = None,
        ranged: list[tuple] | None = None,
    ) -> list[bool]:
        """The transaction of add_items: the cursor moved past `rows` (or ConcurrentIngest),
        the items inserted (and `ranged`, runs of them as ranges rows), unreadable rows and
        repeated ids recorded as rejects."""
        rejects = rejects or []
        with self._conn.transaction():
            self._move_cursor(job_id, first_seq, cursor)
            if ranged:
                self._conn.executemany("insert_range", ranged)
            inserted = self._conn.executemany(query, params) if params else 0
            if inserted < len(params):
                rejects += self._duplicates(job_id, first_seq, rows, accepted)
            if rejects:
                self._conn.executemany("insert_reject", rejects)
        seen = self._seen_ids(job_id, first_seq)
        text = self._conn.text  # as the rows read back hold them (_seen_ids)
        seen.update(text(r[1]) for r, ok in zip(rows, accepted, strict=True) if ok)  # type: ignore[arg-type]
        self._seen[job_id] = (first_seq + len(rows), seen)
        return accepted

    def _duplicates(
        self, job_id: int, first_seq: int, rows: list[Row], accepted: list[bool]
    ) -> list[tuple[int, int, int, str | None, str]]:
        """Rows the INSERT skipped (ON CONFLICT): their id was taken by an earlier record."""
        base = job_id << SEQ_BITS
        out = []
        for i, r in enumerate(rows):
            if not accepted[i]:
                continue
            got = self._conn.fetchone("item_by_custom_id", (job_id, r.custom_id))
            if got is not None and got[0] != base + first_seq + i:
                accepted[i] = False
                out.append(
                    (
                        job_id,
                        first_seq + i,
                        r.line,
                        r.custom_id,
                        f"line {r.line}: duplicate id {r.custom_id!r}"
                        f" (first seen on line {got[1]})",
                    )
                )
        return out

    @_replayed()
    def finish_ingest(self, job_id: int) -> None:
        with self._conn.transaction():
            self._conn.execute("finish_ingest", (job_id,))

    # -- work ---------------------------------------------------------------------------

    @_replayed(_leased)
    def lease(self, job_id: int, limit: int, lease: Lease) -> list[Item]:
        lo, hi = _range(job_id)
        with self._conn.transaction():
            rows = self._conn.fetchall(
                "lease", (lease.owner, lease.expires, lease.now, lo, hi, limit)
            )
        items = [Item(r[0] & _SEQ_MASK, r[1], r[2], r[3], r[4], None, r[5]) for r in rows]
        items.sort(key=lambda it: it.seq)  # RETURNING order is not guaranteed
        return items

    @_replayed()
    def complete(self, job_id: int, owner: str, outcomes: list[Outcome], now: float) -> int:
        """Commit results and errors; only for items this owner still holds (no double write)."""
        base = job_id << SEQ_BITS
        done = _final_params(outcomes, base, now, owner)
        again = [
            (o.error_class, o.message, o.not_before, *_usage(o), o.attempts, base + o.seq, owner)
            for o in outcomes
            if o.state == "pending"
        ]
        changed = 0
        with self._conn.transaction():
            if done:
                changed += self._conn.executemany("complete_done", done)
            if again:
                changed += self._conn.executemany("complete_again", again)
        return changed

    @_replayed()
    def release(self, job_id: int, owner: str, seqs: list[int] | None = None) -> int:
        """Give leased items back untouched (attempts unchanged): Ctrl-C, or a dead owner."""
        lo, hi = _range(job_id)
        with self._conn.transaction():
            if seqs is None:
                return self._conn.execute("release_all", (lo, hi, owner))
            if not seqs:
                return 0
            return self._conn.executemany("release_one", [(lo + s, owner) for s in seqs])

    @_replayed()
    def renew(self, job_id: int, owner: str, expires: float) -> int:
        with self._conn.transaction():
            return self._conn.execute("renew", (expires, *_range(job_id), owner))

    @_replayed()
    def reclaim_expired(self, job_id: int, now: float) -> int:
        with self._conn.transaction():
            return self._conn.execute("reclaim_expired", (*_range(job_id), now))

    @_replayed()
    def lease_owners(self, job_id: int) -> list[str]:
        return [r[0] for r in self._conn.fetchall("lease_owners", _range(job_id)) if r[0]]

    # -- attempts counted when they start ------------------------------------------------
    # Before computing, a runner marks the range of seqs it is computing: fresh records past
    # the ingest cursor, or items it holds leased. The mark is one small row per runner,
    # replaced per call. A runner that dies (a crash in user code, kill -9, the OOM killer)
    # leaves its mark behind, and the next runner counts an attempt for exactly those records.

    @_replayed()
    def mark_inflight(self, job_id: int, owner: str, first_seq: int, last_seq: int) -> None:
        # One statement, its own small transaction (autocommit); an UPDATE of the runner's
        # row costs about half an INSERT OR REPLACE (SQLite, measured: ~22 vs ~45 us).
        args = (first_seq, last_seq, job_id, owner)
        if not self._conn.execute("update_inflight", args):
            self._conn.execute("insert_inflight", args)

    @_replayed()
    def clear_inflight(self, job_id: int, owner: str) -> None:
        self._conn.execute("clear_inflight", (job_id, owner))

    @_replayed()
    def inflight(self, job_id: int) -> list[tuple[str, int, int]]:
        return [(r[0], r[1], r[2]) for r in self._conn.fetchall("inflight", (job_id,))]

    @_replayed()
    def release_dead(
        self, job_id: int, owner: str, max_attempts: int, error_class: str, message: str
    ) -> int:
        """Give back the leases of a runner that died. Those it was computing (inside its
        mark) had an attempt: it is counted, with `error_class` and `message`, and an item
        that reaches `max_attempts` fails. Its other leased items go back untouched. The mark
        goes once no fresh record is left in it (past the ingest cursor: the next runner
        inserts those as suspects itself). Returns the items that had an attempt counted."""
        lo, hi = _range(job_id)
        counted = 0
        with self._conn.transaction():
            mark = self._conn.fetchone("inflight_mark", (job_id, owner))
            if mark is not None:
                counted = self._conn.execute(
                    "count_dead_attempt",
                    (
                        max_attempts,
                        message,
                        time.time(),
                        error_class,
                        lo + mark[0],
                        lo + mark[1],
                        owner,
                    ),
                )
            self._conn.execute("release_all", (lo, hi, owner))
            self._conn.execute("drop_dead_mark", (job_id, owner))
        return counted

    @_replayed()
    def next_due(self, job_id: int) -> float | None:
        return self._conn.fetchone("next_due", _range(job_id))[0]  # type: ignore[index]

    # -- reading ------------------------------------------------------------------------

    @_replayed()
    def counts(self, job_id: int) -> Counts:
        # One scan of the job's items, grouped by state, added up here (two scans, one for
        # the states and one for usage, took ~1 s at the end of a million-item run).
        # In one snapshot, as an export: another process turning ranges into item rows
        # between the two reads made a count miss them, or count them twice.
        with self._conn.snapshot():
            rows = self._conn.fetchall("count_states", _range(job_id))
            got = self._conn.fetchone("count_ranges", (job_id,))
            rejected = self._conn.fetchone("count_rejects", (job_id,))[0]  # type: ignore[index]
        ranged, first, last = got  # type: ignore[misc]
        if ranged:
            rows.append(("succeeded", int(ranged), first, last, 0, 0, 0.0, 0.0))
        states: dict[str, int] = {}
        for r in rows:
            states[r[0]] = states.get(r[0], 0) + r[1]
        starts = [r[2] for r in rows if r[2] is not None]
        ends = [r[3] for r in rows if r[3] is not None]
        return Counts(
            states,
            rejected,
            min(starts) if starts else None,
            max(ends) if ends else None,
            int(sum(r[4] for r in rows)),
            int(sum(r[5] for r in rows)),
            float(sum(r[6] for r in rows)),
            float(sum(r[7] for r in rows)),
        )

    def iter_results(
        self, job_id: int, with_payload: bool = False
    ) -> Iterator[tuple[str, bytes, bytes | None, bytes | None]]:
        query = "results_with_payload" if with_payload else "results"

        def of_range(r: tuple) -> list:
            first, last, _, ids, _, sizes, payloads, results = r
            none = [None] * (last - first + 1)
            held = _split(payloads, orjson.loads(sizes)) if with_payload else none
            return list(zip(orjson.loads(ids), results.split(b"\n"), held, none, strict=True))

        of_item = operator.itemgetter(1, 2, 3, 4)
        for batch in self._merged(job_id, query, _range(job_id), 5000, of_item, of_range):
            yield from batch

    def iter_result_lines(self, job_id: int, id_name: str) -> Iterator[list[bytes]]:
        """The JSONL output, in input order, in batches of lines: `{"<id_name>": id, ...}`.

        The database splices the id into the stored result JSON itself, which is cheaper
        than handing a million rows to Python to splice."""
        head = "{" + orjson.dumps(id_name).decode() + ":"
        start = head.encode() + b'"'

        def of_range(r: tuple) -> list[bytes]:
            # The same bytes as the query's, made with bytes methods alone: a ranged id has
            # nothing JSON escapes, so it is quoted as it is and '","' only separates two;
            # its results are objects, one a line (add_succeeded).
            ids, results = r[3], r[7]
            parts = zip(
                itertools.repeat(start),
                ids[2:-2].split(b'","'),
                itertools.repeat(b'",'),
                results[1:].split(b"\n{"),
                itertools.repeat(b"\n"),
            )
            return b"".join(itertools.chain.from_iterable(parts)).splitlines(keepends=True)

        params = (head, *_range(job_id))
        yield from self._merged(
            job_id, "result_lines", params, 10000, operator.itemgetter(1), of_range
        )

    def iter_failures(self, job_id: int) -> Iterator[Failure]:
        lo, hi = _range(job_id)
        for batch in self._conn.iterate("failures", (lo, hi, job_id), 1000):
            for _, cid, line, state, ecls, msg, attempts in batch:
                yield Failure(cid, line, state, ecls or "unknown", msg or "", attempts)

    @_replayed()
    def failure_records(self, job_id: int, limit: int) -> list[tuple[Failure, bytes | None]]:
        """The first `limit` failures in input order, each with its input record (None for a
        line that could not be read)."""
        lo, hi = _range(job_id)
        return [
            (Failure(cid, line, state, ecls or "unknown", msg or "", attempts), payload)
            for _, cid, line, state, ecls, msg, attempts, payload in self._conn.fetchall(
                "failure_records", (lo, hi, job_id, limit)
            )
        ]

    @_replayed()
    def finished_per_interval(self, job_id: int, since: float, width: float) -> dict[int, int]:
        """{n: items finished in [since + n*width, since + (n+1)*width)}, from `since` on
        (a throughput over time)."""
        rows = self._conn.fetchall("finished_per_interval", (*_range(job_id), since, width))
        rows += self._conn.fetchall("ranges_finished_per_interval", (job_id, since, width))
        out: dict[int, int] = {}
        for n, count in rows:
            out[int(n)] = out.get(int(n), 0) + int(count)
        return out

    @_replayed()
    def reject_lines(self, job_id: int, limit: int) -> list[int]:
        """Input lines (or rows) of records that could not be read, first ones first."""
        return [r[0] for r in self._conn.fetchall("reject_lines", (job_id, limit))]

    @_replayed()
    def retry(self, job_id: int, states: tuple[str, ...]) -> int:
        with self._conn.transaction():
            if "succeeded" in states:
                self._explode(job_id)
            return self._conn.execute("retry", (*_range(job_id), self._conn.array(states)))

    @_replayed()
    def cancel(self, job_id: int) -> int:
        """Stop the job: open items become cancelled; a running runner sees the flag and stops."""
        with self._conn.transaction():
            # The time: a run that started before it obeys it; one started after undoes it.
            self._conn.execute("mark_cancelled", (time.time(), job_id))
            return self._conn.execute("cancel_items", _range(job_id))

    @_replayed()
    def is_cancelled(self, job_id: int) -> bool:
        row = self._conn.fetchone("is_cancelled", (job_id,))
        return bool(row and row[0])

    @_replayed()
    def reopen(self, job_id: int, before: float = float("inf")) -> int:
        """Undo a cancel made before `before`: running a cancelled job again resumes it (a
        cancel made while that run was starting stands)."""
        with self._conn.transaction():
            if not self._conn.execute("undo_cancel", (job_id, min(before, 1e300))):
                return 0
            return self._conn.execute("reopen_items", _range(job_id))

    # -- remote batches -----------------------------------------------------------------
    # A provider batch is a chunk: its items are `submitted` with `batch_chunk` set in the
    # same transaction that records the chunk as `creating`, *before* the remote create call,
    # so an item is never in two chunks, and a crash between "create" and "record the remote
    # id" leaves a `creating` chunk to adopt on restart, not items to submit again.

    @_replayed()
    def pending_page(self, job_id: int, after_seq: int, limit: int, now: float) -> list[Item]:
        """Pending items due by `now`, in input order, after `after_seq` (not leased)."""
        lo, hi = _range(job_id)
        rows = self._conn.fetchall("pending_page", (max(lo, lo + after_seq + 1), hi, now, limit))
        return [_item(r) for r in rows]

    @_replayed()
    def known_ids(self, job_id: int, custom_ids: list[str]) -> set[str]:
        """Which of `custom_ids` are items of the job already (a queue's redeliveries)."""
        at = self._conn.fetchone("ingest_position", (job_id,))
        if at is None:
            return set()
        # The ids of every item so far (add_items and add_succeeded keep it): read again only
        # when another process moved the cursor since.
        asked = list(dict.fromkeys(custom_ids))
        return self._confirmed(job_id, self._seen_ids(job_id, int(at[0])), asked)

    def _confirmed(self, job_id: int, seen: IdHashes, custom_ids: list[str]) -> set[str]:
        """Which of `custom_ids` are items of the job: `seen`'s hash hits, confirmed in the
        rows, compared as the items hold them (_repeats)."""
        stored = list(map(self._conn.text, custom_ids))
        hits = [c for c, hit in zip(stored, seen.maybe(stored), strict=True) if hit]
        if not hits:
            return set()
        items = self._first_lines(job_id, hits)
        return {
            cid for cid, as_stored in zip(custom_ids, stored, strict=True) if as_stored in items
        }

    @_replayed()
    def repeats_seen(self, job_id: int, custom_ids: list[str]) -> set[str]:
        """Which of `custom_ids` are items of the job as far as this process's ingest knows
        (the ids it keeps, hits confirmed in the rows), with no query when none is a hit: the
        runner leaves such a repeat uncomputed; add_items, which refuses it, has the last
        word (after another ingester wrote, this may not know all)."""
        got = self._seen.get(job_id)
        return set() if got is None else self._confirmed(job_id, got[1], custom_ids)

    @_replayed()
    def items_page(self, job_id: int, from_seq: int, limit: int) -> list[ItemState]:
        """Items from `from_seq` on, in input order, whatever their state (ranges from there on
        become item rows first)."""
        lo, hi = _range(job_id)
        if self._conn.fetchall("ranges_page", (job_id, from_seq - 1, _ALL, 1)):
            with self._conn.transaction():  # what it reads item by item is item rows
                self._explode(job_id, from_seq - 1)
        rows = self._conn.fetchall("items_page", (lo + from_seq, hi, limit))
        return [ItemState(r[0] & _SEQ_MASK, *r[1:]) for r in rows]

    @_replayed(_chunk_planned)
    def plan_chunk(self, job_id: int, provider: str, seqs: list[int], now: float) -> int:
        base = job_id << SEQ_BITS
        with self._conn.transaction():
            self._conn.execute("lock_job", (job_id,))  # one chunk number per planner
            chunk = self._conn.fetchone("next_chunk", (job_id,))[0]  # type: ignore[index]
            if seqs:
                self._conn.executemany("submit_item", [(chunk, now, base + s) for s in seqs])
            self._conn.execute("insert_chunk", (job_id, chunk, provider, len(seqs), now))
        return chunk

    @_replayed()
    def set_create_until(self, job_id: int, chunk: int, until: float) -> None:
        """Recorded before each create call of a `creating` chunk: until when that call
        could still make a batch at the provider (a rerun waits that long before it creates
        the chunk again)."""
        with self._conn.transaction():
            self._conn.execute("set_create_until", (until, job_id, chunk))

    @_replayed()
    def set_remote(
        self, job_id: int, chunk: int, remote_id: str, input_file_id: str | None = None
    ) -> None:
        with self._conn.transaction():
            self._conn.execute("set_remote", (remote_id, input_file_id, job_id, chunk))

    @_replayed()
    def update_chunk(
        self, job_id: int, chunk: int, remote_status: str, counts: dict[str, int]
    ) -> None:
        with self._conn.transaction():
            self._conn.execute(
                "update_chunk", (remote_status, orjson.dumps(counts).decode(), job_id, chunk)
            )

    @_replayed()
    def chunks(self, job_id: int, statuses: tuple[str, ...] | None = None) -> list[RemoteBatch]:
        wanted = self._conn.array(statuses) if statuses else None
        return [
            RemoteBatch(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[6],
                orjson.loads(r[7]) if r[7] else {},
                r[8],
                r[9],
                r[10],
                bool(r[11]),
            )
            for r in self._conn.fetchall("chunks", (job_id, wanted))
        ]

    @_replayed()
    def chunk_items(self, job_id: int, chunk: int) -> list[Item]:
        """The items a chunk still holds, in input (= file line) order."""
        return [_item(r) for r in self._conn.fetchall("chunk_items", (*_range(job_id), chunk))]

    @_replayed()
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
    ) -> int:
        """Commit a collected chunk in one transaction: outcomes for the items it still holds
        (so collecting twice after a crash writes nothing twice), items without a result go
        to `leftover` (pending for a new batch, or cancelled), and the chunk is collected."""
        base = job_id << SEQ_BITS
        done = _final_params(outcomes, base, now, chunk)
        again = [
            (
                o.error_class,
                o.message,
                o.not_before,
                o.follow_up,
                *_usage(o),
                o.attempts,
                base + o.seq,
                chunk,
            )
            for o in outcomes
            if o.state == "pending"
        ]
        lo, hi = _range(job_id)
        changed = 0
        with self._conn.transaction():
            if done:
                changed += self._conn.executemany("finish_chunk_done", done)
            if again:
                changed += self._conn.executemany("finish_chunk_again", again)
            attempt = int(count_attempt and leftover == "pending")
            self._conn.execute("finish_chunk_leftover", (leftover, attempt, lo, hi, chunk))
            self._conn.execute("collect_chunk", (now, remote_status, job_id, chunk))
        return changed

    # -- the LLM response cache (llm/cache.py: LedgerResponseCache) ----------------------
    # Each put commits on its own: a paid answer is durable the moment it arrives.

    @_replayed()
    def cache_get(self, scope: str, keys: list[str]) -> list[tuple[str, bytes, int, int]]:
        return self._conn.fetchall("cache_get", (scope, self._conn.array(keys)))  # type: ignore[return-value]

    @_replayed()
    def cache_put(
        self, scope: str, key: str, body: bytes, input_tokens: int, output_tokens: int
    ) -> None:
        self._conn.execute(
            "cache_put", (scope, key, body, input_tokens, output_tokens, time.time())
        )

    @_replayed()
    def cache_clear(self, scope: str) -> int:
        return self._conn.execute("cache_clear", (scope,))
