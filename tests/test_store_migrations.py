"""Versioned schema migrations: a ledger written by an older overnight is upgraded when it is
opened, in one transaction, by one process; a ledger from a newer overnight is refused."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import orjson
import pytest

import overnight
from overnight.store import LedgerError, SQLiteLedger
from overnight.store.connector import load_queries

# The layout before versioned migrations and before the columns added since (tokens,
# usage, vectors, batch chunks...): what the first overnight releases wrote.
OLD_DDL = """
CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    spec_hash TEXT NOT NULL, fp_size INTEGER NOT NULL, fp_mtime_ns INTEGER NOT NULL,
    fp_digest TEXT NOT NULL, ingest_records INTEGER NOT NULL DEFAULT 0,
    ingest_line INTEGER NOT NULL DEFAULT 1, ingest_offset INTEGER NOT NULL DEFAULT 0,
    ingest_done INTEGER NOT NULL DEFAULT 0, cancelled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL,
    custom_id TEXT NOT NULL, line INTEGER NOT NULL, payload BLOB NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0, lease_owner TEXT, lease_expires REAL,
    error_class TEXT, message TEXT, result BLOB, started_at REAL, finished_at REAL);
CREATE UNIQUE INDEX items_custom_id ON items (job_id, custom_id);
CREATE TABLE remote_batches (job_id INTEGER NOT NULL, chunk INTEGER NOT NULL,
    provider TEXT NOT NULL, status TEXT NOT NULL, remote_id TEXT,
    input_file_id TEXT, remote_status TEXT, requests INTEGER NOT NULL, counts TEXT,
    planned_at REAL NOT NULL, ended_at REAL, PRIMARY KEY (job_id, chunk));
CREATE TABLE claims (name TEXT PRIMARY KEY, owner TEXT NOT NULL, since REAL NOT NULL,
    expires REAL NOT NULL);
INSERT INTO jobs (name, spec_hash, fp_size, fp_mtime_ns, fp_digest, created_at, ingest_done,
    ingest_records) VALUES ('earlier', 'h', 1, 1, 'd', 5.0, 1, 2);
INSERT INTO items (id, job_id, custom_id, line, payload, state, attempts, result)
    VALUES (1099511627776, 1, 'a', 1, X'7B7D', 'succeeded', 1, X'7B226F7574707574223A317D'),
           (1099511627777, 1, 'b', 2, X'7B7D', 'pending', 0, NULL);
"""


LATEST = len([n for n in load_queries("sqlite") if n.startswith("migration_")])


def old_ledger(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(OLD_DDL)
    db.close()
    return path


def columns(path: Path, table: str) -> list[str]:
    with sqlite3.connect(path) as db:
        return [r[1] for r in db.execute(f"PRAGMA table_info({table})")]


def versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as db:
        return [r[0] for r in db.execute("SELECT version FROM schema_version")]


def test_a_job_runs_on_a_ledger_written_by_the_old_schema(tmp_path):
    ledger_path = old_ledger(tmp_path / ".overnight" / "ledger.db")
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(20))
    )
    (tmp_path / "double.py").write_text(
        "def fn(records):\n    return [r['n'] * 2 for r in records]\n"
    )
    (tmp_path / "job.toml").write_text(
        'name = "new"\n[source]\npath = "in.jsonl"\nid = "id"\n'
        '[model]\nbackend = "python"\nfunction = "double:fn"\n'
        '[run]\nbatch_size = 4\nisolation = "none"\n[output]\npath = "out.jsonl"\n'
    )
    report = overnight.Job.from_file(tmp_path / "job.toml").run()
    assert report.exit_code == 0 and report.counts.by_state == {"succeeded": 20}
    out = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [r["id"] for r in out] == [f"r{i}" for i in range(20)]
    # Upgraded: the columns added since, a version record, and the old job kept, with a token.
    assert {"vector", "cost", "batch_chunk"} <= set(columns(ledger_path, "items"))
    assert {"token", "origin", "ingest_key"} <= set(columns(ledger_path, "jobs"))
    assert versions(ledger_path) == [LATEST]
    ledger = SQLiteLedger(ledger_path)
    try:
        earlier = ledger.get_job("earlier")
        assert earlier is not None and len(earlier.token) == 10
        assert ledger.counts(earlier.id).by_state == {"succeeded": 1, "pending": 1}
        assert [r[0] for r in ledger.iter_results(earlier.id)] == ["a"]
        assert ledger.schema_version == LATEST
    finally:
        ledger.close()


def _open(path: str) -> int:
    ledger = SQLiteLedger(path)
    try:
        return ledger.schema_version
    finally:
        ledger.close()


def test_processes_opening_one_old_ledger_at_once_upgrade_it_once(tmp_path):
    path = old_ledger(tmp_path / "ledger.db")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        got = pool.map(_open, [str(path)] * 8)
    assert got == [LATEST] * 8
    assert versions(path) == [LATEST]  # one migration, recorded once
    assert columns(path, "items").count("vector") == 1


def test_a_ledger_from_a_newer_overnight_is_refused(tmp_path):
    path = tmp_path / "ledger.db"
    SQLiteLedger(path).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version VALUES (99, 0)")
    with pytest.raises(LedgerError, match="newer overnight"):
        SQLiteLedger(path)


def test_opening_an_up_to_date_ledger_writes_nothing(tmp_path):
    path = tmp_path / "ledger.db"
    SQLiteLedger(path).close()
    before = path.read_bytes()
    SQLiteLedger(path).close()
    assert path.read_bytes() == before
    assert versions(path) == [LATEST]


def test_a_waiting_repair_request_moves_out_of_result_into_its_own_column(tmp_path):
    """Migration 3: a pending (or submitted) item's follow-up request lived in `result`; a
    ledger written before keeps its waiting repairs, now in `follow_up`, and `result` means
    only a result."""
    from overnight.records import Cursor, Fingerprint, Row
    from overnight.store.base import Outcome

    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path)
    job = ledger.create_job("j", "h", Fingerprint(1, 1, "d"))
    ledger.add_items(
        job.id, 0, [Row(i + 1, f"r{i}", b"{}", None, None) for i in range(3)], Cursor(3, 4, 0)
    )
    ledger.close()
    repair = b'{"endpoint": "/v1/chat/completions", "body": {}}'
    with sqlite3.connect(path) as db:  # the layout of version 2, as an older overnight left it
        db.execute("ALTER TABLE items DROP COLUMN follow_up")
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version VALUES (2, 0)")
        db.execute("UPDATE items SET result = ? WHERE custom_id = 'r1'", (repair,))
        db.execute("UPDATE items SET state = 'succeeded', result = X'7B7D' WHERE custom_id = 'r2'")
    ledger = SQLiteLedger(path)
    try:
        assert ledger.schema_version == LATEST
        page = {it.custom_id: it.follow_up for it in ledger.pending_page(job.id, -1, 10, 1e18)}
        assert page == {"r0": None, "r1": repair}
        assert [r[0] for r in ledger.iter_results(job.id)] == ["r2"]  # results untouched
        chunk = ledger.plan_chunk(job.id, "openai", [1], 1.0)
        assert [it.follow_up for it in ledger.chunk_items(job.id, chunk)] == [repair]
        done = Outcome(1, "succeeded", b'{"output": 1}')
        assert ledger.finish_chunk(job.id, chunk, [done], 2.0) == 1
        with sqlite3.connect(path) as db:
            row = db.execute("SELECT result, follow_up FROM items WHERE custom_id = 'r1'")
            assert row.fetchone() == (b'{"output": 1}', None)
    finally:
        ledger.close()
