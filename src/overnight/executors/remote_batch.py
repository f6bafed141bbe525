"""A provider's batch API (openai-batch, anthropic-batch): read the whole input into the
ledger, then submit, poll and collect remote batches (batch_runner.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .. import llm_job, sources
from ..claim import RunHandle
from ..errors import UsageError
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
        job._verify_read(ledger, fresh)
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
