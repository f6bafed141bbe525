"""`overnight serve` killed with SIGKILL mid-batch and started again finishes the batch, every
custom_id exactly once in the output file: the ledger is the truth."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from serve_helpers import (
    chat_line,
    client,
    free_port,
    lines_of,
    server_log,
    serving,
    start_process,
    upload,
    wait_for,
    write_config,
)


def _calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().split() if log.exists() else []


@pytest.mark.slow
def test_a_server_killed_mid_batch_finishes_it_after_a_restart(tmp_path: Path) -> None:
    n, batch_size = 30, 2
    config = write_config(tmp_path, run=f"batch_size = {batch_size}")
    env = {**os.environ, "SERVE_TEST_SLEEP": "0.1"}
    port = free_port()
    server = start_process(config, port, env)
    try:
        oai = client(f"http://127.0.0.1:{port}/v1")
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"k{i}", "sleep") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        while len(_calls(tmp_path)) < 8:
            assert time.monotonic() < deadline, "the batch did not start in 60 s"
            time.sleep(0.02)
        running = oai.batches.retrieve(created.id)
        assert running.status == "in_progress"
        assert 0 < running.request_counts.completed < n  # live, from the ledger
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    before = _calls(tmp_path)
    assert len(before) < n, "the batch finished before the kill"
    time.sleep(0.5)  # the function's worker process dies with the server
    assert _calls(tmp_path) == before

    server = start_process(config, port, env)  # resumes the batch at start-up
    try:
        batch = wait_for(oai, created.id, ("completed", "failed"), timeout=120)
        assert batch.status == "completed", batch.errors
        assert batch.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
        out = lines_of(oai, batch.output_file_id)
        assert batch.error_file_id is None
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    ids = Counter(line["custom_id"] for line in out)
    assert sorted(ids) == sorted(f"k{i}" for i in range(n))
    assert set(ids.values()) == {1}
    # Only what was in flight at the kill ran twice.
    again = [cid for cid, times in Counter(_calls(tmp_path)).items() if times > 1]
    assert len(again) <= batch_size, again
    # SIGTERM: a clean shutdown (uvicorn re-raises the signal once it has shut down).
    assert server.returncode == -signal.SIGTERM
    assert "Application shutdown complete" in server_log(config)


def test_a_server_stopped_mid_batch_resumes_it_and_runs_batches_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.05")
    config = write_config(tmp_path, extra="[batches]\nconcurrency = 1", run="batch_size = 2")
    with serving(config) as url:
        oai = client(url)
        file_id = upload(oai, [chat_line(f"q{i}", "sleep") for i in range(40)])
        first, second = (
            oai.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
            for _ in range(2)
        )
        deadline = time.monotonic() + 60
        while len(_calls(tmp_path)) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert oai.batches.retrieve(first).status == "in_progress"
        assert oai.batches.retrieve(second).status == "validating"  # waits for a place
    stopped = len(_calls(tmp_path))
    assert stopped < 40
    with serving(config) as url:
        oai = client(url)
        for batch_id in (first, second):
            batch = wait_for(oai, batch_id, ("completed", "failed"))
            assert batch.request_counts.model_dump() == {
                "total": 40,
                "completed": 40,
                "failed": 0,
            }
            assert len(lines_of(oai, batch.output_file_id)) == 40
    assert len(_calls(tmp_path)) <= 80 + 2  # at most the batch in flight at the stop again
