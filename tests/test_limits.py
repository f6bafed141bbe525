"""Client-side limits with a fake clock: token buckets (rpm, tpm), retry-after pauses, AIMD.
Through a real job against the fake: tests/test_llm_jobs.py; the retry backoff (RetryPolicy):
tests/test_retries.py."""

from __future__ import annotations

import asyncio

import pytest

from overnight.llm.limits import AIMD, RateLimiter, TokenBucket


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
    times: list[float] = []

    async def go() -> None:
        for _ in range(1000):
            await limiter.acquire()
            times.append(clock.now)

    asyncio.run(go())
    # A second's worth may go at once (100), the rest at 100/s: 900 more take 9 s, 10 ms apart.
    assert times[99] == 0.0 and times[100] == pytest.approx(0.01)
    assert clock.now == pytest.approx(9.0, rel=0.01)


def test_low_rpm_has_no_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=30, tpm=None, clock=clock, sleep=clock.sleep)

    async def go() -> None:
        for _ in range(3):
            await limiter.acquire()

    asyncio.run(go())
    assert clock.now == pytest.approx(4.0)  # one at once, then one every 2 s


def test_tpm_corrected_by_usage_and_penalty() -> None:
    clock = Clock()
    limiter = RateLimiter(rpm=None, tpm=600, clock=clock, sleep=clock.sleep)  # 10 tokens/s

    async def go() -> None:
        await limiter.acquire(10)  # the whole burst
        limiter.settle(10, 2)  # it used only 2: 8 come back
        await limiter.acquire(8)
        assert clock.now == 0.0
        limiter.settle(8, 28)  # it used 20 more than estimated: a debt of 20 tokens
        await limiter.acquire(10)
        assert clock.now == pytest.approx(3.0)
        limiter.penalize(5.0)  # retry-after: nobody sends for 5 s, whatever the buckets say
        await limiter.acquire(0)

    asyncio.run(go())
    assert clock.now == pytest.approx(8.0)


def test_token_bucket_debt_delays_the_next() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=10, clock=clock)
    bucket.take(30)  # bigger than the burst: goes, leaves a debt
    assert bucket.wait_time(1) == pytest.approx(2.1)
    clock.now = 100.0
    assert bucket.level == -20 and bucket.wait_time(10) == 0.0  # refilled to the burst only
    assert bucket.level == 10


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
        for _ in range(100):
            aimd.on_success()

    asyncio.run(grow())
    assert aimd.limit == 28  # +1 per 5 successes
    asyncio.run(grow())
    assert aimd.limit == 32  # never above the maximum

    floor = AIMD(2, minimum=1, clock=clock)
    for step in range(5):
        clock.now = 10.0 + 2 * step
        floor.on_throttle()
    assert floor.limit == 1


def test_aimd_slot_respects_the_current_limit() -> None:
    aimd = AIMD(4, maximum=4, grow_after=1)
    peak = 0

    async def worker(hold: asyncio.Event) -> None:
        nonlocal peak
        async with aimd.slot():
            peak = max(peak, aimd.in_flight)
            await hold.wait()

    async def go() -> None:
        nonlocal peak
        hold = asyncio.Event()
        tasks = [asyncio.create_task(worker(hold)) for _ in range(10)]
        await asyncio.sleep(0.01)
        assert aimd.in_flight == 4 and peak == 4
        hold.set()
        await asyncio.gather(*tasks)
        # After a cut to 1, a second holder waits until it is grown back by a success.
        aimd.limit = 1
        peak = 0
        hold = asyncio.Event()
        tasks = [asyncio.create_task(worker(hold)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert aimd.in_flight == 1
        aimd.on_success()  # grow_after = 1: the limit is 2, the waiter wakes
        await asyncio.sleep(0.01)
        assert aimd.in_flight == 2
        hold.set()
        await asyncio.gather(*tasks)
        assert aimd.in_flight == 0

    asyncio.run(go())


class ManualClock(Clock):
    """Time moves only when the test says; a sleeper wakes once its deadline has passed."""

    def __init__(self) -> None:
        super().__init__()
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, future))
        await future

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for deadline, future in self.sleepers:
            if deadline <= self.now and not future.done():
                future.set_result(None)


def test_tokens_given_back_wake_a_waiting_request() -> None:
    """An answer that used fewer tokens than estimated lets the next request go at once, not
    after the wait computed from the estimate (that held throughput at a third of tpm)."""
    clock = ManualClock()
    limiter = RateLimiter(rpm=None, tpm=600, clock=clock, sleep=clock.sleep)  # 10 tokens/s

    async def turns() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def go() -> None:
        await limiter.acquire(10)  # the whole burst
        second = asyncio.ensure_future(limiter.acquire(10))
        await turns()
        assert not second.done() and clock.sleepers[-1][0] == pytest.approx(1.0)
        clock.advance(0.1)  # 1 token back by time: not enough
        await turns()
        assert not second.done()
        limiter.settle(10, 1)  # the first answer used 1 token: 9 come back
        await turns()
        assert second.done() and clock.now == pytest.approx(0.1)

    asyncio.run(go())


def test_aimd_defaults_halve_and_grow_back_after_exactly_20_successes() -> None:
    clock = Clock()
    aimd = AIMD(8, clock=clock)  # the defaults the real-time predictor uses

    async def succeed(n: int) -> None:
        for _ in range(n):
            aimd.on_success()

    aimd.on_throttle()
    assert aimd.limit == 4 and aimd.cuts == 1
    asyncio.run(succeed(19))
    assert aimd.limit == 4
    asyncio.run(succeed(1))
    assert aimd.limit == 5
    asyncio.run(succeed(19))
    assert aimd.limit == 5
    asyncio.run(succeed(1))
    assert aimd.limit == 6
    # Successes before a cut do not count toward the growth after it.
    asyncio.run(succeed(15))
    clock.now = 5.0
    aimd.on_throttle()
    assert aimd.limit == 3
    asyncio.run(succeed(19))
    assert aimd.limit == 3
    clock.now = 5.5  # within the cooldown: a second 429 of the same burst is no second cut
    aimd.on_throttle()
    assert aimd.limit == 3 and aimd.cuts == 2


def test_aimd_halves_an_odd_concurrency_down_to_whole_requests() -> None:
    """Concurrency 5 cut by a 429 lets 2 requests run at once, not 3 (half of 5 rounded
    up would still overload the server that just said "too many")."""
    aimd = AIMD(5, clock=Clock())
    aimd.on_throttle()
    peak = 0

    async def worker(hold: asyncio.Event) -> None:
        nonlocal peak
        async with aimd.slot():
            peak = max(peak, aimd.in_flight)
            await hold.wait()

    async def go() -> None:
        hold = asyncio.Event()
        tasks = [asyncio.create_task(worker(hold)) for _ in range(5)]
        await asyncio.sleep(0.01)
        assert aimd.in_flight == 2
        hold.set()
        await asyncio.gather(*tasks)

    asyncio.run(go())
    assert peak == 2


def test_aimd_defaults_cut_once_a_second_down_to_one_request_at_a_time() -> None:
    """The real-time predictor's AIMD (start = maximum = concurrency, the other defaults):
    429s a second apart each halve it, down to one request at a time, never to none."""
    clock = Clock()
    aimd = AIMD(8, maximum=8, clock=clock)
    limits = []
    for second in range(5):
        clock.now = float(second)
        aimd.on_throttle()
        limits.append(aimd.limit)
    assert limits == [4, 2, 1, 1, 1]
