"""The real-time predictor: the official async SDKs against a real HTTP server (the fake
provider, or a scripted one), with retries, limits, cache, dedupe, repair and endpoint-down."""

from __future__ import annotations

import collections
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_helpers import KEY, SCHEMA
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from overnight.errors import (
    EndpointDown,
    InvalidOutput,
    KeyRefused,
    PermanentError,
    is_transient,
    secret_forms,
)
from overnight.llm.cache import ResponseCache
from overnight.llm.providers import retry_after as _retry_after
from overnight.llm.realtime import APIError, RealtimePredictor, RetriesExhausted, _safe_url
from overnight.llm.requests import Answer, LLMTask, make_llm_task
from overnight.testing.fake_provider import FakeProvider

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-20241022"}


def url(fake: FakeProvider, provider: str) -> str:
    return fake.openai_url if provider == "openai" else fake.anthropic_url


def task_for(provider: str, kind: str = "generate", **kw: Any) -> LLMTask:
    params = {"max_tokens": 64} if kind != "embed" else {}
    return make_llm_task(kind, provider, MODELS[provider], params=params, **kw)  # type: ignore[arg-type]


def predictor(provider: str, base_url: str, task: LLMTask, **kw: Any) -> RealtimePredictor:
    kw = {"backoff_base": 0.01, "backoff_max": 0.05, "api_key": KEY, **kw}
    return RealtimePredictor(provider, base_url=base_url, task=task, **kw)


def run(p: RealtimePredictor, requests: list[Any]) -> list[Any]:
    try:
        return p.process(requests, len(requests))
    finally:
        p.close()


def sent(fake: FakeProvider) -> int:
    return sum(fake.stats.requests.values())


# -- every kind, both providers ---------------------------------------------------------------

PASSTHROUGH = {
    "openai": [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        },
        {"custom_id": "b", "url": "/v1/embeddings", "body": {"input": "hi"}},  # the job's model
    ],
    "anthropic": [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/messages",
            "body": {"max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        }
    ],
}


@pytest.mark.parametrize(
    ("provider", "kind"),
    [
        (p, k)
        for p in ("openai", "anthropic")
        for k in ("generate", "extract", "classify", "embed", "passthrough")
        if (p, k) != ("anthropic", "embed")
    ],
)
def test_every_kind(fake: FakeProvider, provider: str, kind: str) -> None:
    extra: dict[str, Any] = {
        "extract": {"schema": SCHEMA},
        "classify": {"labels": ["billing", "bug", "other"]},
    }.get(kind, {})
    task = task_for(provider, kind, system="Be brief." if kind == "generate" else None, **extra)
    records = PASSTHROUGH[provider] if kind == "passthrough" else [{"text": "invoice wrong"}]
    if provider == "openai" and kind == "passthrough":
        task = make_llm_task("passthrough", "openai", "text-embedding-3-small")
    answers = run(predictor(provider, url(fake, provider), task), [task.build(r) for r in records])
    assert all(isinstance(a, Answer) and not a.cached for a in answers), answers
    outputs = [task.parse(a)["output"] for a in answers]
    assert all(a.input_tokens > 0 for a in answers)
    if kind == "generate":
        assert outputs == ["echo: invoice wrong"] and answers[0].output_tokens > 0
    elif kind == "extract":
        assert set(outputs[0]) == {"topic", "urgent"}
    elif kind == "classify":
        assert outputs[0] in ("billing", "bug", "other")
    elif kind == "embed":
        assert len(outputs[0]) == 8 and all(isinstance(x, float) for x in outputs[0])
    elif provider == "openai":
        assert [o["object"] for o in outputs] == ["chat.completion", "list"]
    else:
        assert outputs[0]["type"] == "message"
        assert outputs[0]["model"] == MODELS["anthropic"]  # filled in from the job
    assert sent(fake) == len(records) and fake.stats.status_counts[200] == len(records)


# -- retries --------------------------------------------------------------------------------


def test_429_honours_retry_after_and_cuts_concurrency(fake: FakeProvider) -> None:
    fake.knobs.throttle_next = 6
    fake.knobs.throttle_seconds = 0.3
    task = task_for("openai")
    p = predictor("openai", fake.openai_url, task, concurrency=16, max_attempts=5)
    t0 = time.monotonic()
    answers = run(p, [task.build({"text": f"t{i}"}) for i in range(24)])
    assert all(isinstance(a, Answer) for a in answers)
    assert time.monotonic() - t0 >= 0.3  # the backoff alone is at most 0.05 s
    assert p.stats.throttled == 6 and fake.stats.status_counts[429] == 6
    assert p.aimd.cuts >= 1 and p.stats.concurrency < 16
    assert p.stats.sent == 30 and p.stats.retries == 6 and p.stats.ok == 24


def arrivals(fake: FakeProvider) -> list[float]:
    return sorted(s.arrived for s in fake.stats.realtime)


def test_failed_attempts_wait_as_retry_backoff_says(fake: FakeProvider) -> None:
    """retry.Backoff, measured at the server: after the n-th failure at least half of
    base * 2**(n-1) (equal jitter), whatever the random draw."""
    fake.knobs.fail_next = 3
    task = task_for("openai")
    p = predictor(
        "openai", fake.openai_url, task, max_attempts=4, backoff_base=0.4, backoff_max=1.0
    )
    (answer,) = run(p, [task.build({"text": "x"})])
    assert isinstance(answer, Answer) and answer.attempts == 4
    times = arrivals(fake)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(gaps) == 3
    # A try leaves after the answer to the one before: the gap between arrivals is at least
    # the wait. 0.4/2, 0.8/2, then the cap: 1.0/2.
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.5, gaps


def test_a_429_is_not_a_failed_attempt(fake: FakeProvider) -> None:
    fake.knobs.throttle_next = 4
    fake.knobs.throttle_seconds = 0.05
    task = task_for("openai")
    p = predictor("openai", fake.openai_url, task, concurrency=1, max_attempts=2)
    (answer,) = run(p, [task.build({"text": "x"})])
    assert isinstance(answer, Answer) and answer.attempts == 5  # every request sent counts
    assert p.stats.throttled == 4 and sent(fake) == 5
    # 429s, then failures: max_attempts counts the failures only; the message and
    # `attempts` tell every request sent.
    fake.knobs.throttle_next, fake.knobs.fail_next = 2, 100
    p = predictor("openai", fake.openai_url, task, concurrency=1, max_attempts=2)
    (error,) = run(p, [task.build({"text": "y"})])
    assert isinstance(error, RetriesExhausted) and error.attempts == 4
    assert str(error).startswith(
        "gave up after 4 attempts (2 answered 429, not counted toward max_attempts): HTTP 500"
    )
    assert sent(fake) == 5 + 4


def test_rate_limited_for_too_long_pauses_the_job(fake: FakeProvider) -> None:
    fake.knobs.throttle_next = 40  # 4 s of 429s at 2 requests in flight, then answers
    fake.knobs.throttle_seconds = 0.2
    task = task_for("anthropic")
    p = predictor("anthropic", fake.anthropic_url, task, concurrency=2, max_throttled=1.0)
    try:
        with pytest.raises(EndpointDown, match=r"rate limited for \d+ s in a row") as info:
            p.process([task.build({"text": f"t{i}"}) for i in range(4)], 4)
        assert "HTTP 429" in str(info.value) and "items stay pending" in str(info.value)
        before = sent(fake)
        with pytest.raises(EndpointDown):  # nothing more is sent
            p.process([task.build({"text": "more"})], 1)
        assert sent(fake) == before
    finally:
        p.close()


def test_out_of_quota_pauses_at_once(fake: FakeProvider) -> None:
    fake.knobs.out_of_quota = True
    task = task_for("openai")
    p = predictor("openai", fake.openai_url, task, concurrency=2, max_throttled=2.0)
    try:
        with pytest.raises(EndpointDown, match="exceeded your current quota.*out of credit"):
            p.process([task.build({"text": f"t{i}"}) for i in range(10)], 10)
        assert sent(fake) <= 2  # the requests in flight, no retry
    finally:
        p.close()


@pytest.mark.parametrize("status", [408, 409, 503])
def test_408_409_and_5xx_are_retried(fake: FakeProvider, status: int) -> None:
    fake.knobs.fail_next, fake.knobs.fail_status = 2, status
    task = task_for("openai")
    (answer,) = run(predictor("openai", fake.openai_url, task), [task.build({"text": "x"})])
    assert isinstance(answer, Answer) and answer.attempts == 3
    assert fake.stats.status_counts[status] == 2


def test_other_4xx_are_not_retried(fake: FakeProvider) -> None:
    fake.knobs.fail_next, fake.knobs.fail_status = 2, 422
    task = task_for("anthropic")
    (error,) = run(predictor("anthropic", fake.anthropic_url, task), [task.build({"text": "x"})])
    assert isinstance(error, APIError) and error.status == 422 and error.attempts == 1
    assert sent(fake) == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_dropped_connections_are_retried(fake: FakeProvider, provider: str) -> None:
    """The request reached the server and no answer came back (the connection closed)."""
    fake.knobs.drop_next = 2
    task = task_for(provider)
    p = predictor(provider, url(fake, provider), task, concurrency=1, max_attempts=3)
    (answer,) = run(p, [task.build({"text": "x"})])
    assert isinstance(answer, Answer) and answer.attempts == 3
    assert fake.stats.connections_dropped == 2 and sent(fake) == 3


def test_aimd_halves_on_a_429_and_grows_back_after_20_successes(fake: FakeProvider) -> None:
    task = task_for("openai")
    p = predictor("openai", fake.openai_url, task, concurrency=4)
    texts = iter(range(1000))

    def some(n: int) -> None:
        answers = p.process([task.build({"text": f"t{next(texts)}"}) for _ in range(n)], n)
        assert all(isinstance(a, Answer) for a in answers)

    try:
        fake.knobs.throttle_next, fake.knobs.throttle_seconds = 1, 0.0
        some(1)  # a 429, then an answer: 1 success
        assert p.aimd.limit == 2 and p.stats.concurrency == 2
        # At most 2 requests are in flight, as the server sees them.
        fake.knobs.latency = 0.3
        fake.stats.peak_in_flight = 0
        some(6)  # 7 successes
        assert fake.stats.peak_in_flight <= 2
        fake.knobs.latency = 0.0
        some(12)  # 19 successes
        assert p.aimd.limit == 2
        some(1)  # the 20th
        assert p.aimd.limit == 3 and p.stats.concurrency == 3
    finally:
        p.close()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_500_and_malformed_bodies_are_retried(fake: FakeProvider, provider: str) -> None:
    fake.knobs.fail_next = 2
    task = task_for(provider)
    answers = run(
        predictor(provider, url(fake, provider), task, max_attempts=3), [task.build({"text": "w"})]
    )
    assert isinstance(answers[0], Answer) and fake.stats.status_counts[500] == 2
    fake.knobs.malformed_next = 1
    p = predictor(provider, url(fake, provider), task, max_attempts=3)
    assert isinstance(run(p, [task.build({"text": "x"})])[0], Answer)
    assert p.stats.retries == 1


def test_gives_up_after_max_attempts(fake: FakeProvider) -> None:
    fake.knobs.fail_next = 100
    task = task_for("openai")
    p = predictor("openai", fake.openai_url, task, max_attempts=3)
    (answer,) = run(p, [task.build({"text": "x"})])
    # Permanent for the runner: it must not try three more times on top.
    assert isinstance(answer, RetriesExhausted) and not is_transient(answer)
    assert "gave up after 3 attempts: HTTP 500" in str(answer) and sent(fake) == 3


def test_timeout_is_retried(fake: FakeProvider) -> None:
    fake.knobs.timeout_next = 1
    fake.knobs.hang_seconds = 1.0
    task = task_for("anthropic")
    p = predictor("anthropic", fake.anthropic_url, task, timeout=0.3, max_attempts=3)
    (answer,) = run(p, [task.build({"text": "x"})])
    assert isinstance(answer, Answer) and p.stats.retries == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_client_error_fails_the_item_at_once_with_the_message(
    fake: FakeProvider, provider: str
) -> None:
    task = make_llm_task("generate", provider, "missing-model", params={"max_tokens": 8})  # type: ignore[arg-type]
    good = task_for(provider)
    p = predictor(provider, url(fake, provider), task, max_attempts=5)
    bad, ok = run(p, [task.build({"text": "x"}), good.build({"text": "y"})])
    assert isinstance(bad, APIError) and isinstance(bad, PermanentError) and bad.status == 404
    assert "missing-model" in str(bad) and bad.error_class == "http_404"
    assert isinstance(ok, Answer)  # the other item is not affected
    assert fake.stats.status_counts[404] == 1  # not retried


def test_a_wrong_key_stops_the_predictor_at_the_first_401(fake: FakeProvider) -> None:
    """A 401 is the key's fault, not the record's: nothing more is sent (every request would
    be refused), and the job stops with its items pending (exit 2, see test_adversary)."""
    fake.knobs.require_key = "sk-the-right-one-000"
    task = task_for("openai")
    p = predictor("openai", fake.openai_url, task, concurrency=1)
    try:
        with pytest.raises(KeyRefused, match="401"):
            p.process([task.build({"text": f"x{i}"}) for i in range(20)], 20)
        assert fake.stats.status_counts[401] == 1  # not retried, the other 19 never sent
        with pytest.raises(KeyRefused):
            p.process([task.build({"text": "later"})], 1)
        assert fake.stats.status_counts[401] == 1
    finally:
        p.close()


# -- repair ------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_repair_turns_an_invalid_answer_valid(
    tmp_path: Path, fake: FakeProvider, provider: str
) -> None:
    fake.knobs.invalid_json_rate = 1.0  # every first answer breaks the schema
    task = task_for(provider, "extract", schema=SCHEMA)
    requests = [task.build({"text": f"ticket {i}"}) for i in range(3)]
    (plain,) = run(predictor(provider, url(fake, provider), task), requests[:1])
    with pytest.raises(InvalidOutput, match="schema"):
        task.parse(plain)
    cache = ResponseCache(tmp_path / "cache.db", "job:t")
    p = predictor(provider, url(fake, provider), task, repair=True, cache=cache)
    answers = run(p, requests)
    assert [set(task.parse(a)["output"]) for a in answers] == [{"topic", "urgent"}] * 3
    assert p.stats.repairs == 3 and sent(fake) == 1 + 6
    assert [a.attempts for a in answers] == [2, 2, 2]  # the request and its repair
    # Both calls are paid: the repaired answer carries the usage of the two.
    assert answers[0].input_tokens > plain.input_tokens
    assert answers[0].output_tokens > plain.output_tokens
    # The cache keeps the repaired answer for the original request.
    again = run(predictor(provider, url(fake, provider), task, repair=True, cache=cache), requests)
    assert all(a.cached for a in again) and again[0].body == answers[0].body
    assert sent(fake) == 7


# -- cache and dedupe --------------------------------------------------------------------------


def test_cache_hit_sends_nothing(tmp_path: Path, fake: FakeProvider) -> None:
    task = task_for("openai")
    requests = [task.build({"text": f"t{i}"}) for i in range(4)]
    cache = ResponseCache(tmp_path / "cache.db", "job:t")
    first = run(predictor("openai", fake.openai_url, task, cache=cache), requests[:3])
    assert sent(fake) == 3 and not any(a.cached for a in first)
    assert cache.get(requests[0].key) is not None  # stored as it arrived
    p = predictor("openai", fake.openai_url, task, cache=cache)
    second = run(p, requests)
    assert sent(fake) == 4 and p.stats.cache_hits == 3
    assert [a.cached for a in second] == [True, True, True, False]
    assert [a.attempts for a in second] == [0, 0, 0, 1]  # the ledger's count: requests sent
    assert [a.body for a in second[:3]] == [a.body for a in first]
    assert second[0].input_tokens == first[0].input_tokens  # usage kept, for the report


def test_identical_requests_in_flight_are_sent_once(fake: FakeProvider) -> None:
    fake.knobs.latency = 0.05
    task = task_for("anthropic")
    same = task.build({"text": "same"})
    p = predictor("anthropic", fake.anthropic_url, task)
    answers = run(p, [same, task.build({"text": "other"}), same, same])
    assert sent(fake) == 2 and p.stats.deduplicated == 2
    assert [a.cached for a in answers] == [False, False, True, True]  # paid once
    assert [a.attempts for a in answers] == [1, 1, 0, 0]  # ... and sent once
    assert answers[0].body == answers[2].body == answers[3].body


# -- endpoint down -----------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_in_a_row_is_endpoint_down() -> None:
    port = closed_port()
    base = f"http://user:hunter2-password@127.0.0.1:{port}/v1"
    task = task_for("openai")
    p = predictor("openai", base, task, concurrency=4, max_attempts=3)
    try:
        with pytest.raises(EndpointDown) as info:
            p.process([task.build({"text": f"t{i}"}) for i in range(10)], 10)
        message = str(info.value)
        assert f"cannot reach http://127.0.0.1:{port}/v1" in message
        assert "20 requests in a row" in message and "run it again" in message
        assert KEY not in message and "hunter2" not in message
        sent_before = p.stats.sent
        assert 20 <= sent_before < 24  # once down, only the 3 others in flight may land
        with pytest.raises(EndpointDown):  # and nothing on the next call
            p.process([task.build({"text": "more"})], 1)
        assert p.stats.sent == sent_before
    finally:
        p.close()


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: connects hang (a firewall dropping packets)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.05)
    yield port
    for c in fillers:
        c.close()
    server.close()


def test_connect_timeouts_are_endpoint_down_and_cancel_in_flight(full_backlog: int) -> None:
    task = task_for("anthropic")
    base = f"http://127.0.0.1:{full_backlog}"
    p = predictor("anthropic", base, task, concurrency=3, timeout=0.2, down_after=3)
    with pytest.raises(EndpointDown, match="connect timed out"):
        run(p, [task.build({"text": f"t{i}"}) for i in range(12)])
    # Three connects time out together; the rest are not tried, one after another.
    assert p.stats.sent <= 6


# -- the server's word, and secrets -----------------------------------------------------------


class Scripted:
    """A server that answers each path from a script of (status, message, headers), then 200.
    Error messages may quote the key the client sent, as a careless proxy would."""

    def __init__(self) -> None:
        self.script: dict[str, collections.deque[tuple[int, str, dict[str, str]]]] = (
            collections.defaultdict(collections.deque)
        )
        self.seen: collections.Counter[str] = collections.Counter()
        self.arrived: list[float] = []  # time.monotonic() of each request
        self.provider = FakeProvider()
        self.provider.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["POST"])])

    async def handle(self, request: HTTPRequest) -> JSONResponse:
        path = request.url.path
        self.seen[path] += 1
        self.arrived.append(time.monotonic())
        key = request.headers.get("x-api-key") or request.headers.get("authorization", "")
        key = key.removeprefix("Bearer ")
        if self.script[path]:
            status, message, headers = self.script[path].popleft()
            # The key as a careless proxy may quote it: as is, repr, JSON, URL-encoded.
            forms = {"quoted": urllib.parse.quote(key, safe=""), "as_json": json.dumps(key)}
            error = {"type": "invalid_request_error", "message": message.format(key=key, **forms)}
            return JSONResponse({"type": "error", "error": error}, status, headers=headers)
        if path == "/v1/messages":
            return JSONResponse(
                {"type": "message", "content": [{"type": "text", "text": "ok"}], "usage": {}}
            )
        return JSONResponse({"choices": [{"message": {"content": "ok"}}], "usage": {}})


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    s = Scripted()
    with s.provider:
        yield s


def test_x_should_retry_and_retry_after_ms(scripted: Scripted) -> None:
    chat = "/v1/chat/completions"
    scripted.script[chat].extend(
        [
            (500, "down for good", {"x-should-retry": "false"}),  # first request: no retry
            (400, "try me again", {"x-should-retry": "true"}),  # second: retried, then ok
            (503, "busy", {"retry-after-ms": "300"}),
        ]
    )
    task = task_for("openai")
    p = predictor("openai", scripted.provider.openai_url, task, concurrency=1, max_attempts=3)
    try:
        (first,) = p.process([task.build({"text": "a"})], 1)
        assert isinstance(first, APIError) and first.status == 500 and scripted.seen[chat] == 1
        t0 = time.monotonic()
        (second,) = p.process([task.build({"text": "b"})], 1)
        assert isinstance(second, Answer) and scripted.seen[chat] == 4
        assert time.monotonic() - t0 >= 0.3  # retry-after-ms waited for
    finally:
        p.close()


def test_429s_back_off_by_how_many_came_in_a_row(scripted: Scripted) -> None:
    """No retry-after: the n-th 429 in a row waits the backoff of n (RetryPolicy), although
    429s are not failed attempts."""
    chat = "/v1/chat/completions"
    scripted.script[chat].extend([(429, "slow down", {})] * 3)
    task = task_for("openai")
    p = predictor("openai", scripted.provider.openai_url, task, backoff_base=0.2, backoff_max=1.0)
    (answer,) = run(p, [task.build({"text": "a"})])
    assert isinstance(answer, Answer) and answer.attempts == 4
    times = scripted.arrived
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4, gaps


def test_429s_in_a_row_are_counted_from_the_last_other_failure(scripted: Scripted) -> None:
    """max_throttled is for 429s in a row: a 500 between two runs of them starts it again."""
    chat = "/v1/chat/completions"
    slow = (429, "slow down", {"retry-after": "0.3"})
    scripted.script[chat].extend([slow, slow, (500, "oops", {}), slow, slow])
    task = task_for("openai")
    p = predictor("openai", scripted.provider.openai_url, task, max_throttled=0.7)
    (answer,) = run(p, [task.build({"text": "a"})])  # 0.9 s of 429s, never 0.7 s in a row
    assert isinstance(answer, Answer) and answer.attempts == 6


def test_the_key_never_appears_in_an_error(scripted: Scripted, monkeypatch) -> None:
    secret = "sk-live/0123+4567=89abcdef"  # URL-encoding changes it
    monkeypatch.setenv("SOME_UNRELATED_NAME", secret)  # not a name `redact` looks at
    for provider, path, base in [
        ("openai", "/v1/chat/completions", scripted.provider.openai_url),
        ("anthropic", "/v1/messages", scripted.provider.anthropic_url),
    ]:
        scripted.script[path].extend(
            [
                (400, "bad request from key {key}, {key!r}, {quoted}, {as_json}", {}),
                (500, "server error for {key}", {}),
                (500, "server error for {quoted}", {}),
                (500, "server error for {key!r} {as_json}", {}),
                (429, "slow down, {key}", {"retry-after": "0"}),
            ]
        )
        task = task_for(provider)
        p = predictor(provider, base, task, api_key=secret, concurrency=1, max_attempts=3)
        errors = [
            p.process([task.build({"text": t})], 1)[0] for t in ("a", "b", "c")
        ]  # one at a time: the script's order holds
        p.close()
        assert isinstance(errors[0], APIError) and "bad request from key" in str(errors[0])
        assert isinstance(errors[1], RetriesExhausted) and "server error" in str(errors[1])
        assert isinstance(errors[2], Answer)  # the 429 was retried
        for error in errors[:2]:
            text = f"{error} {error.args!r}"
            assert not any(form in text for form in secret_forms(secret)), text
            assert "***" in str(error)
        assert str(errors[0]).count("***") == 4


# -- pure helpers ------------------------------------------------------------------------------


def test_retry_after_headers() -> None:
    assert _retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert _retry_after({"retry-after": "1.5"}) == 1.5
    assert _retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # the past
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= (_retry_after({"retry-after": future}) or 0) <= 31
    assert _retry_after({"retry-after": "soon"}) is None  # garbage is no advice, not a crash
    assert _retry_after({}) is None and _retry_after(None) is None


def test_safe_url_drops_credentials() -> None:
    assert _safe_url("https://u:p@api.example.com:8443/v1?key=abc") == (
        "https://api.example.com:8443/v1"
    )
