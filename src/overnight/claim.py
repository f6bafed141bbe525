"""The workers of a job, and which one of them is its primary: a claim in the ledger.

`overnight run JOB` started several times at once (in one shell, on one machine, or on many
machines sharing a ledger) gives several workers on one job. Each records itself as a run
(`runs`, with a heartbeat); all of them compute leased items. One of them, the primary, holds
the job's claim (one row per job name): it sets the job up (creates, resumes or reconciles it),
reads the input into the ledger and, on the provider batch backends, plans and submits the
chunks; the others poll and collect. A worker that joins a job another live worker holds
waits until the job is set up, then works beside it. `--restart`, and a changed input, are
refused (exit 2 naming the other workers) while another worker runs.

A claim whose owner died is taken over at once when the owner lived on this host (its pid
and start time say so); one held from another host is taken over only once its heartbeat
stops for `ttl` seconds. Whichever worker takes it over goes on with the ingest, or the
submitting, where the dead one stopped.
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

from .errors import UsageError, option
from .runner import Progress, lease_owner, owner_alive
from .store import Claim, Ledger, RunRecord

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


def worker_alive(run: RunRecord, now: float | None = None, ttl: float = TTL) -> bool:
    """True when a run that has not ended is a live worker (not one killed without a word)."""
    alive = owner_alive(run.owner.partition("/")[0])
    if alive is None:
        return run.updated_at + ttl >= (now or time.time())
    return alive


def live_workers(ledger: Ledger, name: str, ttl: float = TTL) -> list[str]:
    """The owners of the live workers of job `name`."""
    now = time.time()
    return [r.owner for r in ledger.open_runs(name) if worker_alive(r, now, ttl)]


@dataclass
class RunHandle:
    """One worker of a job. `primary`: it holds the job's claim (it sets the job up, ingests
    and submits). The job sets `progress` once it has one (the heartbeat records it for
    `status`), `job_id` and `lease_seconds` once it leases (the heartbeat renews its leases),
    and `outcome` when it knows how the run ends."""

    name: str
    owner: str
    since: float
    ttl: float
    primary: bool = False
    run_id: int = 0
    progress: Progress | None = None
    outcome: str = "error"
    final: tuple[int, float, float] | None = None
    job_id: int | None = None
    lease_seconds: float | None = None
    held: Claim | None = None  # the claim as `take` last saw it

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

    def take(self, ledger: Ledger) -> bool:
        """Become the primary unless another live worker is: True when this worker holds
        the job's claim (a dead primary's is taken over)."""
        if self.primary:
            return True
        now = time.time()
        held = ledger.claim(self.name, self.owner, now, now + self.ttl)
        if held.owner != self.owner and not holder_alive(held, now):
            log.info("job %r: taking over from %s, which is gone", self.name, describe(held.owner))
            held = ledger.claim(self.name, self.owner, now, now + self.ttl, take_from=held.owner)
        self.primary = held.owner == self.owner
        self.held = held
        return self.primary

    def leave(self, ledger: Ledger) -> bool:
        """This worker is done (`finish` said how): its run is recorded as ended. True when
        no other worker is still at work, so this one is the last (it writes the output)."""
        ledger.update_run(self.run_id, time.time(), *self.figures(), self.outcome)
        return not self.others(ledger)

    def others(self, ledger: Ledger) -> list[str]:
        """The other live workers of this job."""
        return [o for o in live_workers(ledger, self.name, self.ttl) if o != self.owner]


RESTART = f"{option('restart')} would discard what it computes and send its requests again"
SAME_PROCESS = "a second run in the same process cannot work beside it (start another process)"


def busy(name: str, owners: list[str], since: float | None = None, why: str = RESTART) -> JobBusy:
    """The refusal of what only a job's sole worker may do (`--restart`, a changed input)."""
    who = ", ".join(describe(o) for o in owners[:5])
    if since:
        who += f" (since {datetime.fromtimestamp(since).strftime('%Y-%m-%d %H:%M:%S')})"
    return JobBusy(
        f"job {name!r} is being run by {who}; {why}. Let it finish (`overnight status` shows"
        " it), or stop it first (`overnight cancel`)"
    )


@contextmanager
def claimed(
    ledger: Ledger,
    name: str,
    connect: Callable[[], Ledger],
    *,
    on_lost: Callable[[], None] | None = None,
    ttl: float = TTL,
    restart: bool = False,
) -> Iterator[RunHandle]:
    """Work on job `name` as one of its workers while the block runs: the primary if no
    other live worker holds the job's claim, else a worker beside it. With `restart`, raise
    JobBusy if another worker holds the claim (the caller refuses too if other workers run).
    A heartbeat thread renews the claim (while held), the run's record and the worker's
    leases over its own ledger connection (`connect`), so a long model call does not let
    them expire; `on_lost` runs if the claim is ever taken over."""
    owner = f"{lease_owner()}/{secrets.token_hex(4)}"
    handle = RunHandle(name, owner, time.time(), ttl)
    if not handle.take(ledger):
        assert handle.held is not None
        if restart:
            raise busy(name, [handle.held.owner], handle.held.since)
        # Workers are processes: two runs in one process would share its lease owner (and
        # release each other's leases), so a second one here is refused, not joined.
        mine = lease_owner()
        here = [o for o in live_workers(ledger, name, ttl) if o.partition("/")[0] == mine]
        if here:
            raise busy(name, here, handle.held.since, why=SAME_PROCESS)
    stop = threading.Event()
    beat: threading.Thread | None = None
    try:
        handle.run_id = ledger.start_run(name, owner, handle.since)
        # The heartbeat's own connection, opened now: opened later, it could create a new,
        # empty ledger where the real one was deleted.
        beat = threading.Thread(
            target=_heartbeat, args=(connect(), stop, on_lost, handle), daemon=True
        )
        beat.start()
        yield handle
    finally:
        stop.set()
        if beat is not None:
            beat.join(timeout=ttl)
        try:
            if handle.run_id:
                ledger.update_run(handle.run_id, time.time(), *handle.figures(), handle.outcome)
        finally:
            if handle.primary:
                ledger.release_claim(name, owner)


def _heartbeat(
    ledger: Ledger,
    stop: threading.Event,
    on_lost: Callable[[], None] | None,
    handle: RunHandle,
) -> None:
    name, owner, ttl = handle.name, handle.owner, handle.ttl
    leaser = owner.partition("/")[0]  # the runner's lease owner (runner.lease_owner)
    try:
        while not stop.wait(min(ttl / 4, (handle.lease_seconds or ttl) / 3)):
            now = time.time()
            if handle.primary and not ledger.renew_claim(name, owner, now + ttl):
                handle.primary = False
                log.error("job %r: another process took over this run's claim; stopping", name)
                if on_lost is not None:
                    on_lost()
                return
            ledger.update_run(handle.run_id, now, *handle.figures())
            if handle.job_id is not None and handle.lease_seconds:
                ledger.renew(handle.job_id, leaser, now + handle.lease_seconds)
    except Exception as exc:  # the main thread meets the same ledger trouble and reports it
        log.warning("job %r: could not renew the run's claim: %s", name, exc)
    finally:
        ledger.close()
