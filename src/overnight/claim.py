"""Which process runs a job: a claim in the ledger, taken before a run touches anything.

A second `overnight run` of a running job — started a second later or at the same instant,
in the same shell or from another one — finds the claim and stops with exit 2 naming the
running process, before it reads the input or sends a request. The claim is one row per job
name, so it also guards `--restart` and an incremental rerun, which replace the job's rows.

A claim whose owner died is taken over at once when the owner lived on this host (its pid
and start time say so); one held from another host is taken over only once its heartbeat
stops for `ttl` seconds.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from .errors import UsageError
from .runner import Progress, lease_owner, owner_alive
from .store import Claim, Ledger

log = logging.getLogger(__name__)

TTL = 60.0  # seconds a claim outlives its last heartbeat


class JobBusy(UsageError):
    """Another live process runs this job (exit 2)."""


def describe(owner: str) -> str:
    """`host:pid:start/run` -> "process 1234 on host h"."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return f"process {pid} on {host}"


def holder_alive(claim: Claim, now: float | None = None) -> bool:
    """True when the claim's process is (or may be) running: alive on this host, or still
    heartbeating from another."""
    alive = owner_alive(claim.owner.partition("/")[0])
    if alive is None:  # another host: trust its heartbeat
        return claim.expires >= (now or time.time())
    return alive


@dataclass
class RunHandle:
    """The run holding the claim. The job sets `progress` once it has one (the heartbeat
    records it for `status`) and `outcome` when it knows how the run ends."""

    claim: Claim
    run_id: int
    progress: Progress | None = None
    outcome: str = "error"
    final: tuple[int, float, float] | None = None

    def figures(self) -> tuple[int, float, float]:
        """(items processed, processing seconds, setup seconds) of this run so far."""
        if self.final is not None:
            return self.final
        p = self.progress
        if p is None:
            return 0, 0.0, 0.0
        return p.processed, max(0.0, p.elapsed - p.setup_seconds), p.setup_seconds

    def finish(self, outcome: str, processed: int, seconds: float, setup_seconds: float) -> None:
        """How the run ended, with the very figures its report shows."""
        self.outcome, self.final = outcome, (processed, seconds, setup_seconds)


@contextmanager
def claimed(
    ledger: Ledger,
    name: str,
    connect: Callable[[], Ledger],
    *,
    on_lost: Callable[[], None] | None = None,
    ttl: float = TTL,
) -> Iterator[RunHandle]:
    """Hold job `name` for this process while the block runs; raise JobBusy if another holds
    it. A heartbeat thread renews the claim over its own ledger connection (`connect`), so a
    long model call does not let it expire; `on_lost` runs if it is ever taken over."""
    owner = f"{lease_owner()}/{secrets.token_hex(4)}"
    now = time.time()
    held = ledger.claim(name, owner, now, now + ttl)
    if held.owner != owner and not holder_alive(held, now):
        log.info("taking over job %r from %s, which is gone", name, describe(held.owner))
        held = ledger.claim(name, owner, now, now + ttl, take_from=held.owner)
    if held.owner != owner:
        since = datetime.fromtimestamp(held.since).strftime("%Y-%m-%d %H:%M:%S")
        raise JobBusy(
            f"job {name!r} is being run by {describe(held.owner)} (since {since}); a second run"
            " would send its requests again. Let it finish (`overnight status` shows it), or"
            " stop it first (`overnight cancel`)"
        )
    handle = RunHandle(held, ledger.start_run(name, owner, now))
    stop = threading.Event()
    beat: threading.Thread | None = None
    try:
        # The heartbeat's own connection, opened now: opened later, it could create a new,
        # empty ledger where the real one was deleted.
        beat = threading.Thread(
            target=_heartbeat,
            args=(connect(), name, owner, ttl, stop, on_lost, handle),
            daemon=True,
        )
        beat.start()
        yield handle
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=ttl)
        try:
            ledger.update_run(handle.run_id, time.time(), *handle.figures(), handle.outcome)
        finally:
            ledger.release_claim(name, owner)


def _heartbeat(
    ledger: Ledger,
    name: str,
    owner: str,
    ttl: float,
    stop: threading.Event,
    on_lost: Callable[[], None] | None,
    handle: RunHandle,
) -> None:
    try:
        while not stop.wait(ttl / 4):
            now = time.time()
            if not ledger.renew_claim(name, owner, now + ttl):
                log.error("job %r: another process took over this run's claim; stopping", name)
                if on_lost is not None:
                    on_lost()
                return
            ledger.update_run(handle.run_id, now, *handle.figures())
    except Exception as exc:  # the main thread meets the same ledger trouble and reports it
        log.warning("job %r: could not renew the run's claim: %s", name, exc)
    finally:
        ledger.close()
