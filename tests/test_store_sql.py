"""The named queries of both dialects, and what the PostgreSQL connector makes of a server
that refuses, loses or lacks what a ledger needs: a LedgerError naming the URL (never its
password), exit 2, never psycopg's own error."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from conftest import PG_SERVER

from overnight.records import Fingerprint
from overnight.store import LedgerError, open_ledger
from overnight.store.connector import load_queries, positional

FP = Fingerprint(1, 2, "d")


def test_both_dialects_hold_the_same_queries_with_the_same_parameters():
    sqlite, pg = load_queries("sqlite"), load_queries("postgresql")
    # SQLite alone has ledgers from before versioned migrations, whose columns it adds.
    shared = {n: q.params for n, q in sqlite.items() if not n.startswith("legacy_column ")}
    assert shared == {n: q.params for n, q in pg.items()}
    assert any(n.startswith("legacy_column ") for n in sqlite)


def test_sqlite_finds_a_jobs_leased_items_by_their_index_not_by_a_scan(tmp_path):
    # Renew (the heartbeat's, in a write transaction), release, reclaim and the lease owners
    # look at the few leased items; a scan of a million-item job took ~0.2 s each.
    ledger = open_ledger(str(tmp_path / "ledger.db"))
    try:
        db = ledger._db  # type: ignore[attr-defined]
        for name in ("renew", "release_all", "reclaim_expired", "lease_owners"):
            query = load_queries("sqlite")[name]
            sql = positional(query, "?")
            plan = db.execute("EXPLAIN QUERY PLAN " + sql, [0] * len(query.params)).fetchall()
            assert any("items_leased" in step[-1] for step in plan), (name, plan)
    finally:
        ledger.close()


def test_a_refused_connection_is_a_ledger_error_without_the_password():
    with pytest.raises(LedgerError) as caught:
        open_ledger("postgresql://someone:s3cret@127.0.0.1:1/test")
    text = str(caught.value)
    assert "postgresql://someone@127.0.0.1:1/test" in text and "s3cret" not in text
    assert "is PostgreSQL running" in text


def test_a_schema_that_does_not_exist_is_named_with_a_hint():
    with pytest.raises(LedgerError, match="CREATE SCHEMA"):
        open_ledger(f"{PG_SERVER}?options=-csearch_path%3Dno_such_schema_here")


def test_a_lost_connection_that_cannot_be_made_again_is_a_ledger_error(pg_ledger_url, monkeypatch):
    """A lost connection is made again (test_ledger_reconnect.py); when the server stays out
    of reach, the operation ends in a LedgerError naming the ledger (exit 2)."""
    from overnight.retry import RetryPolicy
    from overnight.store import postgresql

    monkeypatch.setattr(postgresql, "_RECONNECT", RetryPolicy(max_attempts=2, base=0.01))
    ledger = open_ledger(pg_ledger_url)
    try:
        job = ledger.create_job("job", "spec", FP)
        conn = ledger._conn  # type: ignore[attr-defined]
        pid = conn.db.info.backend_pid
        conn._dsn = "postgresql://127.0.0.1:9/test"  # the server is gone: nothing listens
        with psycopg.connect(PG_SERVER, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(LedgerError, match="connection") as caught:
            ledger.counts(job.id)
        assert "127.0.0.1" in str(caught.value)
    finally:
        ledger.close()


def test_ledgers_in_two_schemas_of_one_database_are_apart(pg_ledger_url):
    other = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {other}")
        try:
            one = open_ledger(pg_ledger_url)
            two = open_ledger(f"{PG_SERVER}?options=-csearch_path%3D{other}")
            one.create_job("job", "spec", FP)
            assert two.get_job("job") is None and one.get_job("job") is not None
            one.close()
            two.close()
        finally:
            admin.execute(f"DROP SCHEMA {other} CASCADE")


# -- the response cache in a PostgreSQL ledger ------------------------------------------------


def test_the_response_cache_in_the_ledger_is_shared_by_every_connection(pg_ledger_url):
    from overnight.llm.cache import LedgerResponseCache

    with (
        LedgerResponseCache(pg_ledger_url, "job:a") as one,
        LedgerResponseCache(pg_ledger_url, "job:a") as two,
        LedgerResponseCache(pg_ledger_url, "job:b") as other,
    ):
        one.put("k1", {"answer": 1}, 3, 4)
        one.put("k1", {"answer": 2}, 5, 6)  # a newer answer replaces it
        got = two.get_many(["k1", "k2", "k1"])
        assert list(got) == ["k1"] and got["k1"].cached
        assert (got["k1"].input_tokens, got["k1"].output_tokens) == (5, 6)
        assert two.hits == 1 and other.get("k1") is None  # scopes apart
        assert two.clear_scope() == 1 and one.get("k1") is None


def test_an_llm_job_on_a_postgresql_ledger_keeps_its_answers_there(
    pg_ledger_url, tmp_path, fake, keys
):
    from llm_helpers import llm_job, write_records

    write_records(tmp_path, 8)
    job = llm_job(tmp_path, "openai", fake.openai_url, run={"ledger": pg_ledger_url})
    assert job.run().counts["succeeded"] == 8
    assert fake.stats.requests["/v1/chat/completions"] == 8
    again = job.run(restart=True)  # the job starts over; its answers are in the ledger
    assert again.counts["succeeded"] == 8 and again.counts.cost == 0
    assert fake.stats.requests["/v1/chat/completions"] == 8
    assert not list(tmp_path.rglob("cache.db")) and not list(tmp_path.rglob("ledger.db"))
