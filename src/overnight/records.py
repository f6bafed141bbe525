"""What a source hands the ledger: records (`Row`), where reading resumes (`Cursor`), and what
the input was (`Fingerprint`). Plain values, shared by sources and the ledger so that neither
imports the other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple


class Row(NamedTuple):
    """One input record. Tuples, not dataclasses: a million of them are built per benchmark run."""

    line: int  # 1-based line (JSONL, CSV: where the record starts) or row number (Parquet, SQL)
    custom_id: str | None
    payload: bytes | None  # the record as a JSON object, stored in the ledger
    record: dict[str, Any] | None  # the parsed record, handed straight to the task (no re-parse)
    error: str | None  # why this record could not be read (an input error)
    end: int = 0  # JSONL: byte offset just past this record, where reading resumes
    key: str | None = None  # a keyset source's resume point just past this record (Cursor.key)


def cursor_after(row: Row, records: int) -> Cursor:
    """Where to resume once `row`, the `records`-th record, is committed."""
    return Cursor(records, row.line + 1, row.end, row.key)


@dataclass(frozen=True)
class Cursor:
    """Where reading resumes: records consumed so far, the next line, a byte offset (JSONL),
    and `key`: an opaque resume point a source defines for itself (a SQL source's last id
    read, for keyset pagination). The ledger stores it and hands it back; it never reads it."""

    records: int = 0
    line: int = 1
    offset: int = 0
    key: str | None = None


@dataclass(frozen=True)
class Fingerprint:
    """What the input was: size and mtime to skip re-hashing, and the content digest."""

    size: int
    mtime_ns: int
    digest: str
