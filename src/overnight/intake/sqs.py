"""Amazon SQS through boto3: `queue = "sqs://"` (AWS) or another endpoint (urls.py), with
`queue_name`. Received messages stay invisible to others for the queue's visibility timeout;
the consumer deletes them (its acknowledgement) once their records are in the ledger. It asks
for at most `limit` at a time (10 per call, long polling) and deletes them before it asks
again. Results are sent with SendMessageBatch, at most 10 and the queue's largest message
size (`MaximumMessageSize`) to a call: a result over that size goes as its id and state with
`error_class = "result_too_large"` (the result stays in the ledger), or
SQS would refuse it, and with it every result after, at every start."""

from __future__ import annotations

import os
import time
from typing import Any

import boto3
import botocore.exceptions
import orjson

from .base import BrokerLost, Delivery, unreachable
from .urls import sqs_endpoint

LARGEST = 262_144  # SQS's own largest message, where the queue's attribute cannot be read
# A connection refused, timed out or cut, and what SQS answers with an error (the queue
# deleted, throttled): a lost broker, connected again (or exit 2 naming the queue), not
# botocore's own error out of `overnight consume` (exit 1).
_LOST = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.ClientError,
)


def _client(url: str, queue_name: str) -> tuple[Any, str]:
    endpoint, region = sqs_endpoint(url)
    region = region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    try:
        client = boto3.client("sqs", endpoint_url=endpoint, region_name=region)
        queue_url = client.get_queue_url(QueueName=queue_name)["QueueUrl"]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise unreachable(url, exc) from None
    return client, queue_url


class SqsReceiver:
    def __init__(self, url: str, queue_name: str) -> None:
        self._sqs, self.queue_url = _client(url, queue_name)

    def receive(self, limit: int, timeout: float) -> list[Delivery]:
        out: list[Delivery] = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < limit:
                left = deadline - time.monotonic()
                got = self._sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=min(10, limit - len(out)),
                    WaitTimeSeconds=0 if out else max(0, min(20, int(left))),
                ).get("Messages", [])
                out += [Delivery(m["Body"].encode(), m["ReceiptHandle"]) for m in got]
                if not got:
                    if out or time.monotonic() >= deadline:
                        break
                    time.sleep(min(0.05, max(0.0, left)))
        except _LOST as exc:
            raise BrokerLost(str(exc)) from exc
        return out

    def ack(self, deliveries: list[Delivery]) -> None:
        try:
            for i in range(0, len(deliveries), 10):
                part = deliveries[i : i + 10]
                self._sqs.delete_message_batch(
                    QueueUrl=self.queue_url,
                    Entries=[{"Id": str(k), "ReceiptHandle": d.tag} for k, d in enumerate(part)],
                )
        except _LOST as exc:
            raise BrokerLost(str(exc)) from exc

    def close(self) -> None:
        self._sqs.close()


class SqsPublisher:
    def __init__(self, url: str, queue_name: str) -> None:
        self._sqs, self.queue_url = _client(url, queue_name)
        try:
            got = self._sqs.get_queue_attributes(
                QueueUrl=self.queue_url, AttributeNames=["MaximumMessageSize"]
            )
            self.largest = int(got["Attributes"]["MaximumMessageSize"])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, KeyError):
            self.largest = LARGEST

    def publish(self, bodies: list[bytes]) -> None:
        part: list[bytes] = []
        size = 0
        for body in bodies:
            if len(body) > self.largest:
                body = _too_large(body, self.largest)
            if part and (len(part) == 10 or size + len(body) > self.largest):
                self._send(part)
                part, size = [], 0
            part.append(body)
            size += len(body)
        if part:
            self._send(part)

    def _send(self, part: list[bytes]) -> None:
        got = self._sqs.send_message_batch(
            QueueUrl=self.queue_url,
            Entries=[{"Id": str(k), "MessageBody": b.decode()} for k, b in enumerate(part)],
        )
        if got.get("Failed"):
            first = got["Failed"][0]
            raise RuntimeError(f"SQS refused a result message: {first.get('Message')}")

    def close(self) -> None:
        self._sqs.close()


def _too_large(body: bytes, largest: int) -> bytes:
    """A result message over the queue's largest size: its id (its first field, see
    kinds.result_message) and state, and why the rest is not there."""
    head = orjson.loads(body)
    kept = dict(list(head.items())[:1])
    kept["state"] = head.get("state")
    kept["error_class"] = "result_too_large"
    kept["error"] = (
        f"the result message ({len(body):,} bytes) is over the queue's largest ({largest:,}"
        " bytes); the result is kept in the job's ledger"
    )
    return orjson.dumps(kept)
