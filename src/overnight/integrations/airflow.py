"""overnight in Airflow: an operator that runs a job file, deferrable while provider batches run.

    from pathlib import Path
    from overnight.integrations.airflow import OvernightOperator

    enrich = OvernightOperator(task_id="enrich", job_file=Path(__file__).parent / "enrich.toml")

Running the task runs the job (`overnight run`) and pushes its report to XCom as the task's
return value: `Report.to_dict()`, what `overnight run --json` prints. The ledger makes the task
idempotent: a retried task (after an error, a killed worker, a cleared task instance) resumes
the job, and nothing that finished is computed or paid for again; a task run over a changed
input computes only the new and changed records.

Batch backends (`openai-batch`, `anthropic-batch`): the task submits the job's batches
(`run(detach=True)`) and defers to `OvernightTrigger`, which polls the ledger and the provider
from the triggerer, holding no worker slot, until every batch of the job has ended; the task
then resumes, collects the results and writes the output (what must be tried again goes out
in new batches, and the task defers again). `deferrable=False` waits in the worker instead.
The triggerer needs what the worker needs: the job file at the same path, the ledger (a
PostgreSQL URL when workers and triggerer are on several machines) and the API key's variable.

Failed items: `on_failed="fail"` (the default) fails the task when any item failed or was
invalid (after the job has run: what succeeded is written); `"warn"` logs them and succeeds.
A run that was interrupted, cancelled or stopped early fails the task; a wrong setting fails it
without retries (`AirflowFailException`: a retry would fail the same way). A task Airflow
stops (SIGTERM: `on_kill`) ends its run after the batch in flight and fails, so its retry
starts at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from .. import llm_job
from ..errors import EndpointDown, OvernightError, UsageError
from ..executors import executor_class, remote_batch
from ..job import Job, Report

__all__ = ["OvernightOperator", "OvernightTrigger", "live_batches", "running_batch"]


class OvernightOperator(BaseOperator):
    """Runs the overnight job in `job_file` (see the module docstring).

    `ledger`: a PostgreSQL URL or a SQLite file for the job's ledger (None: the job file's own,
    `[run] ledger`, or OVERNIGHT_LEDGER). `poll_interval`: seconds between the trigger's looks
    at the provider while the task is deferred. The job file is read when the DAG is parsed,
    so a missing file or a bad key is an import error of the DAG that names the file; a
    relative `job_file` is taken from the working directory: give `Path(__file__).parent / ...`.
    """

    ui_color = "#1d2f4e"
    ui_fgcolor = "#ffffff"

    def __init__(
        self,
        *,
        job_file: str | Path,
        ledger: str | None = None,
        on_failed: Literal["fail", "warn"] = "fail",
        deferrable: bool = True,
        poll_interval: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        where = f"OvernightOperator(task_id={self.task_id!r})"
        if on_failed not in ("fail", "warn"):
            raise AirflowException(
                f"{where}: on_failed must be 'fail' or 'warn', not {on_failed!r}"
            )
        if poll_interval <= 0:
            raise AirflowException(f"{where}: poll_interval must be > 0, not {poll_interval!r}")
        self.job_file = str(Path(job_file).resolve())
        self.ledger = ledger
        self.on_failed = on_failed
        self.deferrable = deferrable
        self.poll_interval = float(poll_interval)
        self._stop = threading.Event()
        try:
            self._job()
        except UsageError as exc:
            raise AirflowException(f"{where}: {exc}") from None

    def _job(self) -> Job:
        return Job.from_file(self.job_file, state=self.ledger)

    def execute(self, context: Any) -> dict[str, Any]:
        job = self._job()
        self.log.info("overnight: running %s (ledger %s)", job.name, job.ledger_name)
        if self.deferrable and executor_class(job.spec.model.mode).detaches:
            return self._submit_or_finish(job)
        return self._finish(job, self._run(job))

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Back from the trigger: every batch has ended (or the job needs a run)."""
        if event.get("error"):
            raise AirflowFailException(event["error"])
        return self._submit_or_finish(self._job())

    def _submit_or_finish(self, job: Job) -> dict[str, Any]:
        """Collect what ended and submit what is pending; defer while the ledger holds live
        batches, else finish the job in this worker (collect, write the output)."""
        report = self._run(job, detach=True)
        with _airflow_errors():
            live = live_batches(job) if report.counts.open else []
        if live:
            self.log.info(
                "overnight: %s: %d items in %d provider batches; deferring (no worker slot held)"
                " until they end, polling every %gs",
                job.name,
                report.counts["submitted"],
                len(live),
                self.poll_interval,
            )
            self.defer(
                trigger=OvernightTrigger(self.job_file, self.ledger, self.poll_interval),
                method_name="execute_complete",
            )
        return self._finish(job, self._run(job))

    def _run(self, job: Job, detach: bool = False) -> Report:
        with _airflow_errors():
            return job.run(detach=detach, stop=self._stop)

    def on_kill(self) -> None:
        """The task was stopped (marked failed or cleared in the UI, a timeout): the run ends
        after the batch it is computing, commits what it finished and lets go of its leases
        and of the job, so a retry or another worker takes the rest at once rather than after
        the lease time. Provider batches stay live; the task's next try collects them."""
        self.log.info("overnight: stopping the run (task killed)")
        self._stop.set()

    def _finish(self, job: Job, report: Report) -> dict[str, Any]:
        result = report.to_dict()
        c = report.counts
        self.log.info(
            "overnight: %s: %d succeeded, %d failed, %d invalid, %d processed by this run;"
            " cost $%.4f (saved $%.4f); output %s",
            job.name,
            c["succeeded"],
            c.failed,
            c["invalid"],
            report.processed,
            c.cost,
            c.saved,
            report.output,
        )
        problem = _problem(report)
        if problem is not None:
            raise AirflowException(f"{job.name}: {problem}")
        bad = c.failed + c["invalid"] + c.rejected
        if bad:
            message = f"{job.name}: {bad:,} item(s) failed or invalid (see `overnight failures`)"
            if self.on_failed == "fail":
                raise AirflowException(message)
            self.log.warning(message)
        return result


class OvernightTrigger(BaseTrigger):
    """Waits, in the triggerer, until every provider batch of the job has ended: each poll
    reads the job's live batches from the ledger and asks the provider about them. Its event
    resumes the task: `{"ended": True}`, or `{"error": message}` when the job cannot be
    polled (the ledger has no such job, the API key is refused)."""

    def __init__(self, job_file: str, ledger: str | None = None, poll_interval: float = 60.0):
        super().__init__()
        self.job_file = job_file
        self.ledger = ledger
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{__name__}.OvernightTrigger",
            {"job_file": self.job_file, "ledger": self.ledger, "poll_interval": self.poll_interval},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while True:
            try:  # the ledger and the provider are blocking calls: in a thread of their own
                running = await asyncio.to_thread(self._running_batch)
            except EndpointDown as exc:  # the provider out of reach: look again later
                self.log.warning("%s; polling again in %gs", exc, self.poll_interval)
            except UsageError as exc:
                yield TriggerEvent({"error": str(exc)})
                return
            else:
                if running is None:
                    yield TriggerEvent({"ended": True})
                    return
                self.log.info("overnight: %s: provider batch %s is running", *running)
            await asyncio.sleep(self.poll_interval)

    def _running_batch(self) -> tuple[str, str] | None:
        """(job name, remote id) of a batch still running; None when all have ended."""
        job = Job.from_file(self.job_file, state=self.ledger)
        remote_id = running_batch(job)
        return None if remote_id is None else (job.name, remote_id)


def live_batches(job: Job) -> list[str]:
    """The remote ids of the job's provider batches that the ledger holds as live (submitted,
    not yet collected); [] when the job was cancelled (a run collects what they finished)."""
    with job.ledger() as ledger:
        info = ledger.get_job(job.name)
        if info is None:
            raise UsageError(
                f"job {job.name!r} has not been run yet (no ledger entry in {job.ledger_name})"
            )
        if ledger.is_cancelled(info.id):
            return []
        return [c.remote_id for c in ledger.chunks(info.id, ("live",)) if c.remote_id]


def running_batch(job: Job) -> str | None:
    """A provider batch of the job that has not ended (its remote id), asking the provider
    about each live batch in the ledger until one has not; None when every one has ended
    (or the ledger holds none): the time to resume the task. Raises UsageError (no such
    job, the API key refused) or EndpointDown (the provider out of reach)."""
    live = live_batches(job)
    if not live:
        return None
    service = remote_batch.service(job)
    for remote_id in live:
        try:
            ended = service.poll(remote_id).ended
        except Exception as exc:  # the SDK's errors: the key refused, the API unreachable
            failure = llm_job.provider_failure(job.spec, exc)
            if failure is None:
                raise
            raise failure from None
        if not ended:
            return remote_id
    return None


@contextmanager
def _airflow_errors() -> Iterator[None]:
    """overnight's errors as Airflow's: a bad setting or the key refused fails the task
    without retries (a retry would fail the same way); the provider or the ledger out of
    reach fails this try (a retry resumes the job)."""
    try:
        yield
    except UsageError as exc:
        raise AirflowFailException(str(exc)) from None
    except OvernightError as exc:
        raise AirflowException(str(exc)) from None


def _problem(report: Report) -> str | None:
    """Why a finished run fails the task whatever `on_failed` says."""
    if report.cancelled:
        return "the job was cancelled (`overnight run`, or clearing the task, resumes it)"
    if report.interrupted:
        return "the run was interrupted; a retry of the task resumes it"
    if report.stop_reason:
        return f"the run stopped early: {report.stop_reason}"
    if not report.ingest_done:
        return "the input was not read to its end"
    return None
