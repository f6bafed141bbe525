"""The exception hierarchy users catch, and how the runner classifies failures."""

from __future__ import annotations

import functools
import json
import urllib.parse


class OvernightError(Exception):
    """Base class of every error overnight raises on purpose."""

    exit_code = 1
    # Tries made for the item before this error, by a backend that retries on its own (the
    # real-time LLM predictor); the ledger adds it to the item's `attempts`.
    attempts = 1


class UsageError(OvernightError):
    """The job file, the input or the command line is wrong; nothing was processed (exit 2)."""

    exit_code = 2


class ExportRefused(UsageError):
    """The output took some results and not others (a table refused rows, a results queue
    was down): they are computed and kept in the ledger, for the next export."""


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


class KeyRefused(OvernightError):
    """The provider refused the API key (HTTP 401): the job stops at once with its items
    pending, instead of sending every record to be refused. Shown as exit 2 naming the
    key's variable (llm_job.provider_failure)."""

    exit_code = 2

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status_code = status
        self.message = message


def option(name: str) -> str:
    """A `Job.run` option, as a message below the CLI names it: `restart=True`. The CLI shows
    it as its flag (--restart; see cli.py), so the library's messages name no flag."""
    return f"`{name}=True`"


def redact(text: str, *secrets: str) -> str:
    """Remove secret values from a message before it is stored, logged or printed: the values
    of environment variables whose names look secret (`*_API_KEY`, `*_TOKEN`, ...) and
    `secrets`, in every form a message may hold them (see `secret_forms`). Keys must never
    reach the ledger, the errors file, the output or a traceback."""
    import os

    values = [v for name, v in os.environ.items() if name.endswith(_SECRET_SUFFIXES)]
    for value in (*secrets, *values):
        for form in secret_forms(value):
            if form in text:
                text = text.replace(form, "***")
    return text


@functools.lru_cache(maxsize=256)
def secret_forms(secret: str) -> tuple[str, ...]:
    """The ways a secret can be written into a message, longest first (a longer form is
    replaced before a part of it): as is and stripped of the whitespace around it (a key read
    from a file keeps its newline), each escaped as repr and JSON write it (a newline as the two
    characters `\\n`), quoted, and URL-encoded. Forms under 8 characters are left alone: they
    would blank out ordinary words."""
    forms: set[str] = set()
    for value in (secret, secret.strip()):
        forms.update(
            (
                value,
                repr(value)[1:-1],  # quoted forms hold these: no need to list them too
                ascii(value)[1:-1],
                json.dumps(value)[1:-1],
                urllib.parse.quote(value, safe=""),
                urllib.parse.quote_plus(value),
            )
        )
    return tuple(sorted((f for f in forms if len(f) >= 8), key=len, reverse=True))


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
