"""The exception hierarchy users catch, and how the runner classifies failures."""

from __future__ import annotations


class OvernightError(Exception):
    """Base class of every error overnight raises on purpose."""

    exit_code = 1


class UsageError(OvernightError):
    """The job file, the input or the command line is wrong; nothing was processed (exit 2)."""

    exit_code = 2


class JobFileError(UsageError):
    """A job file that cannot be read or does not validate; the message names file and key."""


class InputChangedError(UsageError):
    """The input (or the task/model) changed since the job was first run."""


class TransientError(OvernightError):
    """Raise from a backend or a python function to ask for a retry with backoff."""


class PermanentError(OvernightError):
    """Raise from a backend or a python function to fail the item(s) at once."""


class InputError(PermanentError):
    """A record that cannot be turned into a request (bad line, missing template field, ...)."""

    error_class = "input_error"


class InvalidOutput(PermanentError):
    """The model answered, but the answer fails validation (schema, label set, JSON).

    Carries the answer so that its token usage (which is billed) is still recorded."""

    error_class = "schema_error"

    def __init__(self, reason: str, answer: object = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


class OutputCountError(PermanentError):
    """A function returned a different number of outputs than it was given records.

    The fault is the batch's, not one record's: the runner fails the whole batch with it
    instead of splitting the batch (each half alone might "succeed" with wrong outputs)."""

    error_class = "wrong_output_count"


class WorkerCrashed(TransientError):
    """The worker process running user code or the local model died during a call (a signal
    such as SIGSEGV or the OOM killer's SIGKILL, or an exit). Retried like a transient error;
    the runner splits the batch until the record that kills it is alone."""

    error_class = "worker_crashed"


class WorkerTimeout(TransientError):
    """A call to the worker process ran past `[run] timeout`; the worker was killed."""

    error_class = "worker_timeout"


class WorkerStartError(OvernightError):
    """The worker process could not load the function or the model at all."""


class EndpointDown(OvernightError):
    """The endpoint fails every request (connection refused, DNS, ...): pause the job.

    Items stay pending; running the job again resumes it."""

    exit_code = 3


def redact(text: str) -> str:
    """Remove secret values found in the environment from a message before it is stored,
    logged or printed: keys must never reach the ledger, the errors file or a traceback."""
    import os

    for name, value in os.environ.items():
        if len(value) >= 8 and name.endswith(_SECRET_SUFFIXES) and value in text:
            text = text.replace(value, "***")
    return text


_SECRET_SUFFIXES = ("_API_KEY", "_TOKEN", "_SECRET", "_KEY")


# Built-in exceptions that mean "try again later" rather than "this record is bad".
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    TransientError,
    TimeoutError,
    ConnectionError,
    MemoryError,
)
# Matched by name so that torch (and later the HTTP SDKs) need not be imported to classify.
_TRANSIENT_NAMES = {"OutOfMemoryError", "APITimeoutError", "APIConnectionError", "RateLimitError"}


def is_transient(exc: BaseException) -> bool:
    """True when a failure may go away on its own (timeouts, OOM, connection drops)."""
    if isinstance(exc, PermanentError):
        return False
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__)


def error_class(exc: BaseException) -> str:
    """The short name stored in the ledger: `input_error` or the exception's class name."""
    return getattr(exc, "error_class", None) or type(exc).__name__
