"""When to try a failed call again: one `RetryPolicy`, plain data, for every path.

The local runner (a python function or a local model's failures), the real-time provider
calls and the batch paths (a batch's create, a batch's failed lines) each ask the same
question after a failure — try again, and when, or give up, or pause the job — and answer
it with `RetryPolicy.decide(attempt, failure, now)`. Paths differ only in the policy's data
(the batch lines wait for no backoff: the next batch is the wait; a batch create has its
own four tries) and in what they do with the answer.

The rules, in order (`decide`):

1. A kind in `pause` (a refused key, an account out of credit) pauses the job, items
   pending: trying again will not help, and failing every item would be wrong.
2. The server's `x-should-retry: false` gives up at once; `true` retries even a kind that
   is not retryable (the server's word beats the status code).
3. A kind not in `retryable` gives up at once (a bad request, a record the function
   refuses).
4. A 429 (`throttled`), where `max_throttled` is set, is not a failed attempt: it is retried
   for as long as the 429s in a row last less than `max_throttled` seconds, then the job
   pauses. Where `max_throttled` is None it is a failed attempt like the others.
5. A failed attempt: after `max_attempts` of them, give up.
6. Otherwise retry after the backoff: `base * 2**(attempt-1)`, capped at `cap`, of which the
   `jitter` fraction is drawn at random (0.5: "equal jitter", half fixed, half random, so
   retries spread out but never come back at once) — and never before the server's
   Retry-After hint, itself capped at `max_server_wait` (120 s by default).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Protocol

from .errors import is_transient

# Kinds (see llm/providers.FailureKind for the provider's; `transient` and `permanent` are
# an exception's, by errors.is_transient; `unreadable` an answer that is not JSON).
RETRYABLE = frozenset(
    {"transient", "retryable", "timed_out", "unreachable", "unreadable", "throttled"}
)
PAUSE = frozenset({"key_refused", "out_of_quota"})
MAX_SERVER_WAIT = 120.0  # a longer Retry-After is capped (the OpenAI SDK gives up instead)
# One request answered 429 for this long in a row: the server is not going to let us in soon
# (a daily quota, an account limit). The job pauses, items pending, rather than failing them.
MAX_THROTTLED = 1800.0
_MAX_DOUBLINGS = 64  # 2**64 times any base is past any cap; a float 2**1024 would overflow

Action = Literal["retry", "give_up", "pause"]
Reason = Literal[
    "backoff",  # retry: a failed attempt, attempts left
    "throttled",  # retry: a 429, not counted
    "exhausted",  # give up: max_attempts failed attempts
    "not_retryable",  # give up: the kind is not worth another try
    "server_said_no",  # give up: x-should-retry: false
    "throttled_too_long",  # pause: 429s in a row for max_throttled seconds
    "key_refused",  # pause: the kinds in `pause` are their own reason
    "out_of_quota",
]


class Failed(Protocol):
    """What `decide` reads of a failure: `llm.providers.Failure` is one, `Fault` another."""

    @property
    def kind(self) -> str: ...
    @property
    def retry_after(self) -> float | None: ...
    @property
    def should_retry(self) -> bool | None: ...


@dataclass(frozen=True)
class Fault:
    """A failure that is not a provider's answer: an exception's, a batch line's."""

    kind: str
    retry_after: float | None = None
    should_retry: bool | None = None

    @staticmethod
    def of(exc: BaseException) -> Fault:
        return Fault("transient" if is_transient(exc) else "permanent")


@dataclass(frozen=True)
class RetryDecision:
    action: Action
    reason: Reason | str
    at: float | None = None  # retry at this time, on the clock `now` was read from
    wait: float = 0.0  # at - now
    hint: float | None = None  # the server's Retry-After that went into it, capped

    @property
    def retry(self) -> bool:
        return self.action == "retry"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base: float = 0.5  # seconds before the second attempt (before jitter)
    cap: float = 60.0
    jitter: float = 0.5  # the random fraction of each delay
    max_server_wait: float = MAX_SERVER_WAIT
    max_throttled: float | None = MAX_THROTTLED  # None: a 429 is a failed attempt
    retryable: frozenset[str] = RETRYABLE
    pause: frozenset[str] = PAUSE

    def decide(
        self,
        attempt: int,
        failure: Failed,
        now: float,
        *,
        since: float | None = None,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """After a failure: retry at a time, give up, or pause the job, with the reason.

        `attempt`: the failed attempts so far, this one included; for a `throttled` failure
        not counted as an attempt (`max_throttled` set), the 429s in a row. `since`: when
        those 429s in a row began (on `now`'s clock). `rng`: where the jitter is drawn."""
        kind = failure.kind
        if kind in self.pause:
            return RetryDecision("pause", kind)
        if failure.should_retry is False:
            return RetryDecision("give_up", "server_said_no")
        if kind not in self.retryable and not failure.should_retry:
            return RetryDecision("give_up", "not_retryable")
        reason: Reason = "backoff"
        if kind == "throttled" and self.max_throttled is not None:
            if since is not None and now - since >= self.max_throttled:
                return RetryDecision("pause", "throttled_too_long")
            reason = "throttled"
        elif attempt >= self.max_attempts:
            return RetryDecision("give_up", "exhausted")
        hint = failure.retry_after
        if hint is not None:
            hint = min(hint, self.max_server_wait)
        wait = max(self.delay(attempt, rng), hint or 0.0)
        return RetryDecision("retry", reason, now + wait, wait, hint)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The backoff after the `attempt`-th failure, jittered (see the module docstring)."""
        d = min(self.cap, self.base * 2.0 ** min(_MAX_DOUBLINGS, max(0, attempt - 1)))
        return d * (1 - self.jitter) + (rng or random).uniform(0, d * self.jitter)
