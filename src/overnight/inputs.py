"""A job's input: what `Job` asks of it (`Input`), whatever it is read from.

`input_for(spec, base_dir, ...)` picks the kind from a table (`INPUTS`): a file ([source]
path, sources.py) or a database table or query ([source] url, sql_source.py). Another kind
plugs in with `register_input`, without touching the job. Every error is a UsageError (exit 2)
naming the job file and the key.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import orjson

from . import sources
from .errors import UsageError
from .records import Cursor, Fingerprint, Row
from .spec import QUEUE_KEYS, JobSpec, source_format

log = logging.getLogger(__name__)

Reader = Callable[[Cursor], Iterator[list[Row]]]


class Since(Protocol):
    """Only what changed since the last run (a SQL source's `changed_since`)."""

    def count(self) -> int:
        """How many rows changed."""
        ...

    def read(self, chunk: int) -> Iterator[list[Row]]:
        """The changed rows."""
        ...

    def read_ids(self, ids: list[str]) -> Iterator[list[Row]]:
        """The rows of these ids, as they are now."""
        ...

    def count_ids(self) -> int:
        """How many rows have an id now, changed or not."""
        ...

    def existing_ids(self, ids: list[str]) -> set[str]:
        """Those of `ids` still in the input (the others were deleted)."""
        ...


class Input(Protocol):
    """What a job needs of its input."""

    def describe(self) -> str:
        """The input, for messages and status: the file, or the table or query and where."""
        ...

    def check(self) -> None:
        """It opens and parses, and has the id: UsageError (exit 2) naming the key if not."""
        ...

    def reader(self, chunk: int) -> Reader:
        """Chunks of rows from a cursor on (the cursor's `key` is this input's own)."""
        ...

    def fingerprint(self) -> tuple[Fingerprint, str]:
        """What the input is now, and its plain content hash (what older ledgers stored)."""
        ...

    def same_input(self, stored: Fingerprint) -> bool:
        """The input a ledger entry was made from (a moved job file is still the same job)."""
        ...

    def changed_while_read(self, stored: Fingerprint) -> bool:
        """After reading to the end: were the bytes read not those the run started with?"""
        ...

    def since(self, stored: Fingerprint) -> Since | None:
        """Read only what changed since `stored`; None: read the input whole."""
        ...

    def estimate_records(self) -> int:
        """About how many records the input holds (a progress bar's total)."""
        ...

    def kept_files(self) -> Iterator[tuple[str, Path]]:
        """Files the input is read from (what an output must never replace)."""
        ...


UNREAD = "unread"  # a fingerprint's digest until the first read has seen the whole input


# Two methods an input kind may have, and one registered before them lacks:
#   unread_fingerprint() -> Fingerprint | None: a new job's fingerprint when taking one means
#     reading the whole input first (a database table): a placeholder until the first read
#     has seen it all. None: `fingerprint()` is cheap enough to take first.
#   read_fingerprint(stored, cursor) -> Fingerprint | None: when `stored` is that placeholder
#     and the input was read to `cursor`, its end: the fingerprint of what was read.
def unread_fingerprint(inp: Input) -> Fingerprint | None:
    method = getattr(inp, "unread_fingerprint", None)
    return None if method is None else method()


def read_fingerprint(inp: Input, stored: Fingerprint, cursor: Cursor) -> Fingerprint | None:
    method = getattr(inp, "read_fingerprint", None)
    return None if method is None else method(stored, cursor)


def _usage(origin: str, message: str) -> UsageError:
    return UsageError(f"{origin}: {message}")


def _how(spec: JobSpec, content: str) -> str:
    """A content hash, mixed with how the input is read (unless that is the default)."""
    how = spec.source.model_dump(exclude={"path", *QUEUE_KEYS})
    if not any(how.values()):  # the defaults: the plain content hash
        return content
    mixed = hashlib.blake2b(content.encode() + orjson.dumps(how, option=orjson.OPT_SORT_KEYS))
    return mixed.hexdigest()[:32]


@dataclass
class FileInput:
    """[source] path: a JSONL, CSV or Parquet file (sources.py)."""

    spec: JobSpec
    path: Path
    origin: str
    id_field: str | None

    def describe(self) -> str:
        return str(self.path)

    @cached_property
    def format(self) -> str:
        return source_format(self.spec.source, self.path)

    def check(self) -> None:
        if not self.path.is_file():
            raise _usage(self.origin, f"[source] path: input file not found: {self.path}")
        self.format  # noqa: B018 - validates the format
        try:
            first = sources.first_row(
                self.format, self.path, self.id_field, self.spec.source.delimiter
            )
        except sources.SourceError as exc:
            raise _usage(self.origin, str(exc)) from None
        if first is None:
            log.warning(
                "%s: [source] path: %s holds no records: the job has nothing to do",
                self.origin,
                self.path,
            )

    def reader(self, chunk: int) -> Reader:
        fmt, src, id_field = self.format, self.path, self.id_field
        delimiter = self.spec.source.delimiter
        return lambda cursor: sources.read(fmt, src, id_field, cursor, chunk, delimiter)

    def fingerprint(self) -> tuple[Fingerprint, str]:
        """The file's content hash, and how it is read: another id column, delimiter or
        format turns the same bytes into other records, so it is a changed input too. With
        the content hash alone, which is what older ledgers hold."""
        fp = sources.fingerprint(self.path)
        return Fingerprint(fp.size, fp.mtime_ns, _how(self.spec, fp.digest)), fp.digest

    def same_input(self, stored: Fingerprint) -> bool:
        return self.fingerprint()[0].digest == stored.digest

    def changed_while_read(self, stored: Fingerprint) -> bool:
        """A file rewritten in place while it was read gives records of two inputs (and lines
        cut in two where reading went on). Appending to it is fine: the next run reads what
        was added."""
        size = stored.size
        try:
            intact = _how(self.spec, sources.digest_of_prefix(self.path, size))
        except OSError:
            intact = ""
        return not (self.path.stat().st_size >= size and intact == stored.digest)

    def since(self, stored: Fingerprint) -> Since | None:
        return None

    def unread_fingerprint(self) -> Fingerprint | None:
        return None  # hashing the bytes is a fraction of reading the records

    def read_fingerprint(self, stored: Fingerprint, cursor: Cursor) -> Fingerprint | None:
        return None

    def estimate_records(self) -> int:
        return sources.estimate_records(self.format, self.path, self.spec.source.delimiter or ",")

    def kept_files(self) -> Iterator[tuple[str, Path]]:
        yield "the input ([source] path)", self.path


@dataclass
class SqlInput:
    """[source] url: a database table or query (sql_source.py). Columns this job writes back
    into the same table ([output] mode = "update") are not part of its records."""

    spec: JobSpec
    base_dir: Path
    origin: str
    id_name: str
    _source: Any = field(default=None, repr=False)

    def _sql(self, call: Callable[[], Any]) -> Any:
        """A database's SqlError (exit 2, naming the key) with the job file in front."""
        from .sqldb import SqlError

        try:
            return call()
        except SqlError as exc:
            raise _usage(self.origin, str(exc)) from None

    def _rows(self, rows: Iterator[list[Row]]) -> Iterator[list[Row]]:
        """The source's chunks, with its SqlError (a table dropped while read, ...) as a
        UsageError naming the job file."""
        from .sqldb import SqlError

        try:
            yield from rows
        except SqlError as exc:
            raise _usage(self.origin, str(exc)) from None

    @property
    def source(self) -> Any:
        if self._source is None:
            from .sql_sink import SqlSink
            from .sql_source import SqlSource

            src, out = self.spec.source, self.spec.output
            exclude: frozenset[str] = frozenset()
            if out.url is not None and out.mode == "update" and out.columns:
                from .sqldb import same_table

                sink = self._sql(lambda: SqlSink.from_spec(out, self.base_dir, self.id_name))
                url = self._sql(lambda: SqlSource.from_spec(src, self.base_dir).url)
                # A query: any table of the same database may be the one it reads.
                if same_table(url, src.table or out.table, sink.url, out.table):
                    exclude = frozenset(out.columns)
            elif out.url is not None and out.mode == "upsert" and src.table is not None:
                from .sqldb import SqlError, same_table

                sink = self._sql(lambda: SqlSink.from_spec(out, self.base_dir, self.id_name))
                url = self._sql(lambda: SqlSource.from_spec(src, self.base_dir).url)
                if same_table(url, src.table, sink.url, out.table):
                    # An upsert deletes the rows of ids that have no good result (a failed
                    # record's, a deleted one's): into the source table, that deleted the
                    # user's rows; and its columns, read back, made every record "changed".
                    def refuse() -> None:
                        raise SqlError(
                            f"[output] table: {out.table} is the [source] table; mode ="
                            ' "upsert" would delete its rows whose record fails: write into'
                            ' it with mode = "update" and `columns`, or name another table'
                        )

                    self._sql(refuse)
            self._source = self._sql(lambda: SqlSource.from_spec(src, self.base_dir, exclude))
        return self._source

    def describe(self) -> str:
        return str(self.source.where)

    def check(self) -> None:
        self._sql(self.source.check)

    def reader(self, chunk: int) -> Reader:
        sql = self.source
        return lambda cursor: self._rows(sql.read(cursor, min(chunk, 10000)))

    def _how(self) -> str:
        """How the source is read (table or query, id, changed_since), hashed: the part of
        its fingerprint that says which input it is."""
        how = self.spec.source.model_dump(exclude={"path", "url", *QUEUE_KEYS})
        how["exclude"] = sorted(self.source.exclude)
        return hashlib.blake2b(
            orjson.dumps(how, option=orjson.OPT_SORT_KEYS), digest_size=8
        ).hexdigest()

    def fingerprint(self) -> tuple[Fingerprint, str]:
        """Its rows' hash (read whole), or with `changed_since` the column's high-water mark
        now."""
        sql = self.source
        if self.spec.source.changed_since:
            mark = orjson.dumps(self._sql(sql.high_water)).decode()
            return Fingerprint(0, 0, f"{self._how()}:since:{mark}"), mark
        n, content = self._sql(sql.digest)
        return Fingerprint(n, 0, f"{self._how()}:{content}"), content

    def same_input(self, stored: Fingerprint) -> bool:
        # which table or query, not its rows now (they change)
        return stored.digest.partition(":")[0] == self._how()

    def changed_while_read(self, stored: Fingerprint) -> bool:
        # A database changes while it is read: the next run compares the table then with
        # what was read (or, when taken before the read, with what it was before).
        return False

    def unread_fingerprint(self) -> Fingerprint | None:
        """Without `changed_since` the fingerprint is the hash of every row: rather than read
        the table twice on a job's first run (once to hash it, once to compute it), the
        read itself hashes what it reads (sql_source.read_digest)."""
        if self.spec.source.changed_since:
            return None  # the column's high-water mark: one cheap query
        return Fingerprint(0, 0, f"{self._how()}:{UNREAD}")

    def read_fingerprint(self, stored: Fingerprint, cursor: Cursor) -> Fingerprint | None:
        from .sql_source import read_digest

        if stored.digest != f"{self._how()}:{UNREAD}":
            return None
        read = read_digest(cursor)
        if read is None:  # no hash in the cursor: hash the table now, as before
            return self.fingerprint()[0]
        return Fingerprint(read[0], 0, f"{self._how()}:{read[1]}")

    def since(self, stored: Fingerprint) -> Since | None:
        if not self.spec.source.changed_since:
            return None
        if not stored.digest.startswith(f"{self._how()}:since:"):
            return None
        return _SqlSince(self, orjson.loads(stored.digest.partition(":since:")[2]))

    def estimate_records(self) -> int:
        return int(self._sql(self.source.count))

    def kept_files(self) -> Iterator[tuple[str, Path]]:
        return iter(())


@dataclass
class _SqlSince:
    input: SqlInput
    mark: Any

    def count(self) -> int:
        sql, mark = self.input.source, self.mark
        return int(self.input._sql(lambda: sql.count(since=mark)))

    def read(self, chunk: int) -> Iterator[list[Row]]:
        return self.input._rows(self.input.source.read(Cursor(), chunk, since=self.mark))

    def read_ids(self, ids: list[str]) -> Iterator[list[Row]]:
        return self.input._rows(iter([list(self.input.source.read_ids(ids))]))

    def count_ids(self) -> int:
        return int(self.input._sql(self.input.source.count_ids))

    def existing_ids(self, ids: list[str]) -> set[str]:
        return set(self.input._sql(lambda: self.input.source.existing_ids(ids)))


@dataclass(frozen=True)
class InputKind:
    """One kind of input: whether a job's [source] is of this kind, and how to open it."""

    name: str
    matches: Callable[[JobSpec], bool]
    make: Callable[[JobSpec, Path, str, str | None], Input]


def _file(spec: JobSpec, base_dir: Path, origin: str, id_field: str | None) -> Input:
    path = Path(spec.source.path or "").expanduser()
    return FileInput(spec, path if path.is_absolute() else base_dir / path, origin, id_field)


def _sql_input(spec: JobSpec, base_dir: Path, origin: str, id_field: str | None) -> Input:
    return SqlInput(spec, base_dir, origin, id_field or "custom_id")


def _queue_input(spec: JobSpec, base_dir: Path, origin: str, id_field: str | None) -> Input:
    from .intake.kinds import QueueInput

    return QueueInput(spec, origin)


# The kinds, the first that matches wins; the last, a file, takes what none other does.
INPUTS: list[InputKind] = [
    InputKind("queue", lambda spec: spec.source.queue is not None, _queue_input),
    InputKind("sql", lambda spec: spec.source.url is not None, _sql_input),
    InputKind("file", lambda spec: True, _file),
]


def register_input(kind: InputKind) -> None:
    """Another kind of input, tried before the built-in ones."""
    INPUTS.insert(0, kind)


def input_kind(spec: JobSpec) -> InputKind:
    return next(k for k in INPUTS if k.matches(spec))


def input_for(
    spec: JobSpec, base_dir: Path, origin: str = "Job(...)", id_field: str | None = None
) -> Input:
    """The job's input, of the first kind in `INPUTS` its [source] matches."""
    return input_kind(spec).make(spec, base_dir, origin, id_field)
