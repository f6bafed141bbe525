"""A job's output: what `Job` asks of it (`Output`), wherever the results go.

`output_for(spec, base_dir, ...)` picks the kind from a table (`OUTPUTS`): files ([output]
path, sinks.py) or a database table ([output] url, sql_sink.py). Another kind plugs in with
`register_output`, without touching the job. Every error is a UsageError (exit 2) naming the
job file and the key.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import sinks
from .errors import ExportRefused, UsageError
from .spec import JobSpec
from .store import Ledger

Kept = Iterable[tuple[str, Path]]  # (what it is, the file): what an output must not replace


class Output(Protocol):
    """What a job needs of its output."""

    path: Path  # the results file ([output] path, or the job's name .out.jsonl)
    errors_path: Path  # the errors file ([output] errors, or beside the results file)

    def describe(self) -> str:
        """Where the results go, for messages: the file, or the table and its database."""
        ...

    def check(self, kept: Kept) -> None:
        """It can be written, and replaces none of `kept`: UsageError (exit 2) if not."""
        ...

    def write(self, ledger: Ledger, job_id: int) -> sinks.Exported:
        """(Re)write the results and errors of the job from the ledger."""
        ...


def _usage(origin: str, message: str) -> UsageError:
    return UsageError(f"{origin}: {message}")


def _same_file(a: Path, b: Path) -> bool:
    """The same file: one path, through symlinks and `..`, or hard links of one file."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _check_errors_suffix(spec: JobSpec, errors_path: Path, origin: str) -> None:
    if spec.output.errors and errors_path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise _usage(
            origin,
            f"[output] errors: {errors_path.name}: the errors file is JSON lines; name it .jsonl",
        )


def _check_files(files: list[tuple[str, Path]], kept: Kept, origin: str) -> None:
    kept = list(kept)
    for key, path in files:
        if path.is_dir():
            raise _usage(origin, f"[output] {key}: {path} is a folder; name a file")
        blocked = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocked is not None:
            raise _usage(origin, f"[output] {key}: {path}: {blocked} is a file, not a folder")
        # Exports replace their files whole: never one the job reads or keeps its state in.
        clash = next((what for what, p in kept if _same_file(path, p)), None)
        if clash is not None:
            raise _usage(
                origin,
                f"[output] {key}: {path} is {clash}; writing the results there would"
                " destroy it. Name another file",
            )


@dataclass
class FileOutput:
    """[output] path: a JSONL, CSV or Parquet file, and the errors file (sinks.py)."""

    spec: JobSpec
    path: Path
    errors_path: Path
    origin: str
    id_name: str

    def describe(self) -> str:
        return str(self.path)

    def check(self, kept: Kept) -> None:
        if self.spec.output.path and self.path.suffix.lower() not in (
            ".jsonl",
            ".ndjson",
            ".csv",
            ".parquet",
        ):
            raise _usage(
                self.origin, f"[output] path: {self.path.name}: use .jsonl, .csv or .parquet"
            )
        _check_errors_suffix(self.spec, self.errors_path, self.origin)
        _check_files([("path", self.path), ("errors", self.errors_path)], kept, self.origin)
        if _same_file(self.path, self.errors_path):
            raise _usage(
                self.origin,
                f"[output] errors: {self.errors_path} is also [output] path; the errors file"
                " would replace the results. Name another file",
            )

    def write(self, ledger: Ledger, job_id: int) -> sinks.Exported:
        try:
            return sinks.export(
                ledger,
                job_id,
                self.path,
                self.errors_path,
                self.id_name,
                self.spec.output.include,
                vectors=self.spec.task.kind == "embed",
            )
        except sinks.OutputUnwritable as exc:
            raise sinks.OutputUnwritable(f"{self.origin}: {exc}") from None


@dataclass
class SqlOutput:
    """[output] url: the results into a table (sql_sink.py), the errors into `errors_table`
    or the errors file."""

    spec: JobSpec
    base_dir: Path
    path: Path
    errors_path: Path
    origin: str
    id_name: str
    job: str  # the job's name: an upsert marks the rows it writes with it
    _sink: Any = field(default=None, repr=False)

    def _sql(self, call: Callable[[], Any]) -> Any:
        """A database's SqlError (exit 2, naming the key) with the job file in front."""
        from .sql_sink import RowsRefused
        from .sqldb import SqlError

        try:
            return call()
        except RowsRefused as exc:  # the others written: not the job file's mistake
            raise ExportRefused(f"{self.origin}: {exc}") from None
        except SqlError as exc:
            raise _usage(self.origin, str(exc)) from None

    @property
    def sink(self) -> Any:
        if self._sink is None:
            from .sql_sink import SqlSink

            out, base = self.spec.output, self.base_dir
            self._sink = self._sql(lambda: SqlSink.from_spec(out, base, self.id_name, self.job))
        return self._sink

    def describe(self) -> str:
        return str(self.sink.where)

    def check(self, kept: Kept) -> None:
        self._sql(self.sink.check)
        if self.spec.output.errors_table is not None:
            return
        _check_errors_suffix(self.spec, self.errors_path, self.origin)
        _check_files([("errors", self.errors_path)], kept, self.origin)

    def write(self, ledger: Ledger, job_id: int) -> sinks.Exported:
        sink = self.sink
        rows = self._sql(lambda: sink.export(ledger, job_id))
        if sink.errors_table is not None:
            errors_rows = self._sql(lambda: sink.export_errors(ledger, job_id))
            errors: Any = f"table {sink.errors_table} at {sink.where.partition(' at ')[2]}"
        else:
            errors = self.errors_path
            try:
                with sinks._writing("errors", errors):
                    errors_rows = sinks.write_errors(errors, ledger, job_id)
            except sinks.OutputUnwritable as exc:
                raise sinks.OutputUnwritable(f"{self.origin}: {exc}") from None
        return sinks.Exported(sink.where, errors, rows, errors_rows)


@dataclass(frozen=True)
class OutputKind:
    """One kind of output: whether a job's [output] is of this kind, and how to open it.
    `make(spec, base_dir, path, errors_path, origin, id_name, job_name)`."""

    name: str
    matches: Callable[[JobSpec], bool]
    make: Callable[[JobSpec, Path, Path, Path, str, str, str], Output]


def _file(
    spec: JobSpec, base: Path, path: Path, errors: Path, origin: str, id_name: str, job: str
) -> Output:
    return FileOutput(spec, path, errors, origin, id_name)


def _sql(
    spec: JobSpec, base: Path, path: Path, errors: Path, origin: str, id_name: str, job: str
) -> Output:
    return SqlOutput(spec, base, path, errors, origin, id_name, job)


def _queue(
    spec: JobSpec, base: Path, path: Path, errors: Path, origin: str, id_name: str, job: str
) -> Output:
    from .intake.kinds import QueueOutput

    return QueueOutput(spec, path, errors, origin, id_name, job)


# The kinds, the first that matches wins; the last, files, takes what none other does.
OUTPUTS: list[OutputKind] = [
    OutputKind("queue", lambda spec: spec.output.queue is not None, _queue),
    OutputKind("sql", lambda spec: spec.output.url is not None, _sql),
    OutputKind("file", lambda spec: True, _file),
]


def register_output(kind: OutputKind) -> None:
    """Another kind of output, tried before the built-in ones."""
    OUTPUTS.insert(0, kind)


def output_for(
    spec: JobSpec, base_dir: Path, name: str, origin: str = "Job(...)", id_name: str = "custom_id"
) -> Output:
    """The job's output, of the first kind in `OUTPUTS` its [output] matches. Its files are
    relative to `base_dir`; the results file is `name`.out.jsonl unless [output] path says."""

    def where(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base_dir / p

    path = where(spec.output.path or f"{name}.out.jsonl")
    if spec.output.errors:
        errors = where(spec.output.errors)
    else:
        errors = path.with_name(f"{path.stem}.errors.jsonl")
    kind = next(k for k in OUTPUTS if k.matches(spec))
    return kind.make(spec, base_dir, path, errors, origin, id_name, name)
