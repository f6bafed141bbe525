"""Which broker a `queue = "..."` URL names, and the keys each one needs.

- `amqp://` / `amqps://`: RabbitMQ (`queue_name`);
- `redis://` / `rediss://`: Redis Streams (`stream`; the source reads it as a consumer group);
- `sqs://[host[:port]]` / `sqs+http://host:port`: Amazon SQS (`queue_name`). `sqs://` alone is
  AWS's own endpoint; a host names another (ElasticMQ, LocalStack, moto), over HTTPS, or plain
  HTTP with `sqs+http`. `?region=eu-west-1` sets the region (else AWS_DEFAULT_REGION, else
  us-east-1). Credentials come from the environment, as boto3 finds them.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

Broker = Literal["rabbitmq", "redis", "sqs"]

_SCHEMES: dict[str, Broker] = {
    "amqp": "rabbitmq",
    "amqps": "rabbitmq",
    "redis": "redis",
    "rediss": "redis",
    "sqs": "sqs",
    "sqs+http": "sqs",
}


def broker_of(url: str) -> Broker:
    """The broker of a queue URL; ValueError naming the schemes if it is none of them."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    broker = _SCHEMES.get(scheme)
    if broker is None:
        raise ValueError(
            f"`queue` must be an amqp://, redis:// or sqs:// URL (got {safe_url(url)!r})"
        )
    return broker


def check_queue_keys(url: str, queue_name: str | None, stream: str | None, where: str) -> None:
    """The keys a queue URL needs, for the job file's [source] or [output]: ValueError."""
    broker = broker_of(url)
    if broker == "redis":
        if stream is None:
            raise ValueError("a Redis `queue` needs `stream`: the stream's key")
        if queue_name is not None:
            raise ValueError("a Redis `queue` takes `stream`, not `queue_name`")
    else:
        name = "RabbitMQ" if broker == "rabbitmq" else "SQS"
        if queue_name is None:
            raise ValueError(f"a {name} `queue` needs `queue_name`")
        if stream is not None:
            raise ValueError(f"`stream` applies to a Redis `queue`, not to {name}")


def safe_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def sqs_endpoint(url: str) -> tuple[str | None, str | None]:
    """(endpoint URL or None for AWS's own, region or None) of an sqs:// URL."""
    parts = urlsplit(url)
    region = parse_qs(parts.query).get("region", [None])[0]
    if not parts.netloc:
        return None, region
    scheme = "http" if parts.scheme.lower() == "sqs+http" else "https"
    return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}", region
