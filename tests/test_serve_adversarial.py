"""`overnight serve` under attack: the scenarios that cost users money or lose their work,
each driven through the official SDKs over loopback HTTP against the repo's fake provider.
Every paid answer reaches the batch's output file exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
from llm_helpers import ANT_KEY, KEY
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
from test_serve_providers import RUN, oai_remote_batches, provider_models

from overnight.store import open_ledger
from overnight.testing.fake_provider import FakeProvider

# 0.001 hours: a window of 4 s (3.6 rounded).
SHORT = "[batches]\ncompletion_window_hours = 0.001\n"


def _every_paid_answer_once(fake: FakeProvider, out: list[dict], errors: list[dict]) -> None:
    """Every line the provider billed is in the output file, once, with its answer."""
    billed = fake.stats.snapshot().billed
    answered = Counter(
        line["response"]["body"]["choices"][0]["message"]["content"].removeprefix("echo: ")
        for line in out
    )
    assert answered == billed, (answered, billed, errors)


def test_an_expired_batch_on_a_providers_batch_api_keeps_what_the_provider_finished(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """The window ends while the remote batch is live: the remote batch is cancelled, and
    the half the provider ran anyway (and billed) is in the expired batch's output file."""
    config = write_config(tmp_path, extra=provider_models(fake) + SHORT, run=RUN)
    fake.knobs.batch_seconds = 120  # the remote batch outlives the window
    fake.knobs.cancel_fraction = 0.5
    n = 8
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"e{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        batch = wait_for(oai, created.id, ("expired", "completed", "failed"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status == "expired", batch
    assert fake.stats.batch_creations == 1
    _every_paid_answer_once(fake, out, errors)
    assert len(out) == n // 2
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"e{i}" for i in range(n)) and set(ids.values()) == {1}
    assert batch.request_counts.model_dump() == {"total": n, "completed": n // 2, "failed": n // 2}


def test_a_provider_batch_that_expired_while_the_server_was_down_keeps_its_paid_results(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """Stopped while its remote batch is live, started again after the window ended: the
    batch is expired at start-up, and what the provider ran before its remote batch was
    cancelled (billed) is collected into the output file, not dropped."""
    config = write_config(tmp_path, extra=provider_models(fake) + SHORT, run=RUN)
    fake.knobs.batch_seconds = 120
    fake.knobs.cancel_fraction = 0.5
    n = 8
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"d{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 30
        while oai.batches.retrieve(created.id).status != "in_progress" or not _live(config):
            assert time.monotonic() < deadline, "no live remote batch"
            time.sleep(0.05)
    assert time.time() < created.expires_at, "the window ended before the stop"
    while time.time() < created.expires_at + 1:
        time.sleep(0.1)
    with serving(config) as url:
        oai = client(url)
        batch = wait_for(oai, created.id, ("expired", "completed", "failed"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status == "expired", batch
    assert fake.stats.batch_creations == 1
    assert [b["status"] for b in oai_remote_batches(fake)] == ["cancelled"]
    _every_paid_answer_once(fake, out, errors)
    assert len(out) == n // 2
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"d{i}" for i in range(n)) and set(ids.values()) == {1}
    assert batch.request_counts.model_dump() == {"total": n, "completed": n // 2, "failed": n // 2}


def _live(config: Path) -> bool:
    """Whether the ledger records a live remote batch (its id known)."""
    ledger = open_ledger(str(config.parent / "state" / "ledger.db"))
    try:
        return any(ledger.chunks(job.id, ("live",)) for job in ledger.list_jobs())
    finally:
        ledger.close()


def test_killed_between_the_remote_create_and_its_record_then_expired_keeps_paid_results(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """SIGKILL the moment the upstream created the remote batch (its id never recorded),
    and the window ends while the server is down: at start-up the batch expires, the remote
    batch the lost create made is found, cancelled and collected: what it ran is in the
    output file once, and no second remote batch is created."""
    config = write_config(tmp_path, extra=provider_models(fake) + SHORT, run=RUN)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANT_KEY}
    port = free_port()
    fake.knobs.batch_seconds = 120
    fake.knobs.cancel_fraction = 0.5
    n = 8
    server = start_process(config, port, env)
    killed: list[str] = []

    def kill_the_server(method: str, path: str) -> None:
        if method == "POST" and path == "/v1/batches" and not killed:
            killed.append(path)
            os.kill(server.pid, signal.SIGKILL)

    fake.knobs.after_acting = kill_the_server
    try:
        oai = client(f"http://127.0.0.1:{port}/v1")
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"k{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        assert server.wait(60) == -signal.SIGKILL
    finally:
        fake.knobs.after_acting = None
        if server.poll() is None:
            server.kill()
            server.wait(30)
    assert killed and fake.stats.batch_creations == 1
    while time.time() < created.expires_at + 1:
        time.sleep(0.1)
    server = start_process(config, port, env)
    try:
        batch = wait_for(oai, created.id, ("expired", "completed", "failed"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert batch.status == "expired", (batch, server_log(config))
    assert fake.stats.batch_creations == 1
    assert [b["status"] for b in oai_remote_batches(fake)] == ["cancelled"]
    _every_paid_answer_once(fake, out, errors)
    assert len(out) == n // 2
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"k{i}" for i in range(n)) and set(ids.values()) == {1}


def test_a_real_time_provider_answering_200_with_a_malformed_body(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """200 with a body that is not JSON (twice): unreadable answers are retried, every line
    ends in the output once, and what was billed is what the output holds."""
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    fake.knobs.malformed_next = 2
    n = 6
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"m{i}", f"text {i}", "fast") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        batch = wait_for(oai, created.id, ("completed", "failed", "expired"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status == "completed", batch
    _every_paid_answer_once(fake, out, errors)
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"m{i}" for i in range(n)) and set(ids.values()) == {1}


def test_a_batch_api_result_file_with_garbled_lines(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """Two lines of the remote batch's output file are cut in half (not JSON): their
    requests go out again in a second remote batch and every custom_id ends once. (The
    provider billed those two twice: an answer that cannot be read cannot be used.)"""
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    fake.knobs.garble_result_lines = 2
    n = 6
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"g{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        batch = wait_for(oai, created.id, ("completed", "failed", "expired"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status == "completed", batch
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"g{i}" for i in range(n)) and set(ids.values()) == {1}


def test_a_key_revoked_mid_batch_keeps_the_answers_recorded_before(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """The provider refuses the key half-way (401): the batch fails with the reason, and the
    answers recorded before (paid for: in the ledger, out of reach until now) are in its
    output file, the lines not run in its error file, every custom_id once."""
    slow = (
        f'[models.slow]\nbackend = "openai"\nname = "gpt-4o-mini"\n'
        f'base_url = "{fake.openai_url}"\nconcurrency = 1\n'
    )
    config = write_config(tmp_path, extra=provider_models(fake) + slow, run=RUN)
    fake.knobs.latency = 0.01
    n = 80  # a real-time run sends 64 requests per call: the first call's are recorded
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"r{i}", f"text {i}", "slow") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        while (recorded := oai.batches.retrieve(created.id).request_counts.completed) < 64:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fake.knobs.require_key = "another key"
        batch = wait_for(oai, created.id, ("completed", "failed", "expired"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status == "failed", batch
    assert batch.errors is not None and "refused the API key" in batch.errors.data[0].message
    assert recorded <= len(out) < n
    billed = fake.stats.snapshot().billed
    assert all(
        billed[line["response"]["body"]["choices"][0]["message"]["content"][6:]] == 1
        for line in out
    )
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"r{i}" for i in range(n)) and set(ids.values()) == {1}
    assert batch.request_counts.model_dump() == {
        "total": n,
        "completed": len(out),
        "failed": n - len(out),
    }


def test_a_window_that_ends_while_the_remote_create_is_in_flight(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """The window ends while the upstream is still creating the remote batch (the cancel
    finds no live batch to cancel): the batch it made is cancelled once recorded, and what
    it ran is in the expired batch's output file, once."""
    config = write_config(tmp_path, extra=provider_models(fake) + SHORT, run=RUN)
    fake.knobs.create_delay = 6.0  # past the 4 s window
    fake.knobs.batch_seconds = 120
    fake.knobs.cancel_fraction = 0.5
    n = 8
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"c{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        batch = wait_for(oai, created.id, ("expired", "completed", "failed"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status == "expired", batch
    assert fake.stats.batch_creations == 1
    assert [b["status"] for b in oai_remote_batches(fake)] == ["cancelled"]
    _every_paid_answer_once(fake, out, errors)
    assert len(out) == n // 2
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"c{i}" for i in range(n)) and set(ids.values()) == {1}


def test_a_message_batch_on_anthropics_batch_api_expired_while_down_keeps_paid_results(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """As for OpenAI, a Message Batch to an anthropic-batch model: stopped while its remote
    Message Batch is live, started after the window ended; the remote batch is cancelled
    and what it ran (billed) comes back `succeeded`, the rest `expired`."""
    import anthropic

    config = write_config(tmp_path, extra=provider_models(fake) + SHORT, run=RUN)
    fake.knobs.batch_seconds = 120
    fake.knobs.cancel_fraction = 0.5
    n = 8
    requests = [
        {
            "custom_id": f"a{i}",
            "params": {
                "model": "claude-batch",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
        }
        for i in range(n)
    ]
    with serving(config) as url:
        ant = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0)
        created = ant.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while not _live(config):
            assert time.monotonic() < deadline, "no live remote batch"
            time.sleep(0.05)
    expires_at = created.expires_at.timestamp()
    assert time.time() < expires_at, "the window ended before the stop"
    while time.time() < expires_at + 1:
        time.sleep(0.1)
    with serving(config) as url:
        ant = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0)
        deadline = time.monotonic() + 60
        while (batch := ant.messages.batches.retrieve(created.id)).processing_status != "ended":
            assert time.monotonic() < deadline, batch.processing_status
            time.sleep(0.1)
        results = list(ant.messages.batches.results(created.id))
    billed = fake.stats.snapshot().billed
    answered = Counter(
        r.result.message.content[0].text.removeprefix("echo: ")  # type: ignore[union-attr]
        for r in results
        if r.result.type == "succeeded"
    )
    assert answered == billed and len(answered) == n // 2, (answered, billed)
    assert batch.request_counts.succeeded == n // 2 and batch.request_counts.expired == n // 2
    assert sorted(r.custom_id for r in results) == sorted(f"a{i}" for i in range(n))


def test_two_servers_on_postgresql_race_to_expire_a_provider_batch(
    tmp_path: Path, fake: FakeProvider, keys: None, pg_ledger_url: str
) -> None:
    """Two servers on one PostgreSQL ledger, both watching the window of a batch that one of
    them runs on the provider's batch API: it is expired once, its remote batch cancelled
    once, and what that ran is in the output file once, seen alike on both servers."""
    config = write_config(tmp_path, extra=provider_models(fake) + SHORT, run=RUN)
    config.write_text(config.read_text().replace('"state/ledger.db"', f'"{pg_ledger_url}"'))
    fake.knobs.batch_seconds = 120
    fake.knobs.cancel_fraction = 0.5
    n = 8
    with serving(config) as one, serving(config) as two:
        first, second = client(one), client(two)
        created = first.batches.create(
            input_file_id=upload(
                first, [chat_line(f"p{i}", f"text {i}", "cheap") for i in range(n)]
            ),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        batch = wait_for(second, created.id, ("expired", "completed", "failed"), timeout=60)
        out = lines_of(second, batch.output_file_id)
        errors = lines_of(second, batch.error_file_id)
        assert first.batches.retrieve(created.id) == batch
        assert lines_of(first, batch.output_file_id) == out
    assert batch.status == "expired", batch
    assert fake.stats.batch_creations == 1
    assert [b["status"] for b in oai_remote_batches(fake)] == ["cancelled"]
    _every_paid_answer_once(fake, out, errors)
    assert len(out) == n // 2
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"p{i}" for i in range(n)) and set(ids.values()) == {1}


def test_a_key_refused_while_the_remote_batch_is_live_waits_and_collects_it(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """The provider refuses the key while the batch's remote batch runs: the batch does not
    fail (its remote batch runs on at the provider and is paid for; nothing would ever
    collect it), it waits; once the key is accepted again its answers are collected."""
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    fake.knobs.batch_seconds = 2
    n = 8
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"k{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 30
        while not _live(config):
            assert time.monotonic() < deadline, "no live remote batch"
            time.sleep(0.05)
        fake.knobs.require_key = "a key the server does not have"
        time.sleep(3)  # the remote batch ends meanwhile, billed in full
        assert oai.batches.retrieve(created.id).status == "in_progress"
        fake.knobs.require_key = None
        batch = wait_for(oai, created.id, ("completed", "failed", "expired"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status == "completed", batch
    assert fake.stats.batch_creations == 1
    _every_paid_answer_once(fake, out, errors)
    assert len(out) == n and not errors


@pytest.mark.parametrize("delay", [0.0, 0.4, 0.8, 1.2])
def test_a_cancel_racing_the_remote_batchs_completion(
    tmp_path: Path, fake: FakeProvider, keys: None, delay: float
) -> None:
    """A cancel that lands around the moment the remote batch completes, before, as or after
    the server collects it: however it ends, every billed answer is in the output once."""
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    fake.knobs.batch_seconds = 1.0
    n = 8
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"x{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 30
        while not _live(config):
            assert time.monotonic() < deadline, "no live remote batch"
            time.sleep(0.01)
        time.sleep(delay)
        with contextlib.suppress(openai.BadRequestError):  # too late: finalizing or ended
            oai.batches.cancel(created.id)
        batch = wait_for(oai, created.id, ("completed", "cancelled", "failed"), timeout=60)
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
    assert batch.status in ("completed", "cancelled"), batch
    _every_paid_answer_once(fake, out, errors)
    ids = Counter(line["custom_id"] for line in out + errors)
    assert sorted(ids) == sorted(f"x{i}" for i in range(n)) and set(ids.values()) == {1}
    assert batch.request_counts.completed == len(out)


def test_a_message_batch_whose_key_is_revoked_mid_run_keeps_the_answers_recorded_before(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """As for OpenAI, a Message Batch to a real-time Anthropic model: the batch ends with
    the answers recorded before the refusal `succeeded` in its results, the rest `errored`."""
    import anthropic

    slow = (
        f'[models.slow-claude]\nbackend = "anthropic"\nname = "claude-3-5-haiku"\n'
        f'base_url = "{fake.anthropic_url}"\nconcurrency = 1\n'
    )
    config = write_config(tmp_path, extra=provider_models(fake) + slow, run=RUN)
    fake.knobs.latency = 0.01
    n = 80  # a real-time run sends 64 requests per call: the first call's are recorded
    requests = [
        {
            "custom_id": f"v{i}",
            "params": {
                "model": "slow-claude",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
        }
        for i in range(n)
    ]
    with serving(config) as url:
        ant = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0)
        created = ant.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        deadline = time.monotonic() + 60
        while _succeeded(config, f"{created.id}.0") < 64:  # its one part's job
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fake.knobs.require_key = "another key"
        while (batch := ant.messages.batches.retrieve(created.id)).processing_status != "ended":
            assert time.monotonic() < deadline, batch.processing_status
            time.sleep(0.1)
        results = list(ant.messages.batches.results(created.id))
    succeeded = [r for r in results if r.result.type == "succeeded"]
    assert 64 <= len(succeeded) < n
    assert batch.request_counts.succeeded == len(succeeded)
    assert batch.request_counts.errored == n - len(succeeded)
    assert sorted(r.custom_id for r in results) == sorted(f"v{i}" for i in range(n))


def _succeeded(config: Path, job: str) -> int:
    """Items of the ledger job succeeded so far (0 before it exists)."""
    ledger = open_ledger(str(config.parent / "state" / "ledger.db"))
    try:
        found = ledger.get_job(job)
        return 0 if found is None else ledger.counts(found.id)["succeeded"]
    finally:
        ledger.close()
