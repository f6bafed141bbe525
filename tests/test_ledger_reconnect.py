"""A PostgreSQL ledger lives through lost connections: the server restarting, a network blip,
an administrator's pg_terminate_backend. Before, the run died with answers it had paid for
in memory (the response cache on the same server lost them too), and the next run paid again.

The connections are cut for real (pg_terminate_backend on the test's own application_name).
Where a COMMIT's answer is lost after it committed — which a real server does not do on
demand — a connector around the real one cuts its own connection right after a commit."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from llm_helpers import read_jsonl, write_records

from overnight.records import Cursor, Row
from overnight.store.base import ConnectionLost, Lease, Outcome
from overnight.store.postgresql import PostgresConnector
from overnight.testing.fake_provider import FakeProvider

from overnight.store.ledger import SQLLedger  # isort: skip

ADMIN = "postgresql://127.0.0.1:5432/test"


def named(url: str) -> tuple[str, str]:
    """The ledger URL with an application_name of this test's own, and that name."""
    app = f"ovt_{uuid.uuid4().hex[:10]}"
    return f"{url}&application_name={app}", app


def cut(app: str) -> int:
    """Terminate every server connection of `app` (as a restart or an administrator does)."""
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (app,),
        ).fetchall()
    return len(rows)


def rows(n: int, start: int = 0) -> list[Row]:
    return [Row(start + i + 1, f"r{start + i}", b'{"x": 1}', None, None) for i in range(n)]


class LosingConnector(PostgresConnector):
    """The real connector, except that when armed, the next transaction commits and then
    its connection is terminated before the caller hears back (the answer to a COMMIT lost
    on the way: True), or is terminated before it begins (False)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.armed: bool | None = None  # None: off; True: cut after commit; False: before

    @contextmanager
    def transaction(self) -> Iterator[None]:
        mode, self.armed = self.armed, None
        if mode is False:
            self.terminate()  # the server rolls back what was not committed
        with super().transaction():
            yield
        if mode:
            self.terminate()
            raise ConnectionLost(f"ledger {self.url}: connection lost (test)")

    def terminate(self) -> None:
        pid = self.db.info.backend_pid
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.fixture
def losing(pg_ledger_url: str) -> Iterator[tuple[SQLLedger, LosingConnector]]:
    conn = LosingConnector(pg_ledger_url)
    ledger = SQLLedger(conn)
    try:
        yield ledger, conn
    finally:
        ledger.close()


def fresh_job(ledger: SQLLedger, n: int = 10) -> int:
    from overnight.records import Fingerprint

    job = ledger.create_job("j", "h", Fingerprint(1, 1, "d"))
    ledger.add_items(job.id, 0, rows(n), Cursor(n, n, 0))
    return job.id


def state_counts(ledger: SQLLedger, job_id: int) -> dict[str, int]:
    return dict(ledger.counts(job_id).by_state)


# -- a connection cut for real --------------------------------------------------------------


def test_every_operation_goes_on_after_its_connection_was_terminated(pg_ledger_url):
    url, app = named(pg_ledger_url)
    ledger = SQLLedger(PostgresConnector(url))
    try:
        job_id = fresh_job(ledger)
        assert cut(app) == 1
        items = ledger.lease(job_id, 4, Lease("w1", time.time() + 60, time.time()))
        assert [it.seq for it in items] == [0, 1, 2, 3]
        assert cut(app) == 1
        done = [Outcome(it.seq, "succeeded", b'{"y": 1}', attempts=1) for it in items]
        assert ledger.complete(job_id, "w1", done, time.time()) == 4
        assert cut(app) == 1
        assert state_counts(ledger, job_id) == {"succeeded": 4, "pending": 6}
        assert cut(app) == 1
        ledger.cache_put("s", "k", b'{"paid": true}', 3, 4)
        assert ledger.cache_get("s", ["k"]) == [("k", b'{"paid": true}', 3, 4)]
    finally:
        ledger.close()


# -- a COMMIT that committed, its answer lost ------------------------------------------------


def test_a_lease_whose_commit_answer_was_lost_returns_the_items_it_took(losing):
    ledger, conn = losing
    job_id = fresh_job(ledger)
    now = time.time()
    conn.armed = True
    items = ledger.lease(job_id, 4, Lease("w1", now + 60, now))
    assert [it.seq for it in items] == [0, 1, 2, 3]  # not 4..7 as well: nothing taken twice
    assert state_counts(ledger, job_id) == {"leased": 4, "pending": 6}


def test_a_lease_cut_before_its_commit_takes_the_items_again(losing):
    ledger, conn = losing
    job_id = fresh_job(ledger)
    now = time.time()
    conn.armed = False
    items = ledger.lease(job_id, 4, Lease("w1", now + 60, now))
    assert [it.seq for it in items] == [0, 1, 2, 3]
    assert state_counts(ledger, job_id) == {"leased": 4, "pending": 6}


def test_added_items_whose_commit_answer_was_lost_are_not_refused_as_another_ingest(losing):
    ledger, conn = losing
    job_id = fresh_job(ledger, 0)
    conn.armed = True
    batch = rows(5) + [
        Row(6, "r0", b"{}", None, None)
    ]  # a repeated id: refused, as without the cut
    accepted = ledger.add_items(job_id, 0, batch, Cursor(6, 6, 0))
    assert accepted == [True] * 5 + [False]
    assert state_counts(ledger, job_id) == {"pending": 5}
    assert ledger.counts(job_id).rejected == 1
    conn.armed = False  # and cut before the commit: added once, all the same
    accepted = ledger.add_items(job_id, 6, rows(3, start=10), Cursor(9, 9, 0))
    assert accepted == [True] * 3
    assert state_counts(ledger, job_id) == {"pending": 8}


def test_fresh_results_whose_commit_answer_was_lost_are_committed_once(losing):
    # add_succeeded: the runner's commit of computed fresh records (results paid for).
    ledger, conn = losing
    job_id = fresh_job(ledger, 0)
    conn.armed = True
    batch = [*rows(3), Row(4, "r0", b"{}", None, None)]  # a repeated id: refused, as ever
    results = [b'{"y": 1}'] * 4
    assert ledger.add_succeeded(job_id, 0, batch, Cursor(4, 5, 0), results) == [True] * 3 + [False]
    assert state_counts(ledger, job_id) == {"succeeded": 3}
    assert ledger.counts(job_id).rejected == 1
    conn.armed = False  # and cut before the commit: committed once, all the same
    assert ledger.add_succeeded(job_id, 4, rows(2, start=10), Cursor(6, 7, 0), results[:2]) == [
        True,
        True,
    ]
    assert state_counts(ledger, job_id) == {"succeeded": 5}


def test_a_chunk_planned_whose_commit_answer_was_lost_is_one_chunk(losing):
    ledger, conn = losing
    job_id = fresh_job(ledger)
    conn.armed = True
    chunk = ledger.plan_chunk(job_id, "openai", [0, 1, 2], time.time())
    chunks = ledger.chunks(job_id)
    assert [c.chunk for c in chunks] == [chunk]  # not a second, empty one sent to the provider
    assert [it.seq for it in ledger.chunk_items(job_id, chunk)] == [0, 1, 2]


def test_a_run_started_whose_commit_answer_was_lost_is_one_run(losing):
    ledger, conn = losing
    conn.armed = True
    now = time.time()
    run_id = ledger.start_run("j", "host:1:2:run", now)
    open_runs = ledger.open_runs("j")
    assert len(open_runs) == 1 and open_runs[0].started_at == now
    ledger.update_run(run_id, now + 1, 5, 1.0, 0.0, "finished")
    assert ledger.open_runs("j") == []


@pytest.mark.parametrize("after", [True, False])
def test_results_committed_once_whichever_side_of_the_commit_the_cut_falls(losing, after):
    ledger, conn = losing
    job_id = fresh_job(ledger, 4)
    now = time.time()
    items = ledger.lease(job_id, 4, Lease("w1", now + 60, now))
    conn.armed = after
    ok = [Outcome(it.seq, "succeeded", b'{"y": 1}', attempts=1, input_tokens=2) for it in items]
    ledger.complete(job_id, "w1", ok, time.time())
    counts = ledger.counts(job_id)
    assert dict(counts.by_state) == {"succeeded": 4}
    assert counts.input_tokens == 8  # usage added once, not twice


# -- end to end: a paid answer is never paid for twice --------------------------------------


def test_a_run_whose_ledger_connections_are_cut_three_times_pays_for_each_answer_once(
    tmp_path: Path, pg_ledger_url: str, fake: FakeProvider, keys: Any
) -> None:
    """A real-time job on a PostgreSQL ledger; while it runs every ledger connection it
    holds (runner, heartbeat, response cache) is terminated, three times. The run finishes,
    every record has its result, and the provider answered each request once."""
    from llm_helpers import llm_job

    url, app = named(pg_ledger_url)
    n = 60
    write_records(tmp_path, n)
    fake.knobs.latency = 0.05
    job = llm_job(
        tmp_path, "openai", fake.openai_url, model={"concurrency": 2}, run={"ledger": url}
    )
    cuts: list[int] = []

    def cutter() -> None:
        for answered in (10, 25, 40):
            deadline = time.monotonic() + 60
            while len(fake.stats.realtime) < answered and time.monotonic() < deadline:
                time.sleep(0.01)
            cuts.append(cut(app))

    thread = threading.Thread(target=cutter, daemon=True)
    thread.start()
    report = job.run()
    thread.join(timeout=60)
    # The first cut finds every connection (runner, cache, heartbeat); later ones those
    # connected again by then (the runner reconnects when it next writes).
    assert len(cuts) == 3 and cuts[0] >= 2 and all(c >= 1 for c in cuts), cuts
    assert report.exit_code == 0, report
    assert report.counts["succeeded"] == n
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "job.out.jsonl")) == sorted(
        f"r{i}" for i in range(n)
    )
    answered = [s for s in fake.stats.realtime if s.status == 200]
    assert len(answered) == n  # each paid once


# -- a deadlock: the database undoes one transaction, the ledger runs it again --------------


def test_an_operation_the_database_undid_to_break_a_deadlock_runs_again(pg_ledger_url):
    """plan_chunk locks the job's row, then its items; another session holds an item and
    then asks for the job's row: a deadlock. The ledger's side (the shorter deadlock_timeout,
    so the one the server undoes) runs again once the other commits, and plans the chunk."""
    url, app = named(pg_ledger_url.replace("?options=", "?options=-cdeadlock_timeout%3D300ms%20"))
    ledger = SQLLedger(PostgresConnector(url))
    schema = pg_ledger_url.rsplit("%3D", 1)[1]
    try:
        job_id = fresh_job(ledger, 3)
        item0 = job_id << 40
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f"SET search_path = {schema}")
            admin.execute("SET deadlock_timeout = '10s'")
            admin.execute("BEGIN")
            admin.execute("UPDATE items SET attempts = attempts WHERE id = %s", (item0,))
            planned: list[int | BaseException] = []

            def plan() -> None:
                try:
                    planned.append(ledger.plan_chunk(job_id, "openai", [0, 1], time.time()))
                except BaseException as exc:  # noqa: BLE001 - reported by the assert below
                    planned.append(exc)

            thread = threading.Thread(target=plan)
            thread.start()
            deadline = time.monotonic() + 10
            while not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock'",
                (app,),
            ).fetchone():
                assert time.monotonic() < deadline, "plan_chunk never waited for the item"
                time.sleep(0.01)
            # The cycle: the ledger holds the job's row and waits for item0; now this session
            # (holding item0) asks for the job's row. The server undoes the ledger's side.
            admin.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            admin.execute("COMMIT")
            thread.join(timeout=30)
        assert planned and isinstance(planned[0], int), planned
        assert [c.chunk for c in ledger.chunks(job_id)] == [planned[0]]
        assert [it.seq for it in ledger.chunk_items(job_id, planned[0])] == [0, 1]
    finally:
        ledger.close()
