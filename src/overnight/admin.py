"""The commands about a job that run nothing: `estimate`, `status`, `failures`, `retry`,
`export`, `cancel`. `Job`'s methods of those names call these."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from . import llm_job, sinks, sources
from .claim import describe, holder_alive, live_workers
from .errors import InputError, UsageError
from .executors import remote_batch
from .opening import check_origin
from .report import Activity, CancelResult, Report, RetryResult
from .runner import Progress
from .store import Counts, Failure, JobInfo, Ledger

if TYPE_CHECKING:
    from .job import Job


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def _ledger_of(job: Job) -> Iterator[Ledger]:
    """The ledger of a job that has run, for a command that reads it: a SQLite file that is
    not there is not made (a mistyped --ledger left an empty one behind, and its folders)."""
    if job.state_path is not None and not job.state_path.exists():
        raise UsageError(f"job {job.name!r} has not been run yet (no ledger at {job.ledger_name})")
    with job.ledger() as ledger:
        yield ledger


def job_info(job: Job, ledger: Ledger) -> JobInfo:
    """The job's ledger entry; a clear error when it has none or it is another job's."""
    info = ledger.get_job(job.name)
    if info is None:
        raise UsageError(
            f"job {job.name!r} has not been run yet (no ledger entry in {job.ledger_name})"
        )
    check_origin(job, info)
    return info


def job_or_starting(job: Job, ledger: Ledger, wait: float = 120.0) -> JobInfo:
    """The job's ledger entry; while a run that holds the job's claim has not made it yet
    (it hashes the input, or asks the provider about earlier batches), wait for it."""
    deadline = time.monotonic() + wait
    while (info := ledger.get_job(job.name)) is None:
        claim = ledger.get_claim(job.name)
        if claim is None or not holder_alive(claim):
            break
        if time.monotonic() > deadline:
            raise UsageError(
                f"job {job.name!r} is starting ({describe(claim.owner)}) and has no"
                " ledger entry yet; try again in a moment"
            )
        time.sleep(0.1)
    return info or job_info(job, ledger)


def remote_batches(ledger: Ledger, job_id: int) -> list[dict[str, Any]]:
    """The job's remote batches (the ledger's chunks), as a report lists them."""
    return [c.to_dict() for c in ledger.chunks(job_id)]


def estimate(job: Job) -> Any:
    """Tokens and cost of the whole input, real time vs batch; sends nothing, needs no key.

    Every record is rendered into its request exactly as a run would, so the estimate
    counts the real prompts, schema and parameters."""
    if not job.is_llm:
        raise job._usage("estimate applies to the LLM backends (openai, anthropic, ...)")
    job.check(need_key=False)
    from .estimate import estimate_requests

    def requests() -> Iterator[tuple[str, dict[str, Any]]]:
        for rows in job._reader(sources.CHUNK)(sources.Cursor()):
            for row in rows:
                if row.error is not None:
                    continue
                try:
                    req = job.task.build(row.record)  # type: ignore[arg-type]
                except InputError:
                    continue  # a template field missing: that record fails, costs nothing
                yield req.endpoint, req.body

    params = job.spec.model.params
    max_tokens = params.get("max_tokens", params.get("max_completion_tokens"))
    return estimate_requests(
        requests(),
        job.spec.model.name or "",
        job.prices,
        max_tokens=max_tokens if isinstance(max_tokens, int) else None,
        # A label is a few tokens of JSON: bounding it by max_tokens would overstate.
        expected_output_tokens=16 if job.spec.task.kind == "classify" else None,
    )


def status(job: Job) -> Report:
    """Counts, and whether the job is finished, who runs it, how fast, how long to go.
    The processing figures are the last run's own (those its report showed)."""
    with _ledger_of(job) as ledger:
        info = job_info(job, ledger)
        counts = ledger.counts(info.id)
        activity = _activity(job, ledger, info, counts)
        last = activity.last_run
        return Report(
            job=job.name,
            counts=counts,
            processed=last.processed if last else 0,
            seconds=last.seconds if last else 0.0,
            setup_seconds=last.setup_seconds if last else 0.0,
            cancelled=ledger.is_cancelled(info.id),
            ingest_done=info.ingest_done,
            remote_batches=tuple(remote_batches(ledger, info.id)),
            llm=job.is_llm,
            tokens=job._counts_tokens,
            activity=activity,
        )


def _activity(job: Job, ledger: Ledger, info: JobInfo, counts: Counts) -> Activity:
    now = time.time()
    claim = ledger.get_claim(job.name)
    workers = live_workers(ledger, job.name)  # several `run`s of a job: its workers
    held = claim is not None and holder_alive(claim, now)
    running = held or bool(workers)
    last = ledger.last_run(job.name)
    unfinished: list[str] = []
    unread: int | None = 0
    if not info.ingest_done:
        try:
            expected = job._expected()
        except (OSError, ValueError, UsageError):
            expected = None
        read = counts.total
        unread = None if expected is None else max(0, expected - read)
        unfinished.append(
            f"the input is not fully read: {read:,} records so far"
            + (f" of ~{expected:,}" if expected else "")
        )
    if counts.open:
        parts = [f"{counts[s]:,} {s}" for s in ("pending", "leased", "submitted") if counts[s]]
        unfinished.append(f"{counts.open:,} items still open ({', '.join(parts)})")
    if ledger.is_cancelled(info.id):
        unfinished.append("cancelled: `overnight run` resumes it")
    rate = 0.0
    if running and last is not None and last.ended_at is None:
        window = min(60.0, max(1.0, now - last.started_at))
        rate = ledger.finished_since(info.id, now - window) / window
    elif last is not None:
        rate = last.items_per_second
    remaining = None if unread is None else counts.open + unread
    eta = remaining / rate if remaining and rate > 0 else (0.0 if remaining == 0 else None)
    if unfinished and not running:
        if last is not None and last.ended_at is None:
            unfinished.append(
                f"no run is active: the last one ({describe(last.owner)}) stopped without"
                f" finishing at about {_clock(last.updated_at)} (killed?); `overnight run`"
                " resumes it"
            )
        else:
            unfinished.append("no run is active: `overnight run` resumes it")
    owner = claim.owner if held and claim else workers[0] if workers else None
    owner = owner or (last.owner if last else None)
    runner = describe(owner) if owner else None
    if runner and len(workers) > 1:
        runner += f" and {len(workers) - 1} other worker{'s' if len(workers) > 2 else ''}"
    return Activity(
        running=running,
        runner=runner,
        last_run=last,
        items_per_second=rate,
        remaining=remaining,
        eta_seconds=eta if running else None,
        unfinished=tuple(unfinished),
    )


def failures(job: Job) -> list[Failure]:
    with _ledger_of(job) as ledger:
        return list(ledger.iter_failures(job_info(job, ledger).id))


def retry(job: Job, invalid: bool = False) -> RetryResult:
    """Move failed (and invalid) items back to pending; `run` then processes them.

    Input lines that could not be read are not items and cannot be moved: fixing the
    line and running again is how they are retried (the run reads a changed input again)."""
    states = ("failed", "invalid") if invalid else ("failed",)
    with _ledger_of(job) as ledger:
        info = job_info(job, ledger)
        moved = ledger.retry(info.id, states)
        unread = ledger.counts(info.id).rejected
        return RetryResult(moved, unread, tuple(ledger.reject_lines(info.id, 10)))


def export(job: Job) -> sinks.Exported:
    job._check_output()
    with _ledger_of(job) as ledger:
        info = job_info(job, ledger)
        return job.output.write(ledger, info.id)


def drain_cancelled(job: Job, stop: threading.Event) -> bool:
    """A cancelled job's provider batches to their end (BatchRunner.drain): what they
    finished is collected into the ledger, nothing is submitted. True when none is left
    live (or the job has none), False if `stop` came first."""
    with job.ledger() as ledger:
        info = ledger.get_job(job.name)
        if info is None or not job.is_llm or not ledger.chunks(info.id, ("creating", "live")):
            return True
        with job._cache() as cache:
            runner = remote_batch.runner(job, ledger, info, Progress(), None, stop, cache)
            return bool(runner.drain())


def cancel(job: Job) -> CancelResult:
    """Open items become cancelled; a running run stops after its batch in flight; live
    provider batches are cancelled remotely and what they finished is kept (collected
    by the running run or the next `run`). `run` resumes the job."""
    with job.ledger() as ledger:
        info = job_or_starting(job, ledger)
        counts = ledger.counts(info.id)
        activity = _activity(job, ledger, info, counts)
        if (
            info.ingest_done
            and not counts.open
            and not activity.running
            and not ledger.chunks(info.id, ("creating", "live"))
        ):
            # Nothing is open: marking the job cancelled would only make `status` and
            # the next run say so of a job that had finished.
            return CancelResult(items=0, runner=None, unread=0, remote_batches=0, finished=True)
        n = ledger.cancel(info.id)
        remote_cancelled = 0
        if job.is_llm and ledger.chunks(info.id, ("live",)):
            from .batch_runner import BatchRunner

            runner = BatchRunner(
                ledger,
                info,
                job.task,  # type: ignore[arg-type]
                remote_batch.service(job),
                tag=remote_batch.tag(job, info),
                max_attempts=job.spec.run.max_attempts,
                meter=llm_job.meter(job.spec, job.prices, batch=True),
            )
            with job._provider_errors():
                remote_cancelled = runner.cancel_remote()
        unread = None
        if not info.ingest_done and activity.remaining is not None:
            unread = max(0, activity.remaining - counts.open)
        return CancelResult(
            items=n,
            runner=activity.runner if activity.running else None,
            unread=unread if not info.ingest_done else 0,
            remote_batches=remote_cancelled,
        )
