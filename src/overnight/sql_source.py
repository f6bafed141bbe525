"""Read records from a database table or query: `[source] url`, `table` or `query`, `id`.

Rows are streamed with keyset pagination on the id column (`WHERE id > :last ORDER BY id
LIMIT n`), one short query per page, so memory stays bounded whatever the table's size and
no transaction stays open while the model works. Each row's `Row.key` is where reading
resumes after it: the ledger stores it as the ingest cursor, and an interrupted ingest goes on
from the last committed id. A `query` is wrapped as a subquery for the keyset.

A row becomes a JSON object (Decimal -> number, date/time -> ISO 8601, UUID -> text, bytes ->
base64). A row whose id is NULL is an input error naming its row number, read after the others.

The content hash of what was read (`digest`) is a sum of each row's hash, carried in the
cursor (`"h"`): the first run of a job takes its fingerprint from the read itself, not from a
second read of the whole table before it (`digest`, what a rerun compares with).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL

from .records import Cursor, Row
from .sqldb import SqlError, connect, parse_url, python_type, reflect, safe_url, scrub

_PLAIN = (str, int, float, bool)
_MISSING = object()
_INT64 = (-(2**63), 2**64)  # the integers orjson writes
_SUM = 2**128


def row_hash(payload: bytes | None) -> int:
    """A row's part of the content hash: the hash of its JSON (which holds its id)."""
    return int.from_bytes(hashlib.blake2b(payload or b"", digest_size=16).digest(), "big")


def sum_digest(total: int) -> str:
    """The content hash of rows whose row_hash values add up to `total` (mod 2**128). A sum,
    not a hash of the rows in a row, so that it is carried in the cursor across a resumed
    read (a hashlib state cannot be); the rows' JSON holds their ids, so a sum tells a
    changed table as well."""
    return f"s{total % _SUM:032x}"


def plain(value: Any) -> Any:
    """A database value as JSON can hold it."""
    if value is None or type(value) in _PLAIN:
        if type(value) is int and not _INT64[0] <= value < _INT64[1]:
            return str(value)  # past what JSON (orjson) holds: its digits
        return value
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return plain(int(value))
        return float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bool | int | float | str):  # numpy scalars, str subclasses
        return value
    return str(value)


def _default(value: Any) -> Any:
    """What orjson does not write itself (it writes dates, times and UUIDs as `plain` does)."""
    converted = plain(value)
    if converted is value:  # an int past 64 bits, ...
        return str(value)
    return converted


def encode(values: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """(payload, record) of a row: the record is the payload read back, so a record computed
    fresh and one read back from the ledger on a resume are the same."""
    try:
        payload = orjson.dumps(values, default=_default)
    except TypeError:
        payload = orjson.dumps({k: plain(v) for k, v in values.items()}, default=str)
    return payload, orjson.loads(payload)


def _unplain(value: Any, kind: type | None) -> Any:
    """A JSON value (an id or a high-water mark kept in the ledger) back as the column's
    Python type, for a bound parameter."""
    if value is None or kind is None or isinstance(value, kind):
        return value
    try:
        if kind is uuid.UUID:
            return uuid.UUID(str(value))
        if kind is dt.datetime:
            return dt.datetime.fromisoformat(str(value))
        if kind is dt.date:
            return dt.date.fromisoformat(str(value))
        if kind is Decimal:
            return Decimal(str(value))
        if kind in (int, float, str):
            return kind(value)
    except (ValueError, TypeError):
        return value
    return value


def _without_semicolons(query: str) -> str:
    """A query without its last semicolons, nor the line comments after them (it is wrapped
    as a subquery)."""
    query = query.strip().rstrip(";").strip()
    lines = query.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        code = lines[i].partition("--")[0].rstrip()
        if not code:
            continue  # a comment alone
        if code.endswith(";"):
            return "\n".join([*lines[:i], code.rstrip("; \t")])
        break
    return query


def _unique(table: sa.Table, name: str) -> bool:
    """Whether the column alone is the table's primary key or a unique index: then no two of
    its values are equal under its collation either."""
    if [c.name for c in table.primary_key.columns] == [name]:
        return True
    return any(ix.unique and [c.name for c in ix.columns] == [name] for ix in table.indexes)


def _exact(column: Any, backend: str) -> Any:
    """A text id as the keyset must order and compare it: by its exact characters. Under
    MariaDB/MySQL's default collations (case- and accent-insensitive, trailing spaces ignored)
    or SQLite's NOCASE, "B" and "b " are equal: a page ending on "B" went on from `id > 'B'`
    and never read "b ". An id the table keeps unique cannot have such twins, and keeps its
    index (see _unique)."""
    if backend in ("mysql", "mariadb"):
        # Its characters' UTF-8 bytes, whatever the column's character set: compared with
        # the bound id, which is sent as UTF-8 text (type_coerce: bound as text, not bytes).
        text = sa.cast(column, mysql.CHAR(charset="utf8mb4"))
        return sa.type_coerce(sa.cast(text, mysql.BINARY()), sa.String)
    if backend == "sqlite":
        return column.collate("BINARY")
    return column


@dataclass
class SqlSource:
    url: URL
    id: str
    table: str | None = None
    query: str | None = None
    changed_since: str | None = None
    # Columns this job writes back into the same table ([output] mode = "update"): not part
    # of the record, or every write would make every row look changed to the next run.
    exclude: frozenset[str] = frozenset()
    _shape: tuple[Any, ...] | None = field(default=None, repr=False)
    # What the keyset orders and compares on (see _exact): the id column, or its exact bytes.
    _key: Any = field(default=None, repr=False)

    @classmethod
    def from_spec(
        cls, source: Any, base_dir: Path, exclude: frozenset[str] = frozenset()
    ) -> SqlSource:
        query = _without_semicolons(source.query) if source.query else None
        return cls(
            parse_url(source.url, base_dir, "[source] url"),
            source.id,
            source.table,
            query,
            source.changed_since,
            exclude,
        )

    @property
    def where(self) -> str:
        """The table or query, for messages."""
        what = f"table {self.table}" if self.table else "the query"
        return f"{what} at {safe_url(self.url)}"

    # -- shape: the selectable, its columns, and the id's type ----------------------------

    def _load_shape(self, conn: sa.Connection) -> tuple[Any, ...]:
        if self._shape is not None:
            return self._shape
        if self.table is not None:
            table = reflect(conn, self.table, "[source] table", self.url)
            if table is None:
                raise SqlError(f"[source] table: no table {self.table!r} in {safe_url(self.url)}")
            names = [c.name for c in table.columns]
            columns = {c.name: c for c in table.columns}
            source: Any = table
            kinds = {n: python_type(c) for n, c in columns.items()}
            unique = _unique(table, self.id)
        else:
            # On its own line (a line comment last), and no bind parameters: a colon is
            # the query's own (`'10 :30'`, `::text`).
            escaped = self.query.replace(":", "\\:")
            sub = f"({escaped}\n) AS overnight_q"
            try:
                names = list(conn.execute(sa.text(f"SELECT * FROM {sub} LIMIT 0")).keys())
            except sa.exc.DBAPIError as exc:
                conn.rollback()
                raise SqlError(
                    f"[source] query: the database refused it: {scrub(str(exc.orig), self.url)}"
                ) from None
            conn.rollback()
            columns = {n: sa.column(n) for n in names}
            source = sa.text(sub)
            kinds = {}
            unique = False
        for key, name in (("id", self.id), ("changed_since", self.changed_since)):
            if name is not None and name not in columns:
                shown = ", ".join(repr(n) for n in names[:12]) + (
                    ", ..." if len(names) > 12 else ""
                )
                raise SqlError(
                    f"[source] {key}: no column {name!r} in {self.where} (columns: {shown})"
                )
        if self.query is not None:
            kinds = self._query_kinds(conn, source, columns)
        selected = [columns[n] for n in names if n not in self.exclude or n == self.id]
        self._key = columns[self.id]
        if not unique and kinds.get(self.id) is str:
            self._key = _exact(columns[self.id], self.url.get_backend_name())
        self._shape = (source, selected, columns, kinds)
        return self._shape

    def _query_kinds(self, conn: sa.Connection, source: Any, columns: dict) -> dict:
        """A query's columns have no reflected types: the id's and `changed_since`'s are
        those of a value of theirs, so an id or a mark kept in the ledger (JSON) is bound
        as the column's type (a uuid, a timestamp), not as text."""
        kinds = {}
        for name in {self.id, self.changed_since} - {None}:
            col = columns[name]
            query = sa.select(col).select_from(source).where(col.is_not(None)).limit(1)
            page = self._fetch(conn, query)
            if page:
                kinds[name] = type(page[0][name])
        return kinds

    def _select(self, conn: sa.Connection) -> tuple[sa.Select, Any, dict[str, Any], dict]:
        source, selected, columns, kinds = self._load_shape(conn)
        return sa.select(*selected).select_from(source), columns[self.id], columns, kinds

    def check(self) -> None:
        """Connects, and finds the table (or runs the query) and its id column: SqlError
        naming the key otherwise."""
        self._shape = None  # the table may have changed since the last run: look again
        database = self.url.database
        if (
            self.url.get_backend_name() in ("sqlite", "duckdb")
            and database not in (None, "", ":memory:")
            and not Path(database).exists()
        ):  # connecting would create an empty one
            raise SqlError(f"[source] url: no such database file: {database}")
        with connect(self.url, "[source] url") as conn:
            self._load_shape(conn)

    # -- reading ----------------------------------------------------------------------

    def _since(
        self, query: sa.Select, columns: dict[str, Any], kinds: dict, since: Any
    ) -> sa.Select:
        if since is _MISSING or self.changed_since is None:
            return query
        # A row whose column is NULL (an `updated_at` set on a row's first update only) is
        # never past a mark: it is read each time, and the run computes only the ones it does
        # not have (opening.py), or a row inserted so was never read at all.
        col = columns[self.changed_since]
        if since is None:  # the table had no value at all last time: every row
            return query
        kind = kinds.get(self.changed_since)
        return query.where(sa.or_(col > _unplain(since, kind), col.is_(None)))

    def read(
        self, start: Cursor = Cursor(), chunk: int = 2000, since: Any = _MISSING
    ) -> Iterator[list[Row]]:
        """Rows from `start` on; with `since`, only those whose `changed_since` is past it."""
        state = orjson.loads(start.key) if start.key else {}
        records = start.records
        dumps = orjson.dumps
        total = int(state.get("h", "0"), 16)  # the rows' hashes so far (see sum_digest)
        blake2b = hashlib.blake2b
        with connect(self.url, "[source] url") as conn:
            base, id_col, columns, kinds = self._select(conn)
            base = self._since(base, columns, kinds, since)
            after = _unplain(state["after"], kinds.get(self.id)) if "after" in state else _MISSING
            last_json = state.get("after", _MISSING)
            # Rows whose id is `after` read so far: the next page starts at `id >= after` and
            # leaves them out, so a duplicate id that straddles two pages is read (and failed
            # as a duplicate) as it is within one, not skipped. None: an older cursor (`>`).
            same = state.get("same", None if "after" in state else 0)
            if "nulls" not in state:
                while True:
                    key_col = self._key
                    query = base.where(id_col.is_not(None)).order_by(key_col)
                    limit = chunk
                    if after is not _MISSING and same is None:
                        query = query.where(key_col > after)
                    elif after is not _MISSING:
                        query = query.where(key_col >= after)
                        limit += same
                    page = self._fetch(conn, query.limit(limit))
                    full = len(page) == limit
                    skip = 0
                    while skip < len(page) and skip < (same or 0) and after is not _MISSING:
                        if encode({"v": page[skip][self.id]})[1]["v"] != last_json:
                            break  # (one of them was deleted meanwhile)
                        skip += 1
                    page = page[skip:]
                    if not page:
                        break
                    rows = []
                    for values in page:
                        records += 1
                        payload, record = encode(values)
                        total += int.from_bytes(blake2b(payload, digest_size=16).digest(), "big")
                        value = record[self.id]
                        same = same + 1 if value == last_json and same is not None else 1
                        last_json = value
                        key = dumps({"after": value, "same": same, "h": f"{total % _SUM:x}"})
                        key = key.decode()
                        if value == "":
                            rows.append(
                                Row(
                                    records,
                                    None,
                                    payload,
                                    None,
                                    f"row {records}: empty {self.id!r}",
                                    0,
                                    key,
                                )
                            )
                        else:
                            cid = value if type(value) is str else str(value)
                            rows.append(Row(records, cid, payload, record, None, 0, key))
                    after = values[self.id]
                    yield rows
                    if not full:
                        break
            # Rows without an id, last: each an input error with its row number.
            nulls = state.get("nulls", 0)
            while True:
                query = base.where(id_col.is_(None)).limit(chunk).offset(nulls)
                page = self._fetch(conn, query)
                if not page:
                    return
                rows = []
                for values in page:
                    records += 1
                    nulls += 1
                    payload, _ = encode(values)
                    total += row_hash(payload)
                    h = f"{total % _SUM:x}"
                    mark = (
                        {"nulls": nulls, "h": h}
                        if last_json is _MISSING
                        else {"after": last_json, "nulls": nulls, "h": h}
                    )
                    rows.append(
                        Row(
                            records,
                            None,
                            payload,
                            None,
                            f"row {records}: the id column {self.id!r} is NULL",
                            0,
                            dumps(mark).decode(),
                        )
                    )
                yield rows
                if len(page) < chunk:
                    return

    def _fetch(self, conn: sa.Connection, query: sa.Select) -> list[Any]:
        try:
            result = conn.execute(query)
            names = [str(k) for k in result.keys()]  # noqa: SIM118 - str, not quoted_name (orjson)
            page = [dict(zip(names, row, strict=True)) for row in result.all()]
        except sa.exc.DBAPIError as exc:
            conn.rollback()
            key = "query" if self.query else "table"
            raise SqlError(
                f"[source] {key}: cannot read {self.where}: {scrub(str(exc.orig), self.url)}"
            ) from None
        conn.rollback()  # no transaction stays open between pages
        return page  # type: ignore[return-value]

    def read_ids(self, ids: list[str], chunk: int = 500) -> Iterator[Row]:
        """The rows of these ids as they are now (the failed records an incremental run with
        `changed_since` reads again); line numbers are left to the caller."""
        with connect(self.url, "[source] url") as conn:
            base, id_col, _, kinds = self._select(conn)
            kind = kinds.get(self.id)
            for i in range(0, len(ids), chunk):
                part = ids[i : i + chunk]
                if kind is not None:
                    cond = id_col.in_([_unplain(v, kind) for v in part])
                else:
                    cond = sa.cast(id_col, sa.String).in_(part)
                for values in self._fetch(conn, base.where(cond).order_by(id_col)):
                    payload, record = encode(values)
                    yield Row(0, str(record[self.id]), payload, record, None)

    def existing_ids(self, ids: list[str], chunk: int = 1000) -> set[str]:
        """Those of `ids` still in the table or query now (the id column alone is read: the
        index answers it): what an incremental run with `changed_since` checks for rows
        deleted since the last run."""
        found: set[str] = set()
        with connect(self.url, "[source] url") as conn:
            source, _, columns, kinds = self._load_shape(conn)
            id_col = columns[self.id]
            kind = kinds.get(self.id)
            for i in range(0, len(ids), chunk):
                part = ids[i : i + chunk]
                if kind is not None:
                    cond = id_col.in_([_unplain(v, kind) for v in part])
                else:
                    cond = sa.cast(id_col, sa.String).in_(part)
                query = sa.select(id_col).select_from(source).where(cond)
                found.update(str(next(iter(r.values()))) for r in self._fetch(conn, query))
        return found

    def count_ids(self) -> int:
        """Rows with an id now (a cheap look for deletes before reading any)."""
        with connect(self.url, "[source] url") as conn:
            source, _, columns, _ = self._load_shape(conn)
            query = sa.select(sa.func.count()).select_from(source)
            query = query.where(columns[self.id].is_not(None))
            page = self._fetch(conn, query)
            return int(next(iter(page[0].values())) or 0)

    def count(self, since: Any = _MISSING) -> int:
        with connect(self.url, "[source] url") as conn:
            base, _, columns, kinds = self._select(conn)
            query = sa.select(sa.func.count()).select_from(
                self._since(base, columns, kinds, since).subquery()
            )
            page = self._fetch(conn, query)
            return int(next(iter(page[0].values())) or 0)

    def high_water(self) -> Any:
        """The largest value of the `changed_since` column now (as JSON), None when empty."""
        assert self.changed_since is not None
        with connect(self.url, "[source] url") as conn:
            base, _, columns, _ = self._select(conn)
            sub = base.subquery()
            try:
                value = conn.execute(sa.select(sa.func.max(sub.c[self.changed_since]))).scalar()
            except sa.exc.DBAPIError as exc:
                raise SqlError(
                    f"[source] changed_since: cannot read it: {scrub(str(exc.orig), self.url)}"
                ) from None
            finally:
                conn.rollback()
            return plain(value)

    def digest(self, chunk: int = 5000) -> tuple[int, str]:
        """(rows, content hash) of the whole table or query, read as a run reads it: what
        decides whether a rerun has anything to do. The same as `read_digest` of the cursor
        after reading it all."""
        total = n = 0
        for rows in self.read(Cursor(), chunk):
            total += sum(row_hash(row.payload) for row in rows)
            n += len(rows)
        return n, sum_digest(total)


def read_digest(cursor: Cursor) -> tuple[int, str] | None:
    """(rows, content hash) of what a read that ended at `cursor` read (from its start, across
    resumes): None when the cursor carries no hash (an older overnight's)."""
    if not cursor.key:
        return (0, sum_digest(0)) if cursor.records == 0 else None
    state = orjson.loads(cursor.key)
    if "h" not in state:
        return None
    return cursor.records, sum_digest(int(state["h"], 16))
