"""`overnight serve` over provider models: a batch's lines sent to a provider's real-time API
or to its own batch API (for its discount), through the official `openai` and `anthropic`
SDKs as our clients and the repo's fake provider as the upstream. Every such batch is a
ledger job: retries, per-line errors, cost and the response cache apply."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import anthropic
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

from overnight.service.batches import stable_id
from overnight.store import open_ledger
from overnight.testing.fake_provider import FakeProvider

RUN = "batch_size = 4\nbackoff_base = 0.01\nbackoff_max = 0.05"


def provider_models(fake: FakeProvider) -> str:
    return f"""
[models.fast]
backend = "openai"
name = "gpt-4o-mini"
base_url = "{fake.openai_url}"

[models.cheap]
backend = "openai-batch"
name = "gpt-4o-mini"
base_url = "{fake.openai_url}"
poll_interval = 0.05

[models.embed]
backend = "openai"
name = "text-embedding-3-small"
base_url = "{fake.openai_url}"

[models.claude]
backend = "anthropic"
name = "claude-3-5-haiku"
base_url = "{fake.anthropic_url}"

[models.claude-batch]
backend = "anthropic-batch"
name = "claude-3-5-haiku"
base_url = "{fake.anthropic_url}"
poll_interval = 0.05
"""


def money(usd: float) -> str:
    """As the dashboard shows an amount."""
    return f"${usd:,.4f}" if usd < 1 else f"${usd:,.2f}"


def embed_line(custom_id: str, text: str, model: str = "embed") -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": model, "input": text},
    }


def job_counts(config: Path, job_name: str, ledger_url: str | None = None):
    ledger = open_ledger(ledger_url or str(config.parent / "state" / "ledger.db"))
    try:
        job = ledger.get_job(job_name)
        assert job is not None
        return ledger.counts(job.id)
    finally:
        ledger.close()


def run_batch(oai, lines: list[dict], endpoint: str = "/v1/chat/completions"):
    created = oai.batches.create(
        input_file_id=upload(oai, lines), endpoint=endpoint, completion_window="24h"
    )
    return wait_for(oai, created.id, ("completed", "failed", "cancelled"))


def test_a_batch_routed_to_a_real_time_provider(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    # A price high enough to show on the dashboard ($ with 4 decimals): [run] prices applies.
    (tmp_path / "prices.toml").write_text(
        '[models."gpt-4o-mini"]\ninput = 10000.0\noutput = 20000.0\ncontext = 128000\n'
    )
    config = write_config(
        tmp_path, extra=provider_models(fake), run=RUN + '\nprices = "prices.toml"'
    )
    fake.knobs.fail_next = 2  # two 500s: retried with the job's RetryPolicy
    texts = [f"ticket number {i}" for i in range(6)]
    lines = [chat_line(f"c{i}", t, model="fast") for i, t in enumerate(texts)]
    bad = chat_line("bad", "never sent", model="fast")
    bad["body"]["stream"] = True  # a batch cannot stream: this line alone fails
    with serving(config) as url:
        oai = client(url)
        batch = run_batch(oai, [*lines, bad])
        assert batch.status == "completed", batch.errors
        assert batch.request_counts.model_dump() == {"total": 7, "completed": 6, "failed": 1}
        out = {line["custom_id"]: line for line in lines_of(oai, batch.output_file_id)}
        assert sorted(out) == [f"c{i}" for i in range(6)]
        for i, text in enumerate(texts):
            response = out[f"c{i}"]["response"]
            assert response["status_code"] == 200
            body = response["body"]  # the provider's own answer body
            assert body["object"] == "chat.completion"
            assert body["model"].startswith("gpt-4o-mini")  # the provider's id, not "fast"
            assert body["choices"][0]["message"]["content"] == f"echo: {text}"
            assert body["usage"]["prompt_tokens"] > 0
        (error,) = lines_of(oai, batch.error_file_id)
        assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
        assert "stream" in error["response"]["body"]["error"]["message"]
        assert batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0
        assert fake.stats.status_counts[500] == 2
        assert fake.stats.requests["/v1/chat/completions"] == 6 + 2
        first = job_counts(config, batch.id)
        assert first.cost > 0.01 and first.saved == 0
        tokens = batch.usage.input_tokens, batch.usage.output_tokens
        assert first.cost == pytest.approx((tokens[0] * 10000 + tokens[1] * 20000) / 1e6)

        # The same lines again, in a new batch: answered from the response cache, sent
        # nowhere, costing nothing (what they would have cost shows as saved).
        again = run_batch(oai, lines)
        assert again.status == "completed" and again.request_counts.completed == 6
        assert fake.stats.requests["/v1/chat/completions"] == 6 + 2
        repeat = {line["custom_id"]: line for line in lines_of(oai, again.output_file_id)}
        assert {k: v["response"]["body"]["choices"] for k, v in repeat.items()} == {
            k: v["response"]["body"]["choices"] for k, v in out.items()
        }
        second = job_counts(config, again.id)
        assert second.cost == 0 and second.saved == pytest.approx(first.cost)

        # The dashboard shows what was spent and saved: both batches, the second all saved.
        page = urllib.request.urlopen(url.removesuffix("/v1") + "/dashboard/main").read().decode()
        assert f"cost {money(first.cost)}" in page and f"saved {money(second.saved)}" in page


def test_a_line_the_provider_refuses_goes_to_the_error_file_with_its_status(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    config = write_config(tmp_path, extra=provider_models(fake), run="batch_size = 1")
    fake.knobs.fail_status, fake.knobs.fail_next = 400, 1  # the first request sent
    with serving(config) as url:
        oai = client(url)
        batch = run_batch(oai, [chat_line(f"c{i}", f"text {i}", model="fast") for i in range(3)])
        assert batch.status == "completed", batch.errors
        assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
        (error,) = lines_of(oai, batch.error_file_id)
        assert error["response"]["status_code"] == 400
        assert error["response"]["body"]["error"]["type"] == "invalid_request_error"
        assert len(lines_of(oai, batch.output_file_id)) == 2
    assert fake.stats.requests["/v1/chat/completions"] == 3  # a 400 is not retried


def test_an_embeddings_batch_routed_to_a_provider(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    with serving(config) as url:
        oai = client(url)
        batch = run_batch(
            oai, [embed_line(f"e{i}", f"text {i}") for i in range(3)], "/v1/embeddings"
        )
        assert batch.status == "completed", batch.errors
        out = {line["custom_id"]: line for line in lines_of(oai, batch.output_file_id)}
        assert sorted(out) == ["e0", "e1", "e2"]
        body = out["e0"]["response"]["body"]
        assert body["object"] == "list" and body["model"].startswith("text-embedding-3-small")
        assert len(body["data"][0]["embedding"]) > 1
        assert fake.stats.requests["/v1/embeddings"] == 3


@pytest.mark.parametrize("ledger", ["sqlite", "postgresql"])
def test_a_batch_routed_to_the_providers_batch_api(
    tmp_path: Path, fake: FakeProvider, keys: None, ledger: str, request: pytest.FixtureRequest
) -> None:
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    url_of_ledger = None
    if ledger == "postgresql":
        url_of_ledger = request.getfixturevalue("pg_ledger_url")
        config.write_text(config.read_text().replace('"state/ledger.db"', f'"{url_of_ledger}"'))
    texts = [f"note {i}" for i in range(5)]
    lines = [chat_line(f"n{i}", t, model="cheap") for i, t in enumerate(texts)]
    with serving(config) as url:
        oai = client(url)
        batch = run_batch(oai, lines)
        assert batch.status == "completed", batch.errors
        assert batch.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
        out = {line["custom_id"]: line for line in lines_of(oai, batch.output_file_id)}
        for i, text in enumerate(texts):
            body = out[f"n{i}"]["response"]["body"]
            assert body["choices"][0]["message"]["content"] == f"echo: {text}"
        assert batch.error_file_id is None
        # One remote batch, every line in it once; nothing went through real time.
        assert fake.stats.batch_creations == 1
        assert sorted(fake.stats.batch_items.values()) == [1] * 5
        assert fake.stats.requests["/v1/chat/completions"] == 0
        counts = job_counts(config, batch.id, url_of_ledger)
        assert counts.cost > 0 and counts.saved == pytest.approx(counts.cost)  # half price

        again = run_batch(oai, lines)  # the cache answers: no second remote batch
        assert again.status == "completed" and again.request_counts.completed == 5
        assert fake.stats.batch_creations == 1
        assert job_counts(config, again.id, url_of_ledger).cost == 0


def test_a_batch_to_a_model_that_cannot_serve_its_endpoint_fails_validation(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    with serving(config) as url:
        oai = client(url)
        batch = run_batch(oai, [chat_line("a", "hi", model="claude")])
        assert batch.status == "failed"
        (error,) = batch.errors.data
        assert error.code == "unsupported_endpoint" and error.line == 1
        assert "/v1/messages" in error.message


def test_a_provider_model_is_not_served_in_real_time_here(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    with serving(config) as url:
        oai = client(url)
        with pytest.raises(Exception) as caught:
            oai.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
        assert getattr(caught.value, "status_code", None) == 400
        assert "batches" in str(caught.value)


@pytest.mark.parametrize("model", ["claude", "claude-batch"])
def test_an_anthropic_message_batch_routed_to_a_provider_model(
    tmp_path: Path, fake: FakeProvider, keys: None, model: str
) -> None:
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    requests = [
        {
            "custom_id": f"m{i}",
            "params": {
                "model": model,
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"question {i}"}],
            },
        }
        for i in range(4)
    ]
    requests.append(
        {
            "custom_id": "wrong",  # an OpenAI model: it does not serve /v1/messages
            "params": {"model": "fast", "max_tokens": 8, "messages": []},
        }
    )
    with serving(config) as url:
        ant = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="x", max_retries=0)
        created = ant.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        deadline = time.monotonic() + 120
        while (batch := ant.messages.batches.retrieve(created.id)).processing_status != "ended":
            assert time.monotonic() < deadline, batch.processing_status
            time.sleep(0.1)
        assert batch.request_counts.succeeded == 4 and batch.request_counts.errored == 1
        results = {r.custom_id: r.result for r in ant.messages.batches.results(created.id)}
        for i in range(4):
            result = results[f"m{i}"]
            assert result.type == "succeeded"
            message = result.message  # the provider's own message
            assert message.model.startswith("claude-3-5-haiku")
            assert message.content[0].text == f"echo: question {i}"  # type: ignore[union-attr]
            assert message.usage.input_tokens > 0
        assert results["wrong"].type == "errored"
        if model == "claude-batch":
            assert fake.stats.batch_creations == 1
            assert fake.stats.requests["/v1/messages"] == 0
        else:
            assert fake.stats.batch_creations == 0
            assert fake.stats.requests["/v1/messages"] == 4


def test_a_provider_model_without_its_key_stops_the_server_at_start(
    tmp_path: Path, fake: FakeProvider
) -> None:
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY",)}
    env["ANTHROPIC_API_KEY"] = ANT_KEY
    done = subprocess.run(
        [sys.executable, "-m", "overnight", "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert '[models."fast"]' in done.stderr and "OPENAI_API_KEY" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_server_killed_while_a_provider_batch_is_live_finishes_it_creating_it_once(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """SIGKILL the moment the upstream has created the remote batch, before the server read
    its id: the restarted server adopts that batch (found by its metadata) instead of paying
    for the lines again, and the output has every custom_id once."""
    n = 12
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANT_KEY}
    port = free_port()
    fake.knobs.batch_seconds = 1.0
    server = start_process(config, port, env)
    killed = []

    def kill_the_server(method: str, path: str) -> None:
        if method == "POST" and re.fullmatch(r"/v1/batches", path) and not killed:
            killed.append(path)
            os.kill(server.pid, signal.SIGKILL)

    fake.knobs.after_acting = kill_the_server
    try:
        oai = client(f"http://127.0.0.1:{port}/v1")
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"k{i}", f"line {i}", "cheap") for i in range(n)]),
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

    server = start_process(config, port, env)  # resumes the batch at start-up
    try:
        batch = wait_for(oai, created.id, ("completed", "failed"), timeout=120)
        assert batch.status == "completed", (batch.errors, server_log(config))
        assert batch.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
        out = lines_of(oai, batch.output_file_id)
        assert batch.error_file_id is None
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    ids = Counter(line["custom_id"] for line in out)
    assert sorted(ids) == sorted(f"k{i}" for i in range(n)) and set(ids.values()) == {1}
    assert {line["id"] for line in out} == {stable_id("batch_req_", created.id, c) for c in ids}
    # Nothing paid twice: one remote batch, every line in it once.
    assert fake.stats.batch_creations == 1
    assert sorted(set(fake.stats.batch_items.values())) == [1]


# -- a self-hosted LLM: backend = "transformers" ---------------------------------------------


@pytest.mark.slow
def test_a_chat_batch_on_a_self_hosted_transformers_model(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from test_transformers import need_smollm2

    need_smollm2()
    config = write_config(
        tmp_path, extra='[models.smol]\nbackend = "transformers"\nname = "smollm2"\n', run=RUN
    )
    lines = [chat_line(f"s{i}", text, model="smol") for i, text in enumerate(["Say hi.", "2+2?"])]
    for line in lines:
        line["body"]["max_tokens"] = 8
    bad = chat_line("bad", "x", model="smol")
    bad["body"]["messages"] = "not a list"
    with serving(config) as url:
        oai = client(url)
        batch = run_batch(oai, [*lines, bad])
        assert batch.status == "completed", batch.errors
        assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
        out = {line["custom_id"]: line for line in lines_of(oai, batch.output_file_id)}
        for cid in ("s0", "s1"):
            body = out[cid]["response"]["body"]  # the model's chat.completion
            assert body["object"] == "chat.completion" and body["model"] == "smollm2"
            assert isinstance(body["choices"][0]["message"]["content"], str)
            assert 0 < body["usage"]["completion_tokens"] <= 8
        (error,) = lines_of(oai, batch.error_file_id)
        assert error["custom_id"] == "bad" and error["response"]["status_code"] == 400
        assert "messages" in error["response"]["body"]["error"]["message"]
        assert batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0
        # Its own answers: nothing to send in real time to it here.
        with pytest.raises(Exception) as caught:
            oai.chat.completions.create(model="smol", messages=[{"role": "user", "content": "x"}])
        assert getattr(caught.value, "status_code", None) == 400


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ('backend = "transformers"\nname = "nowhere"', '[models."m"] name:'),
        ('backend = "transformers"', '[models."m"] name: a model folder'),
        ('backend = "openai-batch"\napi_key_env = "SERVE_TEST_NO_KEY"', "SERVE_TEST_NO_KEY"),
    ],
)
def test_start_up_checks_self_hosted_and_provider_models(
    tmp_path: Path, model: str, named: str
) -> None:
    from overnight.errors import JobFileError
    from overnight.service.config import check_models, load_config

    config = write_config(tmp_path, extra=f"[models.m]\n{model}\n")
    with pytest.raises(JobFileError) as caught:
        check_models(load_config(config))
    assert named in str(caught.value)


# Connections refused before the test lets the provider answer: in real time, past the 20 in a
# row that pause the job; the batch API's upload: its first try and two after a pause.
@pytest.mark.parametrize(("model", "refusals"), [("fast", 25), ("cheap", 3)])
def test_a_provider_that_cannot_be_reached_pauses_the_batch_until_it_is_back(
    tmp_path: Path,
    fake: FakeProvider,
    keys: None,
    model: str,
    refusals: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every connection reset: the batch's job pauses (items as they were) and runs again
    after a wait; once the provider answers, the batch completes with every line. (In real
    time the endpoint is down after 20 connection failures in a row: max_attempts is high
    enough here that no line uses up its attempts first.)"""
    run = "batch_size = 8\nmax_attempts = 10\nbackoff_base = 0.01\nbackoff_max = 0.05"
    config = write_config(tmp_path, extra=provider_models(fake), run=run)
    fake.knobs.refuse_connections = True
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"d{i}", f"down {i}", model) for i in range(8)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        # Tried, paused (not failed), tried again.
        paused = f"batch {created.id}: cannot reach"
        while fake.stats.connections_refused < refusals or paused not in caplog.text:
            assert time.monotonic() < deadline, "the batch was not paused"
            time.sleep(0.05)
        assert "trying again in" in caplog.text
        assert oai.batches.retrieve(created.id).status == "in_progress"
        fake.knobs.refuse_connections = False
        batch = wait_for(oai, created.id, ("completed", "failed"), timeout=120)
        assert batch.status == "completed", batch.errors
        assert batch.request_counts.model_dump() == {"total": 8, "completed": 8, "failed": 0}
        assert batch.error_file_id is None


def test_cancelling_a_batch_cancels_its_remote_batch(
    tmp_path: Path, fake: FakeProvider, keys: None
) -> None:
    """The remote batch is cancelled at the provider too; what it finished anyway is in the
    output file, the rest in the error file, every custom_id once."""
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    fake.knobs.batch_seconds = 60
    n = 6
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"x{i}", f"text {i}", "cheap") for i in range(n)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        while fake.stats.batch_creations < 1:
            assert time.monotonic() < deadline, "no remote batch"
            time.sleep(0.05)
        assert oai.batches.cancel(created.id).status == "cancelling"
        batch = wait_for(oai, created.id, ("cancelled", "completed", "failed"), timeout=60)
        assert batch.status == "cancelled", batch.errors
        out = lines_of(oai, batch.output_file_id) + lines_of(oai, batch.error_file_id)
    remote = oai_remote_batches(fake)
    assert [b["status"] for b in remote] == ["cancelled"]
    ids = Counter(line["custom_id"] for line in out)
    assert sorted(ids) == sorted(f"x{i}" for i in range(n)) and set(ids.values()) == {1}
    assert batch.request_counts.completed + batch.request_counts.failed == n


def oai_remote_batches(fake: FakeProvider) -> list[dict]:
    import openai

    upstream = openai.OpenAI(base_url=fake.openai_url, api_key=KEY, max_retries=0)
    return [b.model_dump() for b in upstream.batches.list()]


@pytest.mark.slow
def test_a_server_killed_while_an_anthropic_batch_is_live_finishes_it_creating_it_once(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """As above, for a Message Batch to an anthropic-batch model: the remote Message Batch
    created just before the kill is adopted after the restart, never created again."""
    n = 8
    config = write_config(tmp_path, extra=provider_models(fake), run=RUN)
    env = {**os.environ, "OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": ANT_KEY}
    port = free_port()
    fake.knobs.batch_seconds = 1.0
    server = start_process(config, port, env)
    killed = []

    def kill_the_server(method: str, path: str) -> None:
        if method == "POST" and path == "/v1/messages/batches" and not killed:
            killed.append(path)
            os.kill(server.pid, signal.SIGKILL)

    fake.knobs.after_acting = kill_the_server
    ant = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0)
    requests = [
        {
            "custom_id": f"a{i}",
            "params": {
                "model": "claude-batch",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"line {i}"}],
            },
        }
        for i in range(n)
    ]
    try:
        created = ant.messages.batches.create(requests=requests)  # type: ignore[arg-type]
        assert server.wait(60) == -signal.SIGKILL
    finally:
        fake.knobs.after_acting = None
        if server.poll() is None:
            server.kill()
            server.wait(30)
    assert killed and fake.stats.batch_creations == 1

    server = start_process(config, port, env)
    try:
        deadline = time.monotonic() + 120
        while (batch := ant.messages.batches.retrieve(created.id)).processing_status != "ended":
            assert time.monotonic() < deadline, server_log(config)
            time.sleep(0.1)
        results = list(ant.messages.batches.results(created.id))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    assert batch.request_counts.succeeded == n, server_log(config)
    ids = Counter(r.custom_id for r in results)
    assert sorted(ids) == sorted(f"a{i}" for i in range(n)) and set(ids.values()) == {1}
    assert all(r.result.type == "succeeded" for r in results)
    assert fake.stats.batch_creations == 1
    assert sorted(set(fake.stats.batch_items.values())) == [1]


def test_tenants_do_not_share_cached_answers(
    tmp_path: Path, fake: FakeProvider, keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is per tenant: the same lines from another key are sent (and paid) again,
    so no tenant learns what another asked; from the same key they are not."""
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:team-a,key-b:team-b")
    auth = '[auth]\nkeys_env = "SERVE_TEST_KEYS"\n'
    config = write_config(tmp_path, extra=auth + provider_models(fake), run=RUN)
    lines = [chat_line(f"t{i}", f"shared {i}", model="fast") for i in range(3)]
    with serving(config) as url:
        for key, sent in (("key-a", 3), ("key-a", 3), ("key-b", 6)):
            batch = run_batch(client(url, key), lines)
            assert batch.status == "completed" and batch.request_counts.completed == 3
            assert fake.stats.requests["/v1/chat/completions"] == sent
