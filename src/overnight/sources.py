"""Read records lazily from JSONL, CSV and Parquet, with their line (or row) numbers.

A reader yields chunks of `Row`s, starting at a `Cursor` (records consumed, next line, byte
offset), so that an interrupted ingest resumes after the last committed record instead of
starting over. A record that cannot be read becomes a `Row` with an `error`: it never stops
the reader.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from .errors import UsageError
from .records import Cursor, Fingerprint, Row

CHUNK = 2000
# Delimiters a header may turn out to use when the one in force finds no id column.
_OTHER_DELIMITERS = (";", "\t", "|", ",")


class SourceError(UsageError):
    """The input cannot be read at all (unreadable file, corrupt Parquet, no id column): a
    job-file or input problem, exit 2. The message names the key and the file."""

    def __init__(self, detail: str, key: str = "path") -> None:
        super().__init__(f"[source] {key}: {detail}")
        self.detail, self.key = detail, key


def fingerprint(path: Path, known: Fingerprint | None = None) -> Fingerprint:
    """Content hash of the input. Skips re-hashing when size and mtime match what was stored."""
    st = path.stat()
    if known and known.size == st.st_size and known.mtime_ns == st.st_mtime_ns:
        return known
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return Fingerprint(st.st_size, st.st_mtime_ns, h.hexdigest())


def digest_of_prefix(path: Path, size: int) -> str:
    """The content hash (as `fingerprint` makes it) of the file's first `size` bytes: the
    input as it was when a run started, if it was only appended to since."""
    h = hashlib.blake2b(digest_size=16)
    left = size
    with path.open("rb") as f:
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def estimate_records(fmt: str, path: Path, delimiter: str = ",") -> int:
    """About how many records the input holds, for a progress bar's ETA before ingest ends.
    Parquet: its row count. JSONL: its lines (~50 ms per 100 MB). CSV: records may span
    lines, so the first MB is parsed and the rest extrapolated by size."""
    if fmt == "parquet":
        return _parquet_file(path).metadata.num_rows
    size = path.stat().st_size
    with _open_binary(path) as f:
        if fmt == "csv":
            sample = f.read(1 << 20)
            complete = sample if len(sample) == size else sample[: sample.rfind(b"\n") + 1]
            text = complete.decode("utf-8", errors="replace")
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
            records = sum(1 for row in reader if row) - 1
            if not complete or records <= 0:
                return max(records, 0)
            return round(records * size / len(complete))
        lines = 0
        block = b""
        for block in iter(lambda: f.read(1 << 20), b""):
            lines += block.count(b"\n")
        return lines + (1 if block and not block.endswith(b"\n") else 0)


def _open_binary(path: Path) -> Any:
    """Open the input, or say in one line why it cannot be (permissions, a folder, ...)."""
    try:
        return path.open("rb")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the input: {exc.strerror or exc}") from None


@contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """An I/O error while reading (EIO, a vanished network share) as one clear message."""
    try:
        yield
    except OSError as exc:
        raise SourceError(f"{path}: cannot read the input: {exc.strerror or exc}") from None


def _parquet_file(path: Path) -> Any:
    """A pyarrow ParquetFile, with a corrupt or non-Parquet file as one clear message."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except OSError as exc:  # pyarrow raises its own OSError subclasses for unreadable files
        if isinstance(exc, pa.ArrowException):
            raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None
        raise SourceError(f"{path}: cannot read the input: {exc.strerror or exc}") from None
    except pa.ArrowException as exc:
        raise SourceError(f"{path}: not a readable Parquet file ({exc})") from None


def missing_id_column(path: Path, id_field: str, columns: list[str], delimiter: str = "") -> str:
    """Why no column is named `id_field`, with the likeliest fix."""
    shown = ", ".join(repr(c) for c in columns[:8]) + (", ..." if len(columns) > 8 else "")
    msg = f"{path}: no column {id_field!r} in the header (columns: {shown})"
    if delimiter:
        if any("\x00" in c for c in columns):
            return msg + "; the header holds NUL bytes: is the file UTF-16? Save it as UTF-8"
        for other in _OTHER_DELIMITERS:
            if other != delimiter and any(
                id_field in (part.strip() for part in c.split(other)) for c in columns
            ):
                return (
                    f"{msg}; the header looks {other!r}-separated: set [source] delimiter = "
                    f"{orjson.dumps(other).decode()}"
                )
    close = difflib.get_close_matches(id_field, columns, n=1)
    if close:
        return f"{msg}; did you mean [source] id = {orjson.dumps(close[0]).decode()}?"
    return msg + "; set [source] id to one of the columns, or leave it out to use content hashes"


def content_id(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=12).hexdigest()


_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark
_new = tuple.__new__  # builds a Row without the Python-level __new__: ~3x cheaper per record


def _row(line: int, record: Any, payload: bytes, id_field: str | None, end: int = 0) -> Row:
    if not isinstance(record, dict):
        return Row(line, None, payload, None, f"line {line}: not a JSON object", end)
    if id_field is None:
        return _new(Row, (line, content_id(payload), payload, record, None, end, None))
    value = record.get(id_field)
    if value is None or value == "":
        return Row(line, None, payload, None, f"line {line}: record has no {id_field!r}", end)
    return _new(
        Row, (line, value if type(value) is str else str(value), payload, record, None, end, None)
    )


def read_jsonl(
    path: Path, id_field: str | None, start: Cursor = Cursor(), chunk: int = CHUNK
) -> Iterator[list[Row]]:
    loads = orjson.loads
    with _open_binary(path) as f, _read_errors(path):
        f.seek(start.offset)
        rows: list[Row] = []
        line, offset = start.line, start.offset
        if offset == 0:  # a byte order mark (Windows tools write one) is not part of line 1
            if f.read(len(_BOM)) == _BOM:
                offset = len(_BOM)
            else:
                f.seek(0)
        for raw in f:
            offset += len(raw)
            payload = raw.strip()
            if payload:
                try:
                    rows.append(_row(line, loads(payload), payload, id_field, offset))
                except orjson.JSONDecodeError as exc:
                    why = "not valid UTF-8" if "UTF-8" in str(exc) else f"malformed JSON ({exc})"
                    rows.append(Row(line, None, payload, None, f"line {line}: {why}", offset))
                if len(rows) >= chunk:
                    yield rows
                    rows = []
            line += 1
        if rows:
            yield rows


def read_csv(
    path: Path,
    id_field: str | None,
    start: Cursor = Cursor(),
    chunk: int = CHUNK,
    delimiter: str = ",",
) -> Iterator[list[Row]]:
    csv.field_size_limit(sys.maxsize)
    dumps = orjson.dumps
    # surrogateescape keeps a row with bad bytes readable, so it fails alone (below).
    with _open_binary(path) as raw, _read_errors(path):
        f = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        # strict: a quote that is never closed is an error, not a field that swallows every
        # line after it (and their records) without a word.
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise SourceError(f"{path}: the header is not readable CSV ({exc})") from None
        if header is None:
            return
        header = [h.removeprefix("\ufeff") for h in header]
        if id_field is not None and id_field not in header:
            # Every row would fail alone with "record has no id": it is the job file's mistake.
            raise SourceError(missing_id_column(path, id_field, header, delimiter), key="id")
        width = len(header)
        rows: list[Row] = []
        records = 0
        prev_end = reader.line_num
        for values in _records(reader):
            line = prev_end + 1
            prev_end = reader.line_num
            if not values:  # a blank line is not a record
                continue
            records += 1
            if records <= start.records:
                continue
            if type(values) is not list:  # a csv.Error: malformed quoting
                through = f" (through line {prev_end})" if prev_end > line else ""
                rows.append(
                    Row(line, None, None, None, f"line {line}: malformed CSV{through}: {values}")
                )
            elif len(values) != width:
                rows.append(
                    Row(
                        line,
                        None,
                        None,
                        None,
                        f"line {line}: {len(values)} fields, header has {width}",
                    )
                )
            else:
                record = dict(zip(header, values, strict=True))
                try:
                    payload = dumps(record)
                except orjson.JSONEncodeError:
                    rows.append(Row(line, None, None, None, f"line {line}: not valid UTF-8"))
                else:
                    rows.append(_row(line, record, payload, id_field))
            if len(rows) >= chunk:
                yield rows
                rows = []
        if rows:
            yield rows


def _records(reader: Any) -> Iterator[list[str] | csv.Error]:
    """The reader's records; a record it cannot parse comes as its csv.Error, and reading
    goes on after it."""
    while True:
        try:
            yield from reader
            return
        except csv.Error as exc:
            yield exc


def read_parquet(
    path: Path, id_field: str | None, start: Cursor = Cursor(), chunk: int = CHUNK
) -> Iterator[list[Row]]:
    import pyarrow as pa

    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    if id_field is not None and id_field not in names:
        raise SourceError(missing_id_column(path, id_field, names), key="id")
    # Skip whole row groups already ingested, then the rest of a partly ingested one.
    skip, first_group, row_no = start.records, 0, 0
    meta = pf.metadata
    while (
        first_group < meta.num_row_groups and row_no + meta.row_group(first_group).num_rows <= skip
    ):
        row_no += meta.row_group(first_group).num_rows
        first_group += 1
    groups = list(range(first_group, meta.num_row_groups))
    if not groups:
        return
    batches = pf.iter_batches(batch_size=chunk, row_groups=groups)
    while True:
        try:  # a corrupt page shows only when its row group is read
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise SourceError(
                f"{path}: cannot read the Parquet file after row {row_no} (corrupt?): {exc}"
            ) from None
        if batch is None:
            return
        rows = []
        for record in batch.to_pylist():
            row_no += 1
            if row_no <= skip:
                continue
            payload = orjson.dumps(record, default=str)
            rows.append(_row(row_no, record, payload, id_field))
        if rows:
            yield rows


READERS = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}


def read(
    fmt: str,
    path: Path,
    id_field: str | None,
    start: Cursor = Cursor(),
    chunk: int = CHUNK,
    delimiter: str | None = None,
) -> Iterator[list[Row]]:
    if fmt == "csv":
        return read_csv(path, id_field, start, chunk, delimiter or ",")
    return READERS[fmt](path, id_field, start, chunk)


def first_row(
    fmt: str, path: Path, id_field: str | None, delimiter: str | None = None
) -> Row | None:
    """The input's first record, or None when it holds none. Reading it proves the file can
    be opened and parsed (a SourceError otherwise) and, for CSV and Parquet, that the id
    column exists, before anything is ingested."""
    for rows in read(fmt, path, id_field, chunk=1, delimiter=delimiter):
        return rows[0]
    return None


def read_all(path: Path, fmt: str) -> list[dict[str, Any]]:
    """A small file (labelled examples) read whole; any bad record is an error naming its line,
    an unreadable file one naming the file (ValueError both)."""
    out = []
    try:
        for rows in read(fmt, path, None):
            for row in rows:
                if row.error:
                    raise ValueError(f"{path}: {row.error}")
                out.append(row.record)
    except SourceError as exc:
        raise ValueError(exc.detail) from None
    return out
