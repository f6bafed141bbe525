"""kill -9 during batch submission and while waiting, then run again: the rerun adopts the
batch it created before it died (found by metadata on OpenAI, by shape on Anthropic) and
creates nothing new for those items; every result is collected once. And the other ways a
batch job meets its past through the CLI: a deleted ledger, --restart, --detach and cancel.

Every process here is a real `python -m overnight` killed with a real SIGKILL: by the test,
or by the fake provider the moment it has acted on a request (`run_killed_at`)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from llm_helpers import ANT_KEY, KEY, read_jsonl, write_records

from overnight.testing.fake_provider import FakeProvider

pytestmark = pytest.mark.slow


def job_file(folder: Path, backend: str, url: str, model_extra: str = "", run: str = "") -> Path:
    model = "claude-3-5-haiku" if "anthropic" in backend else "gpt-4o-mini"
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
poll_interval = 0.05
max_requests_per_batch = 10
params = {{ max_tokens = 32 }}
{model_extra}

[run]
{run}

[output]
path = "out.jsonl"
"""
    )
    return path


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANT_KEY, **extra}


def run(job: Path, *args: str, command: str = "run", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "overnight", command, str(job), *args],
        capture_output=True,
        text=True,
        env=environment(**env),
        timeout=180,
    )


def start(job: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=environment(**env),
    )


# Where a run is killed: the request the fake has just acted on (method, path), before the
# run reads its answer. "after_create": the batch exists, its id never reached the ledger.
KILL_POINTS = {
    "after_upload": ("POST", r"/v1/files"),
    "after_create": ("POST", r"/v1/(batches|messages/batches)"),
    "while_polling": ("GET", r"/v1/(batches|messages/batches)/[^/]+"),
}


def run_killed_at(job: Path, fake: FakeProvider, point: str, **env: str) -> int:
    """`overnight run`, killed with SIGKILL by the fake the moment it has acted on the
    request `point` names: the run's exit status (-9)."""
    method, pattern = KILL_POINTS[point]
    proc = start(job, **env)
    fired = threading.Event()

    def kill_the_client(m: str, path: str) -> None:
        if m == method and re.fullmatch(pattern, path) and not fired.is_set():
            fired.set()
            os.kill(proc.pid, signal.SIGKILL)

    fake.knobs.after_acting = kill_the_client
    try:
        return proc.wait(timeout=180)
    finally:
        fake.knobs.after_acting = None


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL
    assert proc.wait(timeout=30) == -9


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
@pytest.mark.parametrize("crash_at", ["after_create", "while_polling"])
def test_kill_then_rerun_never_creates_twice(
    tmp_path: Path, fake: FakeProvider, backend: str, crash_at: str
) -> None:
    write_records(tmp_path, 25)
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = job_file(tmp_path, backend, url)
    fake.knobs.batch_seconds = 0.5
    assert run_killed_at(job, fake, crash_at) == -9
    created_before = fake.stats.batch_creations
    assert created_before >= 1
    done = run(job)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(25)]
    # Every item went to the provider exactly once, across both processes.
    assert sorted(set(fake.stats.batch_items.values())) == [1]
    assert sum(fake.stats.batch_items.values()) == 25
    assert fake.stats.batch_creations == 3  # 10 + 10 + 5: none twice


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.mark.parametrize("how", ["after_upload", "during_upload"])
def test_kill_around_the_upload_leaves_no_prompt_file_and_resubmits_once(
    tmp_path: Path, fake: FakeProvider, how: str
) -> None:
    """Killed after the file upload (or while it hangs), before the batch exists: nothing
    was submitted, so the rerun creates it, once (an orphan file is harmless: files cost
    nothing). The request file of prompts is left nowhere: neither in the system's temp
    folder nor in the job's state folder."""
    write_records(tmp_path, 5)
    job = job_file(tmp_path, "openai-batch", fake.openai_url)
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    state_tmp = tmp_path / ".overnight" / "tmp"
    if how == "after_upload":
        assert run_killed_at(job, fake, "after_upload", TMPDIR=str(system_tmp)) == -9
        assert fake.stats.files_uploaded == 1
    else:
        fake.knobs.upload_delay = 60
        proc = start(job, TMPDIR=str(system_tmp))
        wait_for(lambda: fake.stats.uploads_received >= 1)
        kill(proc)
        fake.knobs.upload_delay = 0
    assert fake.stats.batch_creations == 0
    assert files_in(system_tmp) == [] and files_in(state_tmp) == []
    assert run(job, TMPDIR=str(system_tmp)).returncode == 0
    assert files_in(system_tmp) == [] and files_in(state_tmp) == []
    assert fake.stats.batch_creations == 1
    assert sorted(set(fake.stats.batch_items.values())) == [1]


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_kill_during_a_slow_create_then_an_immediate_rerun_creates_once(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """The create is on its way (the provider takes 2 s to make the batch) when the run is
    killed; the rerun starts at once, before the batch exists. It must not create the chunk
    again until that create can no longer land (recorded before the call: its 3 s timeout
    and as long again), then look again and adopt it."""
    write_records(tmp_path, 15)
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = job_file(tmp_path, backend, url, "timeout = 3")
    fake.knobs.create_delay = 2.0
    proc = start(job)
    wait_for(lambda: fake.stats.creates_received >= 1)
    kill(proc)
    assert fake.stats.batch_creations == 0  # not yet: the rerun cannot see it
    done = run(job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"r{i}" for i in range(15)]
    assert fake.stats.batch_creations == 2  # 10 + 5: exactly one batch per chunk
    assert len(fake.stats.batch_items) == 15
    assert set(fake.stats.batch_items.values()) == {1}  # each custom_id submitted once


def test_a_rerun_never_takes_another_jobs_batch_for_its_own(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anthropic: killed after its create landed, before the id was recorded; then another
    job of the workspace creates a batch of the same size. The rerun looks for its batch by
    time and size, and both are running: it may take the other one. Its lines are then
    refused one by one (not this job's custom_ids): nothing of the other job is written, the
    items go back to pending and are sent again, and every row answers its own prompt."""
    from llm_helpers import llm_job

    monkeypatch.setenv("ANTHROPIC_API_KEY", ANT_KEY)
    fake.knobs.batch_seconds = 600.0  # both batches running until the rerun adopts one
    write_records(tmp_path, 5)
    job = job_file(tmp_path, "anthropic-batch", fake.anthropic_url)
    assert run_killed_at(job, fake, "after_create") == -9
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    (other_dir / "in.jsonl").write_text(
        "".join(f'{{"id": "r{i}", "text": "OTHER job {i}"}}\n' for i in range(5))
    )
    other = llm_job(other_dir, "anthropic-batch", fake.anthropic_url)
    assert other.run(detach=True).exit_code == 0  # newer, same size, running
    fake.knobs.batch_seconds = 0.2

    def end_once_adopted() -> None:
        ledger = tmp_path / ".overnight" / "ledger.db"
        query = "SELECT count(*) FROM remote_batches WHERE remote_id IS NOT NULL"

        def recorded() -> bool:
            with closing(sqlite3.connect(ledger)) as db:
                return db.execute(query).fetchone()[0] > 0

        wait_for(recorded)
        fake.complete_batches()

    watcher = threading.Thread(target=end_once_adopted, daemon=True)
    watcher.start()
    done = run(job, "--json")
    watcher.join()
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["output"] for r in rows] == [
        f"echo: ticket {i}: the invoice is wrong" for i in range(5)
    ]
    assert '"not_ours"' in done.stdout and "refused 5 result lines" in done.stdout
    assert other.run().exit_code == 0
    assert [r["output"] for r in read_jsonl(other.output_path)] == [
        f"echo: OTHER job {i}" for i in range(5)
    ]


def delete_ledger(folder: Path) -> None:
    for f in (folder / ".overnight").glob("ledger.db*"):
        f.unlink()


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_a_deleted_ledger_stops_the_rerun_and_restart_starts_over(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """The provider is a second record of what was sent. The ledger of a job whose batches
    were submitted is deleted; running the job again must not send everything again without
    a word: it stops (exit 2) before submitting anything, listing the batches. --restart
    cancels the running ones and starts over; later runs go on without refusing.
    OpenAI shows running and ended batches (metadata); Anthropic only ended ones (the
    custom_id of their first result line)."""
    write_records(tmp_path, 15)
    anthropic = "anthropic" in backend
    url = fake.anthropic_url if anthropic else fake.openai_url
    job = job_file(tmp_path, backend, url)
    fake.knobs.batch_seconds = 60
    assert run(job, "--detach").returncode == 0
    assert fake.stats.batch_creations == 2
    if anthropic:
        fake.complete_batches()  # Anthropic tells whose a batch is only once it ended
    delete_ledger(tmp_path)
    uploaded = fake.stats.files_uploaded
    refused = run(job)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join(refused.stderr.split())
    assert "2 batches of an earlier run" in message and "--restart" in message
    assert "10 requests" in message and "5 requests" in message
    batches = fake.anthropic.batches if anthropic else fake.openai.batches
    assert all(bid in message for bid in batches)
    assert fake.stats.batch_creations == 2 and fake.stats.files_uploaded == uploaded
    assert not (tmp_path / "out.jsonl").exists()

    fake.knobs.batch_seconds = 0.2
    restarted = run(job, "--restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    if anthropic:  # ended already: nothing to cancel
        assert "live provider batches" not in restarted.stdout
    else:
        assert "cancelled 2 live provider batches of the previous run" in restarted.stdout
        cancelled = {b.obj["status"] for b in list(batches.values())[:2]}
        assert cancelled <= {"cancelling", "cancelled"}
    assert fake.stats.batch_creations == 4
    again = run(job)  # the old batches are known to be the discarded run's now
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 15


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_restart_cancels_the_jobs_live_batches_first(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    write_records(tmp_path, 15)
    anthropic = "anthropic" in backend
    job = job_file(tmp_path, backend, fake.anthropic_url if anthropic else fake.openai_url)
    fake.knobs.batch_seconds = 60
    assert run(job, "--detach").returncode == 0
    old = set(fake.anthropic.batches if anthropic else fake.openai.batches)
    assert len(old) == 2
    fake.knobs.batch_seconds = 0.2
    restarted = run(job, "--restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "cancelled 2 live provider batches of the previous run" in restarted.stdout
    if anthropic:
        states = {fake.anthropic.batches[b].obj["cancel_initiated_at"] is not None for b in old}
    else:
        states = {fake.openai.batches[b].obj["status"] in ("cancelling", "cancelled") for b in old}
    assert states == {True}
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 15


def test_detach_cancel_and_run_again_through_the_cli(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 12)
    job = job_file(tmp_path, "openai-batch", fake.openai_url)
    fake.knobs.batch_seconds = 60
    detached = run(job, "--detach")
    assert detached.returncode == 0, detached.stdout + detached.stderr
    assert "batches submitted" in detached.stdout
    assert fake.stats.batch_creations == 2 and not (tmp_path / "out.jsonl").exists()
    cancelled = run(job, command="cancel")
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert {b.obj["status"] for b in fake.openai.batches.values()} == {"cancelling"}
    fake.knobs.batch_seconds = 0.2
    done = run(job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"r{i}" for i in range(12)]
    # The fake finishes half of a cancelled batch: kept; only the other half went again.
    sent = sorted(fake.stats.batch_items.values())
    assert sent == [1] * 6 + [2] * 6 and fake.stats.batch_creations == 3  # 10 + 2, then 6


def test_auto_past_the_cut_collects_live_batches_then_real_time(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The run that submitted was killed; when it comes back the cut has passed: the live
    batch is cancelled and collected (its finished half kept), the rest done in real time."""
    write_records(tmp_path, 10)
    fake.knobs.batch_seconds = 60

    def auto(deadline: datetime) -> Path:
        return job_file(
            tmp_path,
            "auto",
            fake.openai_url,
            'provider = "openai"',
            f'deadline = "{deadline.isoformat()}"\ndeadline_margin = 3600',
        )

    job = auto(datetime.now(UTC) + timedelta(hours=5))
    assert run_killed_at(job, fake, "while_polling") == -9  # killed at its first poll
    assert fake.stats.batch_creations == 1
    job = auto(datetime.now(UTC) + timedelta(seconds=30))
    done = run(job)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 10
    assert fake.stats.batch_creations == 1  # nothing new submitted past the cut
    assert fake.stats.requests["/v1/chat/completions"] == 5


def test_realtime_kill_pays_at_most_the_requests_in_flight(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Real time: an answer is in the cache the moment it arrives, before its item commits;
    after a kill -9 the rerun re-sends only what was in flight, never what was answered."""
    import time

    write_records(tmp_path, 60)
    fake.knobs.latency = 0.05
    job = tmp_path / "rt.toml"
    job.write_text(
        f"""
[source]
path = "in.jsonl"
id = "id"

[model]
backend = "openai"
name = "gpt-4o-mini"
base_url = "{fake.openai_url}"
concurrency = 4

[task]
kind = "generate"

[output]
path = "out.jsonl"
"""
    )
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", str(job)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while fake.stats.requests["/v1/chat/completions"] < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    sent_before = fake.stats.requests["/v1/chat/completions"]
    assert 20 <= sent_before < 60
    assert run(job).returncode == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 60
    # At most the 4 requests in flight at the kill were sent twice.
    assert fake.stats.requests["/v1/chat/completions"] <= 60 + 4


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_kill_9_while_a_batch_is_live_then_rerun_pays_each_distinct_request_once(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """25 records, 3 distinct prompts: one line per distinct request goes out; the identical
    ones wait for its answer. Killed while that batch is live, the rerun knows which requests
    are out (from the ledger's live chunk) and sends none of them again; the collected answers
    settle every record through the response cache."""
    prompts = ["refund please", "where is my parcel", "cancel my order"]
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "text": prompts[i % 3]}) + b"\n" for i in range(25))
    )
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = job_file(tmp_path, backend, url)
    fake.knobs.batch_seconds = 3.0
    proc = start(job)
    wait_for(lambda: fake.stats.batch_creations >= 1)
    time.sleep(0.5)  # the run goes on planning: the identical records must not be sent
    kill(proc)
    assert fake.stats.batch_creations == 1
    done = run(job)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(25)]
    assert {p: fake.stats.billed[p] for p in prompts} == {p: 1 for p in prompts}
    assert fake.stats.batch_creations == 1


# -- on a PostgreSQL ledger: the same promises, and a second worker -------------------------


@pytest.mark.parametrize("crash_at", ["after_create", "while_polling"])
def test_kill_then_rerun_never_creates_twice_on_a_postgresql_ledger(
    tmp_path: Path, fake: FakeProvider, pg_ledger_url: str, crash_at: str
) -> None:
    write_records(tmp_path, 25)
    job = job_file(tmp_path, "openai-batch", fake.openai_url)
    fake.knobs.batch_seconds = 0.5
    assert run_killed_at(job, fake, crash_at, OVERNIGHT_LEDGER=pg_ledger_url) == -9
    done = run(job, OVERNIGHT_LEDGER=pg_ledger_url)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(25)]
    assert sorted(set(fake.stats.batch_items.values())) == [1]
    assert sum(fake.stats.batch_items.values()) == 25
    assert fake.stats.batch_creations == 3  # 10 + 10 + 5: none twice
    assert not (tmp_path / ".overnight" / "ledger.db").exists()  # the ledger was the server


def test_killing_the_batch_worker_that_holds_the_job_leaves_it_to_the_other(
    tmp_path: Path, fake: FakeProvider, pg_ledger_url: str
) -> None:
    """Two `overnight run` of one batch job on a PostgreSQL ledger. The first holds the job
    and has batches live when it is killed with SIGKILL; the second takes the job over,
    adopts the live batches and finishes: every record sent once, none created twice."""
    write_records(tmp_path, 25)
    job = job_file(tmp_path, "openai-batch", fake.openai_url)
    fake.knobs.batch_seconds = 2.0
    first = start(job, OVERNIGHT_LEDGER=pg_ledger_url)
    wait_for(lambda: fake.stats.batch_creations >= 1)
    second = start(job, OVERNIGHT_LEDGER=pg_ledger_url)
    time.sleep(1.0)  # the second has joined (or waits to)
    kill(first)
    assert second.wait(timeout=180) == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(25)]
    assert sorted(set(fake.stats.batch_items.values())) == [1]
    assert sum(fake.stats.batch_items.values()) == 25
    assert fake.stats.batch_creations == 3
