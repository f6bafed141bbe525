"""The SQLite ledger (WAL). One file holds every job of a folder.

Speed matters here: a million items must cost little more than reading and writing them. So
an item's row id *is* its key, `job_id << 40 | seq` (seq is the record's position in the
input), which makes "the items of a job in input order" a range scan of the table itself; all
writes are bulk statements; and only pending items are indexed by state (a partial index),
because most items go from ingest straight to a lease and never sit in the queue.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import string
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson

from ..records import Cursor, Fingerprint, Row
from .base import (
    Claim,
    ConcurrentIngest,
    Counts,
    Failure,
    Item,
    JobInfo,
    Lease,
    LedgerError,
    Outcome,
    RemoteBatch,
    RunRecord,
)

PAGE_SIZE = 16384
SEQ_BITS = 40  # up to a trillion records per job
_SEQ_MASK = (1 << SEQ_BITS) - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    spec_hash      TEXT NOT NULL,
    fp_size        INTEGER NOT NULL,
    fp_mtime_ns    INTEGER NOT NULL,
    fp_digest      TEXT NOT NULL,
    ingest_records INTEGER NOT NULL DEFAULT 0,
    ingest_line    INTEGER NOT NULL DEFAULT 1,
    ingest_offset  INTEGER NOT NULL DEFAULT 0,
    ingest_done    INTEGER NOT NULL DEFAULT 0,
    cancelled      INTEGER NOT NULL DEFAULT 0, -- when `cancel` ran (epoch seconds; 1: before)
    created_at     REAL NOT NULL,
    token          TEXT,                       -- the job's mark on provider requests
    discarded_before REAL NOT NULL DEFAULT 0,  -- see JobInfo.discarded_before
    fp_how         INTEGER NOT NULL DEFAULT 0, -- 1: fp_digest covers how the input is read
    origin         TEXT,                       -- its job file (see JobInfo.origin)
    ingest_key     TEXT                        -- Cursor.key: a keyset source's resume point
);
CREATE TABLE IF NOT EXISTS items (
    id            INTEGER PRIMARY KEY,          -- job_id << 40 | seq
    job_id        INTEGER NOT NULL,
    custom_id     TEXT NOT NULL,
    line          INTEGER NOT NULL,
    payload       BLOB NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    not_before    REAL NOT NULL DEFAULT 0,
    lease_owner   TEXT,
    lease_expires REAL,
    error_class   TEXT,
    message       TEXT,
    result        BLOB,
    started_at    REAL,
    finished_at   REAL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    cost          REAL,
    list_cost     REAL,
    batch_chunk   INTEGER,                     -- the remote batch holding a submitted item
    vector        BLOB                         -- an embedding output: float32 bytes
);
CREATE UNIQUE INDEX IF NOT EXISTS items_custom_id ON items (job_id, custom_id);
CREATE INDEX IF NOT EXISTS items_pending ON items (id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS remote_batches (
    job_id        INTEGER NOT NULL,
    chunk         INTEGER NOT NULL,
    provider      TEXT NOT NULL,
    status        TEXT NOT NULL,               -- creating | live | collected
    remote_id     TEXT,
    input_file_id TEXT,
    remote_status TEXT,
    requests      INTEGER NOT NULL,
    counts        TEXT,
    planned_at    REAL NOT NULL,
    ended_at      REAL,
    create_until  REAL,                        -- a create may land until then (0: none sent)
    tagged        INTEGER NOT NULL DEFAULT 0,  -- custom_ids carry the job's token
    PRIMARY KEY (job_id, chunk)
);
CREATE TABLE IF NOT EXISTS claims (
    name    TEXT PRIMARY KEY,                  -- the job's name: outlives --restart
    owner   TEXT NOT NULL,
    since   REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,               -- the job's name
    owner         TEXT NOT NULL,
    started_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    ended_at      REAL,                        -- NULL: running, or died without a word
    outcome       TEXT,                        -- finished | interrupted | cancelled | ...
    processed     INTEGER NOT NULL DEFAULT 0,  -- items finished by this run
    seconds       REAL NOT NULL DEFAULT 0,     -- processing time, model loading excluded
    setup_seconds REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_name ON runs (name, id);
CREATE TABLE IF NOT EXISTS inflight (       -- what each runner is computing right now
    job_id    INTEGER NOT NULL,
    owner     TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (job_id, owner)
);
CREATE TABLE IF NOT EXISTS rejects (
    job_id    INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    line      INTEGER NOT NULL,
    custom_id TEXT,
    message   TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);
"""


_COLUMNS_ADDED = {
    "jobs": (
        ("token", "TEXT"),
        ("discarded_before", "REAL NOT NULL DEFAULT 0"),
        # Rows of older ledgers get 0 (see JobInfo.legacy_fingerprint); every write sets 1.
        ("fp_how", "INTEGER NOT NULL DEFAULT 0"),
        ("origin", "TEXT"),
        ("ingest_key", "TEXT"),
    ),
    "remote_batches": (("create_until", "REAL"), ("tagged", "INTEGER NOT NULL DEFAULT 0")),
}
TOKEN_LENGTH = 10
_TOKEN_ALPHABET = string.ascii_lowercase + string.digits


def new_token() -> str:
    """A job's random token: 10 of [a-z0-9], about 52 bits."""
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


_ITEM_COLUMNS_ADDED = (
    ("batch_chunk", "INTEGER"),
    ("input_tokens", "INTEGER"),
    ("output_tokens", "INTEGER"),
    ("cost", "REAL"),
    ("list_cost", "REAL"),
    ("vector", "BLOB"),
)

# Usage adds up over attempts: a failed or repaired attempt was paid for too.
_ADD_USAGE = (
    "input_tokens = coalesce(input_tokens, 0) + ?, output_tokens = coalesce(output_tokens, 0) + ?,"
    " cost = CASE WHEN ? IS NULL THEN cost ELSE coalesce(cost, 0) + ? END,"
    " list_cost = CASE WHEN ? IS NULL THEN list_cost ELSE coalesce(list_cost, 0) + ? END"
)


def _usage(o: Outcome) -> tuple[int, int, float | None, float | None, float | None, float | None]:
    return (o.input_tokens, o.output_tokens, o.cost, o.cost, o.list_cost, o.list_cost)


def _range(job_id: int) -> tuple[int, int]:
    return job_id << SEQ_BITS, ((job_id + 1) << SEQ_BITS) - 1


_HINTS = {
    "readonly": "the ledger is read-only (file or folder permissions, a read-only mount)",
    "locked": "another process has held the ledger's write lock for over 30 s",
    "not a database": "this file is not an overnight ledger, or it is corrupt",
    "malformed": "the ledger file is corrupt",
    "unable to open": "the ledger file cannot be opened (missing folder, permissions)",
    "disk i/o": "the disk under the ledger failed a read or write",
    "full": "the disk under the ledger is full",
}


def _translate(path: Path, exc: sqlite3.Error) -> LedgerError:
    """sqlite3's errors, once, as the error users catch (exit 2): what failed and a hint."""
    text = str(exc)
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_IOERR_WRITE":
        hint: str | None = "could not write the ledger: a read-only or failing disk?"
    else:
        hint = next((h for k, h in _HINTS.items() if k in text.lower()), None)
    return LedgerError(f"ledger {path}: {text}" + (f" ({hint})" if hint else ""))


def switch_to_wal(db: sqlite3.Connection, timeout: float) -> None:
    """PRAGMA journal_mode=WAL, retried while another process holds a lock: SQLite calls no
    busy handler for a journal-mode change, so two processes that create one new file at the
    same instant got "database is locked" at once in place of waiting (measured: 5 of 30
    trials of 4 processes). A file already in WAL mode takes no lock for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sqlite3.Connection.execute(db, "PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY")
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class _Connection(sqlite3.Connection):
    """A connection whose statements raise LedgerError instead of sqlite3's errors."""

    ledger_path: Path

    def execute(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.Error as exc:
            raise _translate(self.ledger_path, exc) from None

    def executemany(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        try:
            return super().executemany(*args, **kwargs)
        except sqlite3.Error as exc:
            raise _translate(self.ledger_path, exc) from None

    def executescript(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        try:
            return super().executescript(*args, **kwargs)
        except sqlite3.Error as exc:
            raise _translate(self.ledger_path, exc) from None


class SQLiteLedger:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            raise LedgerError(f"ledger {path}: is a folder, not a ledger file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"ledger {path}: cannot create its folder: {exc}") from None
        self.path = path
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) so that a lease is
        # taken by exactly one process, and a result commits with its state change.
        # check_same_thread=False: the runner hands the connection to its commit thread, and never
        # uses it from two threads at once.
        try:
            self._db = sqlite3.connect(
                path,
                isolation_level=None,
                timeout=30.0,
                check_same_thread=False,
                factory=_Connection,
            )
        except sqlite3.Error as exc:
            raise _translate(path, exc) from None
        self._db.ledger_path = path  # type: ignore[attr-defined]
        # 16 KiB pages: fewer B-tree pages per million rows (measured ~5% faster end to end
        # than 4 KiB). Only takes effect on a new file, before WAL is switched on.
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        try:
            switch_to_wal(self._db, timeout=30.0)
        except sqlite3.Error as exc:
            raise _translate(path, exc) from None
        # NORMAL in WAL mode survives a killed process; only an OS crash can lose the last
        # commits, and those items are then simply computed again, never lost.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA cache_size=-65536")
        # Checkpoint the WAL every ~40 MB rather than every 4 MB: fewer, larger copies into
        # the database file during bulk ingest; the file is truncated back afterwards.
        self._db.execute(f"PRAGMA wal_autocheckpoint={(40 << 20) // PAGE_SIZE}")
        self._db.execute("PRAGMA journal_size_limit=67108864")
        self._db.execute("PRAGMA temp_store=MEMORY")
        self._db.executescript(SCHEMA)
        # The file this connection writes to. A ledger deleted or replaced under a running job
        # would take every later commit with it, silently: each transaction checks first.
        self._inode = os.stat(path).st_ino
        self._migrate()

    def _migrate(self) -> None:
        """Ledgers written by an older overnight gain the columns added since (cheap: SQLite
        adds a column without rewriting the table); their jobs get a token. In one
        transaction, so two processes opening an old ledger at once do not both alter it."""
        added = {"items": _ITEM_COLUMNS_ADDED, **_COLUMNS_ADDED}
        if not self._needs_migration(added):
            return  # the usual case: no write lock taken
        with self._tx() as db:
            for table, columns in added.items():
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                for column, kind in columns:
                    if column not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            untokened = [r[0] for r in db.execute("SELECT id FROM jobs WHERE token IS NULL")]
            db.executemany(
                "UPDATE jobs SET token = ? WHERE id = ?", [(new_token(), i) for i in untokened]
            )

    def _needs_migration(self, added: dict[str, tuple[tuple[str, str], ...]]) -> bool:
        for table, columns in added.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if any(column not in have for column, _ in columns):
                return True
        return bool(self._db.execute("SELECT 1 FROM jobs WHERE token IS NULL LIMIT 1").fetchone())

    def _check_file(self) -> None:
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if inode != self._inode:
            raise LedgerError(
                f"ledger {self.path} was deleted or replaced while in use; nothing more can be"
                " recorded in it. Restore it to keep its results (running again without it"
                " starts the job over)"
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._check_file()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- claims -------------------------------------------------------------------------

    def claim(
        self, name: str, owner: str, now: float, expires: float, take_from: str | None = None
    ) -> Claim:
        """Claim job `name` for `owner`; the claim returned is whoever holds it afterwards.
        An expired claim, or one held by `take_from` (a dead owner), is taken over."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO claims (name, owner, since, expires) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " since = excluded.since, expires = excluded.expires"
                " WHERE claims.expires < ? OR claims.owner = ? OR claims.owner = ?",
                (name, owner, now, expires, now, take_from or "", owner),
            )
            row = db.execute(
                "SELECT owner, since, expires FROM claims WHERE name = ?", (name,)
            ).fetchone()
        return Claim(*row)

    def renew_claim(self, name: str, owner: str, expires: float) -> bool:
        with self._tx() as db:
            return bool(
                db.execute(
                    "UPDATE claims SET expires = ? WHERE name = ? AND owner = ?",
                    (expires, name, owner),
                ).rowcount
            )

    def release_claim(self, name: str, owner: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM claims WHERE name = ? AND owner = ?", (name, owner))

    # -- runs: what each run did, for `status` -------------------------------------------

    def start_run(self, name: str, owner: str, now: float) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs (name, owner, started_at, updated_at) VALUES (?, ?, ?, ?)",
                (name, owner, now, now),
            )
            return int(cur.lastrowid or 0)

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
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET updated_at = ?, processed = ?, seconds = ?, setup_seconds = ?,"
                " outcome = coalesce(?, outcome),"
                " ended_at = CASE WHEN ? IS NULL THEN ended_at ELSE ? END WHERE id = ?",
                (now, processed, seconds, setup_seconds, outcome, outcome, now, run_id),
            )

    def last_run(self, name: str) -> RunRecord | None:
        row = self._db.execute(
            "SELECT owner, started_at, updated_at, ended_at, outcome, processed, seconds,"
            " setup_seconds FROM runs WHERE name = ? ORDER BY id DESC LIMIT 1",
            (name,),
        ).fetchone()
        return RunRecord(*row) if row else None

    def open_runs(self, name: str) -> list[RunRecord]:
        """The runs of job `name` that have not ended: its workers now, and those that died
        without a word (kill -9), which the caller tells apart (claim.worker_alive)."""
        rows = self._db.execute(
            "SELECT owner, started_at, updated_at, ended_at, outcome, processed, seconds,"
            " setup_seconds FROM runs WHERE name = ? AND ended_at IS NULL ORDER BY id",
            (name,),
        ).fetchall()
        return [RunRecord(*r) for r in rows]

    def finished_since(self, job_id: int, since: float) -> int:
        """Items finished at or after `since` (a recent throughput)."""
        lo, hi = _range(job_id)
        return self._db.execute(
            "SELECT count(*) FROM items WHERE id BETWEEN ? AND ? AND finished_at >= ?",
            (lo, hi, since),
        ).fetchone()[0]

    def get_claim(self, name: str) -> Claim | None:
        row = self._db.execute(
            "SELECT owner, since, expires FROM claims WHERE name = ?", (name,)
        ).fetchone()
        return Claim(*row) if row else None

    # -- jobs ---------------------------------------------------------------------------

    def get_job(self, name: str) -> JobInfo | None:
        row = self._db.execute(
            "SELECT id, name, spec_hash, fp_size, fp_mtime_ns, fp_digest, ingest_records,"
            " ingest_line, ingest_offset, ingest_done, created_at, token, discarded_before,"
            " fp_how, origin, ingest_key FROM jobs WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return None
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

    def create_job(
        self,
        name: str,
        spec_hash: str,
        fingerprint: Fingerprint,
        discarded_before: float = 0.0,
        origin: str | None = None,
    ) -> JobInfo:
        with self._tx() as db:
            # ON CONFLICT: two processes creating one job at once get the same row, not an
            # IntegrityError (the claim keeps them apart before this in `run`).
            db.execute(
                "INSERT INTO jobs (name, spec_hash, fp_size, fp_mtime_ns, fp_digest, created_at,"
                " token, discarded_before, fp_how, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (
                    name,
                    spec_hash,
                    fingerprint.size,
                    fingerprint.mtime_ns,
                    fingerprint.digest,
                    time.time(),
                    new_token(),
                    discarded_before,
                    origin,
                ),
            )
        job = self.get_job(name)
        assert job is not None
        return job

    def list_jobs(self) -> list[JobInfo]:
        """Every job in the ledger, oldest first (read only); not a generation being read
        (see begin_generation)."""
        names = [
            r[0]
            for r in self._db.execute("SELECT name FROM jobs ORDER BY id")
            if "\x00" not in r[0]
        ]
        return [job for job in map(self.get_job, names) if job is not None]

    def delete_job(self, job_id: int) -> None:
        lo, hi = _range(job_id)
        with self._tx() as db:
            db.execute("DELETE FROM items WHERE id BETWEEN ? AND ?", (lo, hi))
            db.execute("DELETE FROM rejects WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM inflight WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM remote_batches WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    # -- incremental runs ---------------------------------------------------------------
    # The input changed since the job started: it is read again into a new generation of the
    # job (a hidden job row), results of records whose id and content are unchanged are
    # carried over, and the new generation replaces the old one in one transaction. Item keys
    # stay `job << 40 | position`, so the output keeps the new input's order. A crash before
    # the swap leaves the old generation as it was; the next run starts the new one again.

    @staticmethod
    def _next_name(name: str) -> str:
        return f"{name}\x00next"

    def begin_generation(self, job: JobInfo, fingerprint: Fingerprint) -> JobInfo:
        """A new, empty generation of `job` for the changed input (any stale one is dropped)."""
        hidden = self._next_name(job.name)
        stale = self.get_job(hidden)
        if stale is not None:
            self.delete_job(stale.id)
        with self._tx() as db:
            db.execute(
                "INSERT INTO jobs (name, spec_hash, fp_size, fp_mtime_ns, fp_digest, created_at,"
                " token, discarded_before, fp_how, origin) SELECT ?, spec_hash, ?, ?, ?,"
                " created_at, token, discarded_before, 1, origin FROM jobs WHERE id = ?",
                (hidden, fingerprint.size, fingerprint.mtime_ns, fingerprint.digest, job.id),
            )
        new = self.get_job(hidden)
        assert new is not None
        return new

    def carry_results(self, old_id: int, new_id: int) -> tuple[int, int]:
        """Finished items of `old_id` whose id and record are unchanged in `new_id` keep their
        state, result, attempts, usage and times; the rest of `new_id` stays pending.
        Returns (items carried over, ids of `old_id` that `new_id` no longer has)."""
        lo, hi = _range(new_id)
        olo, ohi = _range(old_id)
        with self._tx() as db:
            gone = db.execute(
                "SELECT count(*) FROM items AS o WHERE o.id BETWEEN ? AND ? AND NOT EXISTS"
                " (SELECT 1 FROM items AS n WHERE n.job_id = ? AND n.custom_id = o.custom_id)",
                (olo, ohi, new_id),
            ).fetchone()[0]
            kept = db.execute(
                "UPDATE items SET state = o.state, result = o.result, vector = o.vector,"
                " attempts = o.attempts,"
                " error_class = o.error_class, message = o.message, started_at = o.started_at,"
                " finished_at = o.finished_at, input_tokens = o.input_tokens,"
                " output_tokens = o.output_tokens, cost = o.cost, list_cost = o.list_cost"
                " FROM items AS o WHERE items.id BETWEEN ? AND ? AND items.state = 'pending'"
                " AND o.job_id = ? AND o.custom_id = items.custom_id"
                " AND o.payload = items.payload"
                " AND o.state IN ('succeeded', 'failed', 'invalid')",
                (lo, hi, old_id),
            ).rowcount
        return kept, gone

    def replace_generation(self, old: JobInfo, new: JobInfo) -> JobInfo:
        """Swap: `new` takes the job's name and its remote batch history; `old` is deleted."""
        lo, hi = _range(old.id)
        with self._tx() as db:
            db.execute("UPDATE remote_batches SET job_id = ? WHERE job_id = ?", (new.id, old.id))
            db.execute("DELETE FROM items WHERE id BETWEEN ? AND ?", (lo, hi))
            db.execute("DELETE FROM rejects WHERE job_id = ?", (old.id,))
            # In-flight marks name the old positions; the records they name are pending in
            # the new generation (never finished), so they are computed again anyway.
            db.execute("DELETE FROM inflight WHERE job_id = ?", (old.id,))
            # A cancel made while the new generation was read stands.
            db.execute(
                "UPDATE jobs SET cancelled = (SELECT cancelled FROM jobs WHERE id = ?)"
                " WHERE id = ?",
                (old.id, new.id),
            )
            db.execute("DELETE FROM jobs WHERE id = ?", (old.id,))
            db.execute("UPDATE jobs SET name = ? WHERE id = ?", (old.name, new.id))
        job = self.get_job(old.name)
        assert job is not None
        return job

    def set_origin(self, job_id: int, origin: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET origin = ? WHERE id = ?", (origin, job_id))

    def set_fingerprint(self, job_id: int, fingerprint: Fingerprint) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE jobs SET fp_size = ?, fp_mtime_ns = ?, fp_digest = ?, fp_how = 1"
                " WHERE id = ?",
                (fingerprint.size, fingerprint.mtime_ns, fingerprint.digest, job_id),
            )

    # -- ingest -------------------------------------------------------------------------

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
        with its result, so a fresh item costs one write, not three. Rows that cannot be read,
        and repeated ids (the first one wins), go to `rejects`. Returns, per row, whether it
        became an item. Raises ConcurrentIngest when another runner moved the cursor first.
        """
        first = (job_id << SEQ_BITS) + first_seq
        accepted = [r.error is None for r in rows]
        good = rows if all(accepted) else [r for r in rows if r.error is None]
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
        if now is not None and all(
            o[1] == "succeeded"
            and not o[6]
            and o[8] is None
            and o.vector is None
            and o.attempts == 1
            for o in outcomes
        ):
            # The common case, and the per-record cost of ingest: bind only what varies.
            sql = (
                "INSERT INTO items (id, custom_id, line, payload, result, job_id, state,"
                f" attempts, started_at, finished_at) VALUES (?, ?, ?, ?, ?, {int(job_id)},"
                f" 'succeeded', 1, {float(now)!r}, {float(now)!r}) ON CONFLICT DO NOTHING"
            )
            params = [
                (i, r[1], r[0], r[2], o[2]) for i, r, o in zip(ids, good, outcomes, strict=True)
            ]
        else:
            sql = (
                "INSERT INTO items (id, job_id, custom_id, line, payload, state,"
                " attempts, not_before, error_class, message, result, started_at, finished_at,"
                " input_tokens, output_tokens, cost, list_cost, vector)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                # Only a repeated id is skipped (see _duplicates); a NULL where a value belongs
                # must raise, never silently drop the row (OR IGNORE would).
                " ON CONFLICT DO NOTHING"
            )
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
        with self._tx() as db:
            moved = db.execute(
                "UPDATE jobs SET ingest_records = ?, ingest_line = ?, ingest_offset = ?,"
                " ingest_key = ? WHERE id = ? AND ingest_records = ?",
                (cursor.records, cursor.line, cursor.offset, cursor.key, job_id, first_seq),
            ).rowcount
            if not moved:
                raise ConcurrentIngest(f"job {job_id}: another runner is ingesting this job")
            before = db.total_changes
            db.executemany(sql, params)
            rejects = [
                (job_id, first_seq + i, r.line, r.custom_id, r.error)
                for i, r in enumerate(rows)
                if r.error is not None
            ]
            if db.total_changes - before < len(params):
                rejects += self._duplicates(db, job_id, first_seq, rows, accepted)
            if rejects:
                db.executemany(
                    "INSERT OR IGNORE INTO rejects (job_id, seq, line, custom_id, message)"
                    " VALUES (?, ?, ?, ?, ?)",
                    rejects,
                )
        return accepted

    @staticmethod
    def _duplicates(
        db: sqlite3.Connection, job_id: int, first_seq: int, rows: list[Row], accepted: list[bool]
    ) -> list[tuple[int, int, int, str | None, str]]:
        """Rows the INSERT skipped (ON CONFLICT): their id was taken by an earlier record."""
        base = job_id << SEQ_BITS
        out = []
        for i, r in enumerate(rows):
            if not accepted[i]:
                continue
            got = db.execute(
                "SELECT id, line FROM items WHERE job_id = ? AND custom_id = ?",
                (job_id, r.custom_id),
            ).fetchone()
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

    def finish_ingest(self, job_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET ingest_done = 1 WHERE id = ?", (job_id,))

    # -- work ---------------------------------------------------------------------------

    def lease(self, job_id: int, limit: int, lease: Lease) -> list[Item]:
        lo, hi = _range(job_id)
        with self._tx() as db:
            rows = db.execute(
                "UPDATE items SET state = 'leased', lease_owner = ?, lease_expires = ?,"
                " started_at = ? WHERE id IN (SELECT id FROM items WHERE state = 'pending'"
                " AND id BETWEEN ? AND ? AND not_before <= ? ORDER BY id LIMIT ?)"
                " RETURNING id, custom_id, line, payload, attempts, error_class",
                (lease.owner, lease.expires, lease.now, lo, hi, lease.now, limit),
            ).fetchall()
        items = [Item(r[0] & _SEQ_MASK, r[1], r[2], r[3], r[4], None, r[5]) for r in rows]
        items.sort(key=lambda it: it.seq)  # RETURNING order is not guaranteed
        return items

    def complete(self, job_id: int, owner: str, outcomes: list[Outcome], now: float) -> int:
        """Commit results and errors; only for items this owner still holds (no double write)."""
        base = job_id << SEQ_BITS
        done = [
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
                owner,
            )
            for o in outcomes
            if o.state != "pending"
        ]
        again = [
            (o.error_class, o.message, o.not_before, *_usage(o), o.attempts, base + o.seq, owner)
            for o in outcomes
            if o.state == "pending"
        ]
        with self._tx() as db:
            before = db.total_changes
            if done:
                db.executemany(
                    "UPDATE items SET state = ?, result = ?, vector = ?, error_class = ?,"
                    " message = ?, finished_at = ?, " + _ADD_USAGE + ", attempts = attempts + ?,"
                    " lease_owner = NULL, lease_expires = NULL"
                    " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                    done,
                )
            if again:
                db.executemany(
                    "UPDATE items SET state = 'pending', error_class = ?, message = ?,"
                    " not_before = ?, " + _ADD_USAGE + ", attempts = attempts + ?,"
                    " lease_owner = NULL, lease_expires = NULL"
                    " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                    again,
                )
            return db.total_changes - before

    def release(self, job_id: int, owner: str, seqs: list[int] | None = None) -> int:
        """Give leased items back untouched (attempts unchanged): Ctrl-C, or a dead owner."""
        lo, hi = _range(job_id)
        with self._tx() as db:
            before = db.total_changes
            if seqs is None:
                db.execute(
                    "UPDATE items SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
                    " WHERE id BETWEEN ? AND ? AND state = 'leased' AND lease_owner = ?",
                    (lo, hi, owner),
                )
            else:
                db.executemany(
                    "UPDATE items SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
                    " WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                    [(lo + s, owner) for s in seqs],
                )
            return db.total_changes - before

    def renew(self, job_id: int, owner: str, expires: float) -> int:
        lo, hi = _range(job_id)
        with self._tx() as db:
            return db.execute(
                "UPDATE items SET lease_expires = ? WHERE id BETWEEN ? AND ? AND state = 'leased'"
                " AND lease_owner = ?",
                (expires, lo, hi, owner),
            ).rowcount

    def reclaim_expired(self, job_id: int, now: float) -> int:
        lo, hi = _range(job_id)
        with self._tx() as db:
            return db.execute(
                "UPDATE items SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
                " WHERE id BETWEEN ? AND ? AND state = 'leased' AND lease_expires < ?",
                (lo, hi, now),
            ).rowcount

    def lease_owners(self, job_id: int) -> list[str]:
        lo, hi = _range(job_id)
        rows = self._db.execute(
            "SELECT DISTINCT lease_owner FROM items WHERE id BETWEEN ? AND ? AND state = 'leased'",
            (lo, hi),
        ).fetchall()
        return [r[0] for r in rows if r[0]]

    # -- attempts counted when they start ------------------------------------------------
    # Before computing, a runner marks the range of seqs it is computing: fresh records past
    # the ingest cursor, or items it holds leased. The mark is one small row per runner,
    # replaced per call. A runner that dies (a crash in user code, kill -9, the OOM killer)
    # leaves its mark behind, and the next runner counts an attempt for exactly those records.

    def mark_inflight(self, job_id: int, owner: str, first_seq: int, last_seq: int) -> None:
        # One statement, its own small transaction (autocommit); an UPDATE of the runner's
        # row costs about half an INSERT OR REPLACE (measured: ~22 vs ~45 us).
        args = (first_seq, last_seq, job_id, owner)
        if not self._db.execute(
            "UPDATE inflight SET first_seq = ?, last_seq = ? WHERE job_id = ? AND owner = ?", args
        ).rowcount:
            self._db.execute(
                "INSERT INTO inflight (first_seq, last_seq, job_id, owner) VALUES (?, ?, ?, ?)",
                args,
            )

    def clear_inflight(self, job_id: int, owner: str) -> None:
        self._db.execute("DELETE FROM inflight WHERE job_id = ? AND owner = ?", (job_id, owner))

    def inflight(self, job_id: int) -> list[tuple[str, int, int]]:
        return [
            (r[0], r[1], r[2])
            for r in self._db.execute(
                "SELECT owner, first_seq, last_seq FROM inflight WHERE job_id = ?"
                " ORDER BY first_seq",
                (job_id,),
            )
        ]

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
        with self._tx() as db:
            mark = db.execute(
                "SELECT first_seq, last_seq FROM inflight WHERE job_id = ? AND owner = ?",
                (job_id, owner),
            ).fetchone()
            if mark is not None:
                counted = db.execute(
                    "UPDATE items SET attempts = attempts + 1,"
                    " state = CASE WHEN attempts + 1 >= ? THEN 'failed' ELSE 'pending' END,"
                    " message = CASE WHEN attempts + 1 >= ?"
                    " THEN ? || ' (gave up after ' || (attempts + 1) || ' attempts)' ELSE ? END,"
                    " finished_at = CASE WHEN attempts + 1 >= ? THEN ? ELSE NULL END,"
                    " error_class = ?, not_before = 0, lease_owner = NULL, lease_expires = NULL"
                    " WHERE id BETWEEN ? AND ? AND state = 'leased' AND lease_owner = ?",
                    (
                        max_attempts,
                        max_attempts,
                        message,
                        message,
                        max_attempts,
                        time.time(),
                        error_class,
                        lo + mark[0],
                        lo + mark[1],
                        owner,
                    ),
                ).rowcount
            db.execute(
                "UPDATE items SET state = 'pending', lease_owner = NULL, lease_expires = NULL"
                " WHERE id BETWEEN ? AND ? AND state = 'leased' AND lease_owner = ?",
                (lo, hi, owner),
            )
            db.execute(
                "DELETE FROM inflight WHERE job_id = ? AND owner = ? AND last_seq <"
                " (SELECT ingest_records FROM jobs WHERE id = ?)",
                (job_id, owner, job_id),
            )
        return counted

    def next_due(self, job_id: int) -> float | None:
        lo, hi = _range(job_id)
        row = self._db.execute(
            "SELECT min(not_before) FROM items WHERE state = 'pending' AND id BETWEEN ? AND ?",
            (lo, hi),
        ).fetchone()
        return row[0]

    # -- reading ------------------------------------------------------------------------

    def counts(self, job_id: int) -> Counts:
        lo, hi = _range(job_id)
        by_state = dict(
            self._db.execute(
                "SELECT state, count(*) FROM items WHERE id BETWEEN ? AND ? GROUP BY state",
                (lo, hi),
            ).fetchall()
        )
        rejected = self._db.execute(
            "SELECT count(*) FROM rejects WHERE job_id = ?", (job_id,)
        ).fetchone()[0]
        first, last, tin, tout, cost, list_cost = self._db.execute(
            "SELECT min(started_at), max(finished_at), total(input_tokens), total(output_tokens),"
            " total(cost), total(list_cost) FROM items WHERE id BETWEEN ? AND ?",
            (lo, hi),
        ).fetchone()
        return Counts(
            by_state, rejected, first, last, int(tin), int(tout), float(cost), float(list_cost)
        )

    def iter_results(
        self, job_id: int, with_payload: bool = False
    ) -> Iterator[tuple[str, bytes, bytes | None, bytes | None]]:
        lo, hi = _range(job_id)
        cols = (
            "custom_id, result, payload, vector"
            if with_payload
            else "custom_id, result, NULL, vector"
        )
        cur = self._db.execute(
            f"SELECT {cols} FROM items WHERE id BETWEEN ? AND ? AND state = 'succeeded'"
            " ORDER BY id",
            (lo, hi),
        )
        while batch := cur.fetchmany(5000):
            yield from batch

    def iter_result_lines(self, job_id: int, id_name: str) -> Iterator[list[bytes]]:
        """The JSONL output, in input order, in batches of lines: `{"<id_name>": id, ...}`.

        SQLite splices the id into the stored result JSON itself, which is cheaper than
        handing a million rows to Python to splice."""
        lo, hi = _range(job_id)
        head = "{" + orjson.dumps(id_name).decode() + ":"
        cur = self._db.execute(
            "SELECT CAST(? || json_quote(custom_id) || ',' || substr(CAST(result AS TEXT), 2)"
            " || char(10) AS BLOB) FROM items WHERE id BETWEEN ? AND ? AND state = 'succeeded'"
            " ORDER BY id",
            (head, lo, hi),
        )
        while batch := cur.fetchmany(10000):
            yield [r[0] for r in batch]

    def iter_failures(self, job_id: int) -> Iterator[Failure]:
        lo, hi = _range(job_id)
        # Items and ingest rejects, merged in input order.
        cur = self._db.execute(
            "SELECT seq, custom_id, line, state, error_class, message, attempts FROM ("
            " SELECT id - ? AS seq, custom_id, line, state, error_class, message, attempts"
            " FROM items WHERE id BETWEEN ? AND ? AND state IN ('failed', 'invalid')"
            " UNION ALL SELECT seq, custom_id, line, 'failed', 'input_error', message, 0"
            " FROM rejects WHERE job_id = ?) ORDER BY seq",
            (lo, lo, hi, job_id),
        )
        while batch := cur.fetchmany(1000):
            for _, cid, line, state, ecls, msg, attempts in batch:
                yield Failure(cid, line, state, ecls or "unknown", msg or "", attempts)

    def reject_lines(self, job_id: int, limit: int) -> list[int]:
        """Input lines (or rows) of records that could not be read, first ones first."""
        rows = self._db.execute(
            "SELECT line FROM rejects WHERE job_id = ? ORDER BY seq LIMIT ?", (job_id, limit)
        )
        return [r[0] for r in rows]

    def retry(self, job_id: int, states: tuple[str, ...]) -> int:
        lo, hi = _range(job_id)
        marks = ", ".join("?" * len(states))
        with self._tx() as db:
            return db.execute(
                "UPDATE items SET state = 'pending', attempts = 0, not_before = 0,"
                " error_class = NULL, message = NULL, result = NULL, vector = NULL"
                f" WHERE id BETWEEN ? AND ? AND state IN ({marks})",
                (lo, hi, *states),
            ).rowcount

    def cancel(self, job_id: int) -> int:
        """Stop the job: open items become cancelled; a running runner sees the flag and stops."""
        lo, hi = _range(job_id)
        with self._tx() as db:
            # The time: a run that started before it obeys it; one started after undoes it.
            db.execute("UPDATE jobs SET cancelled = ? WHERE id = ?", (time.time(), job_id))
            return db.execute(
                "UPDATE items SET state = 'cancelled', lease_owner = NULL, lease_expires = NULL"
                " WHERE id BETWEEN ? AND ? AND state IN ('pending', 'leased')",
                (lo, hi),
            ).rowcount

    def is_cancelled(self, job_id: int) -> bool:
        row = self._db.execute("SELECT cancelled FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def reopen(self, job_id: int, before: float = float("inf")) -> int:
        """Undo a cancel made before `before`: running a cancelled job again resumes it (a
        cancel made while that run was starting stands)."""
        lo, hi = _range(job_id)
        with self._tx() as db:
            undone = db.execute(
                "UPDATE jobs SET cancelled = 0 WHERE id = ? AND cancelled != 0 AND cancelled < ?",
                (job_id, before),
            ).rowcount
            if not undone:
                return 0
            return db.execute(
                "UPDATE items SET state = 'pending'"
                " WHERE id BETWEEN ? AND ? AND state = 'cancelled'",
                (lo, hi),
            ).rowcount

    def close(self) -> None:
        self._db.close()

    # -- remote batches -----------------------------------------------------------------
    # A provider batch is a chunk: its items are `submitted` with `batch_chunk` set in the
    # same transaction that records the chunk as `creating`, *before* the remote create call,
    # so an item is never in two chunks, and a crash between "create" and "record the remote
    # id" leaves a `creating` chunk to adopt on restart, not items to submit again.

    def pending_page(self, job_id: int, after_seq: int, limit: int, now: float) -> list[Item]:
        """Pending items due by `now`, in input order, after `after_seq` (not leased)."""
        lo, hi = _range(job_id)
        rows = self._db.execute(
            "SELECT id, custom_id, line, payload, attempts, result FROM items"
            " WHERE state = 'pending' AND id BETWEEN ? AND ? AND not_before <= ?"
            " ORDER BY id LIMIT ?",
            (max(lo, lo + after_seq + 1), hi, now, limit),
        ).fetchall()
        return [Item(r[0] & _SEQ_MASK, r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def plan_chunk(self, job_id: int, provider: str, seqs: list[int], now: float) -> int:
        base = job_id << SEQ_BITS
        with self._tx() as db:
            chunk = db.execute(
                "SELECT coalesce(max(chunk), 0) + 1 FROM remote_batches WHERE job_id = ?",
                (job_id,),
            ).fetchone()[0]
            db.executemany(
                "UPDATE items SET state = 'submitted', batch_chunk = ?, started_at = ?"
                " WHERE id = ? AND state = 'pending'",
                [(chunk, now, base + s) for s in seqs],
            )
            db.execute(
                "INSERT INTO remote_batches (job_id, chunk, provider, status, requests,"
                " planned_at, create_until, tagged) VALUES (?, ?, ?, 'creating', ?, ?, 0, 1)",
                (job_id, chunk, provider, len(seqs), now),
            )
        return chunk

    def set_create_until(self, job_id: int, chunk: int, until: float) -> None:
        """Recorded before each create call of a `creating` chunk: until when that call
        could still make a batch at the provider (a rerun waits that long before it creates
        the chunk again)."""
        with self._tx() as db:
            db.execute(
                "UPDATE remote_batches SET create_until = ? WHERE job_id = ? AND chunk = ?"
                " AND status = 'creating'",
                (until, job_id, chunk),
            )

    def set_remote(
        self, job_id: int, chunk: int, remote_id: str, input_file_id: str | None = None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE remote_batches SET status = 'live', remote_id = ?, input_file_id = ?"
                " WHERE job_id = ? AND chunk = ?",
                (remote_id, input_file_id, job_id, chunk),
            )

    def update_chunk(
        self, job_id: int, chunk: int, remote_status: str, counts: dict[str, int]
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE remote_batches SET remote_status = ?, counts = ?"
                " WHERE job_id = ? AND chunk = ?",
                (remote_status, orjson.dumps(counts).decode(), job_id, chunk),
            )

    def chunks(self, job_id: int, statuses: tuple[str, ...] | None = None) -> list[RemoteBatch]:
        sql = (
            "SELECT chunk, provider, status, remote_id, input_file_id, remote_status, requests,"
            " counts, planned_at, ended_at, create_until, tagged FROM remote_batches"
            " WHERE job_id = ?"
        )
        args: tuple = (job_id,)
        if statuses:
            sql += f" AND status IN ({', '.join('?' * len(statuses))})"
            args += statuses
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
            for r in self._db.execute(sql + " ORDER BY chunk", args)
        ]

    def chunk_items(self, job_id: int, chunk: int) -> list[Item]:
        """The items a chunk still holds, in input (= file line) order."""
        lo, hi = _range(job_id)
        rows = self._db.execute(
            "SELECT id, custom_id, line, payload, attempts, result FROM items"
            " WHERE id BETWEEN ? AND ? AND state = 'submitted' AND batch_chunk = ? ORDER BY id",
            (lo, hi, chunk),
        ).fetchall()
        return [Item(r[0] & _SEQ_MASK, r[1], r[2], r[3], r[4], r[5]) for r in rows]

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
        done = [
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
                chunk,
            )
            for o in outcomes
            if o.state != "pending"
        ]
        again = [  # `result` of a pending item: its follow-up request (a repair), if any
            (
                o.error_class,
                o.message,
                o.not_before,
                o.result,
                *_usage(o),
                o.attempts,
                base + o.seq,
                chunk,
            )
            for o in outcomes
            if o.state == "pending"
        ]
        lo, hi = _range(job_id)
        with self._tx() as db:
            before = db.total_changes
            db.executemany(
                "UPDATE items SET state = ?, result = ?, vector = ?, error_class = ?,"
                " message = ?, finished_at = ?, " + _ADD_USAGE + ", attempts = attempts + ?,"
                " batch_chunk = NULL WHERE id = ? AND state = 'submitted' AND batch_chunk = ?",
                done,
            )
            db.executemany(
                "UPDATE items SET state = 'pending', error_class = ?, message = ?,"
                " not_before = ?, result = ?, " + _ADD_USAGE + ", attempts = attempts + ?,"
                " batch_chunk = NULL WHERE id = ? AND state = 'submitted' AND batch_chunk = ?",
                again,
            )
            changed = db.total_changes - before
            db.execute(
                "UPDATE items SET state = ?, batch_chunk = NULL, attempts = attempts + ?,"
                " error_class = coalesce("
                "error_class, 'no_result'), message = coalesce(message, 'the batch ended"
                " without a result for this item') WHERE id BETWEEN ? AND ?"
                " AND state = 'submitted' AND batch_chunk = ?",
                (leftover, int(count_attempt and leftover == "pending"), lo, hi, chunk),
            )
            db.execute(
                "UPDATE remote_batches SET status = 'collected', ended_at = ?,"
                " remote_status = coalesce(?, remote_status) WHERE job_id = ? AND chunk = ?",
                (now, remote_status, job_id, chunk),
            )
        return changed
