"""backend = "auto": the batch API (half price) while there is time; when the time left
falls under `deadline_margin`, cancel what has not finished and complete it in real time.
Without a deadline it is the batch API alone."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, ClassVar

from ..estimate import usd
from . import remote_batch
from .base import RunContext, RunOutcome, register
from .local import LocalExecutor

if TYPE_CHECKING:
    from ..job import Job


@register("auto")
class DeadlineExecutor:
    remote_batches: ClassVar[bool] = True
    detaches: ClassVar[bool] = False

    def __init__(self, job: Job) -> None:
        self.job = job

    def run(self, ctx: RunContext) -> RunOutcome:
        job, ledger, outcome, stop = self.job, ctx.ledger, ctx.outcome, ctx.stop
        job_id = ctx.info.id
        fresh = remote_batch.ingest(job, ctx)
        if fresh is None:
            return outcome
        deadline = job.spec.run.deadline_at
        cut = deadline.timestamp() - job.spec.run.deadline_margin if deadline else None
        switched = False
        # Past the cut already (say the machine was off): this only adopts, cancels and
        # collects the live batches, submitting nothing new.
        with job._cache() as cache:
            remote = remote_batch.runner(
                job, ledger, fresh, ctx.progress, ctx.on_progress, stop, cache, ctx.worker
            )
            try:
                remote.run(until=cut)
            finally:
                outcome.notes += remote.notes
        if stop is not None and stop.is_set():
            return outcome
        counts = ledger.counts(job_id)
        if counts["pending"] and deadline is not None and not ledger.is_cancelled(job_id):
            switched = True  # the rest in real time, at full price
            LocalExecutor(job).run(dataclasses.replace(ctx, info=fresh))
        if deadline is not None:
            counts = ledger.counts(job_id)
            done_at = counts.last_finished or time.time()
            held = counts.open == 0 and done_at <= deadline.timestamp()
            outcome.deadline = {
                "deadline": deadline.isoformat(),
                "held": held,
                "switched_to_realtime": switched,
                "summary": (
                    f"{'finished' if counts.open == 0 else 'not finished'}"
                    f"{' after switching to real time' if switched else ' in batches'};"
                    f" saved {usd(counts.saved)} vs real time"
                ),
            }
        outcome.cancelled = ledger.is_cancelled(job_id)
        return outcome
