"""`overnight consume`: queue intake from RabbitMQ, Redis Streams and SQS (moto's server),
each real, on loopback. Every message gets one result; a redelivered id is not processed
again; flushing by size, by wait and only inside a window (an injected clock); a slow model
never makes the consumer hold more than `prefetch` unacknowledged messages."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from queue_helpers import (  # noqa: F401 - fixtures
    Rabbit,
    RedisStreams,
    Sqs,
    broker,
    calls,
    moto_endpoint,
    records,
    write_job,
)

from overnight.errors import JobFileError, UsageError
from overnight.intake import Consumer
from overnight.intake import consumer as consumer_module
from overnight.intake.window import Window
from overnight.job import Job
from overnight.spec import parse_spec

# -- the job file ---------------------------------------------------------------------------

AMQP = {"queue": "amqp://guest:guest@127.0.0.1:5672/%2F", "queue_name": "in", "id": "id"}
MODEL = {"backend": "python", "function": "fn:upper"}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(JobFileError) as info:
        parse_spec(data, "job.toml")
    return str(info.value)


@pytest.mark.parametrize(
    ("source", "run", "output", "message"),
    [
        (
            {"queue": "amqp://127.0.0.1/", "id": "id"},
            {},
            {},
            "[source]: a RabbitMQ `queue` needs `queue_name`",
        ),
        (
            {"queue": "redis://127.0.0.1:6379/0", "queue_name": "x", "id": "id"},
            {},
            {},
            "[source]: a Redis `queue` needs `stream`",
        ),
        (
            {"queue": "kafka://127.0.0.1/", "queue_name": "x", "id": "id"},
            {},
            {},
            "[source]: `queue` must be an amqp://, redis:// or sqs:// URL",
        ),
        ({**AMQP, "id": None}, {}, {}, "[source]: `id` is required for a queue source"),
        ({**AMQP, "path": "in.jsonl"}, {}, {}, "not both `path` and `queue`"),
        ({**AMQP, "stream": "s"}, {}, {}, "`stream` applies to a Redis `queue`, not to RabbitMQ"),
        ({**AMQP, "prefetch": 0}, {}, {}, "[source] prefetch: Input should be greater than 0"),
        (AMQP, {"window": "1am-6am"}, {}, '[run] window: `window` must look like "01:00-06:00"'),
        (AMQP, {"window": "01:00-24:00"}, {}, "hours are 00-23"),
        (AMQP, {"flush_size": 0}, {}, "[run] flush_size: Input should be greater than 0"),
        (
            {"path": "in.jsonl"},
            {"flush_wait": 3.0},
            {},
            "[run] flush_wait applies to a queue source ([source] queue)",
        ),
        ({"path": "in.jsonl"}, {}, {"queue_name": "r"}, "`queue_name` applies to a results queue"),
        (AMQP, {}, {"queue": AMQP["queue"]}, "[output]: a RabbitMQ `queue` needs `queue_name`"),
        (
            AMQP,
            {},
            {"queue": AMQP["queue"], "queue_name": "r", "path": "o.jsonl"},
            "set `queue` (a results queue) or `path`, not both",
        ),
        (  # its results would come back as redeliveries, be acknowledged and dropped
            AMQP,
            {},
            {"queue": AMQP["queue"] + "/", "queue_name": "in"},
            "[output] queue: 'in' is the job's [source] queue; results go to another queue",
        ),
        (
            {"queue": "redis://127.0.0.1:6379/0", "stream": "s", "id": "id"},
            {},
            {"queue": "redis://127.0.0.1:6379/0", "stream": "s"},
            "[output] queue: 's' is the job's [source] queue",
        ),
    ],
)
def test_a_bad_queue_key_is_one_message_naming_it(
    source: dict[str, Any], run: dict[str, Any], output: dict[str, Any], message: str
) -> None:
    source = {k: v for k, v in source.items() if v is not None}
    data = {"source": source, "model": MODEL, "run": run, "output": output}
    assert message in error_of(data)


def test_consume_on_a_bad_job_file_exits_2_without_a_traceback(tmp_path: Path) -> None:
    write_job(tmp_path, {"queue": "redis://127.0.0.1:6379/0"}, {})
    got = subprocess.run(
        [sys.executable, "-m", "overnight", "consume", "job.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 2
    assert "[source]: a Redis `queue` needs `stream`" in got.stderr
    assert "Traceback" not in got.stderr


def test_consume_reads_only_a_queue(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": 1, "text": "a"}\n')
    job = Job({"source": {"path": "in.jsonl", "id": "id"}, "model": MODEL}, base_dir=tmp_path)
    with pytest.raises(Exception, match="`overnight consume` reads a queue"):
        Consumer(job)


def test_an_unreachable_broker_is_exit_2(tmp_path: Path) -> None:
    source = {"queue": "amqp://guest:guest@127.0.0.1:1/%2F", "queue_name": "x"}
    write_job(tmp_path, source, {"queue": "redis://127.0.0.1:6379/0", "stream": "r"})
    got = subprocess.run(
        [sys.executable, "-m", "overnight", "consume", "job.toml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 2, got.stderr
    assert "cannot reach the queue at amqp://guest:***@127.0.0.1:1/%2F" in got.stderr


def test_a_window_crossing_midnight() -> None:
    night = Window.parse("22:30-04:00")
    at = datetime(2026, 12, 1, 0, 0)
    assert night.contains(at.replace(hour=23))
    assert night.contains(at.replace(hour=3, minute=59))
    assert not night.contains(at.replace(hour=4))
    assert not night.contains(at.replace(hour=22, minute=29))
    day = Window.parse("01:00-06:00")
    assert day.contains(at.replace(hour=1)) and not day.contains(at.replace(hour=6))


# -- against the brokers ----------------------------------------------------------------------


def wait_for(what: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def consume(job_file: Path, **kwargs: Any) -> Any:
    return Consumer(Job.from_file(job_file), **kwargs).run()


def by_id(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    counts = Counter(r["id"] for r in results)
    assert max(counts.values(), default=1) == 1, counts.most_common(3)
    return {r["id"]: r for r in results}


def test_every_message_gets_one_result_and_a_redelivered_id_is_not_processed_again(
    tmp_path: Path, broker: Any
) -> None:
    job = write_job(tmp_path, broker.source(), broker.output(), {"flush_size": 20})
    broker.publish([*records(range(50)), b"not json", orjson.dumps({"text": "no id"})])
    report = consume(job, idle_exit=1.0)
    assert (report.received, report.added, report.rejected) == (52, 50, 2)
    got = by_id(broker.results())
    assert sorted(got, key=int) == [str(i) for i in range(50)]
    assert got["7"] == {"id": "7", "state": "succeeded", "output": "HELLO 7"}
    assert sorted(calls(tmp_path), key=int) == [str(i) for i in range(50)]
    errors = [orjson.loads(line) for line in (tmp_path / "consume.out.errors.jsonl").open("rb")]
    assert [e["message"][:30] for e in errors] == [
        "message 51: malformed JSON (in",
        "message 52: record has no 'id'",
    ]
    # The broker delivers some of them again (their acks lost, say), beside new ones.
    broker.publish([*records(range(40, 50)), *records(range(50, 55)), *records([52])])
    report = consume(job, idle_exit=1.0)
    assert (report.received, report.added, report.redelivered) == (16, 5, 11)
    assert sorted(by_id(broker.results()), key=int) == ["50", "51", "52", "53", "54"]
    assert Counter(calls(tmp_path)).most_common(1)[0][1] == 1  # nothing computed twice
    status = Job.from_file(job).status()
    assert status.counts["succeeded"] == 55


@pytest.fixture
def redis_broker() -> Iterator[RedisStreams]:
    harness = RedisStreams()
    try:
        yield harness
    finally:
        harness.close()


class Clock:
    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now


def in_thread(consumer: Consumer) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    return thread


def counts(job_file: Path) -> Any:
    try:
        return Job.from_file(job_file).status().counts
    except Exception:  # no ledger entry yet
        return None


def test_flush_by_size_and_by_wait(tmp_path: Path, redis_broker: RedisStreams) -> None:
    b = redis_broker
    run = {"flush_size": 10, "flush_wait": 30.0}
    job_file = write_job(tmp_path, b.source(), b.output(), run)
    clock = Clock(datetime(2026, 12, 1, 12, 0))
    consumer = Consumer(Job.from_file(job_file), clock=clock)
    thread = in_thread(consumer)
    try:
        b.publish(records(range(3)))
        wait_for(lambda: (c := counts(job_file)) is not None and c["pending"] == 3)
        time.sleep(1.0)  # three wait, under flush_size, for less than flush_wait: collected only
        assert calls(tmp_path) == [] and b.unacked() == 0 and counts(job_file)["pending"] == 3
        clock.now += 31  # the oldest has waited flush_wait
        wait_for(lambda: len(calls(tmp_path)) == 3)
        b.publish(records(range(3, 13)))  # flush_size arrive: at once, the clock standing still
        # The function has seen all 13 before their batch commits: wait for the commit.
        wait_for(lambda: counts(job_file)["succeeded"] == 13)
        assert len(calls(tmp_path)) == 13
    finally:
        consumer.stop.set()
        thread.join(30)
    assert sorted(by_id(b.results()), key=int) == [str(i) for i in range(13)]


def test_a_window_collects_all_day_and_processes_at_night(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    b = redis_broker
    run = {"flush_size": 5, "flush_wait": 0.0, "window": "01:00-06:00"}
    job_file = write_job(tmp_path, b.source(), b.output(), run)
    clock = Clock(datetime(2026, 12, 1, 12, 0))  # noon: outside the window
    consumer = Consumer(Job.from_file(job_file), clock=clock)
    thread = in_thread(consumer)
    try:
        b.publish(records(range(40)))
        wait_for(lambda: (c := counts(job_file)) is not None and c["pending"] == 40)
        time.sleep(1.0)
        # Collected into the ledger and acknowledged, nothing processed before the window.
        assert calls(tmp_path) == [] and b.unacked() == 0 and b.results() == []
        clock.now = datetime(2026, 12, 2, 0, 59).timestamp()
        time.sleep(0.6)
        assert calls(tmp_path) == []
        clock.now = datetime(2026, 12, 2, 1, 0).timestamp()  # the window opens
        wait_for(lambda: len(calls(tmp_path)) == 40)
    finally:
        consumer.stop.set()
        thread.join(30)
    assert sorted(by_id(b.results()), key=int) == [str(i) for i in range(40)]


def test_a_slow_model_never_makes_the_consumer_hold_more_than_prefetch(
    tmp_path: Path, broker: Any
) -> None:
    n, prefetch = 60, 5
    source = {**broker.source(), "prefetch": prefetch}
    run = {"flush_size": 5, "flush_wait": 0.0, "batch_size": 5}
    job = write_job(tmp_path, source, broker.output(), run, sleep=0.05)
    broker.publish(records(range(n)))
    seen: list[tuple[int, int]] = []  # (unacked, not yet handed out) as the broker says
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append((broker.unacked(), broker.waiting()))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        report = consume(job, idle_exit=1.5)
    finally:
        done.set()
        watcher.join(60)
    assert report.added == n
    assert sorted(by_id(broker.results()), key=int) == [str(i) for i in range(n)]
    assert len(seen) >= 3, seen
    assert max(u for u, _ in seen) <= prefetch, seen
    # It took them a few at a time, as the model got through them: most waited at the broker.
    assert max(w for _, w in seen) >= n - 3 * prefetch, seen


def test_the_local_model_classifies_what_a_queue_brings(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    b = redis_broker
    lines = ['name = "triage"', "[source]", 'id = "id"']
    lines += [f"{k} = {orjson.dumps(v).decode()}" for k, v in b.source().items()]
    lines += ["[task]", 'kind = "classify"', 'labels = ["billing", "bug"]']
    lines += ["[model]", 'backend = "local"', "[run]", "flush_size = 4"]
    lines += ["[output]", *(f"{k} = {orjson.dumps(v).decode()}" for k, v in b.output().items())]
    (tmp_path / "job.toml").write_text("\n".join(lines) + "\n")
    texts = [
        "I was charged twice on my invoice, please refund the payment",
        "The app crashes with an error every time I open settings",
        "Refund my last invoice payment",
        "Clicking save shows an error and crashes",
    ]
    b.publish([orjson.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(texts)])
    report = consume(tmp_path / "job.toml", idle_exit=1.0)
    assert report.added == 4
    got = by_id(b.results())
    assert [got[f"t{i}"]["output"] for i in range(4)] == ["billing", "bug", "billing", "bug"]
    assert set(got["t0"]["scores"]) == {"billing", "bug"}


def test_exit_idle_counts_no_time_spent_computing(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    """A flush longer than --exit-idle, with more messages behind it: they are read too."""
    b = redis_broker
    source = {**b.source(), "prefetch": 10}
    job = write_job(tmp_path, source, b.output(), {"flush_size": 10}, sleep=0.08)
    b.publish(records(range(30)))
    report = consume(job, idle_exit=0.5)
    assert (report.added, report.flushes) == (30, 3)
    assert len(by_id(b.results())) == 30


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_ledger_url")


def test_the_ledger_knows_a_redelivered_id_and_pages_items_in_order(ledger_url: str) -> None:
    from overnight.intake.kinds import rows_of
    from overnight.records import Cursor, Fingerprint
    from overnight.store import Outcome, open_ledger

    ledger = open_ledger(ledger_url)
    try:
        job = ledger.create_job("q", "h", Fingerprint(0, 0, "queue"))
        rows = rows_of(records(range(5)), 0, "id")
        ledger.add_items(job.id, 0, rows, Cursor(5, 6, 0, "published:0"))
        assert ledger.known_ids(job.id, ["3", "9", "0", "3"]) == {"0", "3"}
        outcomes = [Outcome(5, "failed", None, "ValueError", "bad", attempts=1)]
        ledger.add_items(job.id, 5, rows_of(records([9]), 5, "id"), Cursor(6), outcomes)
        page = ledger.items_page(job.id, 2, 3)
        assert [(p.seq, p.custom_id, p.state) for p in page] == [
            (2, "2", "pending"),
            (3, "3", "pending"),
            (4, "4", "pending"),
        ]
        last = ledger.items_page(job.id, 5, 10)
        assert [(p.seq, p.custom_id, p.state, p.message) for p in last] == [
            (5, "9", "failed", "bad")
        ]
    finally:
        ledger.close()


def test_results_go_to_the_jobs_file_when_no_results_queue(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    b = redis_broker
    job = write_job(tmp_path, b.source(), {"path": "out.jsonl"}, {"flush_size": 5})
    b.publish(records(range(12)))
    consume(job, idle_exit=1.0)
    rows = [orjson.loads(line) for line in (tmp_path / "out.jsonl").open("rb")]
    assert [(r["id"], r["output"]) for r in rows] == [(str(i), f"HELLO {i}") for i in range(12)]


def test_a_queue_job_on_a_postgresql_ledger(
    tmp_path: Path, redis_broker: RedisStreams, pg_ledger_url: str
) -> None:
    b = redis_broker
    run = {"flush_size": 10, "ledger": pg_ledger_url}
    job = write_job(tmp_path, b.source(), b.output(), run)
    b.publish(records(range(25)))
    assert consume(job, idle_exit=1.0).added == 25
    b.publish(records(range(20, 30)))  # five delivered again, five new
    report = consume(job, idle_exit=1.0)
    assert (report.added, report.redelivered) == (5, 5)
    assert sorted(by_id(b.results()), key=int) == [str(i) for i in range(30)]
    assert Job.from_file(job).status().counts["succeeded"] == 30


def test_the_queue_keys_leave_a_file_jobs_fingerprint_as_older_versions_stored_it(
    tmp_path: Path,
) -> None:
    """A file job's fingerprint mixes in how its [source] is read: the queue's keys (and
    their defaults) must not enter it, or every existing job would read as changed."""
    (tmp_path / "in.jsonl").write_bytes(b'{"id": 1, "text": "a"}\n')
    job = Job({"source": {"path": "in.jsonl", "id": "id"}, "model": MODEL}, base_dir=tmp_path)
    assert job.input.fingerprint()[0].digest == "6c2da3a4fd202f165866643d25bc363e"  # 1a96c1f's


def close_rabbit_connection(name: str) -> bool:
    """Have RabbitMQ close the one connection that calls itself `name` (only that one)."""
    listed = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    pids = [line.split("\t")[0] for line in listed.splitlines() if f'"{name}"' in line]
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pid, "closed by a test"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return bool(pids)


def test_a_consumer_whose_connection_the_broker_closes_connects_again(tmp_path: Path) -> None:
    from queue_helpers import Rabbit

    b = Rabbit()
    try:
        source = {**b.source(), "prefetch": 10}
        job = write_job(tmp_path, source, b.output(), {"flush_size": 10}, sleep=0.02)
        b.publish(records(range(200)))
        consumer = Consumer(Job.from_file(job), idle_exit=2.0)
        thread = in_thread(consumer)
        wait_for(lambda: len(calls(tmp_path)) >= 30)
        assert close_rabbit_connection(f"overnight consume {b.inbox}")
        thread.join(120)
        assert not thread.is_alive()
        assert sorted(by_id(b.results()), key=int) == [str(i) for i in range(200)]
        assert Counter(calls(tmp_path)).most_common(1)[0][1] == 1
    finally:
        b.close()


def test_a_result_over_the_sqs_queues_largest_message_does_not_sink_the_others(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """SQS refuses a message over the queue's MaximumMessageSize, and with it the whole
    SendMessageBatch: the consumer died on every start at that record, publishing nothing
    after it (nor the 3 before it in its batch). It goes as its id and state with an error."""
    b = Sqs(moto_endpoint)
    try:
        b._sqs.set_queue_attributes(QueueUrl=b._out, Attributes={"MaximumMessageSize": "1024"})
        job = write_job(tmp_path, b.source(), b.output(), {"flush_size": 20})
        text = {3: "x" * 2000, 5: "y" * 900}
        b.publish([orjson.dumps({"id": i, "text": text.get(i, f"t{i}")}) for i in range(12)])
        report = consume(job, idle_exit=1.0)
        assert (report.received, report.added) == (12, 12)
        got: list[dict[str, Any]] = []
        while True:
            part = b._sqs.receive_message(QueueUrl=b._out, MaxNumberOfMessages=10)
            if not part.get("Messages"):
                break
            got += [orjson.loads(m["Body"]) for m in part["Messages"]]
            b._sqs.delete_message_batch(
                QueueUrl=b._out,
                Entries=[
                    {"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]}
                    for k, m in enumerate(part["Messages"])
                ],
            )
        results = by_id(got)
        assert sorted(results, key=int) == [str(i) for i in range(12)]
        assert results["3"]["state"] == "succeeded"
        assert results["3"]["error_class"] == "result_too_large" and "output" not in results["3"]
        assert results["5"]["output"] == "Y" * 900  # under the size: as it is
        assert results["7"]["output"] == "T7"
        assert consume(job, idle_exit=0.5).received == 0  # and it starts again cleanly
    finally:
        b.close()


def test_a_redis_stream_deleted_while_consuming_is_made_again(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    """The stream (and its group) gone under a running consumer (deleted, or a Redis
    restarted without its data): XREADGROUP answered NOGROUP and the consumer died, and what
    producers wrote to the stream afterwards waited for someone to start it again."""
    b = redis_broker
    job_file = write_job(tmp_path, b.source(), b.output(), {"flush_size": 5, "flush_wait": 0.2})
    consumer = Consumer(Job.from_file(job_file))
    thread = in_thread(consumer)
    try:
        b.publish(records(range(5)))
        wait_for(lambda: (c := counts(job_file)) is not None and c["succeeded"] == 5)
        b._r.delete(b.inbox)
        time.sleep(1.5)  # the consumer reads the missing stream meanwhile
        assert thread.is_alive()
        b.publish(records(range(5, 10)))
        wait_for(lambda: counts(job_file)["succeeded"] == 10)
    finally:
        consumer.stop.set()
        thread.join(30)
    assert sorted(by_id(b.results()), key=int) == [str(i) for i in range(10)]
    assert sorted(calls(tmp_path), key=int) == [str(i) for i in range(10)]


def test_a_rabbitmq_queue_deleted_while_consuming_is_declared_again(tmp_path: Path) -> None:
    """The broker cancels the consumer of a deleted queue: pika's consume generator ended
    (StopIteration) and the consumer died with it (exit 1). It connects again, declares the
    queue, and consumes what producers send to it next."""
    b = Rabbit()
    try:
        run = {"flush_size": 5, "flush_wait": 0.2}
        job_file = write_job(tmp_path, b.source(), b.output(), run)
        consumer = Consumer(Job.from_file(job_file))
        thread = in_thread(consumer)
        try:
            b.publish(records(range(5)))
            wait_for(lambda: (c := counts(job_file)) is not None and c["succeeded"] == 5)
            b._ch.queue_delete(b.inbox)
            time.sleep(1.5)  # the consumer is told meanwhile
            assert thread.is_alive()
            b._ch.queue_declare(b.inbox, durable=True)  # the producer's side
            b.publish(records(range(5, 10)))
            wait_for(lambda: counts(job_file)["succeeded"] == 10)
        finally:
            consumer.stop.set()
            thread.join(30)
        assert sorted(by_id(b.results()), key=int) == [str(i) for i in range(10)]
        assert sorted(calls(tmp_path), key=int) == [str(i) for i in range(10)]
    finally:
        b.close()


class Proxy:
    """A TCP proxy on loopback to a real broker, whose connections the test cuts (the
    broker "down") and lets through again."""

    def __init__(self, port: int) -> None:
        self.target, self.open, self.conns = port, True, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open = False
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        self.server.close()


def test_a_results_queue_down_while_consuming_keeps_the_consumer_collecting(
    tmp_path: Path, redis_broker: RedisStreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The results broker gone mid-stream (its connection cut, new ones refused): the consumer
    died (exit 2 on a refused connection; pika's own StreamLostError, exit 1, when cut while
    publishing) though its input was fine. It goes on collecting and computing, and publishes
    what waits once the results queue is back; every record has one result."""
    monkeypatch.setattr(consumer_module, "REPUBLISH", 0.5, raising=False)
    b, rabbit, proxy = redis_broker, Rabbit(), Proxy(5672)
    try:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F"
        out = {"queue": url, "queue_name": rabbit.outbox}
        job_file = write_job(tmp_path, b.source(), out, {"flush_size": 5, "flush_wait": 0.2})
        consumer = Consumer(Job.from_file(job_file))
        thread = in_thread(consumer)
        try:
            b.publish(records(range(5)))
            first: list[dict[str, Any]] = []
            wait_for(lambda: first.extend(rabbit.results()) or len(first) == 5)
            proxy.cut()
            b.publish(records(range(5, 10)))
            wait_for(lambda: counts(job_file)["succeeded"] == 10)
            time.sleep(1.5)  # tries to publish, refused
            assert thread.is_alive()
            proxy.open = True  # the results queue is back
            b.publish(records(range(10, 12)))
            wait_for(lambda: counts(job_file)["succeeded"] == 12)
            time.sleep(1.5)
        finally:
            consumer.stop.set()
            thread.join(30)
        got = by_id(first + rabbit.results())
        assert sorted(got, key=int) == [str(i) for i in range(12)]
        assert sorted(calls(tmp_path), key=int) == [str(i) for i in range(12)]
    finally:
        proxy.close()
        rabbit.close()


def test_a_redis_stream_key_of_another_type_is_exit_2_naming_it(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    """`[source] stream` naming a key that holds a string: Redis's WRONGTYPE came out as an
    'unexpected error' (exit 1); it is the job's mistake, exit 2 naming the key."""
    b = redis_broker
    b._r.set(b.inbox, "not a stream")
    job = write_job(tmp_path, b.source(), {})
    with pytest.raises(UsageError) as info:
        consume(job, idle_exit=0.5)
    assert info.value.exit_code == 2
    assert f"[source] stream: {b.inbox!r}" in str(info.value) and "WRONGTYPE" in str(info.value)


def test_a_row_the_results_table_refuses_does_not_stop_the_consumer(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    """A results table keyed by bigint and a message whose id is "x7": the table refused
    that row, and the consumer stopped (exit 2) at that flush and at every start after it,
    before receiving anything: one record left every later message waiting. The refused row
    is a warning; the next messages are processed and written."""
    b = redis_broker
    schema = f"ov_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        conn.execute(sa.text(f"CREATE TABLE {schema}.results (id bigint PRIMARY KEY, output text)"))
    try:
        out = {"url": "postgresql://127.0.0.1:5432/test", "table": f"{schema}.results"}
        job = write_job(tmp_path, b.source(), out, {"flush_size": 2, "flush_wait": 0.2})
        b.publish([orjson.dumps({"id": 7, "text": "a"}), orjson.dumps({"id": "x7", "text": "b"})])
        assert consume(job, idle_exit=1.0).added == 2
        b.publish([orjson.dumps({"id": 8, "text": "c"})])
        assert consume(job, idle_exit=1.0).added == 1
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT id, output FROM {schema}.results")).all()
        assert sorted(tuple(r) for r in rows) == [(7, "A"), (8, "C")]
        assert sorted(calls(tmp_path)) == ["7", "8", "x7"]
    finally:
        b.close()
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def test_an_sqs_queue_deleted_while_consuming_is_exit_2_naming_it(
    tmp_path: Path, moto_endpoint: str
) -> None:
    """SQS answering NonExistentQueue (the queue deleted under a running consumer), or any
    ClientError, came out of the receive as botocore's own error: an 'unexpected error',
    exit 1. It is a lost broker: connecting again finds no queue, exit 2 naming it."""
    b = Sqs(moto_endpoint)
    try:
        job_file = write_job(tmp_path, b.source(), b.output(), {"flush_size": 3})
        consumer = Consumer(Job.from_file(job_file))
        failed: list[BaseException] = []

        def run() -> None:
            try:
                consumer.run()
            except BaseException as exc:
                failed.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        b.publish(records(range(3)))
        wait_for(lambda: (c := counts(job_file)) is not None and c["succeeded"] == 3)
        b._sqs.delete_queue(QueueUrl=b._in)
        thread.join(60)
        assert not thread.is_alive()
        (error,) = failed
        assert isinstance(error, UsageError) and error.exit_code == 2, repr(error)
        assert "cannot reach the queue" in str(error) and "NonExistentQueue" in str(error)
    finally:
        b._sqs.create_queue(QueueName=b.inbox)  # for close()
        b.close()


def test_a_redis_socket_timeout_shorter_than_the_wait_is_not_fatal(
    tmp_path: Path, redis_broker: RedisStreams
) -> None:
    """`?socket_timeout=0.5` in the Redis URL and a blocking read that waits 1 s for a
    message: redis-py's TimeoutError (not a ConnectionError) came out of the receive as an
    'unexpected error', exit 1, whenever the stream was idle. It is a lost connection."""
    b = redis_broker
    source = {**b.source(), "queue": b.source()["queue"] + "?socket_timeout=0.5"}
    job = write_job(tmp_path, source, b.output(), {"flush_size": 3})
    b.publish(records(range(3)))
    report = consume(job, idle_exit=2.5)
    assert report.added == 3
    assert sorted(by_id(b.results()), key=int) == ["0", "1", "2"]


def test_a_rabbitmq_queue_the_broker_refuses_is_exit_2_naming_it(tmp_path: Path) -> None:
    """A reserved `amq.` queue name: the broker's 403 came out as pika's ChannelClosedByBroker,
    an 'unexpected error' (exit 1); it is the job file's queue_name, exit 2."""
    source = {"queue": "amqp://guest:guest@127.0.0.1:5672/%2F", "queue_name": "amq.overnight"}
    job = write_job(tmp_path, source, {})
    with pytest.raises(UsageError) as info:
        consume(job, idle_exit=0.5)
    assert info.value.exit_code == 2
    assert "[source] queue_name: the broker refused 'amq.overnight'" in str(info.value)
