"""What a run, `status`, `retry` and `cancel` report: plain data the CLI prints and `--json`
dumps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import Counts, RunRecord


@dataclass(frozen=True)
class Activity:
    """What `status` says beyond the counts: is a run alive, is the job finished, how fast."""

    running: bool  # a live process holds the job's claim
    runner: str | None  # "process 1234 on host" (the live one, else the last one)
    last_run: RunRecord | None
    items_per_second: float  # the last minute of a live run, else the last run's rate
    remaining: int | None  # items open + records not read yet (estimated); None: unknown
    eta_seconds: float | None
    unfinished: tuple[str, ...]  # why the job is not finished; empty when it is

    def to_dict(self) -> dict[str, Any]:
        last = self.last_run
        return {
            "running": self.running,
            "runner": self.runner,
            "finished": not self.unfinished,
            "unfinished": list(self.unfinished),
            "items_per_second": round(self.items_per_second, 1),
            "remaining": self.remaining,
            "eta_seconds": None if self.eta_seconds is None else round(self.eta_seconds, 1),
            "last_run": None
            if last is None
            else {
                "started_at": last.started_at,
                "ended_at": last.ended_at,
                "outcome": last.outcome,
                "processed": last.processed,
                "seconds": round(last.seconds, 3),
                "items_per_second": round(last.items_per_second, 1),
            },
        }


@dataclass(frozen=True)
class Report:
    """What a run (or `status`) found: counts by state, where the files are, the exit code."""

    job: str
    counts: Counts
    processed: int = 0  # items finished by this run
    seconds: float = 0.0  # processing time of this run, without setup
    setup_seconds: float = 0.0  # loading the model
    output: Path | str | None = None  # a file, or "table T at URL"
    errors: Path | str | None = None
    interrupted: bool = False
    cancelled: bool = False
    ingest_done: bool = True
    batch_size: int | None = None
    batch_trials: tuple[tuple[int, float], ...] = ()
    stop_reason: str | None = None  # why the run stopped early (max_cost, endpoint down)
    remote_batches: tuple[dict[str, Any], ...] = ()  # provider batches of the job
    deadline: dict[str, Any] | None = None  # backend = "auto": did the deadline hold
    llm: bool = False  # tokens and cost are worth showing
    tokens: bool = False  # a self-hosted LLM: tokens are worth showing (it has no price)
    detached: bool = False  # batches submitted, not waited for: `run` again collects
    notes: tuple[str, ...] = ()  # what the run did besides processing (--restart, incremental)
    activity: Activity | None = None  # `status`: runner, finished or not, throughput, ETA

    @property
    def items_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 all succeeded; 3 some failed, invalid or cancelled; 130 interrupted (resumable)."""
        if self.interrupted:
            return 130
        c = self.counts
        if self.detached:  # submitted and waiting: not a failure, not finished
            return 3 if (c.failed or c["invalid"]) else 0
        if c.failed or c["invalid"] or c["cancelled"] or c.open or not self.ingest_done:
            return 3
        return 0

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "job": self.job,
            "total": c.total,
            # Records that could not be read at all are failed (input_error), like items.
            "states": {**c.by_state, **({"failed": c.failed} if c.failed else {})},
            "succeeded": c["succeeded"],
            "failed": c.failed,
            "invalid": c["invalid"],
            "open": c.open,
            "ingest_done": self.ingest_done,
            "processed": self.processed,
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "items_per_second": round(self.items_per_second, 1),
            "output": str(self.output) if self.output else None,
            "errors": str(self.errors) if self.errors else None,
            "interrupted": self.interrupted,
            "cancelled": self.cancelled,
            "batch_size": self.batch_size,
            "exit_code": self.exit_code,
            "input_tokens": c.input_tokens,
            "output_tokens": c.output_tokens,
            "cost": round(c.cost, 6),
            "cost_at_realtime_prices": round(c.list_cost, 6),
            "saved": round(c.saved, 6),
            "stop_reason": self.stop_reason,
            "remote_batches": list(self.remote_batches),
            "deadline": self.deadline,
            "detached": self.detached,
            "notes": list(self.notes),
            "activity": self.activity.to_dict() if self.activity else None,
        }


@dataclass(frozen=True)
class RetryResult:
    """What `retry` did: items moved back to pending, and input lines it cannot retry."""

    moved: int
    input_errors: int  # lines of the input that could not be read: fix them, then run
    input_error_lines: tuple[int, ...] = ()  # the first few of them

    def to_dict(self) -> dict[str, Any]:
        return {
            "moved": self.moved,
            "input_errors": self.input_errors,
            "input_error_lines": list(self.input_error_lines),
        }


@dataclass(frozen=True)
class CancelResult:
    """What `cancel` did."""

    items: int  # open items (pending, leased) now cancelled
    runner: str | None  # the live run told to stop ("process 1234 on host"), if any
    unread: int | None  # records of the input not read yet (estimated; None: unknown)
    remote_batches: int  # live provider batches cancelled
    finished: bool = False  # the job had nothing open: nothing was cancelled

    def lines(self) -> list[str]:
        if self.finished:
            return ["the job has finished: nothing to cancel (its results are kept)"]
        out = [f"cancelled {self.items:,} open items; finished results are kept"]
        if self.runner:
            out.append(f"{self.runner} is running it: it stops after the batch in flight")
        if self.unread:
            out.append(f"~{self.unread:,} records of the input not read yet will not be read")
        elif self.unread is None:
            out.append("the rest of the input, not read yet, will not be read")
        if self.remote_batches:
            out.append(
                f"cancelled {self.remote_batches} live provider batches; what they finished is"
                " collected by the running run or the next `overnight run`"
            )
        out.append("`overnight run` resumes the job")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "runner": self.runner,
            "unread": self.unread,
            "remote_batches": self.remote_batches,
            "finished": self.finished,
        }
