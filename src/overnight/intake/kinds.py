"""A queue as a job's input ([source] queue) and as its output ([output] queue).

The input holds no records of its own: `overnight consume` appends what the queue delivers to
the job's items (consumer.py), and the runner processes them as it would pending items of a
file that was read. So its reader reads nothing, and `overnight run` on a queue job processes
what was collected and publishes it.

A queue has no fingerprint: what it delivered is gone from it. The fingerprint is the constant
`queue`, so a job is never "changed" and never read again into a new generation (which would
drop what was collected); pointing the job at another queue keeps its items. A job is its name.

The output publishes each finished item once, in input order, from a mark kept in the job's
ingest cursor (`Cursor.key`, the input's own: `published:<seq>`), moved after each page the
broker has confirmed. A crash between a publish and that mark publishes that page again:
results are at-least-once, each carrying the record's id to drop repeats by.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .. import results, sinks
from ..errors import UsageError
from ..records import Cursor, Fingerprint, Row
from ..spec import JobSpec
from ..store import ConcurrentIngest, ItemState, Ledger
from .urls import broker_of, safe_url

FINAL = ("succeeded", "failed", "invalid", "cancelled")
PAGE = 500
_FINGERPRINT = Fingerprint(0, 0, "queue")


def published(cursor: Cursor) -> int:
    """Items before this seq have been published (the mark in the cursor's key)."""
    key = cursor.key or ""
    return int(key.removeprefix("published:")) if key.startswith("published:") else 0


def with_mark(cursor: Cursor, seq: int) -> Cursor:
    return Cursor(cursor.records, cursor.line, cursor.offset, f"published:{seq}")


def _where(url: str, name: str | None) -> str:
    return f"{name} at {safe_url(url)}"


@dataclass
class QueueInput:
    """[source] queue: records arrive through `overnight consume`."""

    spec: JobSpec
    origin: str

    def describe(self) -> str:
        src = self.spec.source
        return f"queue {_where(src.queue or '', src.queue_name or src.stream)}"

    def check(self) -> None:
        broker_of(self.spec.source.queue or "")  # (validated with the job file)

    def reader(self, chunk: int) -> Any:
        return lambda cursor: iter(())

    def fingerprint(self) -> tuple[Fingerprint, str]:
        return _FINGERPRINT, _FINGERPRINT.digest

    def same_input(self, stored: Fingerprint) -> bool:
        return True

    def changed_while_read(self, stored: Fingerprint) -> bool:
        return False

    def unread_fingerprint(self) -> Fingerprint | None:
        return None

    def read_fingerprint(self, stored: Fingerprint, cursor: Cursor) -> Fingerprint | None:
        return None

    def since(self, stored: Fingerprint) -> None:
        return None

    def estimate_records(self) -> int:
        return 0

    def kept_files(self) -> Iterator[tuple[str, Path]]:
        return iter(())


def result_message(item: ItemState, id_name: str) -> bytes:
    """One result: the record's id, its state, and the output row's fields (or the error)."""
    head: dict[str, Any] = {id_name: item.custom_id, "state": item.state}
    if item.state == "succeeded" and item.result is not None:
        head.update(results.decode(item.result, item.vector))
    elif item.state in ("failed", "invalid"):
        head.update(error_class=item.error_class, error=item.message, attempts=item.attempts)
    return orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass
class QueueOutput:
    """[output] queue: each finished item's result to a results queue; the errors file too."""

    spec: JobSpec
    path: Path
    errors_path: Path
    origin: str
    id_name: str
    job: str

    def describe(self) -> str:
        out = self.spec.output
        return f"queue {_where(out.queue or '', out.queue_name or out.stream)}"

    def check(self, kept: Any) -> None:
        from ..outputs import _check_errors_suffix, _check_files

        _check_errors_suffix(self.spec, self.errors_path, self.origin)
        _check_files([("errors", self.errors_path)], kept, self.origin)

    def write(self, ledger: Ledger, job_id: int) -> sinks.Exported:
        sent = publish_new(ledger, self.job, job_id, self.spec, self.id_name)
        with sinks._writing("errors", self.errors_path):
            errors = sinks.write_errors(self.errors_path, ledger, job_id)
        return sinks.Exported(self.describe(), self.errors_path, sent, errors)


def publish_new(ledger: Ledger, name: str, job_id: int, spec: JobSpec, id_name: str) -> int:
    """Publish the finished items past the mark, in order, up to the first one still open;
    move the mark after each page. Returns how many were published."""
    from .base import open_publisher

    info = ledger.get_job(name)
    if info is None or info.id != job_id:
        return 0
    mark, sent = published(info.cursor), 0
    publisher = None
    try:
        while True:
            page = ledger.items_page(job_id, mark, PAGE)
            done: list[ItemState] = []
            for item in page:
                if item.state not in FINAL:
                    break
                done.append(item)
            if not done:
                break
            try:
                if publisher is None:
                    publisher = open_publisher(spec.output)
                publisher.publish([result_message(it, id_name) for it in done])
            except Exception as exc:  # the broker's own errors, past a connection made
                raise _unpublished(spec, exc) from None
            mark = done[-1].seq + 1
            _move_mark(ledger, name, job_id, mark)
            sent += len(done)
            if len(done) < len(page) or len(page) < PAGE:
                break
    finally:
        if publisher is not None:
            publisher.close()
    return sent


def _unpublished(spec: JobSpec, exc: Exception) -> Exception:
    from .base import ResultsUnpublished

    if isinstance(exc, ResultsUnpublished):
        return exc
    out = spec.output
    where = _where(out.queue or "", out.queue_name or out.stream)
    detail = str(exc) if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
    return ResultsUnpublished(
        f"[output] queue: cannot publish results to {where} ({detail}); they are kept in"
        " the ledger and published by the next export"
    )


def _move_mark(ledger: Ledger, name: str, job_id: int, mark: int) -> None:
    """The mark moves with the ledger's one cursor operation (add_items, no rows): a compare
    and set on the records ingested, so an intake that moved the cursor meanwhile is seen."""
    for _ in range(5):
        info = ledger.get_job(name)
        if info is None or info.id != job_id:
            return
        try:
            ledger.add_items(job_id, info.cursor.records, [], with_mark(info.cursor, mark))
            return
        except ConcurrentIngest:
            continue
    raise ConcurrentIngest(f"job {name!r}: the ingest cursor kept moving; the mark did not")


def rows_of(bodies: list[bytes], first_seq: int, id_field: str) -> list[Row]:
    """Messages as records (`line`: the position in the job's intake, from 1)."""
    from ..sources import _row

    rows = []
    for k, body in enumerate(bodies):
        line = first_seq + k + 1
        try:
            row = _row(line, orjson.loads(body), body, id_field)
            if row.error is not None:  # "line N: ..." of a file
                row = row._replace(error=f"message {line}:{row.error.partition(':')[2]}")
            rows.append(row)
        except orjson.JSONDecodeError as exc:
            rows.append(Row(line, None, body, None, f"message {line}: malformed JSON ({exc})"))
    return rows
