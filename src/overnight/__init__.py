"""overnight: durable batch inference. Run a model over a data set; lose nothing."""

from .errors import (
    InputChangedError,
    InputError,
    JobFileError,
    OvernightError,
    PermanentError,
    TransientError,
    UsageError,
)
from .job import Job, Report

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
