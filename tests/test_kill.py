"""kill -9 at several points of `overnight run` and `overnight export`: nothing is lost,
nothing committed is computed again, no half-written output file is ever visible."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from job_helpers import ALL_ITEMS, ALL_ITEMS_PG

pytestmark = pytest.mark.slow

N = 30_000

FUNCTION = """
import os, time
LOG = os.path.join(os.path.dirname(__file__), "computed.log")
def fn(records):
    time.sleep(float(os.environ.get("FN_SLEEP", "0")))
    with open(LOG, "a") as f:
        f.write("".join(r["id"] + "\\n" for r in records))
        f.flush()
    return [{"v": r["n"] * 3} for r in records]
"""

JOB = """
name = "crash"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "crashfn:fn"
[run]
batch_size = 200
[output]
path = "out.jsonl"
"""


def setup_job(tmp_path: Path, n: int) -> Path:
    with (tmp_path / "in.jsonl").open("wb") as f:
        f.write(b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(n)))
    (tmp_path / "crashfn.py").write_text(FUNCTION)
    (tmp_path / "job.toml").write_text(JOB)
    return tmp_path / "job.toml"


def overnight(tmp_path: Path, *args: str, sleep: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "FN_SLEEP": str(sleep)}
    return subprocess.Popen(
        [sys.executable, "-m", "overnight", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def computed(tmp_path: Path) -> list[str]:
    log = tmp_path / "computed.log"
    return log.read_text().split() if log.exists() else []


def committed(tmp_path: Path) -> set[str]:
    db = tmp_path / ".overnight" / "ledger.db"
    if not db.exists():
        return set()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        sql = f"SELECT custom_id FROM {ALL_ITEMS} WHERE state = 'succeeded'"
        return {r[0] for r in con.execute(sql)}
    except sqlite3.OperationalError:  # not created yet
        return set()
    finally:
        con.close()


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> bool:
    """SIGKILL `proc` as soon as `ready()`; False if it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.wait()
    return False


def check_output(tmp_path: Path, n: int) -> None:
    rows = [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(n)]  # each once, in order
    assert [r["output"]["v"] for r in rows] == [3 * i for i in range(n)]
    assert (tmp_path / "out.errors.jsonl").read_bytes() == b""


@pytest.mark.parametrize("at", [1, 400, 9_000, 16_000, 27_000])
def test_sigkill_loses_nothing_and_recomputes_nothing(tmp_path, at):
    """Kill points by items computed so far: at the very start (before any commit), early,
    midway, late. A batch of 200 sleeps 20 ms, so a run lasts about 3 s."""
    setup_job(tmp_path, N)
    proc = overnight(tmp_path, "run", "job.toml", sleep=0.02)
    assert kill_when(proc, lambda: len(computed(tmp_path)) >= at), "finished before the kill"
    safe = committed(tmp_path)
    seen = len(computed(tmp_path))
    assert len(safe) <= seen
    proc = overnight(tmp_path, "run", "job.toml")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    check_output(tmp_path, N)
    again = computed(tmp_path)[seen:]
    # Committed items were never computed again; the rest were computed exactly once more.
    assert not set(again) & safe
    assert sorted(again) == sorted({f"r{i}" for i in range(N)} - safe)


def test_sigkill_in_a_loop_until_done(tmp_path):
    """Kill again and again at seeded random moments; every rerun resumes."""
    import random

    setup_job(tmp_path, N)
    rng = random.Random(5)
    for _ in range(6):
        proc = overnight(tmp_path, "run", "job.toml", sleep=0.02)
        time.sleep(rng.uniform(0.3, 1.2))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = overnight(tmp_path, "run", "job.toml")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    check_output(tmp_path, N)
    with sqlite3.connect(tmp_path / ".overnight" / "ledger.db") as con:
        sql = f"SELECT state, count(*) FROM {ALL_ITEMS} GROUP BY state"
        states = dict(con.execute(sql).fetchall())
    assert states == {"succeeded": N}


def test_sigkill_during_export_never_leaves_a_partial_file(tmp_path):
    n = 300_000
    setup_job(tmp_path, n)
    subprocess.run(
        [sys.executable, "-m", "overnight", "run", "job.toml"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    out = tmp_path / "out.jsonl"
    complete = out.read_bytes()
    out.unlink()
    caught = False
    for _attempt in range(5):
        proc = overnight(tmp_path, "export", "job.toml")
        caught = kill_when(proc, lambda: any(tmp_path.glob(".out.jsonl.*.tmp")))
        # Whatever moment it died at, the output is absent or whole, never partial.
        assert not out.exists() or out.read_bytes() == complete
        if caught:
            break
    assert caught, "export finished before it could be killed mid-write"
    proc = overnight(tmp_path, "export", "job.toml")
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.read_bytes() == complete
    assert not list(tmp_path.glob(".out.jsonl.*.tmp"))  # the stale temp file was cleaned up


def test_ctrl_c_finishes_the_batch_and_resumes(tmp_path):
    setup_job(tmp_path, N)
    proc = overnight(tmp_path, "run", "job.toml", sleep=0.02)
    while len(computed(tmp_path)) < 5_000:
        assert proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    with sqlite3.connect(tmp_path / ".overnight" / "ledger.db") as con:
        leased = con.execute("SELECT count(*) FROM items WHERE state = 'leased'").fetchone()[0]
        sql = f"SELECT count(*) FROM {ALL_ITEMS} WHERE state = 'succeeded'"
        done = con.execute(sql).fetchone()[0]
    assert leased == 0
    # Ctrl-C commits what was computed: the log and the ledger agree exactly.
    assert done == len(computed(tmp_path))
    proc = overnight(tmp_path, "run", "job.toml")
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    check_output(tmp_path, N)
    assert sorted(computed(tmp_path)) == sorted(f"r{i}" for i in range(N))  # each once


# -- the same on a PostgreSQL ledger -------------------------------------------------------


def committed_pg(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as con:
        try:
            sql = f"SELECT custom_id FROM {ALL_ITEMS_PG} AS i WHERE state = 'succeeded'"
            rows = con.execute(sql)
            return {r[0] for r in rows}
        except psycopg.errors.UndefinedTable:  # not created yet
            return set()


@pytest.mark.parametrize("at", [400, 16_000])
def test_sigkill_on_a_postgresql_ledger_loses_nothing_and_recomputes_nothing(
    tmp_path, pg_ledger_url, at
):
    """kill -9 mid-job with the ledger in PostgreSQL, run again: every record exactly once
    in the output, nothing committed computed again."""
    setup_job(tmp_path, N)
    proc = overnight(tmp_path, "run", "job.toml", "--ledger", pg_ledger_url, sleep=0.02)
    assert kill_when(proc, lambda: len(computed(tmp_path)) >= at), "finished before the kill"
    safe = committed_pg(pg_ledger_url)
    seen = len(computed(tmp_path))
    assert len(safe) <= seen
    proc = overnight(tmp_path, "run", "job.toml", "--ledger", pg_ledger_url)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    check_output(tmp_path, N)
    again = computed(tmp_path)[seen:]
    assert not set(again) & safe
    assert sorted(again) == sorted({f"r{i}" for i in range(N)} - safe)
    assert not (tmp_path / ".overnight" / "ledger.db").exists()
