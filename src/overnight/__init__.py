"""overnight: durable batch inference. Run a model over a data set; lose nothing."""

from typing import TYPE_CHECKING, Any

from .errors import (
    InputChangedError,
    InputError,
    JobFileError,
    OvernightError,
    PermanentError,
    TransientError,
    UsageError,
)

if TYPE_CHECKING:
    from .job import Job, Report


def __getattr__(name: str) -> Any:
    # Job and Report load on first use: a worker process (worker.py) and a user's function
    # that imports overnight for its exceptions then start without the whole engine.
    if name in ("Job", "Report"):
        from . import job

        return getattr(job, name)
    raise AttributeError(f"module 'overnight' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "InputChangedError",
    "InputError",
    "Job",
    "JobFileError",
    "OvernightError",
    "PermanentError",
    "Report",
    "TransientError",
    "UsageError",
]
