"""Amazon SQS through boto3: `queue = "sqs://"` (AWS) or another endpoint (urls.py), with
`queue_name`. Received messages stay invisible to others for the queue's visibility timeout;
the consumer deletes them (its acknowledgement) once their records are in the ledger. It asks
for at most `limit` at a time (10 per call, long polling) and deletes them before it asks
again. Results are sent with SendMessageBatch."""

from __future__ import annotations

import os
import time
from typing import Any

import boto3
import botocore.exceptions

from .base import BrokerLost, Delivery, unreachable
from .urls import sqs_endpoint

_LOST = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectionClosedError)


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

    def publish(self, bodies: list[bytes]) -> None:
        for i in range(0, len(bodies), 10):
            part = bodies[i : i + 10]
            got = self._sqs.send_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(k), "MessageBody": b.decode()} for k, b in enumerate(part)],
            )
            if got.get("Failed"):
                first = got["Failed"][0]
                raise RuntimeError(f"SQS refused a result message: {first.get('Message')}")

    def close(self) -> None:
        self._sqs.close()
