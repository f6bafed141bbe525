"""The ledger: the one source of truth for every item's state and result."""

import re
from pathlib import Path

from ..errors import UsageError
from .base import (
    STATES,
    Claim,
    ConcurrentIngest,
    Counts,
    Failure,
    Item,
    ItemState,
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

DEFAULT_LEDGER = Path(".overnight") / "ledger.db"  # beside the job file
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


def ledger_location(value: str, base: Path, key: str) -> str:
    """Where a ledger lives, from a setting (`key` names it in errors: `[run] ledger`,
    `--ledger`, `OVERNIGHT_LEDGER`): a PostgreSQL URL as given (checked), or a SQLite file
    (`sqlite:///path` or a path, relative to `base`) as an absolute path."""
    value = value.strip()
    if not value:
        raise UsageError(f"{key}: empty; give a postgresql:// URL or a SQLite file path")
    if is_postgres(value):
        from psycopg.conninfo import conninfo_to_dict

        try:
            port = conninfo_to_dict(value).get("port")
        except Exception as exc:  # psycopg.ProgrammingError: what libpq could not parse
            raise UsageError(f"{key}: not a valid PostgreSQL URL: {str(exc).strip()}") from None
        if port is not None and not all(p.isdigit() for p in str(port).split(",")):
            raise UsageError(f"{key}: not a valid PostgreSQL URL: port {port!r} is not a number")
        return value
    if value.startswith("sqlite:///"):
        value = value.removeprefix("sqlite:///")  # sqlite:///rel.db, sqlite:////abs.db
    elif m := _SCHEME.match(value):
        raise UsageError(
            f"{key}: {m[1]}:// is not a ledger; give a postgresql:// URL or a SQLite file path"
        )
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


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
    "ItemState",
    "JobInfo",
    "Lease",
    "Ledger",
    "Outcome",
    "RemoteBatch",
    "RunRecord",
    "SQLLedger",
    "SQLiteLedger",
    "DEFAULT_LEDGER",
    "is_postgres",
    "ledger_location",
    "open_ledger",
]
