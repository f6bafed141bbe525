"""Real brokers for the queue intake tests (tests/test_consume*.py): RabbitMQ and Redis on
loopback, SQS through moto's server (a real HTTP endpoint on loopback) driven by boto3. Each
harness uses queues or streams of its own (uuid) and deletes them."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pika
import pytest
import redis

AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
REDIS = "redis://127.0.0.1:6379/0"

FUNCTION = """
import os, time
HERE = os.path.dirname(__file__)
SLEEP = {sleep}
def upper(records):
    time.sleep(SLEEP * len(records))
    with open(os.path.join(HERE, "calls.log"), "a") as f:
        f.write("".join(str(r["id"]) + "\\n" for r in records))
    return [r["text"].upper() for r in records]
"""


def toml_value(v: Any) -> str:
    return orjson.dumps(v).decode()


def write_job(
    folder: Path,
    source: dict[str, Any],
    output: dict[str, Any],
    run: dict[str, Any] | None = None,
    sleep: float = 0.0,
) -> Path:
    """A job file over a python function that upper-cases `text` (and logs its calls)."""
    (folder / "fn.py").write_text(FUNCTION.format(sleep=sleep))
    lines = ['name = "consume"', "[source]", 'id = "id"']
    lines += [f"{k} = {toml_value(v)}" for k, v in source.items()]
    lines += ["[model]", 'backend = "python"', 'function = "fn:upper"']
    lines += ["[run]", *(f"{k} = {toml_value(v)}" for k, v in (run or {}).items())]
    lines += ["[output]", *(f"{k} = {toml_value(v)}" for k, v in output.items())]
    path = folder / "job.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().split() if log.exists() else []


def records(ids: range | list[int]) -> list[bytes]:
    return [orjson.dumps({"id": i, "text": f"hello {i}"}) for i in ids]


class Rabbit:
    name = "rabbitmq"

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.inbox, self.outbox = f"in-{tag}", f"out-{tag}"
        self._conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        self._ch = self._conn.channel()
        self._ch.queue_declare(self.inbox, durable=True)
        self._ch.queue_declare(self.outbox, durable=True)

    def source(self) -> dict[str, Any]:
        return {"queue": AMQP, "queue_name": self.inbox}

    def output(self) -> dict[str, Any]:
        return {"queue": AMQP, "queue_name": self.outbox}

    def publish(self, bodies: list[bytes]) -> None:
        """On a connection of its own: a producer thread may publish while the test reads."""
        conn = pika.BlockingConnection(pika.URLParameters(AMQP))
        try:
            channel = conn.channel()
            for body in bodies:
                channel.basic_publish("", self.inbox, body)
        finally:
            conn.close()

    def results(self) -> list[dict[str, Any]]:
        """Every result message so far (taken off the results queue)."""
        out = []
        while True:
            method, _, body = self._ch.basic_get(self.outbox, auto_ack=True)
            if method is None:
                return out
            out.append(orjson.loads(body))

    def waiting(self) -> int:
        """Messages in the inbox no consumer has been given."""
        return self._ch.queue_declare(self.inbox, passive=True).method.message_count

    def unacked(self) -> int:
        """Messages the broker has handed a consumer that it has not acknowledged."""
        got = subprocess.run(
            ["rabbitmqctl", "-q", "list_queues", "name", "messages_unacknowledged"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        for line in got.splitlines():
            name, _, count = line.partition("\t")
            if name == self.inbox:
                return int(count)
        raise AssertionError(f"{self.inbox} not listed: {got!r}")

    def close(self) -> None:
        self._ch.queue_delete(self.inbox)
        self._ch.queue_delete(self.outbox)
        self._conn.close()


class RedisStreams:
    name = "redis"

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.inbox, self.outbox = f"in-{tag}", f"out-{tag}"
        self._r = redis.Redis.from_url(REDIS)
        self._read = "0"

    def source(self) -> dict[str, Any]:
        return {"queue": REDIS, "stream": self.inbox}

    def output(self) -> dict[str, Any]:
        return {"queue": REDIS, "stream": self.outbox}

    def publish(self, bodies: list[bytes]) -> None:
        pipe = self._r.pipeline()
        for body in bodies:
            pipe.xadd(self.inbox, {"data": body})
        pipe.execute()

    def results(self) -> list[dict[str, Any]]:
        got = self._r.xrange(self.outbox, min=f"({self._read}" if self._read != "0" else "-")
        if got:
            self._read = got[-1][0].decode()
        return [orjson.loads(fields[b"data"]) for _, fields in got]

    def waiting(self) -> int:
        groups = self._r.xinfo_groups(self.inbox)
        return int(groups[0].get("lag") or 0) if groups else self._r.xlen(self.inbox)

    def unacked(self) -> int:
        try:
            return int(self._r.xpending(self.inbox, "overnight")["pending"])
        except redis.exceptions.ResponseError:  # no group yet
            return 0

    def close(self) -> None:
        self._r.delete(self.inbox, self.outbox)
        self._r.close()


class Sqs:
    name = "sqs"

    def __init__(self, endpoint: str, visibility: int = 30) -> None:
        tag = uuid.uuid4().hex[:10]
        self.endpoint = endpoint
        self.inbox, self.outbox = f"in-{tag}", f"out-{tag}"
        self._sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
        # What a consumer received and did not delete is given out again after `visibility` s.
        self._in = self._sqs.create_queue(
            QueueName=self.inbox, Attributes={"VisibilityTimeout": str(visibility)}
        )["QueueUrl"]
        self._out = self._sqs.create_queue(QueueName=self.outbox)["QueueUrl"]

    def _url(self) -> str:
        return "sqs+http://" + self.endpoint.removeprefix("http://") + "?region=us-east-1"

    def source(self) -> dict[str, Any]:
        return {"queue": self._url(), "queue_name": self.inbox}

    def output(self) -> dict[str, Any]:
        return {"queue": self._url(), "queue_name": self.outbox}

    def publish(self, bodies: list[bytes]) -> None:
        for i in range(0, len(bodies), 10):
            entries = [
                {"Id": str(k), "MessageBody": b.decode()} for k, b in enumerate(bodies[i : i + 10])
            ]
            self._sqs.send_message_batch(QueueUrl=self._in, Entries=entries)

    def results(self) -> list[dict[str, Any]]:
        out = []
        while True:
            got = self._sqs.receive_message(QueueUrl=self._out, MaxNumberOfMessages=10).get(
                "Messages", []
            )
            if not got:
                return out
            out += [orjson.loads(m["Body"]) for m in got]
            self._sqs.delete_message_batch(
                QueueUrl=self._out,
                Entries=[
                    {"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]} for k, m in enumerate(got)
                ],
            )

    def _attr(self, name: str) -> int:
        got = self._sqs.get_queue_attributes(QueueUrl=self._in, AttributeNames=[name])
        return int(got["Attributes"][name])

    def waiting(self) -> int:
        return self._attr("ApproximateNumberOfMessages")

    def unacked(self) -> int:
        return self._attr("ApproximateNumberOfMessagesNotVisible")

    def close(self) -> None:
        self._sqs.delete_queue(QueueUrl=self._in)
        self._sqs.delete_queue(QueueUrl=self._out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's SQS as a real HTTP server on loopback, with the fake credentials it takes."""
    from moto.server import ThreadedMotoServer

    for key, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["rabbitmq", "redis", "sqs"])
def broker(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "rabbitmq":
        harness: Any = Rabbit()
    elif request.param == "redis":
        harness = RedisStreams()
    else:
        harness = Sqs(request.getfixturevalue("moto_endpoint"))
    try:
        yield harness
    finally:
        harness.close()
