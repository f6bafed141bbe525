"""Micro-batching: the inputs of requests that arrive together share one model call.

One `MicroBatcher` per model: a bounded queue of inputs and one thread that calls the model.
The thread takes the oldest input, waits until `max_batch_size` inputs are queued or
`max_wait_ms` have passed since that input arrived (an input that already waited while the
model was busy does not wait again), and calls the model once with up to `max_batch_size`
inputs. The queue holds at most `max_queue` inputs: a request that does not fit is refused at
once (`Overloaded`, with how long the queue takes to drain), never parked in a backlog.

A call that raises is tried again request by request, so that one request's bad input fails
that request only.

The batch API's jobs on the same model give way (`wait_idle`): they wait between their
commits while real-time inputs are queued or being computed, and until none has come for
`IDLE_GRACE` seconds (clients that send again as soon as they are answered leave gaps of a
few milliseconds, which must not let a batch call in between).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# How long real-time work must have been quiet before the batch API's jobs on the same model
# go on.
IDLE_GRACE = 0.1


class Overloaded(Exception):
    """The queue is full: try again in `retry_after` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the queue is full; retry in {retry_after:.1f} s")
        self.retry_after = retry_after


@dataclass(eq=False)
class _Request:
    inputs: list[Any]
    arrived: float
    future: Future[list[Any]] = field(default_factory=Future)
    outputs: list[Any] = field(default_factory=list)
    left: int = 0

    def __post_init__(self) -> None:
        self.outputs = [None] * len(self.inputs)
        self.left = len(self.inputs)

    def done(self, i: int, output: Any) -> None:
        self.outputs[i] = output
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.outputs)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class Stats:
    calls: int = 0  # model calls made
    inputs: int = 0  # inputs computed
    refused: int = 0  # requests refused with Overloaded
    batch_seconds: float = 0.0  # a model call's duration, smoothed


class MicroBatcher:
    def __init__(
        self,
        name: str,
        load: Callable[[], Callable[[list[Any]], list[Any]]],
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        on_call: Callable[[int, float], None] | None = None,
    ) -> None:
        """`load` runs in the batcher's thread, once, before the first call: it returns the
        model call (inputs -> one output per input). `on_call(n, seconds)` is told each call's
        size and duration (the /metrics histograms)."""
        self.name = name
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_wait = max_wait_ms / 1000
        self.stats = Stats()
        self._load = load
        self._on_call = on_call
        self._call: Callable[[list[Any]], list[Any]] | None = None
        self._queue: deque[tuple[_Request, int]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._last_active = 0.0
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the event loop's side ------------------------------------------------------------

    def submit(self, inputs: list[Any]) -> Future[list[Any]]:
        """Queues the inputs of one request; its future gets their outputs, in order.
        Overloaded when they do not all fit (a request never holds part of the queue)."""
        if not inputs:
            raise ValueError("no inputs")
        if len(inputs) > self.max_queue:
            raise ValueError(f"at most {self.max_queue} inputs in one request")
        with self._cond:
            if self._closed:
                raise Overloaded(1.0)
            if len(self._queue) + len(inputs) > self.max_queue:
                self.stats.refused += 1
                raise Overloaded(self._drain_seconds())
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"microbatch-{self.name}", daemon=True
                )
                self._thread.start()
            request = _Request(inputs, time.monotonic())
            self._queue.extend((request, i) for i in range(len(inputs)))
            self._last_active = request.arrived
            self._cond.notify_all()
        return request.future

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def _drain_seconds(self) -> float:
        """How long the queue takes to drain: the calls it holds and the one running."""
        per_call = self.stats.batch_seconds or 1.0
        calls = math.ceil(len(self._queue) / self.max_batch_size) + 1
        return calls * per_call + self.max_wait

    # -- the batch API's side -------------------------------------------------------------

    def wait_idle(self, timeout: float) -> bool:
        """Waits (at most `timeout` s) until no real-time input is queued or computed and
        none came in the last IDLE_GRACE s; whether that is so."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                quiet = now - self._last_active
                if not self._queue and not self._busy and quiet >= IDLE_GRACE:
                    return True
                if now >= end or self._closed:
                    return False
                self._cond.wait(min(end - now, max(IDLE_GRACE - quiet, 0.01)))

    # -- the model's thread ---------------------------------------------------------------

    def close(self, timeout: float = 30.0) -> None:
        """Computes what is queued, then stops the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _take(self) -> list[tuple[_Request, int]] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._queue[0][0].arrived + self.max_wait
            while len(self._queue) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(len(self._queue), self.max_batch_size)
            taken = [self._queue.popleft() for _ in range(n)]
            self._busy = True
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            try:
                self._compute(taken)
            except BaseException as exc:  # noqa: BLE001 - every request gets an answer
                for request, _ in taken:
                    request.fail(exc)
            finally:
                with self._cond:
                    self._busy = False
                    self._last_active = time.monotonic()
                    self._cond.notify_all()

    def _model(self) -> Callable[[list[Any]], list[Any]]:
        if self._call is None:
            self._call = self._load()
        return self._call

    def _compute(self, taken: list[tuple[_Request, int]]) -> None:
        call = self._model()
        t0 = time.perf_counter()
        try:
            outputs = self._checked(call, [r.inputs[i] for r, i in taken])
        except Exception as exc:
            requests = list(dict.fromkeys(r for r, _ in taken))
            if len(requests) == 1:
                requests[0].fail(exc)
                return
            log.info(
                "%s: a call of %d inputs failed; trying each request alone", self.name, len(taken)
            )
            for request in requests:
                slots = [(r, i) for r, i in taken if r is request]
                try:
                    outs = self._checked(call, [request.inputs[i] for _, i in slots])
                except Exception as alone:
                    request.fail(alone)
                else:
                    for (_, i), out in zip(slots, outs, strict=True):
                        request.done(i, out)
            return
        seconds = time.perf_counter() - t0
        s = self.stats
        s.batch_seconds = seconds if s.calls == 0 else 0.8 * s.batch_seconds + 0.2 * seconds
        for (request, i), out in zip(taken, outputs, strict=True):
            request.done(i, out)

    def _checked(self, call: Callable[[list[Any]], list[Any]], inputs: list[Any]) -> list[Any]:
        t0 = time.perf_counter()
        outputs = list(call(inputs))
        self.stats.calls += 1
        self.stats.inputs += len(inputs)
        if self._on_call is not None:
            self._on_call(len(inputs), time.perf_counter() - t0)
        if len(outputs) != len(inputs):
            raise RuntimeError(
                f"the model returned {len(outputs)} outputs for {len(inputs)} inputs"
            )
        return outputs
