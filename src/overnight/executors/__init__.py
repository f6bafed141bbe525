"""Executors: each drives a job's items to a final state, one way (see base.py).

local.py         the loop in this process (models, functions, real-time APIs)
remote_batch.py  a provider's batch API
deadline.py      the batch API while there is time, then real time (backend = "auto")
ray.py           models and functions in Ray actors ([run] executor = "ray")

Words: a *batch* is the records of one model call (`batch_size`, batching.py); a *remote
batch* is a provider's batch job (the ledger keeps each as a *chunk*: `ledger.chunks`);
batch_runner.py drives remote batches, despite its name, and `sources.CHUNK` is not a chunk
but the records of one read of the input.
"""

from . import deadline, local, ray, remote_batch  # noqa: F401 - each registers its executor
from .base import (
    EXECUTORS,
    Executor,
    RunContext,
    RunOutcome,
    executor_class,
    executor_for,
    register,
)

__all__ = [
    "EXECUTORS",
    "Executor",
    "RunContext",
    "RunOutcome",
    "executor_class",
    "executor_for",
    "register",
]
