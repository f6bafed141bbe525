"""Batch size: fixed, or "auto" — measure throughput at growing sizes on real work (nothing is
thrown away: every measured batch is committed) and keep the best one under a memory ceiling."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import psutil


def _rss_mb() -> float:
    """Resident memory of this process and its children: the worker process that holds the
    model or runs the function (`[run] isolation = "process"`) is where a batch's memory
    goes, not the runner."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # it ended in between
            total += child.memory_info().rss
    return total / 2**20


@dataclass
class BatchSizer:
    size: int
    auto: bool = False
    maximum: int = 0
    memory_limit_mb: int = 2048
    min_seconds: float = 0.5  # measure each size for at least this long...
    min_batches: int = 2  # ...and over at least this many batches
    settled: bool = True
    best: int = 0
    best_rate: float = 0.0
    trials: list[tuple[int, float]] = field(default_factory=list)  # (size, items/s) measured
    _items: int = 0
    _seconds: float = 0.0
    _batches: int = 0
    _misses: int = 0

    @classmethod
    def fixed(cls, size: int) -> BatchSizer:
        return cls(size=size)

    @classmethod
    def automatic(
        cls, start: int, maximum: int, memory_limit_mb: int, min_batches: int = 2
    ) -> BatchSizer:
        return cls(
            size=start,
            auto=True,
            maximum=maximum,
            memory_limit_mb=memory_limit_mb,
            settled=False,
            best=start,
            min_batches=min_batches,
        )

    def observe(self, items: int, seconds: float) -> None:
        if self.settled:
            return
        if items < self.size:  # a short tail batch says little about this size
            return
        # (A call may hold several batches of `size`: the rate per item is what counts.)
        self._items += items
        self._seconds += seconds
        self._batches += 1
        if self._batches < self.min_batches or self._seconds < self.min_seconds:
            return
        rate = self._items / self._seconds
        self.trials.append((self.size, rate))
        rss_mb = _rss_mb()
        if rate > self.best_rate * 1.03:
            self.best, self.best_rate, self._misses = self.size, rate, 0
        else:
            self._misses += 1
        if rss_mb > self.memory_limit_mb:  # over the ceiling: this size and larger are out
            self.best = min(self.best, max(1, self.size // 2))
            self._settle()
        elif self._misses >= 2 or self.size * 2 > self.maximum:
            self._settle()
        else:
            self.size *= 2
        self._items, self._seconds, self._batches = 0, 0.0, 0

    def _settle(self) -> None:
        self.size, self.settled = self.best, True
