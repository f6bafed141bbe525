"""Two runs of one job: the second one, whenever it starts, becomes a second worker on it
(see claim.py) and never sends a request that the first sent or holds: every record is
computed once, both end with the job's exit code — no traceback, no stray temp file, no
crash of either. Only `--restart` is refused (exit 2 naming the running process) while
another run works on the job.

These tests once meant "a second run is refused": they changed meaning when several runs
of a job became several workers (tests/test_workers.py has the rest)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import job_helpers
import psutil
import pytest
from job_helpers import finish, slow_python_job, wait_for_calls
from llm_helpers import ANT_KEY, KEY, read_jsonl, write_records

import overnight
from overnight.claim import JobBusy
from overnight.store import SQLiteLedger
from overnight.testing.fake_provider import FakeProvider

pytestmark = pytest.mark.slow


def python_job(folder: Path, n: int) -> Path:
    return slow_python_job(folder, n, batch_size=10)


def llm_job(folder: Path, backend: str, url: str) -> Path:
    write_records(folder, 40)
    model = "claude-haiku-4-5" if "anthropic" in backend else "gpt-4o-mini"
    if "batch" in backend:
        limits = "max_requests_per_batch = 10\npoll_interval = 0.05"
    else:
        limits = "concurrency = 2"
    path = folder / "job.toml"
    path.write_text(
        f"""
[source]
path = "in.jsonl"
id = "id"
[task]
kind = "generate"
[model]
backend = "{backend}"
name = "{model}"
base_url = "{url}"
{limits}
params = {{ max_tokens = 16 }}
[output]
path = "out.jsonl"
"""
    )
    return path


def start(job: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANT_KEY}
    return job_helpers.start(job.parent, "run", str(job), *args, env=env)


def both_finished(*results: tuple[int, str, str]) -> None:
    """Two runs started at once: two workers on the job, both end with its exit code (0);
    never a traceback."""
    (first, _, first_err), (second, _, second_err) = results
    assert (first, second) == (0, 0), (first_err, second_err)
    assert "Traceback" not in first_err + second_err, (first_err, second_err)


def test_two_runs_started_at_the_same_instant_compute_everything_once(tmp_path: Path) -> None:
    n = 300
    job = python_job(tmp_path, n)
    a, b = start(job), start(job)
    both_finished(finish(a), finish(b))
    calls = (tmp_path / "calls.log").read_text().split()
    assert sorted(calls) == sorted(f"r{i}" for i in range(n))  # each record computed once
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(n))
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_second_run_a_moment_later_joins_and_a_restart_is_refused(tmp_path: Path) -> None:
    """Was: a second run is refused. Now the second run joins the first as a worker (nothing
    computed twice); `--restart` is still refused while a run works on the job."""
    job = slow_python_job(tmp_path, 400, batch_size=10, sleep=0.2)  # 8 s alone
    first = start(job)
    wait_for_calls(tmp_path, first)  # the first run is computing
    code, _, err = finish(start(job, "--restart"))  # --restart does not get past a live run
    assert code == 2 and "is being run by process" in err and str(first.pid) in err
    assert "--restart would discard" in err  # the CLI names its flag (the library: restart=True)
    assert "Traceback" not in err
    second = start(job)
    both_finished(finish(first), finish(second))
    calls = (tmp_path / "calls.log").read_text().split()
    assert len(calls) == len(set(calls)) == 400
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 400


def test_a_dead_runs_claim_is_taken_over_at_once(tmp_path: Path) -> None:
    job = python_job(tmp_path, 2000)
    first = start(job)
    wait_for_calls(tmp_path, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    code, out, err = finish(start(job))
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 2000


def test_a_claim_from_another_host_holds_until_its_heartbeat_stops(tmp_path: Path) -> None:
    """Was: refused while the claim lives. Now a run waits, as a worker, for the job's primary
    on another host to set the job up, and takes its place once its heartbeat stops; only
    `--restart` is refused."""
    python_job(tmp_path, 5)
    job = overnight.Job.from_file(tmp_path / "job.toml")
    ledger = SQLiteLedger(tmp_path / ".overnight" / "ledger.db")
    now = time.time()
    ledger.claim("job", "elsewhere:4242:1700000000/abcd", now, now + 60)
    with pytest.raises(JobBusy, match="process 4242 on elsewhere") as refused:
        job.run(restart=True)
    assert "`restart=True` would discard" in str(refused.value)  # no CLI flag below the CLI
    assert not (tmp_path / "calls.log").exists()
    with sqlite3.connect(ledger.path) as db:  # its heartbeat stops in a moment
        db.execute("UPDATE claims SET expires = ?", (time.time() + 1.5,))
    ledger.close()
    t0 = time.monotonic()
    assert job.run().exit_code == 0
    assert time.monotonic() - t0 >= 1.0  # it waited for the heartbeat to stop
    assert sorted((tmp_path / "calls.log").read_text().split()) == [f"r{i}" for i in range(5)]


def test_a_claim_of_a_run_that_died_on_this_host_is_taken_over_before_it_expires(
    tmp_path: Path,
) -> None:
    """A run killed a moment ago left its claim with most of its heartbeat's time to go:
    the next run on this host sees that the process is gone and takes the job at once (no
    wait for the heartbeat to stop, as for a claim from another host)."""
    python_job(tmp_path, 5)
    job = overnight.Job.from_file(tmp_path / "job.toml")
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = f"{socket.gethostname()}:{dead.pid}:{int(psutil.Process(dead.pid).create_time())}"
    dead.kill()
    dead.wait()
    ledger = SQLiteLedger(tmp_path / ".overnight" / "ledger.db")
    now = time.time()
    ledger.claim("job", f"{owner}/abcd", now, now + 60)
    ledger.close()
    assert job.run().exit_code == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 5


@pytest.mark.parametrize("backend", ["openai", "openai-batch", "anthropic-batch"])
def test_two_llm_runs_at_once_send_each_request_once(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    fake.knobs.latency = 0.05
    fake.knobs.batch_seconds = 0.3
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = llm_job(tmp_path, backend, url)
    a, b = start(job), start(job)
    both_finished(finish(a), finish(b))
    stats = fake.stats.snapshot()
    if "batch" in backend:
        assert stats.batch_creations == 4
        assert set(stats.batch_items.values()) == {1}
    else:
        assert stats.requests["/v1/chat/completions"] == 40
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 40


def test_exports_at_once_and_during_a_run_leave_every_file_whole(tmp_path: Path) -> None:
    job = python_job(tmp_path, 1500)
    first = start(job)
    wait_for_calls(tmp_path, first)

    def exports() -> list[subprocess.Popen]:
        return [
            subprocess.Popen(
                [sys.executable, "-m", "overnight", "export", str(job)],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(4)
        ]

    during = exports()  # while the run commits (and exports at its end)
    assert all(finish(p)[0] == 0 for p in during), [p.stderr for p in during]
    assert finish(first)[0] == 0
    after = exports()  # four at the same instant on the finished job
    results = [finish(p) for p in after]
    assert [r[0] for r in results] == [0] * 4, [r[2] for r in results]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 1500
    assert not list(tmp_path.glob(".*.tmp"))
