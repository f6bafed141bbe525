"""Export: results in input order (JSONL, CSV, Parquet) and the errors file, from the ledger.

Every file is written to a temporary name beside the target and renamed into place, so a
reader (or a kill -9) never sees half a file.
"""

from __future__ import annotations

import csv
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import psutil

from . import results
from .errors import OvernightError, UsageError
from .store import Ledger

RESERVED = ("output", "scores", "usage")


class ExportError(OvernightError, ValueError):
    """The results cannot be written in the format asked for; they stay in the ledger."""


class OutputUnwritable(UsageError):
    """An output or errors file cannot be written (a read-only or missing folder, a full
    disk): exit 2, naming the key and the file. The results stay in the ledger."""


@contextmanager
def _writing(key: str, path: Path) -> Iterator[None]:
    """An OS error while writing `path` as one clear message, not an unexpected error."""
    try:
        yield
    except OSError as exc:
        raise OutputUnwritable(
            f"[output] {key}: cannot write {path}: {exc.strerror or exc}. The results are kept"
            " in the ledger: once this is fixed, `overnight export` writes them"
        ) from None


@dataclass(frozen=True)
class Exported:
    output: Path | str  # a file, or "table T at URL" (sql_sink.py)
    errors: Path | str
    rows: int
    errors_rows: int


def _remove_stale(path: Path) -> None:
    """Temporary files of `path` left by exports that were killed: only those whose process
    is gone (a concurrent export or run in another process is still writing its own)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        pid = stale.name[len(path.name) + 2 :].partition(".")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
        yield f


def _rows(
    ledger: Ledger, job_id: int, id_name: str, include: list[str]
) -> Iterator[dict[str, Any]]:
    """Output rows; an embedding's `output` is a float32 numpy array (results.py)."""
    for custom_id, result, payload, vector in ledger.iter_results(
        job_id, with_payload=bool(include)
    ):
        row = {id_name: custom_id, **results.decode(result, vector)}
        if include:
            record = orjson.loads(payload)
            for name in include:
                row[name] = record.get(name)
        yield row


def _write_jsonl(
    f: IO[bytes],
    ledger: Ledger,
    job_id: int,
    id_name: str,
    include: list[str],
    vectors: bool,
) -> int:
    n = 0
    if include or vectors:
        option = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
        for row in _rows(ledger, job_id, id_name, include):
            f.write(orjson.dumps(row, option=option))
            n += 1
        return n
    # Fast path: the stored result is already a JSON object; the ledger splices the id in
    # front of it rather than have a million rows parsed and re-serialised here.
    for lines in ledger.iter_result_lines(job_id, id_name):
        f.write(b"".join(lines))
        n += len(lines)
    return n


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def _write_csv(f: IO[str], ledger: Ledger, job_id: int, id_name: str, include: list[str]) -> int:
    writer: csv.DictWriter | None = None
    n = 0
    for row in _rows(ledger, job_id, id_name, include):
        if writer is None:
            writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
            writer.writeheader()
        writer.writerow({k: _cell(v) for k, v in row.items()})
        n += 1
    if writer is None:  # no rows: still a valid CSV with its header
        csv.writer(f).writerow([id_name, "output", *include])
    return n


def _arrow_table(rows: list[dict[str, Any]]) -> Any:
    """Rows as an Arrow table; embeddings (float32 arrays of one length) as a
    fixed_size_list<float32> column, which vector stores and Arrow readers expect."""
    import numpy as np  # here, as pyarrow: a JSONL or CSV output needs neither
    import pyarrow as pa

    outputs = [row.get("output") for row in rows]
    if not all(isinstance(o, np.ndarray) for o in outputs):
        return pa.Table.from_pylist(
            [
                {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()}
                for r in rows
            ]
        )
    dims = {len(o) for o in outputs}  # type: ignore[arg-type]
    if len(dims) != 1:
        raise ValueError(f"embeddings of {len(dims)} different lengths")
    flat = pa.array(np.concatenate(outputs), pa.float32())  # type: ignore[arg-type]
    vectors = pa.FixedSizeListArray.from_arrays(flat, dims.pop())
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "output"} for r in rows])
    return table.add_column(min(1, table.num_columns), "output", vectors)


def _write_parquet(
    path: Path, final: Path, ledger: Ledger, job_id: int, id_name: str, include: list[str]
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer: pq.ParquetWriter | None = None
    n = 0
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal writer
        if not chunk:
            return
        try:
            table = _arrow_table(chunk)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            elif table.schema != writer.schema:
                table = table.cast(writer.schema)
        # (A later chunk's types are cast to the first's: a cast arrow has no kernel for,
        # struct to int say, is ArrowNotImplementedError.)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as exc:
            raise ExportError(
                f"{final}: output rows do not share one type ({exc}); Parquet needs one type "
                "per column: export to .jsonl instead (the results are safe in the ledger)"
            ) from None
        writer.write_table(table)
        chunk.clear()

    try:
        for row in _rows(ledger, job_id, id_name, include):
            chunk.append(row)
            n += 1
            if len(chunk) >= 10000:
                flush()
        flush()
        if writer is None:
            pq.write_table(pa.table({id_name: pa.array([], pa.string())}), path)
    finally:
        if writer is not None:
            writer.close()
    return n


def write_errors(path: Path, ledger: Ledger, job_id: int) -> int:
    n = 0
    with atomic_write(path) as f:
        for fail in ledger.iter_failures(job_id):
            f.write(
                orjson.dumps(
                    {
                        "id": fail.custom_id,
                        "line": fail.line,
                        "state": fail.state,
                        "error_class": fail.error_class,
                        "message": fail.message,
                        "attempts": fail.attempts,
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
            n += 1
    return n


def export(
    ledger: Ledger,
    job_id: int,
    output: Path,
    errors: Path,
    id_name: str,
    include: list[str],
    vectors: bool = False,
) -> Exported:
    """(Re)write the output and errors files. `vectors`: the job's outputs are embeddings
    (stored as float32 bytes; Parquet gets a fixed_size_list<float32> column)."""
    fmt = output.suffix.lower()
    with _writing("path", output):
        if fmt == ".csv":
            with atomic_write(output, "w") as f:
                rows = _write_csv(f, ledger, job_id, id_name, include)
        elif fmt == ".parquet":
            with atomic_path(output) as tmp:
                rows = _write_parquet(tmp, output, ledger, job_id, id_name, include)
        else:
            with atomic_write(output) as f:
                rows = _write_jsonl(f, ledger, job_id, id_name, include, vectors)
    with _writing("errors", errors):
        errors_rows = write_errors(errors, ledger, job_id)
    return Exported(output, errors, rows, errors_rows)
