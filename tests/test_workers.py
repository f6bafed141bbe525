"""Several `overnight run` of one job are several workers (claim.py, runner.py): one ingests,
all compute leased items, every record is computed once, a worker killed with -9 costs only
what it held (taken over by the others within the lease time), and a worker that arrives late
helps. The batch backends' side is in tests/test_two_runs.py and below."""

from __future__ import annotations

import collections
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import job_helpers
import orjson
import pytest
from job_helpers import finish
from llm_helpers import ANT_KEY, KEY, read_jsonl, write_records

import overnight
from overnight.claim import JobBusy
from overnight.store import SQLiteLedger
from overnight.testing.fake_provider import FakeProvider

pytestmark = pytest.mark.slow

FUNCTION = """
import os, time
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
def fn(records):
    time.sleep({sleep})
    with open(LOG, "a") as f:
        f.write("".join(r["id"] + " " + str(os.getpid()) + "\\n" for r in records))
    return [r["n"] for r in records]
"""


def make_job(folder: Path, n: int, *, sleep: float = 0.02, run: str = "") -> Path:
    """`n` records, a function that logs `id pid` per record it computes, and job.toml."""
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(n))
    )
    (folder / "wfn.py").write_text(FUNCTION.format(sleep=sleep))
    job = folder / "job.toml"
    job.write_text(
        '[source]\npath = "in.jsonl"\nid = "id"\n'
        '[model]\nbackend = "python"\nfunction = "wfn:fn"\n'
        f'[run]\nbatch_size = 10\n{run}\n[output]\npath = "out.jsonl"\n'
    )
    return job


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request) -> str | None:
    """Where the workers' ledger lives: the job's SQLite file (None), or a PostgreSQL URL."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_ledger_url")


def start(job: Path, ledger: str | None = None, command: str = "run") -> subprocess.Popen:
    extra = ["--ledger", ledger] if ledger else []
    return job_helpers.start(job.parent, command, str(job), *extra)


def calls(folder: Path) -> list[tuple[str, int]]:
    log = folder / "calls.log"
    if not log.exists():
        return []
    return [(i, int(p)) for i, p in (line.split() for line in log.read_text().splitlines())]


def ledger_rows(folder: Path, sql: str, *args: object, ledger: str | None = None) -> list[tuple]:
    if ledger:
        import psycopg

        with psycopg.connect(ledger, autocommit=True) as con:
            try:
                return con.execute(sql.replace("?", "%s"), args).fetchall()
            except psycopg.errors.UndefinedTable:  # not created yet
                return []
    path = folder / ".overnight" / "ledger.db"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        con.close()


def ingest_done(folder: Path, ledger: str | None = None) -> bool:
    rows = ledger_rows(folder, "SELECT ingest_done FROM jobs", ledger=ledger)
    return [bool(r[0]) for r in rows] == [True]


def wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def check_output(folder: Path, n: int) -> None:
    rows = read_jsonl(folder / "out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(n)]
    assert [r["output"] for r in rows] == list(range(n))
    assert not list(folder.glob(".*.tmp"))


def all_finished(procs: list[subprocess.Popen]) -> None:
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0] * len(procs), [r[2] for r in results]
    assert not any("Traceback" in r[2] for r in results)


def test_three_workers_at_once_compute_each_record_once_and_share_the_work(tmp_path, ledger):
    n = 600
    job = make_job(tmp_path, n)
    procs = [start(job, ledger) for _ in range(3)]
    all_finished(procs)
    done = calls(tmp_path)
    assert sorted(i for i, _ in done) == sorted(f"r{i}" for i in range(n))  # each once
    by_worker = collections.Counter(p for _, p in done)
    assert len(by_worker) > 1, by_worker  # the work was spread
    check_output(tmp_path, n)


def test_kill_9_of_one_of_three_workers_costs_its_leases_only(tmp_path, ledger):
    n = 3000
    job = make_job(tmp_path, n, run='lease_seconds = 2\nisolation = "none"')
    procs = [start(job, ledger) for _ in range(3)]
    wait(lambda: ingest_done(tmp_path, ledger) and len(calls(tmp_path)) >= 300)
    victim = next(p for p in reversed(procs) if p.pid in {pid for _, pid in calls(tmp_path)})
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    held = f"%:{victim.pid}:%"

    def its_leases() -> int:
        sql = "SELECT count(*) FROM items WHERE state = 'leased' AND lease_owner LIKE ?"
        return ledger_rows(tmp_path, sql, held, ledger=ledger)[0][0]

    wait(lambda: its_leases() == 0, timeout=10)
    assert time.monotonic() - killed_at <= 2 + 1  # within the lease time
    all_finished([p for p in procs if p is not victim])
    done = calls(tmp_path)
    count = collections.Counter(i for i, _ in done)
    twice = {i for i, c in count.items() if c > 1}
    assert set(count) == {f"r{i}" for i in range(n)}
    # Computed twice: at most what the victim held leased when it died (one lease: up to
    # 8 calls of 10 when calls are short, see Runner._lease_size), nothing else.
    assert len(twice) <= 80, twice
    assert twice <= {i for i, p in done if p == victim.pid}
    check_output(tmp_path, n)


def test_a_worker_takes_the_ingest_over_when_the_ingester_dies(tmp_path):
    n = 100_000

    def reading_for_both(folder: Path) -> bool:  # it saw the helper: the rest goes in pending
        sql = "SELECT count(*) FROM items WHERE state = 'pending'"
        return not ingest_done(folder) and ledger_rows(folder, sql)[0][0] > 0

    # The scene needs the helper to join while the ingester still reads; on a loaded machine
    # the ingester may finish reading first. Then the scene is played again (fresh folder),
    # up to three times: never a pass without the kill in the middle of the read.
    for attempt in range(3):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        # 5 ms a call of 500: alone, the ingester reads for about a second, time for the
        # helper to start and join (at 0 ms it often read all 100,000 first on a quiet box).
        job = make_job(folder, n, sleep=0.005, run='batch_size = 500\nisolation = "none"')
        job.write_text(job.read_text().replace("batch_size = 10\n", ""))
        ingester = start(job)
        wait(lambda f=folder: len(calls(f)) > 0)  # alone: it computes as it reads
        helper = start(job)
        wait(lambda f=folder: reading_for_both(f) or ingest_done(f))
        if not reading_for_both(folder):  # it finished reading before the helper joined
            all_finished([ingester, helper])
            continue
        ingester.send_signal(signal.SIGKILL)
        ingester.wait()
        assert not ingest_done(folder)  # killed while reading the input
        all_finished([helper])
        count = collections.Counter(i for i, _ in calls(folder))
        assert set(count) == {f"r{i}" for i in range(n)}
        assert sum(c > 1 for c in count.values()) <= 500  # at most the call it died in
        check_output(folder, n)
        return
    pytest.fail("the ingester finished reading before the helper joined, three times")


def test_a_lease_held_from_another_host_is_taken_once_it_expires(tmp_path):
    n = 60
    job = make_job(tmp_path, n, sleep=0.0)
    all_finished([start(job)])
    (tmp_path / "calls.log").unlink()
    expires = time.time() + 1.5
    job_helpers.explode_ranges(tmp_path / ".overnight" / "ledger.db")
    with sqlite3.connect(tmp_path / ".overnight" / "ledger.db") as db:  # a worker elsewhere
        db.execute(
            "UPDATE items SET state = 'leased', result = NULL, lease_owner = ?,"
            " lease_expires = ? WHERE line > 40",
            ("elsewhere:4242:1700000000", expires),
        )
    procs = [start(job) for _ in range(2)]
    all_finished(procs)
    assert time.time() >= expires  # they waited for the lease to end ...
    assert sorted(i for i, _ in calls(tmp_path)) == sorted(f"r{i}" for i in range(40, n))
    check_output(tmp_path, n)  # ... and then computed its items, once


def test_a_worker_started_after_ingest_finished_joins_and_helps(tmp_path, ledger):
    n = 1000  # 100 calls of 80 ms: 4 s for two workers, time for a third to start
    job = make_job(tmp_path, n, sleep=0.08, run='isolation = "none"')
    first = [start(job, ledger) for _ in range(2)]
    wait(lambda: ingest_done(tmp_path, ledger))
    late = start(job, ledger)
    all_finished([*first, late])
    done = calls(tmp_path)
    assert sorted(i for i, _ in done) == sorted(f"r{i}" for i in range(n))
    assert any(p == late.pid for _, p in done)  # it helped
    check_output(tmp_path, n)


def test_cancel_stops_every_worker(tmp_path):
    job = make_job(tmp_path, 3000, run='isolation = "none"')
    procs = [start(job) for _ in range(3)]
    wait(lambda: ingest_done(tmp_path) and len(calls(tmp_path)) >= 100)
    code, _, err = finish(job_helpers.start(tmp_path, "cancel", str(job)))
    assert code == 0, err
    results = [finish(p, timeout=30) for p in procs]
    assert not any("Traceback" in r[2] for r in results)
    assert len(calls(tmp_path)) < 3000


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_two_batch_workers_create_each_chunk_once(
    tmp_path: Path, fake: FakeProvider, backend: str, ledger: str | None
) -> None:
    fake.knobs.batch_seconds = 0.3
    write_records(tmp_path, 50)
    model = "claude-haiku-4-5" if "anthropic" in backend else "gpt-4o-mini"
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = tmp_path / "job.toml"
    job.write_text(
        f'[source]\npath = "in.jsonl"\nid = "id"\n[task]\nkind = "generate"\n'
        f'[model]\nbackend = "{backend}"\nname = "{model}"\nbase_url = "{url}"\n'
        "max_requests_per_batch = 10\npoll_interval = 0.05\nparams = { max_tokens = 16 }\n"
        '[output]\npath = "out.jsonl"\n'
    )
    env = {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANT_KEY}
    extra = ["--ledger", ledger] if ledger else []
    procs = [job_helpers.start(tmp_path, "run", str(job), *extra, env=env) for _ in range(2)]
    all_finished(procs)
    stats = fake.stats.snapshot()
    assert stats.batch_creations == 5  # one create per chunk
    assert sorted(stats.batch_items.values()) == [1] * 50  # every item sent once
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows})
    assert len(rows) == 50


def test_restart_and_a_changed_input_are_refused_while_another_worker_runs(tmp_path):
    """The claim is free (its primary left) but a worker on another host still works on the
    job: `--restart`, or reading a changed input again, would pull the job from under it."""
    job_file = make_job(tmp_path, 5, sleep=0.0)
    job = overnight.Job.from_file(job_file)
    assert job.run().exit_code == 0
    ledger = SQLiteLedger(tmp_path / ".overnight" / "ledger.db")
    run = ledger.start_run("job", "elsewhere:4242:1700000000/abcd", time.time())
    with pytest.raises(JobBusy, match="process 4242 on elsewhere"):
        job.run(restart=True)
    with (tmp_path / "in.jsonl").open("ab") as f:
        f.write(orjson.dumps({"id": "r5", "n": 5}) + b"\n")
    with pytest.raises(JobBusy, match="changed since it started"):
        job.run()
    ledger.update_run(run, time.time() - 3600, 0, 0.0, 0.0)  # its heartbeat stopped long ago
    ledger.close()
    assert job.run().exit_code == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 6
