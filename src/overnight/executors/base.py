"""What every executor shares: the protocol, what it is handed and hands back, the registry.

An executor drives a job's items to a final state, one way: the loop in this process
(local.py), a provider's batch API (remote_batch.py), or the batch API under a deadline
(deadline.py). It finds the job open (its ledger entry made or resumed, opening.py) and
leaves the report to `Job.run`. Which one runs a job is looked up here by `[run] executor`
("local", "ray") and the job's sending mode (`[model] backend`: None for a model or function
in the process, "realtime", "batch", "auto"); another way of running is one more class
registered under its keys.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ..claim import RunHandle
from ..runner import Progress
from ..store import JobInfo, Ledger

if TYPE_CHECKING:
    from ..job import Job


@dataclass
class RunOutcome:
    """What an executor hands back to `Job.run` besides the ledger's counts."""

    interrupted: bool = False
    cancelled: bool = False
    batch_size: int | None = None
    batch_trials: tuple[tuple[int, float], ...] = ()
    deadline: dict[str, Any] | None = None
    detached: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class RunContext:
    """One run of a job, as an executor is handed it. `outcome` is filled as the executor
    goes, so that what it found is reported even when the run is interrupted."""

    ledger: Ledger
    info: JobInfo  # the job's ledger entry, open
    progress: Progress
    on_progress: Callable[[Progress], None] | None
    stop: threading.Event | None
    worker: RunHandle | None = None  # this run as one of the job's workers (claim.py)
    outcome: RunOutcome = field(default_factory=RunOutcome)


class Executor(Protocol):
    # Sends through a provider's batch API: opening the job first asks the provider about
    # batches of earlier runs (and `restart` cancels them).
    remote_batches: ClassVar[bool]
    # Can submit everything and return without waiting (`Job.run(detach=True)`).
    detaches: ClassVar[bool]

    def __init__(self, job: Job) -> None: ...

    def run(self, ctx: RunContext) -> RunOutcome: ...


# Keyed by ([run] executor, sending mode): ("local", None) runs a model or function in this
# process, ("ray", None) on a Ray cluster.
EXECUTORS: dict[tuple[str, str | None], type[Executor]] = {}


def register(
    *modes: str | None, executor: str = "local"
) -> Callable[[type[Executor]], type[Executor]]:
    """Class decorator: the executor of jobs with `[run] executor` whose sending mode is one
    of `modes`."""

    def put(cls: type[Executor]) -> type[Executor]:
        for mode in modes:
            EXECUTORS[executor, mode] = cls
        return cls

    return put


def executor_class(mode: str | None, executor: str = "local") -> type[Executor]:
    return EXECUTORS[executor, mode]


def executor_for(job: Job) -> Executor:
    """The executor of `job`, by its `[run] executor` and sending mode."""
    return executor_class(job.spec.model.mode, job.spec.run.executor)(job)
