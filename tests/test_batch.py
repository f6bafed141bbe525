"""Provider batch backends end to end: overnight.Job → official SDK → fake provider over HTTP.

The fake counts every submission of every custom_id (`stats.batch_items`): the tests hold
overnight to "never submit an item again while a batch holding it is alive"."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2 as httpx
import orjson
import pytest
from llm_helpers import ANT_KEY, KEY, llm_job, read_jsonl, write_records

import overnight
from overnight.llm.batch import AnthropicBatch, JobTag, Line, OpenAIBatch
from overnight.testing.fake_provider import FakeProvider

pytestmark = pytest.mark.usefixtures("keys")


def tag_prefix(job) -> str:
    """The `<identity key>-<token>-` every custom_id of the job starts with."""
    with job.ledger() as ledger:
        token = ledger.get_job(job.name).token
    return f"{job.identity_key}-{token}-"


def when(condition, then, timeout: float = 20.0) -> threading.Thread:
    """Run `then()` once `condition()` holds (a watcher thread)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                then()
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_batches_end_to_end(tmp_path: Path, fake: FakeProvider, backend: str) -> None:
    write_records(tmp_path, 23)
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = llm_job(tmp_path, backend, url, model={"max_requests_per_batch": 10})
    report = job.run()
    assert report.exit_code == 0, report.to_dict()
    rows = read_jsonl(tmp_path / "job.out.jsonl")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(23)]
    assert all(r["output"].startswith("echo: ticket") for r in rows)
    assert fake.stats.batch_creations == 3  # 10 + 10 + 3
    assert max(fake.stats.batch_items.values()) == 1  # no item submitted twice
    assert [b["requests"] for b in report.remote_batches] == [10, 10, 3]
    c = report.counts
    assert c.cost > 0 and c.list_cost == pytest.approx(2 * c.cost)  # half price
    status = job.status()
    assert len(status.remote_batches) == 3 and status.counts.saved > 0


def test_expired_batch_keeps_its_finished_half(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 10)
    fake.knobs.expire_batches = True
    fake.knobs.expire_fraction = 0.5
    when(
        lambda: fake.stats.batch_creations >= 1,
        lambda: setattr(fake.knobs, "expire_batches", False),
    )
    report = llm_job(tmp_path, "openai-batch", fake.openai_url).run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 10
    assert fake.stats.batch_creations == 2
    counts = sorted(fake.stats.batch_items.values())
    assert counts == [1] * 5 + [2] * 5  # only the unfinished half went again
    statuses = [b["status"] for b in report.remote_batches]
    assert statuses == ["expired", "completed"]


def test_expiry_every_time_gives_up_after_max_attempts(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 4)
    fake.knobs.expire_batches = True
    fake.knobs.expire_fraction = 0.0
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, run={"max_attempts": 2})
    report = job.run()
    assert report.counts.failed == 4 and fake.stats.batch_creations == 2
    assert all("gave up after 2 batches" in f.message for f in job.failures())


def test_whole_batch_validation_failure_is_reported_per_line(
    tmp_path: Path, fake: FakeProvider
) -> None:
    write_records(tmp_path, 6)
    fake.knobs.fail_validation = True  # the first batch fails validation, naming line 1
    job = llm_job(tmp_path, "openai-batch", fake.openai_url)
    report = job.run()
    assert report.counts["succeeded"] == 5 and report.counts.failed == 1
    (f,) = job.failures()
    assert f.custom_id == "r0" and "line 1 of the batch file" in f.message
    assert fake.stats.batch_creations == 2


def test_lines_of_a_failed_batch_with_no_attempt_left_fail_as_no_result(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """max_attempts = 1: the lines a batch that failed validation did not name have had their
    one attempt (RetryPolicy: exhausted); they fail, saying so, instead of going back."""
    write_records(tmp_path, 6)
    fake.knobs.fail_validation = True
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, run={"max_attempts": 1})
    assert job.run().counts.failed == 6 and fake.stats.batch_creations == 1
    failures = {f.custom_id: f for f in job.failures()}
    assert "line 1 of the batch file" in failures.pop("r0").message
    assert {f.error_class for f in failures.values()} == {"no_result"}
    assert all("no result after 1 batches (failed" in f.message for f in failures.values())


def test_413_splits_the_batch(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 16)
    fake.knobs.max_batch_bytes = 1500  # about 6 requests
    for backend, url in (
        ("openai-batch", fake.openai_url),
        ("anthropic-batch", fake.anthropic_url),
    ):
        report = llm_job(tmp_path, backend, url, name=backend).run()
        assert report.exit_code == 0 and report.counts["succeeded"] == 16
        assert any(b["status"] == "split" for b in report.remote_batches)
    assert max(fake.stats.batch_items.values()) <= 2  # once per provider


def test_anthropic_ids_are_mapped_and_back(tmp_path: Path, fake: FakeProvider) -> None:
    ids = ["plain_id-1", "has.dots", "has space", "x" * 80, "ovn_5", "ünïcode"]
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": i, "text": f"t {n}"}) + b"\n" for n, i in enumerate(ids))
    )
    job = llm_job(tmp_path, "anthropic-batch", fake.anthropic_url)
    report = job.run()
    assert report.exit_code == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "job.out.jsonl")] == ids
    # Every request goes as <identity key>-<job token>-<seq>, mapped back by seq.
    sent = set(fake.stats.batch_items)
    assert sent == {f"{tag_prefix(job)}{seq}" for seq in range(6)}


def test_cancel_cancels_remote_batches_and_keeps_finished(
    tmp_path: Path, fake: FakeProvider
) -> None:
    write_records(tmp_path, 10)
    fake.knobs.batch_seconds = 30
    job = llm_job(tmp_path, "openai-batch", fake.openai_url)
    when(lambda: fake.stats.batch_creations >= 1 and job.status().remote_batches, job.cancel)
    report = job.run()
    assert report.cancelled and report.exit_code == 3
    # The fake finishes half of a cancelled batch: kept; the rest is cancelled.
    assert report.counts["succeeded"] == 5 and report.counts["cancelled"] == 5
    assert [b["status"] for b in report.remote_batches] == ["cancelled"]
    # Running again resumes the cancelled items, in a new batch.
    fake.knobs.batch_seconds = 0.1
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 10


def test_auto_with_deadline_finishes_in_real_time(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 10)
    fake.knobs.batch_seconds = 60  # the batch API will not make it
    deadline = (datetime.now(UTC) + timedelta(seconds=20)).isoformat()
    job = llm_job(
        tmp_path,
        "auto",
        fake.openai_url,
        model={"provider": "openai"},
        run={"deadline": deadline, "deadline_margin": 19.0},
    )
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 10
    d = report.deadline
    assert d["held"] and d["switched_to_realtime"]
    # Half came from the cancelled batch at half price, half in real time.
    assert fake.stats.requests["/v1/chat/completions"] == 5
    assert 0 < report.counts.saved < report.counts.list_cost


def test_batch_max_cost_stops_submitting_and_resumes_with_a_higher_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    write_records(tmp_path, 30)
    # $1 per 1,000 tokens; a batch of 10 is at most ~10 × (12 + 64) tokens = ~$0.38 at
    # half price: two batches fit under $0.9, the third could pass it.
    (tmp_path / "prices.toml").write_text('[models."gpt-4o-mini"]\ninput = 1e3\noutput = 1e3\n')
    job = llm_job(
        tmp_path,
        "openai-batch",
        fake.openai_url,
        model={"max_requests_per_batch": 10},
        run={"max_cost": 0.9, "prices": "prices.toml"},
    )
    report = job.run()
    assert "max_cost" in report.stop_reason and report.exit_code == 3
    assert fake.stats.batch_creations == 2 and report.counts["pending"] == 10
    assert report.counts.cost <= 0.9
    spent = report.counts.cost
    # A higher limit: the run resumes where it stopped, and sends only what was left.
    job = llm_job(
        tmp_path,
        "openai-batch",
        fake.openai_url,
        model={"max_requests_per_batch": 10},
        run={"max_cost": 2.0, "prices": "prices.toml"},
    )
    report = job.run()
    assert report.exit_code == 0 and report.stop_reason is None, report.to_dict()
    assert report.counts["succeeded"] == 30 and fake.stats.batch_creations == 3
    assert len(fake.stats.batch_items) == 30 and set(fake.stats.batch_items.values()) == {1}
    assert spent < report.counts.cost <= 2.0


def test_detach_submits_and_a_later_run_collects(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 12)
    fake.knobs.batch_seconds = 30
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, model={"max_requests_per_batch": 5})
    report = job.run(detach=True)
    assert report.detached and report.exit_code == 0
    assert report.counts["submitted"] == 12 and fake.stats.batch_creations == 3
    assert not (tmp_path / "job.out.jsonl").exists()
    fake.complete_batches()
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 12
    assert fake.stats.batch_creations == 3  # re-attached, nothing created again


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_batch_repair_asks_again_in_the_next_batch(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    from llm_helpers import SCHEMA

    write_records(tmp_path, 20)
    (tmp_path / "schema.json").write_bytes(orjson.dumps(SCHEMA))
    fake.knobs.invalid_json_rate = 0.5
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = llm_job(
        tmp_path, backend, url, kind="extract", task={"schema": "schema.json", "repair": True}
    )
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 20
    assert fake.stats.batch_creations == 2  # the answers, then the repairs
    twice = sum(1 for n in fake.stats.batch_items.values() if n == 2)
    assert 0 < twice < 20  # only the invalid ones were asked again


def test_a_batch_refused_as_a_whole_fails_its_lines(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 8)
    fake.knobs.max_batch_requests = 5  # the provider's limit is lower than ours
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, model={"max_requests_per_batch": 6})
    report = job.run()
    assert report.counts.failed == 6 and report.counts["succeeded"] == 2
    assert "the provider refused the batch: HTTP 400" in job.failures()[0].message
    # The fix is the job file's limit; retry sends them again, in batches that fit.
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, model={"max_requests_per_batch": 5})
    job.retry()
    assert job.run().counts["succeeded"] == 8


# -- a create whose answer is lost, and cancels that race a create ----------------------------


class LossyCreate(httpx.HTTPTransport):
    """The first batch create either reaches the provider and its answer is lost (`lost`: a
    502 comes back instead, as from a proxy), or is throttled before it gets there (`429`)."""

    def __init__(self, path: str, mode: str) -> None:
        super().__init__()
        self.path, self.mode, self.left = path, mode, 1

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        hit = request.method == "POST" and request.url.path == self.path and self.left > 0
        if hit and self.mode == "429":
            self.left -= 1
            return httpx.Response(429, headers={"retry-after": "0"}, request=request)
        response = super().handle_request(request)
        if hit:
            self.left -= 1
            response.read()
            error = {"error": {"message": "bad gateway", "type": "api_error"}}
            return httpx.Response(502, headers={"retry-after": "0"}, json=error, request=request)
        return response


@pytest.mark.parametrize("mode", ["lost", "429", "reset"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_create_is_never_retried_blindly(fake: FakeProvider, provider: str, mode: str) -> None:
    """Neither SDK makes a create idempotent: its own retry after a lost answer would create
    the batch twice and pay every line twice. The service looks for the batch first."""
    if provider == "openai":
        svc: OpenAIBatch | AnthropicBatch = OpenAIBatch(
            api_key=KEY, base_url=fake.openai_url, max_requests=10, max_bytes=10**6, timeout=1
        )
        path, endpoint, body = "/v1/batches", "/v1/chat/completions", {"model": "gpt-4o-mini"}
    else:
        svc = AnthropicBatch(
            api_key=ANT_KEY,
            base_url=fake.anthropic_url,
            max_requests=10,
            max_bytes=10**6,
            timeout=1,
        )
        path, endpoint = "/v1/messages/batches", "/v1/messages"
        body = {"model": "claude-3-5-haiku", "max_tokens": 8}
    transport = LossyCreate(path, mode if mode != "reset" else "none")
    svc.client = svc.client.with_options(http_client=httpx.Client(transport=transport))
    if mode == "reset":  # the provider acts, then the connection is reset: no answer at all
        transport.left = 0
        fake.knobs.reset_creates = 1
    body["messages"] = [{"role": "user", "content": "hi"}]
    tag = JobTag("job", "0123456789ab", "tok0000000")
    lines = [Line(i, tag.custom_id(i), endpoint, body) for i in range(3)]
    attempts: list[float] = []
    remote, _ = svc.submit(lines, tag, 1, attempts.append)
    assert transport.left == 0 and fake.knobs.reset_creates == 0  # the fault happened
    assert fake.stats.batch_creations == 1
    assert dict(fake.stats.batch_items) == {tag.custom_id(i): 1 for i in range(3)}
    assert svc.poll(remote).counts  # the id returned is the batch that exists


def test_a_cancel_during_the_upload_cancels_that_batch_too(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`overnight cancel` cancels the batches it sees live; a batch whose upload was under way
    is recorded after that, and the runner cancels it when it sees the job cancelled."""
    write_records(tmp_path, 12)
    fake.knobs.batch_seconds = 30
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, model={"max_requests_per_batch": 5})
    submit = OpenAIBatch.submit

    def cancel_then_submit(self, lines, tag, chunk, on_attempt):
        job.cancel()  # another process, while this chunk is `creating`
        return submit(self, lines, tag, chunk, on_attempt)

    monkeypatch.setattr(OpenAIBatch, "submit", cancel_then_submit)
    report = job.run()
    assert report.cancelled and fake.stats.batch_creations == 1  # nothing after the cancel
    assert [b["status"] for b in report.remote_batches] == ["cancelled"]
    # the fake finishes half of a cancelled batch: kept
    assert report.counts["succeeded"] == 2 and report.counts["cancelled"] == 10


def test_a_cancel_before_a_chunk_is_planned_creates_nothing(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_records(tmp_path, 6)
    job = llm_job(tmp_path, "openai-batch", fake.openai_url)
    line_bytes = OpenAIBatch.line_bytes

    def cancel_while_reading(self, line):
        if line.seq == 0:
            job.cancel()  # after the page of pending items was read
        return line_bytes(self, line)

    monkeypatch.setattr(OpenAIBatch, "line_bytes", cancel_while_reading)
    report = job.run()
    assert report.cancelled and report.counts["cancelled"] == 6
    assert fake.stats.batch_creations == 0 and fake.stats.files_uploaded == 0


def test_mixed_models_and_endpoints_make_one_file_each(tmp_path: Path, fake: FakeProvider) -> None:
    """An OpenAI batch file holds one endpoint and one model: a passthrough file that mixes
    them is grouped into one batch per (endpoint, model), not cut at every change."""
    chat = {"url": "/v1/chat/completions", "messages": [{"role": "user", "content": "hi"}]}
    lines = []
    for i in range(12):
        if i % 4 == 3:
            body = {"model": "text-embedding-3-small", "input": f"x{i}"}
            url = "/v1/embeddings"
        else:
            body = {
                "model": "gpt-4o-mini" if i % 2 else "gpt-4.1-mini",
                "messages": chat["messages"],
            }
            url = "/v1/chat/completions"
        lines.append({"custom_id": f"c{i}", "method": "POST", "url": url, "body": body})
    for i in (5, 9):  # records that cannot become a request fail, without a batch
        lines.insert(i, {"custom_id": f"bad{i}", "method": "GET", "url": "/v1/x", "body": {}})
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, kind="passthrough")
    job.spec = job.spec.model_copy(
        update={"source": job.spec.source.model_copy(update={"id": None})}
    )
    report = job.run()
    assert report.counts["succeeded"] == 12 and report.counts.failed == 2
    assert fake.stats.batch_creations == 3  # 4.1-mini chat, 4o-mini chat, embeddings
    assert max(fake.stats.batch_items.values()) == 1
    rows = read_jsonl(tmp_path / "job.out.jsonl")
    assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(12)]
    assert sorted(f.custom_id for f in job.failures()) == ["bad5", "bad9"]
    assert [b["status"] for b in report.remote_batches].count("input_error") == 1


# -- job identity: results are accepted only for requests this job sent ----------------------


def other_job(root: Path, fake: FakeProvider, n: int) -> overnight.Job:
    """Another job of the same workspace: the same ids, other prompts."""
    folder = root / "other"
    folder.mkdir()
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "text": f"OTHER job {i}"}) + b"\n" for i in range(n))
    )
    return llm_job(folder, "anthropic-batch", fake.anthropic_url)


def assert_own_answers(job: overnight.Job, n: int) -> None:
    rows = read_jsonl(job.output_path)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(n)]
    assert [r["output"] for r in rows] == [
        f"echo: ticket {i}: the invoice is wrong" for i in range(n)
    ]


def item_attempts(job: overnight.Job) -> list[int]:
    with sqlite3.connect(job.state_path) as db:
        return [r[0] for r in db.execute("SELECT attempts FROM items ORDER BY id")]


@pytest.mark.parametrize("case", ["lost_after_acting", "lost_other_live", "lost_other_ended"])
def test_a_lost_create_never_takes_another_jobs_answers(
    tmp_path: Path, fake: FakeProvider, case: str
) -> None:
    """Anthropic batches carry no metadata: a create whose answer was lost is looked for by
    creation time and request count. Another job's batch of the same size in that window
    is either told apart (ended: its first result line is not ours), or taken for ours
    (running: nothing tells them apart) and then refused line by line at collection: its
    answers are never written, the items go back to pending without counting an attempt and
    are sent again. Every custom_id of the job reaches the provider once."""
    n = 5
    fake.knobs.batch_seconds = 3.0 if case == "lost_other_live" else 0.2
    other = other_job(tmp_path, fake, n)
    assert other.run(detach=True).exit_code == 0  # its batch: 5 requests, in the window
    if case == "lost_other_ended":
        fake.complete_batches()
    fake.knobs.batch_seconds = 0.2
    fake.knobs.reset_creates = 1  # our create: the connection is reset ...
    fake.knobs.reset_after_acting = case == "lost_after_acting"  # ... after or before acting
    write_records(tmp_path, n)
    job = llm_job(tmp_path, "anthropic-batch", fake.anthropic_url, model={"timeout": 1.0})
    report = job.run()
    assert fake.stats.creates_reset == 1
    assert report.exit_code == 0, report.to_dict()
    assert_own_answers(job, n)
    ours = {cid: k for cid, k in fake.stats.batch_items.items() if cid.startswith(tag_prefix(job))}
    assert sorted(ours) == sorted(f"{tag_prefix(job)}{i}" for i in range(n))
    assert set(ours.values()) == {1}  # each request of ours sent once
    assert item_attempts(job) == [1] * n  # the refused batch counted no attempt
    statuses = [b["status"] for b in report.remote_batches]
    if case == "lost_other_live":  # taken by mistake, refused, sent again
        assert statuses == ["not_ours", "ended"]
        assert any("refused 5 result lines" in note for note in report.notes)
    else:
        assert statuses == ["ended"] and not report.notes
    # the other job's own results are untouched
    other_report = other.run()
    assert other_report.exit_code == 0
    assert [r["output"] for r in read_jsonl(other.output_path)] == [
        f"echo: OTHER job {i}" for i in range(n)
    ]


def test_max_bytes_per_batch_splits_into_chunks_under_the_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """`[model] max_bytes_per_batch`: each request file stays under it, planned that way
    (no 413 and no split needed)."""
    write_records(tmp_path, 20)
    limit = 1500
    job = llm_job(tmp_path, "openai-batch", fake.openai_url, model={"max_bytes_per_batch": limit})
    report = job.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 20
    uploads = [f for f in fake.openai.files.values() if f.obj["purpose"] == "batch"]
    sizes = [len(f.data) for f in uploads]
    assert len(sizes) >= 3 and max(sizes) <= limit, sizes
    assert sum(len(f.data.splitlines()) for f in uploads) == 20
    assert {b["status"] for b in report.remote_batches} == {"completed"}  # none refused
    assert set(fake.stats.batch_items.values()) == {1}


@pytest.mark.parametrize(
    ("backend", "status", "error"),
    [
        ("openai-batch", 500, "server_error"),
        ("openai-batch", 429, "server_error"),
        ("anthropic-batch", 500, "api_error"),
        ("anthropic-batch", 429, "rate_limit_error"),
        ("anthropic-batch", 529, "overloaded_error"),
    ],
)
def test_transiently_failed_lines_go_into_a_new_batch_and_succeed(
    tmp_path: Path, fake: FakeProvider, backend: str, status: int, error: str
) -> None:
    """Lines a batch answered with a server error or a rate limit are not the request's
    fault: they go back to pending and into the next batch; the others are not sent again."""
    write_records(tmp_path, 8)
    fake.knobs.fail_batch_lines = 3
    fake.knobs.fail_batch_status = status
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job = llm_job(tmp_path, backend, url, run={"max_attempts": 2})
    report = job.run()
    assert report.exit_code == 0, (report.to_dict(), job.failures())
    assert report.counts["succeeded"] == 8 and fake.knobs.fail_batch_lines == 0
    assert fake.stats.batch_creations == 2
    assert sorted(fake.stats.batch_items.values()) == [1] * 5 + [2] * 3
    assert_own_answers(job, 8)
    assert sorted(item_attempts(job)) == [1] * 5 + [2] * 3
    # With one attempt allowed, the same lines fail, named by the provider's error type.
    (tmp_path / "once").mkdir()
    write_records(tmp_path / "once", 8)
    fake.knobs.fail_batch_lines = 3
    once = llm_job(tmp_path / "once", backend, url, run={"max_attempts": 1})
    assert once.run().counts.failed == 3
    assert {(f.error_class, "gave up after 1 batches" in f.message) for f in once.failures()} == {
        (error, True)
    }


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_create_that_timed_out_is_not_sent_again_while_it_may_still_land(
    fake: FakeProvider, provider: str
) -> None:
    """The provider takes 7.5 s to make the batch; the client gives up after its 5 s
    timeout and does not see it at its first look (5.5 s). The create may land until 10 s
    (the timeout and as long again): the service waits, looks again, finds it, and never
    sends the create a second time."""
    if provider == "openai":
        svc: OpenAIBatch | AnthropicBatch = OpenAIBatch(
            api_key=KEY, base_url=fake.openai_url, max_requests=10, max_bytes=10**6, timeout=5
        )
        endpoint, body = "/v1/chat/completions", {"model": "gpt-4o-mini"}
    else:
        svc = AnthropicBatch(
            api_key=ANT_KEY, base_url=fake.anthropic_url, max_requests=10, max_bytes=10**6
        )
        svc.timeout = 5
        endpoint, body = "/v1/messages", {"model": "claude-3-5-haiku", "max_tokens": 8}
    body["messages"] = [{"role": "user", "content": "hi"}]
    fake.knobs.create_delay = 7.5
    tag = JobTag("job", "0123456789ab", "tok0000000")
    lines = [Line(i, tag.custom_id(i), endpoint, body) for i in range(3)]
    attempts: list[float] = []
    started = time.time()
    remote, _ = svc.submit(lines, tag, 1, attempts.append)
    assert fake.stats.creates_received == 1 and fake.stats.batch_creations == 1
    assert len(attempts) == 1 and attempts[0] >= started + 10  # the timeout, twice
    assert svc.poll(remote).counts


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_a_project_moved_while_its_batches_run_still_collects_them(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """The identity key follows the ledger's location; the requests of a job are known by
    its token and their seq: moving the folder does not make its own answers foreign."""
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    write_records(before, 12)
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    fake.knobs.batch_seconds = 60
    limits = {"max_requests_per_batch": 10}
    assert llm_job(before, backend, url, model=limits).run(detach=True).exit_code == 0
    before.rename(after)
    fake.complete_batches()
    moved = llm_job(after, backend, url, model=limits)
    report = moved.run()
    assert report.exit_code == 0, report.to_dict()
    assert report.counts["succeeded"] == 12 and not report.notes
    assert fake.stats.batch_creations == 2 and set(fake.stats.batch_items.values()) == {1}
