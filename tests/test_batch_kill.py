"""kill -9 during batch submission and while waiting, then run again: the rerun adopts the
batch it created before it died (found by metadata on OpenAI, by shape on Anthropic) and
creates nothing new for those items; every result is collected once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from llm_helpers import ANT_KEY, KEY, read_jsonl, write_records

from overnight.testing.fake_provider import FakeProvider

pytestmark = pytest.mark.slow


def job_file(folder: Path, backend: str, url: str) -> Path:
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

[output]
path = "out.jsonl"
"""
    )
    return path


def run(job: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANT_KEY}
    env.pop("OVERNIGHT_TEST_CRASH_AT", None)
    if crash_at:
        env["OVERNIGHT_TEST_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(job)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
@pytest.mark.parametrize("crash_at", ["after_create", "while_polling"])
def test_kill_then_rerun_never_creates_twice(
    tmp_path: Path, fake: FakeProvider, backend: str, crash_at: str
) -> None:
    write_records(tmp_path, 25)
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = job_file(tmp_path, backend, url)
    fake.knobs.batch_seconds = 0.5
    died = run(job, crash_at)
    assert died.returncode == -9, died.stderr
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


def test_kill_during_upload_before_create_resubmits_once(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Killed after the file upload, before the batch exists: nothing was submitted, so the
    rerun creates it, once (an orphan file is harmless: files cost nothing)."""
    write_records(tmp_path, 5)
    job = job_file(tmp_path, "openai-batch", fake.openai_url)
    died = run(job, "after_upload")
    assert died.returncode == -9
    assert fake.stats.batch_creations == 0 and fake.stats.files_uploaded == 1
    assert run(job).returncode == 0
    assert fake.stats.batch_creations == 1
    assert sorted(set(fake.stats.batch_items.values())) == [1]


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
