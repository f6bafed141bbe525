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
    """`postgresql://...` (see store/postgresql.py), `sqlite:///path/to/ledger.db` or a path."""
    if url.startswith(("postgres://", "postgresql://")):
        from .postgresql import PostgresLedger  # psycopg is imported only when needed

        return PostgresLedger(url)
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
