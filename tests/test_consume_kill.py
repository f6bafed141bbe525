"""kill -9 `overnight consume` mid-stream, several times, while records keep arriving; start
it again: every message has its result, none lost, none computed from a second item.

Results are at-least-once (intake/kinds.py): a kill between a publish and the ledger's mark
sends that page again, with the same ids and the same outputs. The test counts such repeats
and checks that they are copies; the ledger holds exactly one result per id."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from queue_helpers import Rabbit, RedisStreams, Sqs, calls, moto_endpoint, records, write_job  # noqa: F401

from overnight.job import Job

pytestmark = pytest.mark.slow

N = 600


@pytest.fixture(params=["rabbitmq", "redis", "sqs"])
def kill_broker(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "rabbitmq":
        harness: Any = Rabbit()
    elif request.param == "redis":
        harness = RedisStreams()
    else:  # received and not deleted by a killed consumer: visible again after 2 s
        harness = Sqs(request.getfixturevalue("moto_endpoint"), visibility=2)
    try:
        yield harness
    finally:
        harness.close()


def consume(folder: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "overnight", "consume", "job.toml", *args],
        cwd=folder,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_kill_9_mid_stream_loses_nothing(tmp_path: Path, kill_broker: Any) -> None:
    b = kill_broker
    rng = random.Random(9)
    run = {"flush_size": 40, "flush_wait": 0.3, "batch_size": 20}
    source = {**b.source(), "prefetch": 20}
    write_job(tmp_path, source, b.output(), run, sleep=0.01)

    def produce() -> None:  # the stream: 600 records over about ten seconds
        for i in range(0, N, 20):
            b.publish(records(range(i, i + 20)))
            time.sleep(0.3)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    results: list[dict[str, Any]] = []
    kills = 0
    seen: list[tuple[int, int]] = []  # (results, records computed) at each kill
    for kill in range(4):
        proc = consume(tmp_path)
        if kill == 0:  # while it starts, or takes in its first messages
            time.sleep(rng.uniform(0.5, 1.5))
        else:  # once it has computed some more: while it computes, commits or publishes
            target = len(calls(tmp_path)) + rng.randint(20, 80)
            deadline = time.monotonic() + 60
            while len(calls(tmp_path)) < target and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.2))
        results += b.results()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        kills += 1
        seen.append((len(results), len(calls(tmp_path))))
    producer.join(60)
    last = consume(tmp_path, "--exit-idle", "5")
    out, err = last.communicate(timeout=300)
    assert last.returncode == 0, err.decode()
    results += b.results()

    ids = Counter(r["id"] for r in results)
    assert sorted(ids, key=int) == [str(i) for i in range(N)]  # none lost
    first: dict[str, dict[str, Any]] = {}
    for r in results:  # a repeat is a copy: same id, same output
        assert first.setdefault(r["id"], r) == r
    assert all(r["output"] == f"HELLO {r['id']}" for r in first.values())
    repeats = sum(ids.values()) - N
    counts = Job.from_file(tmp_path / "job.toml").status().counts
    assert (counts["succeeded"], counts.failed, counts.open) == (N, 0, 0)
    computed = Counter(calls(tmp_path))
    assert set(computed) == {str(i) for i in range(N)}
    # Only what a killed runner was computing is computed again (a batch of 20 per kill).
    again = sum(computed.values()) - N
    assert again <= kills * 20, computed.most_common(5)
    print(f"{b.name}: killed at {seen}; {repeats} results published twice, {again} computed twice")
