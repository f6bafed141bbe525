"""Retry strategy as plain data: exponential backoff with jitter, capped, bounded attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    max_attempts: int = 3
    base: float = 0.5  # seconds before the second attempt (before jitter)
    cap: float = 60.0

    def can_retry(self, attempts_made: int) -> bool:
        return attempts_made < self.max_attempts

    def delay(self, attempts_made: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the n-th failed attempt: half fixed, half random ("equal
        jitter"), so retries of a failed batch spread out but never come back instantly."""
        d = min(self.cap, self.base * 2 ** max(0, attempts_made - 1))
        return d / 2 + (rng or random).uniform(0, d / 2)
