"""Client-side limits (fake clock) and the real-time predictor's counters against the fake."""

from __future__ import annotations

import asyncio

import pytest
from llm_helpers import KEY

from overnight.errors import EndpointDown
from overnight.llm.limits import AIMD, RateLimiter, TokenBucket
from overnight.llm.realtime import RealtimePredictor, RetriesExhausted, _retry_after
from overnight.llm.requests import make_llm_task
from overnight.testing.fake_provider import FakeProvider


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_rpm_is_smooth_not_bursty() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=6000, tpm=None, clock=clock, sleep=clock.sleep)

    async def go() -> None:
        for _ in range(1000):
            await limiter.acquire()

    asyncio.run(go())
    # A second's worth may go at once (100), the rest at 100/s: 900 more take 9 s.
    assert clock.now == pytest.approx(9.0, rel=0.01)


def test_tpm_corrected_by_usage_and_penalty() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=None, tpm=600, clock=clock, sleep=clock.sleep)  # 10 tokens/s

    async def go() -> None:
        await limiter.acquire(10)  # the whole burst
        limiter.settle(10, 2)  # it used only 2: 8 come back
        await limiter.acquire(8)
        assert clock.now == 0.0
        limiter.penalize(5.0)
        await limiter.acquire(0)

    asyncio.run(go())
    assert clock.now == pytest.approx(5.0)


def test_token_bucket_debt_delays_the_next() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=10, clock=clock)
    bucket.take(30)  # bigger than the burst: goes, leaves a debt
    assert bucket.wait_time(1) == pytest.approx(2.1)


def test_aimd_halves_once_per_burst_and_grows_slowly() -> None:
    clock = Clock()
    aimd = AIMD(32, grow_after=5, cooldown=1.0, clock=clock)
    for _ in range(10):  # ten 429s from requests already in flight: one cut
        aimd.on_throttle()
    assert aimd.limit == 16 and aimd.cuts == 1
    clock.now = 2.0
    aimd.on_throttle()
    assert aimd.limit == 8

    async def grow() -> None:
        for _ in range(10):
            aimd.on_success()

    asyncio.run(grow())
    assert aimd.limit == 10


def test_retry_after_headers() -> None:
    assert _retry_after({"retry-after-ms": "250"}) == 0.25
    assert _retry_after({"retry-after": "1.5"}) == 1.5
    assert _retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert _retry_after({}) is None


def predictor(url: str, **kw) -> RealtimePredictor:
    task = make_llm_task("generate", "openai", "gpt-4o-mini")
    return RealtimePredictor(
        "openai", base_url=url, api_key=KEY, backoff_base=0.01, backoff_max=0.05, task=task, **kw
    )


def test_predictor_cuts_concurrency_on_429s(fake: FakeProvider) -> None:
    fake.knobs.throttle_next = 6
    fake.knobs.throttle_seconds = 0.05
    p = predictor(fake.openai_url, concurrency=16, max_attempts=5)
    task = make_llm_task("generate", "openai", "gpt-4o-mini")
    try:
        answers = p.process([task.build({"text": f"t{i}"}) for i in range(40)])
    finally:
        p.close()
    assert all(not isinstance(a, Exception) for a in answers)
    assert p.stats.throttled == 6 and p.aimd.cuts >= 1 and p.aimd.limit < 16


def test_predictor_gives_up_after_max_attempts(fake: FakeProvider) -> None:
    fake.knobs.fail_next = 100
    p = predictor(fake.openai_url, max_attempts=3)
    task = make_llm_task("generate", "openai", "gpt-4o-mini")
    try:
        (answer,) = p.process([task.build({"text": "x"})])
    finally:
        p.close()
    assert isinstance(answer, RetriesExhausted)
    assert "gave up after 3 attempts: HTTP 500" in str(answer)


def test_predictor_timeout_is_retried(fake: FakeProvider) -> None:
    fake.knobs.timeout_next = 1
    fake.knobs.hang_seconds = 2.0
    p = predictor(fake.openai_url, timeout=0.3, max_attempts=3)
    task = make_llm_task("generate", "openai", "gpt-4o-mini")
    try:
        (answer,) = p.process([task.build({"text": "x"})])
    finally:
        p.close()
    assert not isinstance(answer, Exception) and p.stats.retries == 1


def test_predictor_endpoint_down() -> None:
    p = predictor("http://127.0.0.1:9/v1", max_attempts=2, down_after=5, concurrency=2)
    task = make_llm_task("generate", "openai", "gpt-4o-mini")
    try:
        with pytest.raises(EndpointDown, match="5 requests in a row"):
            p.process([task.build({"text": f"t{i}"}) for i in range(10)])
    finally:
        p.close()
