"""`overnight serve`: a batch not ended by its `expires_at` ([batches] completion_window_hours,
24 by default) ends `expired`, keeping what it finished, through the official SDKs; also
when it expired while the server was down."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anthropic
import pytest
from serve_helpers import (
    chat_line,
    client,
    free_port,
    lines_of,
    serving,
    start_process,
    upload,
    wait_for,
    write_config,
)

from overnight.store import open_ledger

# 0.001 hours: a window of 4 s (3.6 rounded), against 40 lines of 0.3 s in pairs (12 s).
SHORT = "[batches]\ncompletion_window_hours = 0.001\n"


def _calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().split() if log.exists() else []


def _ledger_job(folder: Path, job: str) -> tuple[bool, dict[str, int]]:
    """Whether the batch's ledger job is cancelled, and its items by state (lines the run
    had not read yet are not items)."""
    ledger = open_ledger(str(folder / "state" / "ledger.db"))
    try:
        found = ledger.get_job(job)
        assert found is not None
        counts = ledger.counts(found.id)
        return ledger.is_cancelled(found.id), {s: n for s, n in counts.by_state.items() if n}
    finally:
        ledger.close()


def test_the_window_is_24_hours_by_default(tmp_path: Path) -> None:
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line("a", "hi")]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        assert created.expires_at == created.created_at + 24 * 3600
        assert wait_for(oai, created.id, ("completed",)).expired_at is None


def test_an_openai_batch_past_its_window_expires_keeping_what_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.3")
    n = 40
    with serving(write_config(tmp_path, extra=SHORT, run="batch_size = 2")) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"s{i}", "sleep") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        assert created.expires_at == created.created_at + 4
        batch = wait_for(oai, created.id, ("expired", "completed", "failed"), timeout=60)
        assert batch.status == "expired", batch
        assert batch.expired_at is not None and batch.expired_at >= created.expires_at
        assert batch.completed_at is None
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
        time.sleep(1)  # no more work after the batch ended
        calls = _calls(tmp_path)
    done = [line["custom_id"] for line in out]
    assert 0 < len(done) < n
    assert all(line["response"]["status_code"] == 200 for line in out)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert all(e["response"] is None for e in errors)
    assert sorted(done + [e["custom_id"] for e in errors]) == sorted(f"s{i}" for i in range(n))
    assert batch.request_counts.model_dump() == {
        "total": n,
        "completed": len(done),
        "failed": len(errors),
    }
    # The work paid for is the work reported: each finished line ran once, none after.
    assert sorted(calls) == sorted(done)
    cancelled, states = _ledger_job(tmp_path, created.id)
    assert cancelled and states.keys() <= {"succeeded", "cancelled"}, states
    assert states["succeeded"] == len(done)


def test_a_batch_that_waited_for_a_place_past_its_window_expires_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[batches] concurrency = 1: the second batch waits (validating) behind the first, past
    its window; it expires without running, every line `batch_expired`."""
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.3")
    extra = SHORT + "concurrency = 1\n"
    with serving(write_config(tmp_path, extra=extra, run="batch_size = 2")) as url:
        oai = client(url)
        first, second = (
            oai.batches.create(
                input_file_id=upload(oai, [chat_line(f"{p}{i}", "sleep") for i in range(n)]),
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            for p, n in (("a", 40), ("b", 5))
        )
        assert oai.batches.retrieve(second.id).status == "validating"
        waited = wait_for(oai, second.id, ("expired", "completed", "failed"), timeout=60)
        ran = wait_for(oai, first.id, ("expired", "completed", "failed"), timeout=60)
        errors = lines_of(oai, waited.error_file_id)
        time.sleep(1)
    assert (ran.status, waited.status) == ("expired", "expired")
    assert waited.in_progress_at is None and lines_of(oai, waited.output_file_id) == []
    assert sorted(e["custom_id"] for e in errors) == [f"b{i}" for i in range(5)]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert waited.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}
    assert not any(c.startswith("b") for c in _calls(tmp_path))


def test_a_message_batch_past_its_window_ends_with_expired_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.3")
    n = 40
    with serving(write_config(tmp_path, extra=SHORT, run="batch_size = 2")) as url:
        api = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0)
        requests = [
            {
                "custom_id": f"m{i}",
                "params": {
                    "model": "rev",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "sleep"}],
                },
            }
            for i in range(n)
        ]
        created = api.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert (created.expires_at - created.created_at).total_seconds() == 4
        deadline = time.monotonic() + 60
        while (batch := api.messages.batches.retrieve(created.id)).processing_status != "ended":
            assert time.monotonic() < deadline, batch
            time.sleep(0.1)
        results = list(api.messages.batches.results(created.id))
    counts = batch.request_counts
    assert counts.processing == counts.errored == counts.canceled == 0
    assert counts.succeeded > 0 and counts.expired > 0
    assert counts.succeeded + counts.expired == n
    assert batch.ended_at is not None and batch.ended_at >= created.expires_at
    assert sorted(r.custom_id for r in results) == sorted(f"m{i}" for i in range(n))
    assert sum(r.result.type == "expired" for r in results) == counts.expired
    assert sum(r.result.type == "succeeded" for r in results) == counts.succeeded


@pytest.mark.slow
def test_a_batch_that_expired_while_the_server_was_down_expires_at_start(
    tmp_path: Path,
) -> None:
    """Killed (SIGKILL) mid-batch, started again after the batch's window ended: the batch
    is expired at start-up, the lines it finished before the kill in its output file, and
    no line runs again."""
    n = 60
    # 0.002 hours: a window of 7 s (7.2 rounded), against 60 lines of 0.3 s in pairs (18 s).
    config = write_config(
        tmp_path, extra="[batches]\ncompletion_window_hours = 0.002\n", run="batch_size = 2"
    )
    env = {**os.environ, "SERVE_TEST_SLEEP": "0.3"}
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
        while oai.batches.retrieve(created.id).request_counts.completed < 2:  # committed
            assert time.monotonic() < deadline, "the batch did not start in 60 s"
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    assert time.time() < created.expires_at, "the window ended before the kill"
    time.sleep(0.5)  # the function's worker process dies with the server
    before = _calls(tmp_path)
    while time.time() < created.expires_at + 1:
        time.sleep(0.1)

    server = start_process(config, port, env)
    try:
        batch = wait_for(oai, created.id, ("expired", "completed", "failed"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
        time.sleep(1)
        after = _calls(tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert batch.status == "expired", batch
    assert after == before  # nothing ran after the restart
    done = sorted(line["custom_id"] for line in out)
    assert 2 <= len(done) < n
    # What was committed before the kill is kept (a pair in flight at the kill is lost).
    assert set(done) <= set(before) and len(before) - len(done) <= 2
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert sorted(done + [e["custom_id"] for e in errors]) == sorted(f"k{i}" for i in range(n))
    assert batch.request_counts.model_dump() == {
        "total": n,
        "completed": len(done),
        "failed": n - len(done),
    }
    cancelled, states = _ledger_job(tmp_path, created.id)
    assert cancelled and states.keys() <= {"succeeded", "cancelled"}, states
    assert states["succeeded"] == len(done)
