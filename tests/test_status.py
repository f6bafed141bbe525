"""`overnight status` and `cancel` tell the truth about a job: finished or not (input not fully
read, items open), whether a run is alive, its throughput and ETA — with the same figures the
run's own report gave."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import job_helpers
import orjson
import pytest
from job_helpers import slow_python_job, wait_for_calls

pytestmark = pytest.mark.slow


def make_job(folder: Path, n: int) -> Path:
    return slow_python_job(folder, n, batch_size=4)


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def start(folder: Path, job: Path) -> subprocess.Popen:
    return job_helpers.start(folder, "run", str(job))


def wait_calls(folder: Path, proc: subprocess.Popen, batches: int) -> None:
    wait_for_calls(folder, proc, 4 * batches)


def status(folder: Path, job: Path) -> dict:
    proc = cli(folder, "status", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    return orjson.loads(proc.stdout)


def test_status_after_kill_9_says_unfinished_and_no_run_alive(tmp_path: Path) -> None:
    job = make_job(tmp_path, 3000)
    proc = start(tmp_path, job)
    wait_calls(tmp_path, proc, 20)
    time.sleep(1.0)  # some commits
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = status(tmp_path, job)
    activity = st["activity"]
    assert activity["running"] is False
    assert activity["finished"] is False
    assert st["ingest_done"] is False
    assert any("not fully read" in why and "of ~3,000" in why for why in activity["unfinished"])
    assert any("stopped without finishing" in why for why in activity["unfinished"])
    assert str(proc.pid) in activity["runner"]
    assert activity["remaining"] == 3000 - st["total"]
    text = cli(tmp_path, "status", str(job)).stdout
    assert "unfinished" in text and "finished: every record" not in text
    # and the rerun finishes it
    again = cli(tmp_path, "run", str(job))
    assert again.returncode == 0, again.stderr
    st = status(tmp_path, job)
    assert st["activity"]["finished"] is True and st["activity"]["unfinished"] == []


def test_status_of_a_live_run_names_it_with_throughput_and_eta(tmp_path: Path) -> None:
    job = make_job(tmp_path, 2000)
    proc = start(tmp_path, job)
    try:
        wait_calls(tmp_path, proc, 100)
        time.sleep(1.0)
        activity = status(tmp_path, job)["activity"]
        assert activity["running"] is True
        assert f"process {proc.pid}" in activity["runner"]
        assert activity["items_per_second"] > 0
        assert activity["eta_seconds"] is not None and activity["eta_seconds"] > 0
        assert activity["finished"] is False
        text = cli(tmp_path, "status", str(job)).stdout
        assert f"running: process {proc.pid}" in text and "to go" in text
        (row,) = orjson.loads(cli(tmp_path, "ls", "--json").stdout)
        assert row["name"] == "job" and row["state"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_status_figures_agree_with_the_runs_report(tmp_path: Path) -> None:
    job = make_job(tmp_path, 200)
    run = cli(tmp_path, "run", str(job), "--json")
    assert run.returncode == 0, run.stderr
    report = orjson.loads(run.stdout)
    st = status(tmp_path, job)
    for key in ("total", "succeeded", "failed", "processed", "seconds", "items_per_second"):
        assert st[key] == report[key], key
    last = st["activity"]["last_run"]
    assert last["outcome"] == "finished"
    assert last["processed"] == report["processed"] == 200
    assert st["activity"]["finished"] is True


def test_cancel_of_a_live_run_says_what_happens_and_the_run_stops(tmp_path: Path) -> None:
    job = make_job(tmp_path, 3000)
    proc = start(tmp_path, job)
    wait_calls(tmp_path, proc, 20)
    cancel = cli(tmp_path, "cancel", str(job))
    assert cancel.returncode == 0, cancel.stderr
    assert (
        f"process {proc.pid}" in cancel.stdout
        and "stops after the batch in flight" in cancel.stdout
    )
    assert "not read yet will not be read" in cancel.stdout
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    st = status(tmp_path, job)
    assert st["activity"]["last_run"]["outcome"] == "cancelled"
    assert any("cancelled" in why for why in st["activity"]["unfinished"])
