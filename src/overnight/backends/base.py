"""The predictor shape: a batch of inputs in, one answer per input out, or an exception.

Local models, python functions and (next) real-time APIs are predictors. Provider batch APIs
will be the second shape, a batch service (submit, poll, collect, cancel).

A predictor with `runs_task = True` (the worker process, worker.py) runs the task as well:
`process` takes the records as stored (JSON bytes) and returns per record its output row as
JSON bytes, or the exception that record raised. The runner looks the attribute up with a
default of False.
"""

from __future__ import annotations

from typing import Any, Protocol


class Predictor(Protocol):
    # Batch sizes "auto" explores, smallest first, and the largest it may try.
    auto_start: int
    auto_max: int
    # Inputs handed to one `process` call at least. A model gains from seeing more inputs
    # than one batch: it can group them by length, so batches carry little padding.
    window: int

    def process(self, inputs: list[Any], batch_size: int) -> list[Any]:
        """One answer per input, in order, computed in batches of `batch_size`. Raise to
        fail the whole call: the runner splits it to find the poison input, and retries
        transient errors with backoff."""
        ...

    def close(self) -> None: ...
