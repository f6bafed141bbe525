"""[run] executor = "ray": the model or function runs in Ray actors, one per worker, each
loading it once; this process, the driver, is the only one that talks to the ledger.

The driver reads the input into the ledger as pending items, a read at a time as the
actors need more (the runner's own way with several workers on one job), leases pages and
keeps `DEPTH` pages in flight per actor, so that an actor always has the next page queued
while it computes one. An actor runs the whole task as the local runner's worker process
does (worker.py: records go as stored, rows come back as JSON bytes); its answers are
settled by the local runner's code (runner.py: validation, per-record errors, the job's
retry policy) and committed with `ledger.complete`, for items the driver still holds:
nothing is written twice.

An actor that dies (a record that kills it, kill -9, its node lost) fails the pages it held
with a `WorkerCrashed` error, like a worker process that dies: the runner splits a failing
page until the record that kills its actor is alone, retries it up to `max_attempts`, and
fails it alone. A new actor takes the dead one's place (or, when none can start within
`RESTART_WAIT`, the job goes on with fewer). Leases stay the truth: a killed driver's items
go back to pending when its lease ends, as with any runner.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..backends.base import Predictor
from ..errors import UsageError, WorkerCrashed, WorkerStartError
from ..records import Row
from ..runner import PROCESS_DIED, Runner, Work
from ..store import ConcurrentIngest
from ..worker import START_TIMEOUT, Recipe, answer, call_message, load, read_reply
from .base import RunContext, RunOutcome, register
from .local import LocalExecutor

if TYPE_CHECKING:
    from ..job import Job

log = logging.getLogger(__name__)

# Pages in flight per actor: the one it computes and the next ones, queued in the actor.
DEPTH = 3
# Seconds a new actor, replacing a dead one, may take to load before the job goes on without.
RESTART_WAIT = 120.0


def import_ray() -> Any:
    """Ray, imported when a job asks for it; exit 2 with how to install it when it is not."""
    try:
        import ray
    except ImportError:
        raise UsageError(
            "[run] executor = 'ray' needs Ray, not installed here; install it with:"
            " pip install 'overnight[ray]'"
        ) from None
    return ray


class Actor:
    """One worker on the Ray cluster: the job's predictor and task, loaded once."""

    def __init__(self, recipe: Recipe) -> None:
        self.predictor, self.task = load(recipe)

    def ready(self) -> int:
        return os.getpid()

    def process(self, msg: bytes) -> tuple[bytes, float]:
        """A `worker.call_message` answered, and the seconds it took here."""
        t0 = time.perf_counter()
        reply = answer(self.predictor, self.task, msg)
        return reply, time.perf_counter() - t0


class Pool:
    """The job's actors. As a predictor (`process`) it makes one call and waits for it: the
    runner's path when it splits a failing page; the driver's own loop uses `submit` and
    `result` to keep several pages in flight."""

    runs_task = True  # records go as stored, rows come back as JSON (worker.py)

    def __init__(self, ray: Any, recipe: Recipe, workers: int, options: dict[str, Any]) -> None:
        self.ray, self.recipe = ray, recipe
        self.remote = ray.remote(**options, max_restarts=0, max_task_retries=0)(Actor)
        self.truncated = 0  # texts the local model cut to its window (counted in the actors)
        self.starts = 0
        # One slot per worker: its actor (None once none could replace a dead one) and the
        # pages in flight on it.
        self.actors: list[Any] = [self._start() for _ in range(workers)]
        self.queued = [0] * workers
        self._ready = False

    @property
    def capacity(self) -> int:
        return DEPTH * sum(a is not None for a in self.actors)

    def _start(self) -> Any:
        self.starts += 1
        return self.remote.remote(self.recipe)

    def wait_ready(self) -> None:
        """Until every actor has loaded the model (they load in parallel, from the start)."""
        if self._ready:
            return
        try:
            self.ray.get([a.ready.remote() for a in self.actors], timeout=START_TIMEOUT)
        except Exception as exc:
            raise WorkerStartError(
                f"the Ray actors could not load ({self.recipe.factory}): {_cause(exc)}"
            ) from None
        self._ready = True

    def submit(self, inputs: list[bytes], batch_size: int) -> tuple[Any, tuple[int, Any]]:
        """Send a call to the actor with the fewest pages in flight: its answer's ref, and
        the slot (index, actor) it went to."""
        live = [k for k, a in enumerate(self.actors) if a is not None]
        k = min(live, key=self.queued.__getitem__)
        self.queued[k] += 1
        actor = self.actors[k]
        return actor.process.remote(call_message(inputs, batch_size)), (k, actor)

    def result(self, ref: Any, slot: tuple[int, Any]) -> tuple[list[Any], float]:
        """A call's answers and its seconds in the actor; a call whose actor died raises
        WorkerCrashed (and a new actor takes its place)."""
        ray, (k, actor) = self.ray, slot
        self.queued[k] -= 1
        try:
            reply, seconds = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            if self.actors[k] is actor:  # (its other pages fail the same way: replace once)
                self._replace(k, exc)
            raise WorkerCrashed(f"the Ray actor died: {_cause(exc)}") from None
        rows, truncated = read_reply(reply)
        self.truncated += truncated
        return rows, seconds

    def process(self, inputs: list[bytes], batch_size: int) -> list[Any]:
        return self.result(*self.submit(inputs, batch_size))[0]

    def _replace(self, k: int, exc: Exception) -> None:
        ray = self.ray
        log.warning("Ray actor %d died (%s); starting another", k, _cause(exc))
        ray.kill(self.actors[k], no_restart=True)
        fresh = self._start()
        try:
            ray.get(fresh.ready.remote(), timeout=RESTART_WAIT)
        except Exception as why:
            ray.kill(fresh, no_restart=True)
            self.actors[k] = None
            if not any(a is not None for a in self.actors):
                raise WorkerStartError(
                    f"the Ray actor died and no other could start: {_cause(why)}"
                ) from None
            log.warning("no actor could replace Ray actor %d (%s); going on with fewer", k, why)
            return
        self.actors[k] = fresh

    def close(self) -> None:
        for actor in self.actors:
            if actor is not None:
                self.ray.kill(actor, no_restart=True)
        self.actors = [None] * len(self.actors)


def _check_reachable(address: str) -> None:
    """Exit 2 at once when a cluster's "host:port" refuses connections (Ray itself retries
    for minutes). Other forms ("auto", "ray://…") are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise UsageError(
            f"[run] ray_address: nothing answers at {address} ({exc.strerror or exc}); is the"
            " Ray cluster's head node up (`ray start --head`), and is this its GCS port?"
        ) from None


def _cause(exc: BaseException) -> str:
    """The first line of what Ray says about an error (its messages run to many lines)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RayRunner(Runner):
    """The driver's loop: the local runner's ingest, settling and commits, with pages in
    flight on the pool's actors instead of one call at a time in this process."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_starts = False  # a record kills an actor, not this process
        self._reading: Iterator[list[Row]] | None = None
        self._next_seq = 0

    def _ingest(self) -> None:
        """One read of the input in, as pending items for the actors (the drain asks for the
        next when the ledger runs short of pending items): the actors start at once, and the
        driver holds one read at a time, however large the input."""
        if self._reading is None:
            self._reading = iter(self.reader(self.job.cursor))
            self._next_seq = self.job.cursor.records
        try:
            rows = next(self._reading, None)
            if rows is not None:
                self._add_pending(self._next_seq, rows)
                self._next_seq += len(rows)
                return
        except ConcurrentIngest:
            raise UsageError(
                f"job {self.job.name!r} is being run by another process right now (it moved "
                "the input cursor first); let it finish, and see `overnight status`"
            ) from None
        self.ledger.finish_ingest(self.job.id)
        self.job = dataclasses.replace(self.job, ingest_done=True)
        self.progress.ingest_done = True
        self.on_progress(self.progress)

    def _drain(self) -> None:
        self._load()
        pool: Pool = self._predictor  # type: ignore[assignment]
        wait = pool.ray.wait
        flight: dict[Any, tuple[list[Work], tuple[int, Any]]] = {}
        while not self._stopping():
            if time.monotonic() - self._looked >= min(5.0, self.lease_seconds / 4):
                self._reclaim()
            room = pool.capacity - len(flight)
            if room > 0:
                want = room * self._window_size()
                items = self.ledger.lease(self.job.id, want, self._lease())
                if len(items) < want and not self.job.ingest_done:
                    self._catch_up()  # the next read of the input, for the next lease
                for page in self._pages(
                    [Work(it.seq, it.line, it.attempts, None, it.payload) for it in items],
                    {it.seq for it in items if it.error_class == PROCESS_DIED},
                ):
                    ref, slot = pool.submit([w.payload for w in page], self.sizer.size)
                    flight[ref] = (page, slot)
            if not flight:
                if not self._wait_for_work():
                    return
                continue
            ready, _ = wait(list(flight), num_returns=1, timeout=1.0)
            for ref in ready:
                page, slot = flight.pop(ref)
                self._complete(self._answered(pool, ref, slot, page))
            self._renew()
            self._check_cancel()

    def _pages(self, works: list[Work], alone: set[int]) -> list[list[Work]]:
        """Leased items as pages of a call each; a suspect (its last attempt died with its
        runner) is a page of its own."""
        size = self._window_size()
        pages, run = [], []
        for w in works:
            if w.seq in alone:
                pages.append([w])
                continue
            run.append(w)
            if len(run) == size:
                pages.append(run)
                run = []
        if run:
            pages.append(run)
        return pages

    def _answered(self, pool: Pool, ref: Any, slot: tuple[int, Any], page: list[Work]) -> list[Any]:
        try:
            answers, seconds = pool.result(ref, slot)
        except WorkerStartError:
            raise  # no actor left to compute anything
        except Exception as exc:  # the call's own error: split, retry, fail, as locally
            return self._failed(page, [w.payload for w in page], exc)
        self.sizer.observe(len(page), seconds)
        return self._settle(page, answers)


def _resources(ray: Any, job: Job) -> tuple[int, dict[str, Any]]:
    """How many actors, and what each asks of the cluster: a GPU each where the cluster has
    GPUs (for a model), else a share of the CPUs."""
    run, model = job.spec.run, job.spec.model
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0)) if model.backend != "python" else 0
    cpus = max(1, int(total.get("CPU", 1)))
    workers = run.workers or gpus or cpus
    if gpus:
        return workers, {"num_gpus": 1, "num_cpus": 1}
    return workers, {"num_cpus": min(1.0, round(cpus / workers, 2))}


@register(None, executor="ray")
class RayExecutor(LocalExecutor):
    remote_batches: ClassVar[bool] = False
    detaches: ClassVar[bool] = False
    runner_class: ClassVar[type[Runner]] = RayRunner

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.pool: Pool | None = None

    def make_predictor(self) -> Predictor:
        assert self.pool is not None
        self.pool.wait_ready()
        return self.pool  # type: ignore[return-value]

    def run(self, ctx: RunContext) -> RunOutcome:
        ray = import_ray()
        # The Ray driver prints what the cluster reports (an actor's death) on stdout, which
        # carries the runner's report (`--json`): to stderr, beside the progress lines.
        with contextlib.redirect_stdout(sys.stderr):
            return self._run(ray, ctx)

    def _run(self, ray: Any, ctx: RunContext) -> RunOutcome:
        job = self.job
        ours = not ray.is_initialized()
        t0 = time.monotonic()  # reaching (or starting) the cluster counts as setup
        address = job.spec.run.ray_address
        if ours and address is not None:
            _check_reachable(address)
        if ours:
            root = str(Path(__file__).resolve().parent.parent.parent)  # holds overnight/
            path = os.pathsep.join([root, *[p for p in sys.path if p and p != root]])
            try:
                ray.init(
                    address=job.spec.run.ray_address,
                    runtime_env={"env_vars": {"PYTHONPATH": path}},
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UsageError(
                    f"[run] ray_address: cannot reach the Ray cluster"
                    f" {job.spec.run.ray_address or '(a local instance)'}: {_cause(exc)}"
                ) from None
        ctx.progress.setup_seconds += time.monotonic() - t0
        try:
            workers, options = _resources(ray, job)
            log.info("Ray: %d actors, each with %s", workers, options)
            self.pool = Pool(ray, job._recipe(), workers, options)  # they start loading now
            return super().run(ctx)
        finally:
            if self.pool is not None:
                self.pool.close()
            if ours:
                ray.shutdown()
