"""Client-side limits for real-time APIs: requests and tokens per minute, and concurrency that
backs off on 429s (AIMD: halve on a burst of 429s, grow back by one slowly).

Hand-written: the libraries that do rate limiting (aiolimiter, limits) cover one bucket each,
not tokens that are estimated before a request and corrected by the usage it returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class TokenBucket:
    """`rate` units per second, at most `burst` stored. The level may go negative: a request
    bigger than the burst still goes, and the debt delays those after it."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level = burst
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` may be taken (0: now)."""
        self._refill()
        need = min(amount, self.burst) - self.level
        return need / self.rate if need > 1e-9 else 0.0  # float dust is not a wait

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.burst, self.level + amount)


class RateLimiter:
    """rpm and tpm. rpm 6000 means one request every 10 ms, not 6000 at once: the bucket
    holds one second's worth at most, so a start does not trip the server's own window."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.clock, self._sleep = clock, sleep
        self.requests = TokenBucket(rpm / 60, max(1.0, rpm / 60), clock) if rpm else None
        self.tokens = TokenBucket(tpm / 60, max(1.0, tpm / 60), clock) if tpm else None
        self.paused_until = 0.0
        self._lock = asyncio.Lock()
        self._refunded: asyncio.Event | None = None  # set when settle() gives tokens back

    async def acquire(self, tokens: int = 0) -> None:
        async with self._lock:  # first come, first served: no starvation of big requests
            while True:
                wait = max(0.0, self.paused_until - self.clock())
                if self.requests is not None:
                    wait = max(wait, self.requests.wait_time(1))
                if self.tokens is not None and tokens:
                    wait = max(wait, self.tokens.wait_time(tokens))
                if wait <= 0:
                    break
                await self._nap(wait)
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None and tokens:
                self.tokens.take(tokens)

    async def _nap(self, seconds: float) -> None:
        """Sleep `seconds`, or less if an answer gives tokens back meanwhile: estimates are
        high (they count `max_tokens`), and a waiter that slept its whole estimated wait would
        hold throughput well under `tpm`."""
        if self.tokens is None:
            await self._sleep(seconds)
            return
        if self._refunded is None:  # created inside the running loop
            self._refunded = asyncio.Event()
        self._refunded.clear()
        refunded = asyncio.ensure_future(self._refunded.wait())
        slept = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait({refunded, slept}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            refunded.cancel()
            slept.cancel()

    def settle(self, estimate: int, actual: int) -> None:
        """Correct the token bucket by what the request really used."""
        if self.tokens is not None and actual != estimate:
            if actual > estimate:
                self.tokens.take(actual - estimate)
            else:
                self.tokens.give(estimate - actual)
                if self._refunded is not None:
                    self._refunded.set()  # the waiter looks again

    def penalize(self, seconds: float) -> None:
        """The server said wait (retry-after): nobody sends before then."""
        self.paused_until = max(self.paused_until, self.clock() + seconds)


class AIMD:
    """Concurrency that halves on 429s (once per `cooldown` seconds, so a burst of 429s from
    requests already in flight is one cut) and grows by one after `grow_after` successes."""

    def __init__(
        self,
        start: int,
        maximum: int | None = None,
        minimum: int = 1,
        grow_after: int = 20,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = start
        self.maximum = maximum or start
        self.minimum, self.grow_after, self.cooldown, self.clock = (
            minimum,
            grow_after,
            cooldown,
            clock,
        )
        self.in_flight = 0
        self.cuts = 0
        self._successes = 0
        self._last_cut = -1e9
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # created inside the running loop
            self._cond = asyncio.Condition()
        return self._cond

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        cond = self._condition()
        async with cond:
            await cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
        try:
            yield
        finally:
            async with cond:
                self.in_flight -= 1
                cond.notify_all()

    def on_success(self) -> None:
        self._successes += 1
        if self._successes >= self.grow_after and self.limit < self.maximum:
            self._successes = 0
            self.limit += 1
            if self._cond is not None:
                asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        cond = self._condition()
        async with cond:
            cond.notify_all()

    def on_throttle(self) -> None:
        now = self.clock()
        if now - self._last_cut >= self.cooldown:
            self._last_cut = now
            self.limit = max(self.minimum, self.limit // 2)
            self._successes = 0
            self.cuts += 1
