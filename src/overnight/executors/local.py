"""The loop in this process: lease, compute, commit (runner.py). Local models, python
functions, self-hosted models and the providers' real-time APIs."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from .. import llm_job, sources
from ..backends.base import Predictor
from ..batching import BatchSizer
from ..opening import verify_read
from ..runner import Runner
from .base import RunContext, RunOutcome, register

if TYPE_CHECKING:
    from ..job import Job


@register(None, "realtime")
class LocalExecutor:
    remote_batches: ClassVar[bool] = False
    detaches: ClassVar[bool] = False
    # The loop over the ledger, and what computes (another executor may run the same loop
    # with other computers: ray.py).
    runner_class: ClassVar[type[Runner]] = Runner

    def __init__(self, job: Job) -> None:
        self.job = job

    def make_predictor(self) -> Predictor:
        job = self.job
        return job._realtime_predictor() if job.is_llm else job._predictor()

    def run(self, ctx: RunContext) -> RunOutcome:
        job, ledger, info, outcome = self.job, ctx.ledger, ctx.info, ctx.outcome
        spec = job.spec
        llm = job.is_llm
        if llm:
            window = job._realtime_window()
            sizer = BatchSizer.fixed(window)
        else:
            sizer = job._sizer()
            window = job._predictor_class().window
        read_size = max(sources.CHUNK, sizer.maximum, sizer.size, window)  # records a read
        from ..backends.local import TokenWindow, TruncationWatch

        task = job.task
        if spec.model.backend == "local":  # texts over the model's window: warn
            task = TruncationWatch(task, TokenWindow(spec.model.name or "all-MiniLM-L6-v2"))
        made: list[Predictor] = []  # an isolated local model counts truncations in its worker

        def predictor() -> Predictor:
            made.append(self.make_predictor())
            return made[-1]

        worker = ctx.worker
        if worker is not None:  # its heartbeat renews its leases while it computes
            worker.job_id, worker.lease_seconds = info.id, spec.run.lease_seconds
        runner = self.runner_class(
            ledger,
            info,
            task,
            predictor,
            reader=job._reader(read_size),
            sizer=sizer,
            window=window,
            retry_policy=job._retry_policy(),
            lease_seconds=spec.run.lease_seconds,
            validate=job.validator,
            on_progress=ctx.on_progress,
            stop=ctx.stop,
            progress=ctx.progress,
            meter=llm_job.meter(spec, job.prices, batch=False)
            if llm
            else llm_job.token_meter()
            if job.self_hosted_llm
            else None,
            max_cost=spec.run.max_cost,
            commit_each_call=llm,
            # In the runner's own process a record can kill it: count attempts when they
            # start. In a worker it kills the worker only, which the runner sees.
            count_starts=not llm and spec.isolation == "none",
            may_ingest=None if worker is None else lambda: worker.take(ledger),
            alone=None if worker is None else lambda: not worker.others(ledger),
        )
        try:
            runner.run()
            now = ledger.get_job(job.name)
            if not info.ingest_done and now is not None and now.ingest_done:
                verify_read(job, ledger, now)
        finally:
            outcome.cancelled = runner.cancelled
            if isinstance(task, TruncationWatch):
                task.truncated += sum(getattr(p, "truncated", 0) for p in made)
                task.warn(job.origin, lambda: job._reader(sources.CHUNK)(sources.Cursor()))
            outcome.batch_size = None if llm else sizer.size
            outcome.batch_trials = () if llm else tuple(sizer.trials)
        return outcome
