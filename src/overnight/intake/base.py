"""What the consumer asks of a broker: a `Receiver` of messages that are acknowledged once
their records are in the ledger, and a `Publisher` of result messages. One module per broker
(rabbitmq.py, redis_streams.py, sqs.py) makes both; `open_receiver` / `open_publisher` pick
it from the URL's scheme (urls.py). Brokers' client libraries are imported there, lazily:
they are the `queue` extra."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from ..errors import ExportRefused, UsageError
from ..spec import OutputSpec, SourceSpec
from .urls import broker_of, safe_url


class Delivery(NamedTuple):
    """One message received: its body (a JSON record) and the broker's handle to ack it."""

    body: bytes
    tag: Any


class Receiver(Protocol):
    def receive(self, limit: int, timeout: float) -> list[Delivery]:
        """Up to `limit` messages; waits up to `timeout` seconds for the first one."""
        ...

    def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge these messages: the broker forgets them."""
        ...

    def close(self) -> None: ...


class Publisher(Protocol):
    def publish(self, bodies: list[bytes]) -> None:
        """Send these messages; returns once the broker holds them all (or raises)."""
        ...

    def close(self) -> None: ...


class BrokerLost(Exception):
    """The connection to the broker broke while consuming: connect again."""


class ResultsUnpublished(ExportRefused):
    """The results queue could not be reached or took no message: the results stay in the
    ledger, past the published mark, for the next export (`overnight consume` tries again
    while it collects)."""


def unreachable(url: str, exc: BaseException) -> UsageError:
    return UsageError(f"cannot reach the queue at {safe_url(url)}: {exc or type(exc).__name__}")


def open_receiver(source: SourceSpec, consumer: str) -> Receiver:
    """A receiver on the job's [source] queue; `consumer` names this consumer (Redis)."""
    url = source.queue or ""
    broker = broker_of(url)
    if broker == "rabbitmq":
        from .rabbitmq import RabbitReceiver

        return RabbitReceiver(url, source.queue_name or "", source.prefetch)
    if broker == "redis":
        from .redis_streams import RedisReceiver

        return RedisReceiver(url, source.stream or "", source.group, consumer)
    from .sqs import SqsReceiver

    return SqsReceiver(url, source.queue_name or "")


def open_publisher(output: OutputSpec) -> Publisher:
    """A publisher to the job's [output] queue."""
    url = output.queue or ""
    broker = broker_of(url)
    if broker == "rabbitmq":
        from .rabbitmq import RabbitPublisher

        return RabbitPublisher(url, output.queue_name or "")
    if broker == "redis":
        from .redis_streams import RedisPublisher

        return RedisPublisher(url, output.stream or "")
    from .sqs import SqsPublisher

    return SqsPublisher(url, output.queue_name or "")
