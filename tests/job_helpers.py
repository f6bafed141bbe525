"""Shared by the process-level tests: a slow python job, and running `overnight` on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

SLOW_FUNCTION = """
import os
import time
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
def fn(records):
    time.sleep({sleep})
    with open(LOG, "a") as f:
        f.write("".join(str(r["id"]) + "\\n" for r in records))
    return [r["n"] for r in records]
"""


def slow_python_job(folder: Path, n: int, batch_size: int = 10, sleep: float = 0.02) -> Path:
    """`n` records `{"id": "r<i>", "n": i}`, a function that sleeps per call and logs the ids it
    computed to calls.log, and job.toml (output out.jsonl)."""
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(n))
    )
    (folder / "slowfn.py").write_text(SLOW_FUNCTION.format(sleep=sleep))
    job = folder / "job.toml"
    job.write_text(
        '[source]\npath = "in.jsonl"\nid = "id"\n'
        '[model]\nbackend = "python"\nfunction = "slowfn:fn"\n'
        f'[run]\nbatch_size = {batch_size}\n[output]\npath = "out.jsonl"\n'
    )
    return job


def start(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`overnight ARGS` in `folder`, in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "overnight", *args],
        cwd=folder,
        env=env or dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().split() if log.exists() else []


def wait_for_calls(folder: Path, proc: subprocess.Popen, at_least: int = 1) -> None:
    """Until the running job has computed `at_least` records."""
    deadline = time.monotonic() + 60
    while len(calls(folder)) < at_least:
        assert proc.poll() is None, "the run ended before it computed enough"
        assert time.monotonic() < deadline, "the run computed too little in 60 s"
        time.sleep(0.05)


# Every item of a SQLite ledger as rows, those committed per range by the runner's fast path
# (the `ranges` table, store/ledger.py) included: what a test that reads the ledger's tables
# itself reads instead of `items`. A ranged item succeeded at its first attempt.
ALL_ITEMS = (
    "(SELECT id, job_id, custom_id, state, attempts FROM items UNION ALL"
    " SELECT (r.job_id << 40) + r.first_seq + j.key, r.job_id, j.value, 'succeeded', 1"
    " FROM ranges AS r, json_each(CAST(r.ids AS TEXT)) AS j)"
)
# The same on a PostgreSQL ledger.
ALL_ITEMS_PG = (
    "(SELECT id, job_id, custom_id, state, attempts FROM items UNION ALL"
    " SELECT (r.job_id << 40) + r.first_seq + j.n - 1, r.job_id, j.value, 'succeeded', 1"
    " FROM ranges AS r, jsonb_array_elements_text(convert_from(r.ids, 'UTF8')::jsonb)"
    " WITH ORDINALITY AS j(value, n))"
)


def explode_ranges(ledger_path: Path) -> None:
    """Turn a SQLite ledger's ranges into item rows, as an operation on one of their items
    would (SQLLedger._explode): for a test that writes the items table itself."""
    import sqlite3

    from overnight.store import SQLiteLedger

    with sqlite3.connect(ledger_path) as db:
        jobs = [r[0] for r in db.execute("SELECT DISTINCT job_id FROM ranges")]
    ledger = SQLiteLedger(ledger_path)
    try:
        with ledger._conn.transaction():
            for job_id in jobs:
                ledger._explode(job_id)
    finally:
        ledger.close()
