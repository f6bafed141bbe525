"""The ledger: the one source of truth for every item's state and result."""

from .base import (
    STATES,
    Claim,
    ConcurrentIngest,
    Counts,
    Failure,
    Item,
    JobInfo,
    Lease,
    Ledger,
    LedgerError,
    Outcome,
    RemoteBatch,
    RunRecord,
)
from .ledger import SQLLedger
from .sqlite import SQLiteLedger


def open_ledger(url: str) -> Ledger:
    """`sqlite:///path/to/ledger.db` or a plain path. PostgreSQL is the next implementation."""
    if url.startswith(("postgres://", "postgresql://")):
        from ..errors import UsageError

        raise UsageError("a PostgreSQL ledger is not available yet; use a SQLite path")
    return SQLiteLedger(url.removeprefix("sqlite:///"))


__all__ = [
    "STATES",
    "Claim",
    "LedgerError",
    "ConcurrentIngest",
    "Counts",
    "Failure",
    "Item",
    "JobInfo",
    "Lease",
    "Ledger",
    "Outcome",
    "RemoteBatch",
    "RunRecord",
    "SQLLedger",
    "SQLiteLedger",
    "open_ledger",
]
