"""Real-time LLM jobs end to end: overnight.Job → official SDK → fake provider over HTTP."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import orjson
import pytest
from llm_helpers import ANT_KEY, KEY, SCHEMA, llm_job, read_jsonl, write_records

import overnight
from overnight.errors import UsageError
from overnight.testing.fake_provider import FakeProvider

pytestmark = pytest.mark.usefixtures("keys")


def url(fake: FakeProvider, backend: str) -> str:
    return fake.anthropic_url if "anthropic" in backend else fake.openai_url


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
@pytest.mark.parametrize("kind", ["generate", "extract", "classify"])
def test_kinds_end_to_end(tmp_path: Path, fake: FakeProvider, backend: str, kind: str) -> None:
    write_records(tmp_path, 12)
    (tmp_path / "schema.json").write_bytes(orjson.dumps(SCHEMA))
    task = {
        "generate": {"system": "You triage tickets for {{ id }}."},
        "extract": {"schema": "schema.json"},
        "classify": {"labels": ["billing", "bug", "other"]},
    }[kind]
    job = llm_job(tmp_path, backend, url(fake, backend), kind=kind, task=task)
    report = job.run()
    assert report.exit_code == 0, report.to_dict()
    rows = read_jsonl(tmp_path / "job.out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12)]
    for r in rows:
        assert r["usage"]["input_tokens"] > 0 and r["usage"]["output_tokens"] > 0
        if kind == "generate":
            assert r["output"].startswith("echo: ticket")
        elif kind == "extract":
            assert set(r["output"]) == {"topic", "urgent"}
        else:
            assert r["output"] in ("billing", "bug", "other")
    c = report.counts
    assert c.input_tokens > 0 and c.cost > 0  # priced: gpt-4o-mini / claude-3-5-haiku
    endpoint = "/v1/messages" if backend == "anthropic" else "/v1/chat/completions"
    assert fake.stats.requests[endpoint] == 12


def test_embed_and_passthrough(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 5)
    job = llm_job(
        tmp_path,
        "openai",
        fake.openai_url,
        kind="embed",
        model={"name": "text-embedding-3-small", "params": {}},
    )
    assert job.run().exit_code == 0
    rows = read_jsonl(tmp_path / "job.out.jsonl")
    assert len(rows[0]["output"]) == 8
    assert "usage" in rows[0]

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = llm_job(
        tmp_path,
        "openai",
        fake.openai_url,
        kind="embed",
        name="vec",
        model={"name": "text-embedding-3-small", "params": {}},
    )
    parquet.spec = parquet.spec.model_copy(
        update={"output": parquet.spec.output.model_copy(update={"path": "vec.parquet"})}
    )
    assert parquet.run().exit_code == 0
    table = pq.read_table(tmp_path / "vec.parquet")
    assert table.schema.field("output").type == pa.list_(pa.float32(), 8)
    assert table.column("output").to_pylist()[0] == pytest.approx(rows[0]["output"], rel=1e-6)

    # An OpenAI batch input file, run as is in real time: ids come from its custom_id.
    lines = [
        {
            "custom_id": "a-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        },
        {
            "custom_id": "a-2",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": "x"},
        },
        {"custom_id": "a-3", "method": "GET", "url": "/v1/chat/completions", "body": {}},
    ]
    (tmp_path / "batch.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    job = llm_job(
        tmp_path, "openai", fake.openai_url, kind="passthrough", name="pt", model={"name": None}
    )
    job.spec = job.spec.model_copy(
        update={"source": job.spec.source.model_copy(update={"path": "batch.jsonl", "id": None})}
    )
    report = job.run()
    assert report.exit_code == 3  # the GET line is an input error
    rows = {r["custom_id"]: r for r in read_jsonl(tmp_path / "pt.out.jsonl")}
    assert rows["a-1"]["output"]["object"] == "chat.completion"
    assert rows["a-2"]["output"]["object"] == "list"
    (failure,) = job.failures()
    assert failure.custom_id == "a-3" and "method must be POST" in failure.message


def test_transient_errors_retried_and_429_honoured(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 30)
    fake.knobs.fail_next = 3
    fake.knobs.malformed_next = 2
    fake.knobs.throttle_next = 4
    fake.knobs.throttle_seconds = 0.4
    job = llm_job(
        tmp_path, "openai", fake.openai_url, model={"concurrency": 8}, run={"max_attempts": 6}
    )
    t0 = time.monotonic()
    report = job.run()
    assert report.exit_code == 0, report.to_dict()
    assert time.monotonic() - t0 >= 0.4  # retry-after was waited for
    assert fake.stats.status_counts[500] == 3 and fake.stats.status_counts[429] == 4
    assert len(read_jsonl(tmp_path / "job.out.jsonl")) == 30


def test_retry_after_holds_back_every_request(tmp_path: Path, fake: FakeProvider) -> None:
    """A server's wait holds back every request to the endpoint, not only the one it answered:
    after the first 429 (retry-after 2 s) nothing new arrives for 2 s; only the requests
    already sent when it came back (concurrency - 1 of them) may land inside it. (Before: 59
    of 60 requests arrived inside the wait.)"""
    write_records(tmp_path, 40)
    fake.knobs.throttle_next, fake.knobs.throttle_seconds = 3, 2.0
    job = llm_job(tmp_path, "openai", fake.openai_url, model={"concurrency": 4})
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 40
    seen = fake.stats.realtime
    first = min(s.answered for s in seen if s.status == 429)
    inside = [s for s in seen if first < s.arrived < first + 2.0]
    assert len(inside) <= 3, [(round(s.arrived - first, 3), s.status) for s in inside]
    assert sum(s.arrived >= first + 2.0 for s in seen) >= 40 - 3


def ledger_attempts(tmp_path: Path) -> dict[str, int]:
    db = sqlite3.connect(tmp_path / ".overnight" / "ledger.db")
    try:
        return dict(db.execute("SELECT custom_id, attempts FROM items"))
    finally:
        db.close()


def test_429s_do_not_fail_items_and_attempts_are_the_requests_sent(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """max_attempts = 1, and 429s on the way: a rate-limited request is not a failed attempt,
    so every item succeeds (before: the first 429 gave up). The ledger's attempts add up to
    the requests the server saw."""
    write_records(tmp_path, 10)
    fake.knobs.throttle_next, fake.knobs.throttle_seconds = 6, 0.05
    job = llm_job(
        tmp_path, "openai", fake.openai_url, model={"concurrency": 2}, run={"max_attempts": 1}
    )
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 10
    attempts = ledger_attempts(tmp_path)
    assert sum(attempts.values()) == len(fake.stats.realtime) == 16
    assert all(n >= 1 for n in attempts.values())


def test_gave_up_after_n_attempts_is_the_ledger_count(tmp_path: Path, fake: FakeProvider) -> None:
    """Reported "gave up after 3 attempts" while the ledger said 1: now both say the
    requests sent, 429s included (and named)."""
    write_records(tmp_path, 1)
    fake.knobs.throttle_next, fake.knobs.throttle_seconds = 1, 0.0
    fake.knobs.fail_next = 100
    job = llm_job(tmp_path, "openai", fake.openai_url, run={"max_attempts": 3})
    report = job.run()
    assert report.counts.failed == 1
    (failure,) = job.failures()
    assert failure.attempts == 4 == len(fake.stats.realtime)
    assert failure.message.startswith(
        "gave up after 4 attempts (1 answered 429, not counted toward max_attempts): HTTP 500"
    )
    # A second run sends nothing more: the item failed.
    job.run()
    assert len(fake.stats.realtime) == 4
    # `retry` sends it again (counting from 0): a 429, then the answer.
    fake.knobs.throttle_next, fake.knobs.fail_next = 1, 0
    assert job.retry().moved == 1
    assert job.run().counts["succeeded"] == 1
    assert ledger_attempts(tmp_path) == {"r0": 2} and len(fake.stats.realtime) == 6


def request_windows(times: list[float], amounts: list[int], seconds: float) -> int:
    """The most of `amounts` that arrived within any `seconds` (windows opening at each
    arrival)."""
    pairs = sorted(zip(times, amounts, strict=True))
    return max(sum(n for t, n in pairs if start <= t < start + seconds) for start, _ in pairs)


def test_rpm_is_held_at_the_server(tmp_path: Path, fake: FakeProvider) -> None:
    """rpm 600: 10 a second, a second's worth (10) at once at most. Measured where it
    matters, at the server: 40 requests take at least 3 s, and no second holds more than
    10 + 10 (a burst, then the rate), give or take 0.5 s of transport jitter (the first
    burst opens 10 connections and may land late, beside the requests sent after it)."""
    write_records(tmp_path, 40)
    job = llm_job(tmp_path, "openai", fake.openai_url, model={"concurrency": 16, "rpm": 600})
    assert job.run().exit_code == 0
    times = [s.arrived for s in fake.stats.realtime]
    assert len(times) == 40
    assert max(times) - min(times) >= 3.0 - 0.5  # (40 - 10) / 10 s; 0.5 s for jitter
    assert request_windows(times, [1] * 40, 1.0) <= 10 + 10 + 5  # unlimited: 40


def test_tpm_is_held_at_the_server(tmp_path: Path, fake: FakeProvider) -> None:
    """tpm 6000: 100 tokens a second, 100 at once at most, counted in the tokens the server
    billed (the estimate, with max_tokens, is corrected by each answer's usage)."""
    write_records(tmp_path, 20)
    job = llm_job(tmp_path, "openai", fake.openai_url, model={"concurrency": 16, "tpm": 6000})
    assert job.run().exit_code == 0
    seen = fake.stats.realtime
    times, tokens = [s.arrived for s in seen], [s.tokens for s in seen]
    total, biggest = sum(tokens), max(tokens)
    assert len(seen) == 20 and total > 300
    assert max(times) - min(times) >= (total - 100 - biggest) / 100
    assert request_windows(times, tokens, 1.0) <= 100 + 100 + biggest


def test_client_errors_fail_the_item_with_the_message(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 3)
    job = llm_job(tmp_path, "openai", fake.openai_url, model={"name": "missing-model"})
    report = job.run()
    assert report.counts.failed == 3 and report.exit_code == 3
    f = job.failures()[0]
    assert f.error_class == "http_404" and "does not exist" in f.message
    assert fake.stats.status_counts[404] == 3  # not retried


def test_repair_turns_invalid_answers_valid(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 20)
    (tmp_path / "schema.json").write_bytes(orjson.dumps(SCHEMA))
    fake.knobs.invalid_json_rate = 0.5
    job = llm_job(
        tmp_path,
        "openai",
        fake.openai_url,
        kind="extract",
        name="norepair",
        task={"schema": "schema.json"},
    )
    bad = job.run().counts["invalid"]
    assert bad > 0
    assert all("schema" in f.message for f in job.failures())
    job = llm_job(
        tmp_path,
        "openai",
        fake.openai_url,
        kind="extract",
        name="repair",
        task={"schema": "schema.json", "repair": True},
    )
    report = job.run()
    assert report.counts["invalid"] == 0 and report.counts["succeeded"] == 20


def test_endpoint_down_pauses_then_resumes(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 30)
    job = llm_job(
        tmp_path,
        "openai",
        "http://127.0.0.1:9/v1",
        model={"concurrency": 4},
        run={"max_attempts": 2},
    )
    report = job.run()
    assert report.stop_reason and "cannot reach http://127.0.0.1:9/v1" in report.stop_reason
    assert report.exit_code == 3 and report.counts.failed == 0
    assert report.counts["succeeded"] == 0
    # The endpoint is back (the job file now names the real one): the rerun finishes.
    job = llm_job(tmp_path, "openai", fake.openai_url, model={"concurrency": 4})
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 30


def test_cache_shared_across_jobs_and_keyed_on_every_ingredient(
    tmp_path: Path, fake: FakeProvider
) -> None:
    write_records(tmp_path, 10)
    run = {"cache": "shared-cache.db"}
    llm_job(tmp_path, "openai", fake.openai_url, name="first", run=run).run()
    sent = fake.stats.requests["/v1/chat/completions"]
    assert sent == 10
    second = llm_job(tmp_path, "openai", fake.openai_url, name="second", run=run).run()
    assert fake.stats.requests["/v1/chat/completions"] == sent  # all from the cache
    assert second.counts.cost == 0 and second.counts.saved > 0
    # A different template, temperature or system prompt is a different request.
    for i, change in enumerate(
        [
            {"task": {"text": "Ticket: {{ text }}"}},
            {"model": {"params": {"temperature": 0.5}}},
            {"task": {"system": "Be brief."}},
        ]
    ):
        llm_job(tmp_path, "openai", fake.openai_url, name=f"v{i}", run=run, **change).run()
        assert fake.stats.requests["/v1/chat/completions"] == sent + 10 * (i + 1)


def test_a_shared_cache_never_serves_one_endpoints_answers_to_another(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The same requests to another base_url (a fake or a proxy first, the real provider next)
    are sent again: a shared cache is keyed by the endpoint. A trailing slash is the same
    endpoint."""
    write_records(tmp_path, 10)
    run = {"cache": "shared-cache.db"}
    llm_job(tmp_path, "openai", fake.openai_url, name="first", run=run).run()
    assert fake.stats.requests["/v1/chat/completions"] == 10
    llm_job(tmp_path, "openai", fake.openai_url + "/", name="same", run=run).run()
    assert fake.stats.requests["/v1/chat/completions"] == 10
    other = fake.openai_url.replace("127.0.0.1", "localhost")
    report = llm_job(tmp_path, "openai", other, name="other", run=run).run()
    assert report.counts["succeeded"] == 10
    assert fake.stats.requests["/v1/chat/completions"] == 20


def test_identical_requests_in_one_job_sent_once(tmp_path: Path, fake: FakeProvider) -> None:
    recs = [{"id": f"r{i}", "text": "same text"} for i in range(6)]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    report = llm_job(tmp_path, "openai", fake.openai_url).run()
    assert report.counts["succeeded"] == 6
    assert fake.stats.requests["/v1/chat/completions"] == 1
    assert report.counts.saved > 0  # five answers cost nothing


def test_max_cost_stops_and_resumes(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 200)
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-4o-mini"]\ninput = 1000.0\noutput = 1000.0\n')
    job = llm_job(
        tmp_path,
        "openai",
        fake.openai_url,
        model={"concurrency": 4},
        run={"max_cost": 0.5, "prices": "prices.toml"},
    )
    report = job.run()
    assert report.exit_code == 3 and "max_cost reached" in report.stop_reason
    done = report.counts["succeeded"]
    assert 0 < done < 200
    assert fake.stats.requests["/v1/chat/completions"] == done
    spent = report.counts.cost
    assert spent >= 0.5
    # Run again with the same limit: it is spent already, nothing is sent.
    report = job.run()
    assert report.exit_code == 3 and "max_cost reached" in report.stop_reason
    assert fake.stats.requests["/v1/chat/completions"] == done
    # A higher limit: the run resumes where it stopped and finishes, each record sent once.
    job = llm_job(
        tmp_path,
        "openai",
        fake.openai_url,
        model={"concurrency": 4},
        run={"max_cost": 1000.0, "prices": "prices.toml"},
    )
    report = job.run()
    assert report.exit_code == 0 and report.stop_reason is None
    assert report.counts["succeeded"] == 200 and report.counts.cost > spent
    assert fake.stats.requests["/v1/chat/completions"] == 200
    assert [r["id"] for r in read_jsonl(tmp_path / "job.out.jsonl")] == [
        f"r{i}" for i in range(200)
    ]


def test_missing_key_is_exit_2_before_ingest(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_records(tmp_path, 3)
    monkeypatch.delenv("OPENAI_API_KEY")
    job = llm_job(tmp_path, "openai", fake.openai_url)
    with pytest.raises(UsageError, match="OPENAI_API_KEY") as info:
        job.run()
    assert info.value.exit_code == 2
    assert not (tmp_path / ".overnight").exists()


def test_secrets_never_stored(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 4)
    fake.knobs.require_key = "something-else"  # every request: 401 that echoes nothing
    with pytest.raises(overnight.UsageError, match="refused the API key in OPENAI_API_KEY"):
        llm_job(tmp_path, "openai", fake.openai_url, name="a").run()
    with pytest.raises(overnight.UsageError, match="refused the API key in ANTHROPIC_API_KEY"):
        llm_job(tmp_path, "anthropic", fake.anthropic_url, name="b").run()
    assert fake.stats.status_counts[401] <= 8  # at most what was in flight at the first
    blobs = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    for key in (KEY, ANT_KEY):
        assert not any(key.encode() in b for b in blobs)
    db = sqlite3.connect(tmp_path / ".overnight" / "ledger.db")
    states = {r[0] for r in db.execute("SELECT state FROM items")}
    assert states <= {"pending"}  # nothing failed: a rerun with the right key sends them


def test_estimate_needs_no_key_and_sends_nothing(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_records(tmp_path, 50)
    monkeypatch.delenv("OPENAI_API_KEY")
    est = llm_job(tmp_path, "openai", fake.openai_url).estimate()
    assert est.items == 50 and est.input_tokens > 50 * 5
    assert est.output_tokens == 50 * 64  # max_tokens bounds it
    assert est.cost_batch == pytest.approx(est.cost_realtime / 2)
    assert sum(fake.stats.requests.values()) == 0
    assert any("batch API" in line for line in est.lines())


def test_a_repeated_id_is_refused_before_it_is_sent(tmp_path: Path, fake: FakeProvider) -> None:
    """A record whose id an earlier one has is refused as a repeat; it used to be sent, paid
    for, and its answer thrown away at the commit. Repeats of a committed item (the ledger's
    ids) and of an earlier record in the same window alike."""
    recs = [{"id": f"r{i}", "text": f"text {i}"} for i in range(120)]
    recs += [
        {"id": "r5", "text": "another text for r5"},  # line 121: r5 committed long before
        {"id": "r200", "text": "new"},
        {"id": "r200", "text": "new again"},  # line 123: its twin one line up
    ]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    report = llm_job(tmp_path, "openai", fake.openai_url).run()
    assert report.counts["succeeded"] == 121
    assert fake.stats.requests["/v1/chat/completions"] == 121  # no request for a repeat
    errors = read_jsonl(tmp_path / "job.out.errors.jsonl")
    assert [e["message"] for e in errors] == [
        "line 121: duplicate id 'r5' (first seen on line 6)",
        "line 123: duplicate id 'r200' (first seen on line 122)",
    ]
    out = {r["id"]: r for r in read_jsonl(tmp_path / "job.out.jsonl")}
    assert len(out) == 121 and "another" not in str(out["r5"])
