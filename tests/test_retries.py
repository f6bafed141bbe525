"""Retries. `RetryPolicy.decide` as data: a table of failures in, decisions out, the clock
and the jitter's draw passed in (nothing sleeps). Then what the README promises of a python
function's failures: a `ConnectionError` or a `MemoryError` let through is retried with
backoff, up to `max_attempts`, and the ledger's attempts say how many tries were made."""

from __future__ import annotations

import math
import random
import sqlite3
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import orjson
import pytest
from job_helpers import ALL_ITEMS

import overnight
from overnight.errors import InputError, InvalidOutput, PermanentError, TransientError
from overnight.llm.batch import CREATE_POLICY, Result, TooLarge, _create, result_fault
from overnight.llm.providers import Failure
from overnight.retry import PAUSE, RETRYABLE, Fault, RetryPolicy

NOW = 1_000_000.0  # the clock, as the caller read it: decisions are relative to it


class Edge:
    """A draw at one end of the jitter's range."""

    def __init__(self, pick: str) -> None:
        self.pick = pick

    def uniform(self, lo: float, hi: float) -> float:
        return lo if self.pick == "low" else hi


LOW, HIGH = Edge("low"), Edge("high")


def decided(
    policy: RetryPolicy,
    attempt: int,
    failure: Fault | Failure,
    now: float = NOW,
    since: float | None = None,
    rng: Edge = LOW,
) -> tuple[object, ...]:
    d = policy.decide(attempt, failure, now, since=since, rng=rng)  # type: ignore[arg-type]
    assert d.retry == (d.action == "retry")
    return (d.action, d.reason, d.at, d.wait, d.hint)


def retry(reason: str, wait: float, hint: float | None = None) -> tuple[object, ...]:
    return ("retry", reason, NOW + wait, wait, hint)


def give_up(reason: str) -> tuple[object, ...]:
    return ("give_up", reason, None, 0.0, None)


def pause(reason: str) -> tuple[object, ...]:
    return ("pause", reason, None, 0.0, None)


# Attempt 1 of the default policy: a retry waits 0.25 s (half of base 0.5, the low draw).
KINDS = [
    # an exception's (errors.is_transient), a batch line's
    ("transient", None, retry("backoff", 0.25)),
    ("permanent", None, give_up("not_retryable")),
    # a provider's (llm.providers.FailureKind), and an answer that is not JSON
    ("retryable", None, retry("backoff", 0.25)),
    ("timed_out", None, retry("backoff", 0.25)),
    ("unreachable", None, retry("backoff", 0.25)),
    ("unreadable", None, retry("backoff", 0.25)),
    ("throttled", None, retry("throttled", 0.25)),
    ("client_error", None, give_up("not_retryable")),
    ("forbidden", None, give_up("not_retryable")),
    ("key_refused", None, pause("key_refused")),
    ("out_of_quota", None, pause("out_of_quota")),
    ("something new", None, give_up("not_retryable")),  # unknown: not worth a retry
    # x-should-retry: the server's word beats the kind, but never resumes a paused job
    ("retryable", False, give_up("server_said_no")),
    ("throttled", False, give_up("server_said_no")),
    ("client_error", True, retry("backoff", 0.25)),
    ("permanent", True, retry("backoff", 0.25)),
    ("retryable", True, retry("backoff", 0.25)),
    ("key_refused", True, pause("key_refused")),
    ("key_refused", False, pause("key_refused")),
    ("out_of_quota", False, pause("out_of_quota")),
]


@pytest.mark.parametrize(("kind", "should_retry", "expected"), KINDS)
def test_each_failure_kind(kind: str, should_retry: bool | None, expected: tuple) -> None:
    assert decided(RetryPolicy(), 1, Fault(kind, should_retry=should_retry)) == expected


def test_the_kinds_tables_cover_every_provider_kind() -> None:
    from typing import get_args

    from overnight.llm.providers import FailureKind

    assert set(get_args(FailureKind)) <= RETRYABLE | PAUSE | {"client_error", "forbidden"}
    assert not RETRYABLE & PAUSE


def test_a_provider_failure_is_decided_by_its_kind_and_headers() -> None:
    """llm.providers.Failure goes in as it is: its retry-after (ms first) and x-should-retry."""
    busy = Failure("retryable", 503, headers={"retry-after-ms": "1500", "retry-after": "9"})
    assert decided(RetryPolicy(), 1, busy) == retry("backoff", 1.5, 1.5)
    said_no = Failure("retryable", 500, should_retry=False)
    assert decided(RetryPolicy(), 1, said_no) == give_up("server_said_no")


# (max_attempts, attempt that just failed, decision): attempts count the failures so far.
EXHAUSTED = [
    (3, 1, retry("backoff", 0.25)),
    (3, 2, retry("backoff", 0.5)),
    (3, 3, give_up("exhausted")),
    (3, 4, give_up("exhausted")),
    (1, 1, give_up("exhausted")),
    (2, 1, retry("backoff", 0.25)),
]


@pytest.mark.parametrize(("max_attempts", "attempt", "expected"), EXHAUSTED)
def test_attempts_exhausted(max_attempts: int, attempt: int, expected: tuple) -> None:
    policy = RetryPolicy(max_attempts)
    assert decided(policy, attempt, Fault("transient")) == expected
    assert decided(policy, attempt, Fault("permanent")) == give_up("not_retryable")


def test_the_default_policy() -> None:
    """3 attempts; 0.5 s doubling to 60 s, half of it random; Retry-After up to 120 s; 429s
    for up to 30 minutes in a row, not counted."""
    policy = RetryPolicy()
    assert decided(policy, 2, Fault("transient"), rng=HIGH) == retry("backoff", 1.0)
    assert decided(policy, 3, Fault("transient")) == give_up("exhausted")
    assert decided(policy, 8, Fault("throttled"), rng=HIGH) == retry("throttled", 60.0)
    assert decided(policy, 9, Fault("throttled"), rng=LOW) == retry("throttled", 30.0)
    assert decided(policy, 1, Fault("retryable", 500.0)) == retry("backoff", 120.0, 120.0)
    assert decided(policy, 1, Fault("throttled"), NOW, NOW - 1799.9) == retry("throttled", 0.25)
    assert decided(policy, 1, Fault("throttled"), NOW, NOW - 1800) == pause("throttled_too_long")


# A 429 is not a failed attempt while max_throttled is set: `attempt` is then the 429s in a
# row, and `since` when they began; where it is None, a 429 is a failed attempt.
THROTTLED = [
    # (max_throttled, attempt, since, decision)
    (10.0, 1, None, retry("throttled", 0.25)),
    (10.0, 50, NOW, retry("throttled", 30.0)),  # far past max_attempts: still retried
    (10.0, 3, NOW - 9.999, retry("throttled", 1.0)),
    (10.0, 3, NOW - 10.0, pause("throttled_too_long")),
    (10.0, 1, NOW - 60.0, pause("throttled_too_long")),
    (None, 2, None, retry("backoff", 0.5)),
    (None, 3, NOW - 60.0, give_up("exhausted")),
]


@pytest.mark.parametrize(("max_throttled", "attempt", "since", "expected"), THROTTLED)
def test_a_429_is_retried_until_it_lasts_too_long(
    max_throttled: float | None, attempt: int, since: float | None, expected: tuple
) -> None:
    policy = RetryPolicy(3, max_throttled=max_throttled)
    assert decided(policy, attempt, Fault("throttled"), since=since) == expected


# The server's Retry-After: never retried sooner, and a longer wait is capped.
RETRY_AFTER = [
    # (hint, attempt, draw, max_server_wait, decision)
    (None, 1, LOW, 120.0, retry("backoff", 0.25)),
    (10.0, 1, LOW, 120.0, retry("backoff", 10.0, 10.0)),
    (0.1, 1, HIGH, 120.0, retry("backoff", 0.5, 0.1)),  # the backoff is longer: it wins
    (0.0, 1, LOW, 120.0, retry("backoff", 0.25, 0.0)),
    (500.0, 1, LOW, 120.0, retry("backoff", 120.0, 120.0)),
    (500.0, 1, LOW, 5.0, retry("backoff", 5.0, 5.0)),
    (3.0, 2, HIGH, 2.0, retry("backoff", 2.0, 2.0)),
]


@pytest.mark.parametrize(("hint", "attempt", "rng", "cap", "expected"), RETRY_AFTER)
def test_retry_after_is_honoured_and_capped(
    hint: float | None, attempt: int, rng: Edge, cap: float, expected: tuple
) -> None:
    policy = RetryPolicy(5, max_server_wait=cap)
    assert decided(policy, attempt, Fault("retryable", hint), rng=rng) == expected
    throttled = decided(policy, attempt, Fault("throttled", hint), rng=rng)
    assert throttled == (expected[0], "throttled", *expected[2:])


def test_a_hint_does_not_bring_back_what_gives_up() -> None:
    assert decided(RetryPolicy(2), 2, Fault("retryable", 1.0)) == give_up("exhausted")
    assert decided(RetryPolicy(), 1, Fault("client_error", 1.0)) == give_up("not_retryable")


def test_backoff_bounds_and_jitter() -> None:
    """Equal jitter: after the n-th failure, between half and all of base * 2**(n-1), capped."""
    policy = RetryPolicy(max_attempts=99, base=0.5, cap=3.0)
    full = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]  # n = 1..6: doubling, then the cap
    transient = Fault("transient")
    assert [decided(policy, n, transient, rng=LOW)[3] for n in range(1, 7)] == [d / 2 for d in full]
    assert [decided(policy, n, transient, rng=HIGH)[3] for n in range(1, 7)] == full
    rng = random.Random(7)
    for n, d in enumerate(full, start=1):
        decisions = [policy.decide(n, transient, NOW, rng=rng) for _ in range(200)]
        waits = [x.wait for x in decisions]
        assert all(d / 2 <= w <= d for w in waits)
        assert all(x.at == NOW + x.wait for x in decisions)
        assert max(waits) - min(waits) > d / 4  # jittered: retries spread out
    waits = [policy.decide(1, transient, NOW).wait for _ in range(50)]  # the module's random
    assert all(0.25 <= w <= 0.5 for w in waits) and len(set(waits)) > 1


@pytest.mark.parametrize(
    ("jitter", "low", "high"), [(0.0, 2.0, 2.0), (0.5, 1.0, 2.0), (1.0, 0.0, 2.0), (0.25, 1.5, 2.0)]
)
def test_jitter_is_the_random_fraction_of_the_delay(jitter: float, low: float, high: float) -> None:
    policy = RetryPolicy(5, base=1.0, jitter=jitter)
    assert decided(policy, 2, Fault("transient"), rng=LOW)[3] == low
    assert decided(policy, 2, Fault("transient"), rng=HIGH)[3] == high


def test_attempt_zero_or_huge_stays_within_base_and_cap() -> None:
    assert decided(RetryPolicy(5, base=1.0), 0, Fault("transient"), rng=HIGH)[3] == 1.0
    # 429s in a row for hours with no cap: the doubling stops at 2**64, no float overflow.
    uncapped = RetryPolicy(5, base=1.0, cap=math.inf, jitter=0.0)
    assert decided(uncapped, 10_000, Fault("throttled"))[3] == 2.0**64
    assert decided(uncapped, 65, Fault("throttled"))[3] == 2.0**64
    assert decided(uncapped, 64, Fault("throttled"))[3] == 2.0**63


@pytest.mark.parametrize("now", [0.0, 17.5, NOW, 1.8e9])
def test_the_clock_is_the_callers(now: float) -> None:
    """`at` is on the clock `now` came from (monotonic in real time, wall time in the
    ledger); the throttled window is measured on it too."""
    d = RetryPolicy(jitter=0.0).decide(2, Fault("transient"), now)
    assert (d.at, d.wait) == (now + 1.0, 1.0)
    throttled = RetryPolicy(max_throttled=5.0).decide(1, Fault("throttled"), now, since=now - 5)
    assert throttled.action == "pause"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TransientError("try later"), "transient"),
        (ConnectionError("reset"), "transient"),
        (TimeoutError(), "transient"),
        (MemoryError(), "transient"),
        (ValueError("bad"), "permanent"),
        (PermanentError("no"), "permanent"),
        (InputError("bad line"), "permanent"),
        (InvalidOutput("not JSON"), "permanent"),
    ],
)
def test_an_exceptions_kind(exc: BaseException, kind: str) -> None:
    assert Fault.of(exc) == Fault(kind)


@pytest.mark.parametrize(
    ("kind", "error_type", "fault"),
    [
        ("expired", "batch_expired", "transient"),
        ("expired", None, "transient"),
        ("cancelled", None, "transient"),
        ("cancelled", "batch_cancelled", "transient"),
        ("errored", "rate_limit_error", "transient"),
        ("errored", "server_error", "transient"),
        ("errored", "unreadable_result", "transient"),
        ("errored", "invalid_request_error", "permanent"),
        ("errored", None, "permanent"),
    ],
)
def test_a_batch_lines_kind(kind: str, error_type: str | None, fault: str) -> None:
    assert result_fault(Result("id", kind, None, error_type)) == Fault(fault)  # type: ignore[arg-type]


def test_a_batch_create_has_four_tries_and_counts_429s() -> None:
    """The create is not idempotent and blocks the run: four tries, after 0.5, 1 and 2 s
    (half of it random), a 429 counted like the others; a refused key or no credit is not
    tried again."""
    assert decided(CREATE_POLICY, 1, Fault("retryable"), rng=HIGH) == retry("backoff", 0.5)
    assert decided(CREATE_POLICY, 3, Fault("throttled"), rng=HIGH) == retry("backoff", 2.0)
    assert decided(CREATE_POLICY, 3, Fault("throttled"), rng=LOW) == retry("backoff", 1.0)
    assert decided(CREATE_POLICY, 4, Fault("throttled")) == give_up("exhausted")
    assert decided(CREATE_POLICY, 4, Fault("retryable")) == give_up("exhausted")
    assert decided(CREATE_POLICY, 1, Fault("retryable", 30.0)) == retry("backoff", 30.0, 30.0)
    assert decided(CREATE_POLICY, 1, Fault("out_of_quota"))[0] == "pause"


FUNCTION = """
import os
SEEN = {seen!r}

def fn(records):
    out = []
    for r in records:
        n = r["n"]
        if n == 13:
            raise MemoryError("never enough for 13")
        mark = os.path.join(SEEN, str(n))
        if n % 4 in (1, 2) and not os.path.exists(mark):  # once per record
            open(mark, "w").close()
            raise ConnectionError(f"reset by peer on {{n}}") if n % 4 == 1 else MemoryError()
        out.append(n * 10)
    return out
"""


def test_connection_and_memory_errors_from_a_function_are_retried(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"k{n}", "n": n}) + b"\n" for n in range(16))
    )
    (tmp_path / "seen").mkdir()
    module = f"fn_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(FUNCTION.format(seen=str(tmp_path / "seen")))
    job = overnight.Job(
        {
            "name": "t",
            "source": {"path": "in.jsonl", "id": "id"},
            "model": {"backend": "python", "function": f"{module}:fn"},
            "run": {"batch_size": 1, "backoff_base": 0.01, "backoff_max": 0.02, "max_attempts": 3},
            "output": {"path": "out.jsonl"},
        },
        base_dir=tmp_path,
    )
    report = job.run()
    assert report.counts["succeeded"] == 15 and report.counts.failed == 1
    rows = {r["id"]: r["output"] for r in map(orjson.loads, (tmp_path / "out.jsonl").open("rb"))}
    assert rows == {f"k{n}": n * 10 for n in range(16) if n != 13}
    (failure,) = job.failures()
    assert failure.custom_id == "k13" and failure.error_class == "MemoryError"
    assert failure.attempts == 3 and "gave up after 3 attempts" in failure.message
    db = sqlite3.connect(tmp_path / ".overnight" / "ledger.db")
    attempts = dict(db.execute(f"SELECT custom_id, attempts FROM {ALL_ITEMS}"))
    db.close()
    # Failed once, then answered: two tries each; the others one. (Batches of one record,
    # so that no split of a failing batch calls the function again in the same attempt.)
    assert {k for k, n in attempts.items() if n == 2} == {
        f"k{n}" for n in range(16) if n % 4 in (1, 2) and n != 13
    }
    assert {k for k, n in attempts.items() if n == 1} == {
        f"k{n}" for n in range(16) if n % 4 in (0, 3)
    }


SLOW_FAILURE = """
import time
CALLS = {calls!r}

def fn(records):
    with open(CALLS, "a") as f:
        f.write(f"{{records[0]['id']}} {{time.time()}}\\n")
    with open(CALLS) as f:
        if len(f.readlines()) == 1:  # the first call only
            raise ConnectionError("reset by peer")
    return [r["n"] for r in records]
"""


def test_a_failed_item_is_not_tried_again_before_its_backoff(tmp_path: Path) -> None:
    """The ledger's due time is the policy's `at`: after the first failure, at least half of
    backoff_base (equal jitter) passes before the record is computed again."""
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "a", "n": 1}\n')
    module = f"fn_{uuid.uuid4().hex[:8]}"
    calls = tmp_path / "calls.txt"
    (tmp_path / f"{module}.py").write_text(SLOW_FAILURE.format(calls=str(calls)))
    job = overnight.Job(
        {
            "name": "t",
            "source": {"path": "in.jsonl", "id": "id"},
            "model": {"backend": "python", "function": f"{module}:fn"},
            "run": {"batch_size": 1, "backoff_base": 0.6, "backoff_max": 0.6, "max_attempts": 2},
            "output": {"path": "out.jsonl"},
        },
        base_dir=tmp_path,
    )
    assert job.run().counts["succeeded"] == 1
    first, second = (float(line.split()[1]) for line in calls.read_text().splitlines())
    assert second - first >= 0.3


def status_error(status: int, headers: dict[str, str] | None = None, code: str = "") -> Exception:
    """An OpenAI SDK error, as a create would raise it."""
    request = httpx.Request("POST", "https://api.example/v1/batches")
    response = httpx.Response(status, headers=headers or {}, request=request)
    body = {"code": code, "message": "no"} if code else None  # the SDK passes the error object
    return openai.APIStatusError(f"Error code: {status}", response=response, body=body)


NO_WAIT = RetryPolicy(4, 0.0, 0.0, max_throttled=None)  # CREATE_POLICY's rules, no sleeping


@pytest.mark.parametrize(
    ("error", "creates"),
    [
        (status_error(503), 4),
        (status_error(429), 4),  # counted: four tries, as any other failure
        (status_error(500, {"x-should-retry": "false"}), 1),
        (status_error(400), 1),
        (status_error(401), 1),
        (status_error(429, code="insufficient_quota"), 1),
        (ValueError("a bug"), 1),
    ],
)
def test_a_batch_create_tries_as_its_policy_says(error: Exception, creates: int) -> None:
    """`_create` asks the policy after each failure; what it gives up on propagates (the
    chunk stays `creating` for the next run). Before each retry it looks for the batch."""
    calls: list[str] = []

    def create() -> str:
        calls.append("create")
        raise error

    def find(until: float) -> None:
        calls.append("find")

    with pytest.raises(type(error)):
        _create(create, find, lambda until: None, 0.0, NO_WAIT)
    assert calls == ["create", "find"] * (creates - 1) + ["create"]


def test_a_batch_create_that_failed_once_finds_or_makes_its_batch() -> None:
    answers: list[Exception | str] = [status_error(502), "batch_2"]
    made = _create(lambda: _next(answers), lambda until: None, lambda until: None, 0.0, NO_WAIT)
    assert made == "batch_2" and not answers
    answers = [status_error(502), "batch_3"]
    found = _create(lambda: _next(answers), lambda until: "batch_1", lambda u: None, 0.0, NO_WAIT)
    assert found == "batch_1" and answers == ["batch_3"]  # never sent again
    answers = [status_error(503), "batch_4"]
    t0 = time.monotonic()
    once = RetryPolicy(2, 0.2, 0.2, jitter=0.0)
    assert _create(lambda: _next(answers), lambda u: None, lambda u: None, 0.0, once) == "batch_4"
    assert time.monotonic() - t0 >= 0.2  # the backoff, slept
    with pytest.raises(TooLarge):
        _create(lambda: _next([status_error(413)]), lambda until: None, lambda u: None, 0.0)


def _next(answers: list[Exception | str]) -> str:
    answer = answers.pop(0)
    if isinstance(answer, Exception):
        raise answer
    return answer
