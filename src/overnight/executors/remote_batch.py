"""A provider's batch API (openai-batch, anthropic-batch): read the whole input into the
ledger, then submit, poll and collect remote batches (batch_runner.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .. import llm_job, sources
from ..claim import RunHandle
from ..errors import UsageError, option
from ..opening import verify_read
from ..runner import Progress, ingest_only
from ..store import JobInfo, Ledger
from .base import RunContext, RunOutcome, register

if TYPE_CHECKING:
    from ..job import Job


def service(job: Job) -> Any:
    """The provider's batch API, as the job's settings shape it."""
    spec = job.spec
    requests, size = llm_job.batch_limits(spec)
    return llm_job.provider(spec).batch_service(
        api_key=llm_job.api_key(spec),
        base_url=spec.model.base_url,
        max_requests=requests,
        max_bytes=size,
        timeout=spec.model.timeout,
        tmp_dir=job._ledger_dir / "tmp",
    )


def tag(job: Job, info: JobInfo) -> Any:
    """The job's mark on each of its remote batches (llm/batch.py)."""
    from ..llm.batch import JobTag

    return JobTag(info.name, job.identity_key, info.token, f"{info.name}@{info.created_at:.6f}")


def runner(
    job: Job,
    ledger: Ledger,
    info: JobInfo,
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
    stop: threading.Event | None,
    cache: Any = None,
    worker: RunHandle | None = None,
) -> Any:
    """The driver of the job's remote batches (batch_runner.py)."""
    from ..batch_runner import BatchRunner

    spec = job.spec
    return BatchRunner(
        ledger,
        info,
        job.task,  # type: ignore[arg-type]
        service(job),
        tag=tag(job, info),
        max_attempts=spec.run.max_attempts,
        meter=llm_job.meter(spec, job.prices, batch=True),
        validate=job.validator,
        progress=progress,
        on_progress=on_progress,
        stop=stop,
        max_cost=spec.run.max_cost,
        poll_interval=spec.model.poll_interval,
        poll_max=max(spec.model.poll_interval, 600.0),
        repair=spec.task.repair,
        cache=cache,
        may_submit=None if worker is None else lambda: worker.take(ledger),
    )


def refuse_earlier_batches(job: Job, info: JobInfo | None) -> None:
    """Exit 2, before anything is submitted, when the provider holds batches of an
    earlier run of this job that the ledger does not know."""
    from ..batch_runner import earlier_batches

    found = earlier_batches(service(job), job.identity_key, info)
    if not found:
        return
    live = sum(t.live for t in found)
    rows = "\n".join(f"  {t.remote_id}  {t.status}  {t.requests} requests" for t in found[:20])
    more = f"\n  … and {len(found) - 20} more" if len(found) > 20 else ""
    raise UsageError(
        f"job {job.name!r}: the provider holds {len(found)} batches of an earlier run of"
        f" this job ({live} still running) that the ledger {job.ledger_name} does not know"
        f" (was it deleted or replaced?):\n{rows}{more}\nRunning it now would send their"
        " requests again and pay for them twice. Put the ledger back if you have it; or run"
        f" with {option('restart')} to cancel the running ones and start over (what they"
        " finished is not used)."
    )


def cancel_earlier_batches(job: Job, ledger: Ledger, info: JobInfo | None) -> list[str]:
    """On a restart: cancel the job's live provider batches (from its ledger entry, and
    any the provider shows with its identity) before its entry is deleted."""
    from ..batch_runner import cancel_earlier

    known: set[str] = set()
    if info is not None:
        known = runner(job, ledger, info, Progress(), None, None).live_remote_ids()
    n = cancel_earlier(service(job), job.identity_key, known)
    return [f"cancelled {n} live provider batches of the previous run"] if n else []


def ingest(job: Job, ctx: RunContext) -> JobInfo | None:
    """Remote batches need the whole input in the ledger first; None if stopped. The
    primary reads it; another worker waits for that (or takes over from a dead primary)."""
    ledger, info, worker, stop = ctx.ledger, ctx.info, ctx.worker, ctx.stop
    while worker is not None and not info.ingest_done and not worker.take(ledger):
        if stop is not None and stop.wait(0.2):
            return None
        now = ledger.get_job(job.name)
        if now is None or now.id != info.id:
            raise UsageError(f"job {job.name!r} was restarted by another process")
        info = now
    if worker is not None and not info.ingest_done:  # the cursor as the last ingester left it
        info = ledger.get_job(job.name) or info
    if not ingest_only(
        ledger,
        info,
        job._reader(sources.CHUNK),
        progress=ctx.progress,
        on_progress=ctx.on_progress or (lambda p: None),
        stop=stop,
    ):
        return None
    fresh = ledger.get_job(job.name)
    assert fresh is not None
    if not info.ingest_done:
        verify_read(job, ledger, fresh)
    return fresh


@register("batch")
class RemoteBatchExecutor:
    remote_batches: ClassVar[bool] = True
    detaches: ClassVar[bool] = True

    def __init__(self, job: Job) -> None:
        self.job = job

    def run(self, ctx: RunContext) -> RunOutcome:
        job, ledger, outcome = self.job, ctx.ledger, ctx.outcome
        fresh = ingest(job, ctx)
        if fresh is None:
            return outcome
        with job._cache() as cache:
            remote = runner(
                job, ledger, fresh, ctx.progress, ctx.on_progress, ctx.stop, cache, ctx.worker
            )
            try:
                remote.run(detach=outcome.detached)
            finally:
                outcome.notes += remote.notes
        outcome.cancelled = ledger.is_cancelled(ctx.info.id)
        return outcome
