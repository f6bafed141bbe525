"""`overnight consume JOB`: collect records from a queue into the job's ledger, and process
them in batches.

The ledger is the truth, and the order of things is what makes a crash (kill -9 included)
lose nothing and compute nothing twice:

1. receive at most `[source] prefetch` messages (the broker's prefetch for RabbitMQ; a bounded
   read for Redis and SQS), so a slow model never makes the consumer hold more;
2. commit them as pending items (`Ledger.add_items`, one transaction). An id the job already
   has is a redelivery (the broker gave the message again because its ack was lost in a
   crash): it is not added, and so not processed again (`Ledger.known_ids`; add_items also
   refuses a repeated id should two copies race);
3. acknowledge them; a crash before this only makes the broker deliver them again (step 2);
4. when `[run] flush_size` items wait, or the oldest has waited `flush_wait` seconds (and,
   with `window`, only inside it), process what is pending with the job's own runner
   (`Job.run`: any backend; results committed in the ledger) and export: to a results queue
   (kinds.py: in order, from a mark in the ledger, at-least-once with the record's id), or
   to the job's files or table. A crash while computing leaves items pending or leased: the
   next start (or flush) computes them.

The schedule reads `clock` (seconds since the epoch; local time for the window), which a
caller may replace.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ..errors import ExportRefused, UsageError
from ..job import Job
from ..records import Cursor
from ..store import ConcurrentIngest, Ledger
from .base import BrokerLost, Delivery, Receiver, ResultsUnpublished, open_receiver
from .kinds import rows_of
from .window import Window

log = logging.getLogger(__name__)

POLL = 0.2  # seconds a receive waits before the schedule is looked at again ...
IDLE_POLL = 1.0  # ... or, with nothing waiting, a long poll (SQS: one request a second)
RECONNECTS = 10  # lost broker connections in a row the consumer lives through
REPUBLISH = 5.0  # seconds between tries to publish results a results queue did not take


@dataclass
class ConsumeReport:
    received: int = 0  # messages received (and acknowledged)
    added: int = 0  # new items in the ledger
    redelivered: int = 0  # messages whose id the job already had: not processed again
    rejected: int = 0  # messages that are not a JSON record with the id (input errors)
    flushes: int = 0  # runs over the collected items

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Consumer:
    job: Job
    clock: Callable[[], float] = time.time
    stop: threading.Event = field(default_factory=threading.Event)
    idle_exit: float | None = None  # return once nothing arrived or waits for this long
    report: ConsumeReport = field(default_factory=ConsumeReport)

    def __post_init__(self) -> None:
        spec = self.job.spec
        if spec.source.queue is None:
            raise UsageError(
                f"{self.job.origin}: [source] queue: `overnight consume` reads a queue; this"
                " job reads a file or a table (use `overnight run`)"
            )
        self.window = Window.parse(spec.run.window) if spec.run.window else None
        self._receiver: Receiver | None = None
        # When to try again to publish results the results queue did not take (down, or
        # its connection lost): the consumer goes on collecting meanwhile.
        self._republish: float | None = None

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> ConsumeReport:
        job, run = self.job, self.job.spec.run
        job.check()
        with job.ledger() as ledger:
            waiting = self._start(ledger)
            oldest = self.clock() if waiting else None
            last_seen = time.monotonic()
            try:
                while not self.stop.is_set():
                    if self._republish is not None and time.monotonic() >= self._republish:
                        self._export()
                    now = self.clock()
                    due = oldest is not None and (
                        waiting >= run.flush_size or now - oldest >= run.flush_wait
                    )
                    if due and self._open(now):
                        self._flush()
                        waiting, oldest = 0, None
                        last_seen = time.monotonic()  # idle: no message while receiving
                        continue
                    if (
                        self.idle_exit is not None
                        and not waiting
                        and time.monotonic() - last_seen >= self.idle_exit
                    ):
                        break
                    wait = POLL if oldest is not None else IDLE_POLL
                    if oldest is not None and self.window is None:
                        wait = min(POLL, max(0.0, oldest + run.flush_wait - now))
                    deliveries = self._receive(self.job.spec.source.prefetch, wait)
                    if not deliveries:
                        continue
                    added = self._commit(ledger, deliveries)
                    self._ack(deliveries)
                    last_seen = time.monotonic()
                    if added:
                        waiting += added
                        oldest = now if oldest is None else oldest
            finally:
                if self._receiver is not None:
                    self._receiver.close()
            if self.stop.is_set() or self._republish is not None:
                # A flush cut short by the stop leaves results to publish; results the
                # queue did not take get a last try (its error, exit 2, if it fails again).
                self.job.export()
        return self.report

    def _open(self, now: float) -> bool:
        return self.window is None or self.window.contains(datetime.fromtimestamp(now))

    def _start(self, ledger: Ledger) -> int:
        """Before anything is received: the job's entry made, and what a crash left (items
        pending, results not published) processed, inside the window. Returns the items
        that wait."""
        info = ledger.get_job(self.job.name)
        if info is None or self._open(self.clock()):
            self._flush(first=True)
            return 0
        self._export()  # publish results a crash left unpublished; compute nothing
        return ledger.counts(info.id)["pending"]

    def _export(self) -> None:
        try:
            self.job.export()
            self._republish = None
        except ResultsUnpublished as exc:
            self._unpublished(exc)
        except ExportRefused as exc:  # rows a table refused: the next flush tries again
            log.warning("%s", exc)

    def _unpublished(self, exc: ResultsUnpublished) -> None:
        log.warning("%s; trying again in %.0f s", exc, REPUBLISH)
        self._republish = time.monotonic() + REPUBLISH

    def _flush(self, first: bool = False) -> None:
        try:
            report = self.job.run(stop=self.stop)
        except ResultsUnpublished as exc:  # computed and committed: published later
            self._unpublished(exc)
            return
        except ExportRefused as exc:
            # A table refused some results (the others written): they stay in the ledger,
            # and the next flush writes them again. Stopping here stopped the consumer at
            # every start, on one record, with every message after it left waiting.
            log.warning("%s", exc)
            self.report.flushes += not first
            return
        self._republish = None
        if not first:
            self.report.flushes += 1
        c = report.counts
        log.info(
            "%s: processed %d (%d succeeded, %d failed, %d invalid in the job)",
            self.job.name,
            report.processed,
            c["succeeded"],
            c.failed,
            c["invalid"],
        )

    # -- the broker -----------------------------------------------------------------------

    def _connect(self) -> Receiver:
        consumer = f"{socket.gethostname()}:{self.job.name}"
        return open_receiver(self.job.spec.source, consumer)

    def _retrying(self, call: Callable[[Receiver], list[Delivery] | None]) -> list[Delivery]:
        for attempt in range(RECONNECTS + 1):
            try:
                if self._receiver is None:
                    self._receiver = self._connect()
                return call(self._receiver) or []
            except BrokerLost as exc:
                if attempt == RECONNECTS:
                    raise UsageError(f"lost the queue and could not connect again: {exc}") from None
                log.warning("lost the queue (%s); connecting again", exc)
                if self._receiver is not None:
                    self._receiver.close()
                    self._receiver = None
                self.stop.wait(min(5.0, 0.2 * 2**attempt))
        return []

    def _receive(self, limit: int, wait: float) -> list[Delivery]:
        return self._retrying(lambda r: r.receive(limit, wait))

    def _ack(self, deliveries: list[Delivery]) -> None:
        """A lost connection loses the acks: the broker delivers those messages again, and
        their ids are in the ledger by now (a redelivery)."""
        try:
            assert self._receiver is not None
            self._receiver.ack(deliveries)
        except BrokerLost as exc:
            log.warning("lost the queue while acknowledging (%s); they come again", exc)
            self._receiver.close()
            self._receiver = None

    # -- into the ledger ------------------------------------------------------------------

    def _commit(self, ledger: Ledger, deliveries: list[Delivery]) -> int:
        """The messages as pending items, in one transaction; redeliveries left out. Returns
        how many items were added."""
        id_field = self.job.id_name
        self.report.received += len(deliveries)
        for _ in range(5):
            info = ledger.get_job(self.job.name)
            if info is None:
                raise UsageError(f"job {self.job.name!r} was deleted while consuming")
            seq = info.cursor.records
            parsed = rows_of([d.body for d in deliveries], seq, id_field)
            ids = [r.custom_id for r in parsed if r.error is None and r.custom_id is not None]
            known = ledger.known_ids(info.id, ids) if ids else set()
            bodies, seen = [], set()
            for d, r in zip(deliveries, parsed, strict=True):
                if r.error is None:
                    if r.custom_id in known or r.custom_id in seen:
                        continue
                    seen.add(r.custom_id)
                bodies.append(d.body)
            redelivered = len(deliveries) - len(bodies)
            if not bodies:
                self.report.redelivered += redelivered
                return 0
            rows = rows_of(bodies, seq, id_field)
            end = seq + len(rows)
            try:
                accepted = ledger.add_items(
                    info.id, seq, rows, Cursor(end, end + 1, 0, info.cursor.key)
                )
            except ConcurrentIngest:
                continue  # another consumer of this job moved the cursor: read it again
            self.report.redelivered += redelivered
            self.report.rejected += accepted.count(False)
            self.report.added += accepted.count(True)
            if redelivered:
                log.info("%d redelivered messages: already in the ledger", redelivered)
            return accepted.count(True)
        raise UsageError(
            f"job {self.job.name!r}: other consumers keep moving its intake; try again"
        )
