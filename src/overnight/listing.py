"""`overnight ls`: the jobs a ledger holds, with their state and counts. Reads only."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .claim import holder_alive
from .errors import UsageError
from .store import DEFAULT_LEDGER, is_postgres, ledger_location, open_ledger


@dataclass(frozen=True)
class JobSummary:
    name: str
    state: str  # running | finished | unfinished | cancelled
    total: int
    succeeded: int
    failed: int
    invalid: int
    open: int
    ingest_done: bool
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_ledger(path: Path) -> bool:
    """An overnight ledger, looked at without writing to it (opening a ledger creates its
    tables, which must not happen to some other SQLite file given by mistake)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return (
                db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='jobs'"
                ).fetchone()
                is not None
            )
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return False


def existing_ledger(where: str | Path | None = None) -> str:
    """The URL of the ledger `where` (--ledger), else $OVERNIGHT_LEDGER, else
    .overnight/ledger.db in the current folder; a SQLite file must be a ledger already
    (a reader never creates one)."""
    if where:
        url = ledger_location(str(where), Path.cwd(), "--ledger")
    elif env := os.environ.get("OVERNIGHT_LEDGER"):
        url = ledger_location(env, Path.cwd(), "OVERNIGHT_LEDGER")
    else:
        url = str(DEFAULT_LEDGER)
    if not is_postgres(url):
        path = Path(url)
        if not path.is_file():
            raise UsageError(
                f"--ledger: no ledger at {path} (no job has run here; or pass --ledger)"
            )
        if not _is_ledger(path):
            raise UsageError(f"--ledger: {path} is not an overnight ledger")
    return url


def list_jobs(where: str | Path | None = None) -> list[JobSummary]:
    """The jobs of the ledger `where` (--ledger), else $OVERNIGHT_LEDGER, else
    .overnight/ledger.db in the current folder."""
    url = existing_ledger(where)
    ledger = open_ledger(url)
    try:
        out = []
        for job in ledger.list_jobs():
            c = ledger.counts(job.id)
            claim = ledger.get_claim(job.name)
            if claim is not None and holder_alive(claim):
                state = "running"
            elif ledger.is_cancelled(job.id):
                state = "cancelled"
            elif job.ingest_done and c.open == 0:
                state = "finished"
            else:
                state = "unfinished"
            out.append(
                JobSummary(
                    name=job.name,
                    state=state,
                    total=c.total,
                    succeeded=c["succeeded"],
                    failed=c.failed,
                    invalid=c["invalid"],
                    open=c.open,
                    ingest_done=job.ingest_done,
                    created_at=job.created_at,
                )
            )
        return out
    finally:
        ledger.close()
