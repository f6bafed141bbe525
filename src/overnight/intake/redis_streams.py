"""Redis Streams through redis-py: `queue = "redis://127.0.0.1:6379/0"`, `stream = "..."`.

The receiver reads as a member of a consumer group (`[source] group`, created if missing, from
the stream's start). Its consumer name is fixed per host and job, so a consumer started again
after a crash first reads the entries it had been given and not acknowledged (id 0); then it
takes over entries another consumer of the group left unacknowledged for a minute
(XAUTOCLAIM), then reads new ones (">"). It asks for at most `limit` entries at a time and
acknowledges them before it asks again: it never holds more than `prefetch`.

An entry is the record as JSON in its `data` field, or the record itself as the entry's
fields. Results are XADDed as `{"data": <JSON>}`."""

from __future__ import annotations

from typing import Any

import orjson
import redis
import redis.exceptions

from ..errors import UsageError
from .base import BrokerLost, Delivery, unreachable
from .urls import safe_url

CLAIM_IDLE_MS = 60_000
# A TimeoutError is not a ConnectionError in redis-py: a `?socket_timeout=` shorter than a
# blocking read's wait raised it whenever the stream was idle (exit 1).
_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _connect(url: str) -> Any:
    try:
        client = redis.Redis.from_url(url)
        client.ping()
        return client
    except (redis.exceptions.RedisError, ValueError) as exc:
        raise unreachable(url, exc) from None


def _body(fields: dict[bytes, bytes] | None) -> bytes:
    if not fields:
        return b"null"  # an entry deleted from the stream while pending: an input error
    if b"data" in fields:
        return fields[b"data"]
    return orjson.dumps({k.decode(): v.decode(errors="replace") for k, v in fields.items()})


class RedisReceiver:
    def __init__(self, url: str, stream: str, group: str, consumer: str) -> None:
        self.stream, self.group, self.consumer = stream, group, consumer
        self._r = _connect(url)
        try:
            self._r.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                # WRONGTYPE: the key holds a string, a list... (a "[source] stream" mistyped).
                self._r.close()
                raise UsageError(f"[source] stream: {stream!r} at {safe_url(url)}: {exc}") from None
        self._phase = "own"  # own pending entries, then others' idle ones, then new ones
        # A blocking read waits less than the URL's `socket_timeout`, if any: longer, and
        # redis-py gives up on the socket while Redis is still rightly waiting.
        limit = self._r.connection_pool.connection_kwargs.get("socket_timeout")
        self._block_limit = float(limit) * 0.8 if limit else None

    def _entries(self, got: Any) -> list[Delivery]:
        entries = got[0][1] if got else []
        return [Delivery(_body(fields), entry_id) for entry_id, fields in entries]

    def receive(self, limit: int, timeout: float) -> list[Delivery]:
        try:
            if self._phase == "own":
                got = self._r.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=limit)
                out = self._entries(got)
                if out:
                    return out
                self._phase = "others"
            if self._phase == "others":
                _, entries, *_ = self._r.xautoclaim(
                    self.stream, self.group, self.consumer, CLAIM_IDLE_MS, "0-0", count=limit
                )
                out = [Delivery(_body(f), i) for i, f in entries]
                if out:
                    return out
                self._phase = "new"
            got = self._r.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=limit,
                block=max(1, int(min(timeout, self._block_limit or timeout) * 1000)),
            )
            return self._entries(got)
        except _LOST as exc:
            raise BrokerLost(str(exc)) from exc
        except redis.exceptions.ResponseError as exc:
            # The stream (and its group) went: deleted (UNBLOCKED, while a read waited on
            # it), or a Redis restarted without its data (NOGROUP). Connecting again makes
            # them again, and reads what comes next.
            if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            raise BrokerLost(str(exc)) from exc

    def ack(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        try:
            self._r.xack(self.stream, self.group, *[d.tag for d in deliveries])
        except _LOST as exc:
            raise BrokerLost(str(exc)) from exc

    def close(self) -> None:
        self._r.close()


class RedisPublisher:
    def __init__(self, url: str, stream: str) -> None:
        self.stream = stream
        self._r = _connect(url)

    def publish(self, bodies: list[bytes]) -> None:
        pipe = self._r.pipeline(transaction=False)
        for body in bodies:
            pipe.xadd(self.stream, {"data": body})
        pipe.execute()

    def close(self) -> None:
        self._r.close()
