"""A ledger that vanishes, turns read-only or is not a ledger: exit 2 with a message naming
it, never silence (exit 0 while results go nowhere) and never a traceback."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from job_helpers import calls, slow_python_job, start, wait_for_calls

from overnight.store import open_ledger

pytestmark = pytest.mark.slow


def make_job(folder: Path, n: int = 600) -> Path:
    return slow_python_job(folder, n, batch_size=10, sleep=0.05)


def overnight(folder: Path, *args: str) -> subprocess.Popen:
    return start(folder, *args)


def until_computing(folder: Path, proc: subprocess.Popen) -> None:
    wait_for_calls(folder, proc, 200)


def immutable_supported(folder: Path) -> bool:
    """`chattr +i` makes a file unwritable even for root (the tests run as root here, where
    permissions alone cannot make a file read-only)."""
    if shutil.which("chattr") is None:
        return False
    probe = folder / "probe"
    probe.write_text("x")
    ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    return ok


@contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Unwritable for everyone: chattr +i as root, else plain permissions."""
    root = os.geteuid() == 0
    for p in paths:
        if root:
            subprocess.run(["chattr", "+i", str(p)], check=True)
        else:
            p.chmod(0o444)
    try:
        yield
    finally:
        for p in paths:
            if root:
                subprocess.run(["chattr", "-i", str(p)], check=True)
            else:
                p.chmod(0o644)


def needs_read_only(folder: Path) -> None:
    if os.geteuid() == 0 and not immutable_supported(folder):
        pytest.fail("cannot make a file read-only for root here (chattr +i unsupported)")


def test_a_ledger_deleted_under_a_running_job_is_exit_2(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    proc = overnight(tmp_path, "run", str(job))
    until_computing(tmp_path, proc)
    for f in (tmp_path / ".overnight").glob("ledger.db*"):
        f.unlink()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "was deleted or replaced while in use" in err
    assert "Traceback" not in err
    # the heartbeat did not bring back an empty ledger where the real one was
    assert not (tmp_path / ".overnight" / "ledger.db").exists()


def test_a_ledger_turned_read_only_under_a_running_job_is_exit_2(tmp_path: Path) -> None:
    needs_read_only(tmp_path)
    job = make_job(tmp_path)
    proc = overnight(tmp_path, "run", str(job))
    until_computing(tmp_path, proc)
    state = tmp_path / ".overnight"
    # Not the -shm file: SQLite maps it into memory, and a write there would be a SIGBUS.
    with read_only(state / "ledger.db", state / "ledger.db-wal"):
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert "ledger" in err and str(state / "ledger.db") in err
    assert "Traceback" not in err


def test_a_read_only_ledger_is_exit_2_before_anything_runs(tmp_path: Path) -> None:
    needs_read_only(tmp_path)
    job = make_job(tmp_path, n=20)
    assert overnight(tmp_path, "status", str(job)).wait(timeout=60) == 2  # not run yet
    ledger = tmp_path / ".overnight" / "ledger.db"
    assert not ledger.exists()  # status does not make one
    ledger.parent.mkdir()
    open_ledger(str(ledger)).close()  # a ledger with no job in it
    for extra in (tmp_path / ".overnight").glob("ledger.db-*"):
        extra.unlink()
    with read_only(ledger):
        proc = overnight(tmp_path, "run", str(job))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert "read-only" in err and "Traceback" not in err
    assert calls(tmp_path) == []


@pytest.mark.parametrize("what", ["folder", "garbage"])
def test_a_ledger_path_that_is_not_a_ledger_is_exit_2(tmp_path: Path, what: str) -> None:
    job = make_job(tmp_path, n=5)
    state = tmp_path / "state.db"
    if what == "folder":
        state.mkdir()
    else:
        state.write_bytes(b"this is not a database" * 100)
    proc = overnight(tmp_path, "run", str(job), "--state", str(state))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert str(state) in err and "Traceback" not in err
    assert calls(tmp_path) == []


def _open_at(path: Path, start_at: float, answers, what: str) -> None:  # a forked process
    from overnight.llm.cache import ResponseCache
    from overnight.store.sqlite import SQLiteLedger

    while time.time() < start_at:
        pass
    try:
        SQLiteLedger(path) if what == "ledger" else ResponseCache(path, scope="job:x")
        answers.put("ok")
    except Exception as exc:  # the answer the test reads
        answers.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("what", ["ledger", "response cache"])
def test_runs_that_create_one_new_ledger_at_the_same_instant_all_open_it(
    tmp_path: Path, what: str
) -> None:
    """SQLite does not wait on a lock while it switches a new file to WAL: two runs creating
    one ledger at the same instant saw "database is locked" (exit 2) about one time in six
    (4 processes, measured 5 of 30 trials before the switch was retried). The same for a
    response cache shared by two jobs (`[run] cache`)."""
    fork = multiprocessing.get_context("fork")
    answers = fork.Queue()
    failed = []
    for trial in range(20):
        path = tmp_path / f"{trial}.sqlite"
        start_at = time.time() + 0.3
        procs = [
            fork.Process(target=_open_at, args=(path, start_at, answers, what)) for _ in range(4)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        failed += [a for a in (answers.get(timeout=5) for _ in procs) if a != "ok"]
    assert failed == []
