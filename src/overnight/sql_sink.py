"""Export results to a database table: `[output] url`, `table`, `mode`, `columns`, `errors_table`.

`mode = "upsert"` inserts or updates one row per result, keyed by the id column, in a table
created when missing (the id's type, TEXT, BIGINT, FLOAT, JSON/JSONB for objects, REAL[] on
PostgreSQL for embeddings), each row marked with the job's name (`overnight_job`); this job's
rows whose id is no longer a good result (gone from the source, or failed since) are deleted,
another job's rows in the same table are left alone. `mode = "update"` sets columns of
existing rows (the source table itself, say), adding the columns when missing; a failed
record's columns are set to NULL.

Rows are written in transactions of `BATCH` rows: a kill during the write leaves every row
either as it was or as the ledger has it, and the next export (a rerun, or `overnight export`)
writes them all again: the export is idempotent.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.mysql import MEDIUMTEXT
from sqlalchemy.engine import URL

from . import results
from .sql_source import _unplain
from .sqldb import (
    SqlError,
    connect,
    parse_url,
    python_type,
    reflect,
    safe_url,
    same_table,
    scrub,
    split_table,
)
from .store import Ledger

log = logging.getLogger(__name__)

BATCH = 1000
# MySQL and MariaDB: text compared byte by byte, trailing spaces included (NO PAD): under
# utf8mb4_bin "7" and "7 " are one key, and the second id's row was refused (or overwrote the
# first's). The first of these the server has (utf8mb4_bin: an old MySQL's only choice).
_BINARY = ("utf8mb4_nopad_bin", "utf8mb4_0900_bin", "utf8mb4_bin")


class RowsRefused(SqlError):
    """The table refused some rows and took the others (see outputs.ExportRefused)."""


_ERRORS_COLUMNS = ("id", "line", "state", "error_class", "message", "attempts")

# Upsert mode: the column naming the job that wrote a row, so that a job deletes only its own
# rows that are no longer results (two jobs may share one results table).
JOB_COLUMN = "overnight_job"


@dataclass
class SqlSink:
    url: URL
    table: str
    mode: str
    columns: dict[str, str] | None  # target column -> result or input field
    errors_table: str | None
    id_name: str  # the id column
    include: list[str]
    job: str = ""  # the job's name, in JOB_COLUMN of each row it upserts

    @classmethod
    def from_spec(cls, output: Any, base_dir: Path, id_name: str, job: str = "") -> SqlSink:
        return cls(
            parse_url(output.url, base_dir, "[output] url"),
            output.table,
            output.mode,
            dict(output.columns) if output.columns is not None else None,
            output.errors_table,
            id_name,
            list(output.include),
            job,
        )

    @property
    def where(self) -> str:
        return f"table {self.table} at {safe_url(self.url)}"

    @property
    def dialect(self) -> str:
        return self.url.get_backend_name()

    def check(self) -> None:
        """Connects (exit 2 naming [output] url otherwise); update mode: the table exists and
        has the id column."""
        with connect(self.url, "[output] url") as conn:
            if self.mode == "update":
                self._existing(conn)
            if self.errors_table is not None:
                if same_table(self.url, self.table, self.url, self.errors_table):
                    raise SqlError(
                        f"[output] errors_table: {self.errors_table} is the results table;"
                        " name another"
                    )
                self._check_errors_table(conn, missing_ok=True)

    def _check_errors_table(self, conn: sa.Connection, missing_ok: bool = False) -> None:
        """Its rows are replaced at each export: a table of other columns (the results table,
        the source table, any other) is not one to empty. Naming one emptied it, exit 0."""
        found = reflect(conn, self.errors_table or "", "[output] errors_table", self.url)
        if found is None and missing_ok:
            return
        names = sorted(c.name for c in found.columns) if found is not None else []
        if names != sorted(_ERRORS_COLUMNS):
            raise SqlError(
                f"[output] errors_table: {self.errors_table} at {safe_url(self.url)} is not an"
                f" errors table (its columns: {', '.join(names[:12])}); its rows would be"
                " replaced: name a new table"
            )

    def _existing(self, conn: sa.Connection) -> sa.Table:
        table = reflect(conn, self.table, "[output] table", self.url)
        if table is None:
            raise SqlError(
                f"[output] table: no table {self.table!r} in {safe_url(self.url)}"
                ' (mode = "update" sets columns of existing rows)'
            )
        if self.id_name not in table.c:
            raise SqlError(f"[output] table: {self.table} has no id column {self.id_name!r}")
        return table

    # -- rows -----------------------------------------------------------------------------

    def _rows(self, ledger: Ledger, job_id: int) -> Iterator[tuple[Any, dict[str, Any], set[str]]]:
        """(id value, {field: value}, the input's fields) per good result: the result's
        fields over the input record's."""
        for custom_id, result, payload, vector in ledger.iter_results(job_id, with_payload=True):
            fields = results.decode(result, vector)
            record = orjson.loads(payload) if payload else {}
            value = record.get(self.id_name, custom_id)
            if "scores" in fields and "confidence" not in fields:
                scores = fields["scores"]
                if isinstance(scores, dict):
                    fields["confidence"] = scores.get(fields.get("output"))
            yield value, {**record, **fields}, set(record)

    def _mapping(self, first: dict[str, Any] | None, record_fields: set[str]) -> dict[str, str]:
        if self.columns is not None:
            if first is not None:
                unknown = [f for f in self.columns.values() if f not in first]
                if unknown:
                    result = sorted(set(first) - record_fields)
                    raise SqlError(
                        f"[output] columns: {unknown[0]!r} is neither a result field"
                        f" ({', '.join(result)}) nor an input field"
                    )
            return dict(self.columns)
        fields = [f for f in (first or {"output": None}) if f not in record_fields]
        mapping = {f: f for f in fields if f not in ("confidence",)}
        mapping.update({f: f for f in self.include})
        return mapping

    # -- column types -------------------------------------------------------------------

    def _type(self, value: Any, is_id: bool = False, collation: str = _BINARY[-1]) -> Any:
        mysql = self.dialect in ("mysql", "mariadb")
        if isinstance(value, bool):
            return sa.Boolean()
        if isinstance(value, int):
            return sa.BigInteger()
        if isinstance(value, float):
            return sa.Float()
        if isinstance(value, np.ndarray) or (
            isinstance(value, list)
            and value
            and all(isinstance(v, float | int) and not isinstance(v, bool) for v in value)
        ):
            if self.dialect == "postgresql":
                return postgresql.ARRAY(sa.REAL())
            return sa.JSON()
        if isinstance(value, dict | list):
            return postgresql.JSONB() if self.dialect == "postgresql" else sa.JSON()
        if is_id and mysql:
            # MySQL keys need a length; ids compare as written ("aB" is not "Ab").
            return sa.String(255, collation=collation)
        return self._text()

    def _types(self, sample: list[Any]) -> Any:
        """The column type for a field's values in the first rows: one that holds them all
        (an int then a float: FLOAT, not BIGINT; mixed kinds: TEXT)."""
        kinds = [self._type(v) for v in sample if v is not None]
        if not kinds:
            return self._type(None)
        names = {type(k) for k in kinds}
        if len(names) == 1:
            return kinds[0]
        if names <= {sa.BigInteger, sa.Float}:
            return sa.Float()
        if names <= {sa.JSON, postgresql.JSONB, postgresql.ARRAY}:
            return postgresql.JSONB() if self.dialect == "postgresql" else sa.JSON()
        return self._text()

    def _text(self) -> Any:
        """A text column: MySQL's TEXT holds 64 KiB, and a longer output was refused at every
        export (the run exit 2); MEDIUMTEXT holds 16 MiB."""
        return MEDIUMTEXT() if self.dialect in ("mysql", "mariadb") else sa.Text()

    def _binary(self, conn: sa.Connection) -> str:
        """The binary NO PAD collation this MySQL or MariaDB server has (see _BINARY)."""
        if self.dialect not in ("mysql", "mariadb"):
            return _BINARY[-1]
        try:
            found = set(
                conn.execute(
                    sa.text(
                        "SELECT collation_name FROM information_schema.collations"
                        " WHERE collation_name IN :names"
                    ).bindparams(sa.bindparam("names", expanding=True)),
                    {"names": list(_BINARY)},
                ).scalars()
            )
        finally:
            conn.rollback()
        return next((c for c in _BINARY if c in found), _BINARY[-1])

    def _create(
        self, conn: sa.Connection, mapping: dict[str, str], head: list[tuple[Any, dict, set]]
    ) -> sa.Table:
        schema, name = split_table(self.table)
        first = head[0] if head else None
        cols = [
            sa.Column(
                self.id_name,
                self._type(first[0] if first else "", True, self._binary(conn)),
                primary_key=True,
                autoincrement=False,
            )
        ]
        for target, source in mapping.items():
            if target != self.id_name:
                kind = self._types([row.get(source) for _, row, _ in head])
                cols.append(sa.Column(target, kind))
        table = sa.Table(name, sa.MetaData(), *cols, schema=schema)
        try:
            with conn.begin():
                table.create(conn, checkfirst=True)
        except sa.exc.DBAPIError as exc:
            # Another worker exporting at the same moment may have made it first.
            made = reflect(conn, self.table, "[output] table", self.url)
            if made is not None:
                return made
            raise SqlError(
                f"[output] table: cannot create {self.where}: {scrub(str(exc.orig), self.url)}"
            ) from None
        log.info("created %s", self.where)
        return self._reflect(conn)

    def _add_columns(
        self, conn: sa.Connection, table: sa.Table, mapping: dict[str, str], head: list
    ) -> sa.Table:
        missing = [t for t in mapping if t not in table.c]
        if not missing:
            return table
        prep = conn.dialect.identifier_preparer
        for target in missing:
            sample = [row.get(mapping[target]) for _, row, _ in head]
            kind = self._types(sample).compile(dialect=conn.dialect)
            try:
                with conn.begin():
                    conn.execute(
                        sa.text(
                            f"ALTER TABLE {prep.format_table(table)}"
                            f" ADD COLUMN {prep.quote(target)} {kind}"
                        )
                    )
            except sa.exc.DBAPIError as exc:
                # Another worker exporting at the same moment may have added it first.
                if target in self._reflect(conn).c:
                    continue
                raise SqlError(
                    f"[output] columns: cannot add column {target!r} to {self.where}:"
                    f" {scrub(str(exc.orig), self.url)}"
                ) from None
            log.info("added column %s (%s) to %s", target, kind, self.where)
        return self._reflect(conn)

    def _reflect(self, conn: sa.Connection) -> sa.Table:
        table = reflect(conn, self.table, "[output] table", self.url)
        assert table is not None
        return table

    # -- writing ------------------------------------------------------------------------

    def _cell(self, value: Any, column: sa.Column) -> Any:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, dict | list):
            kind = column.type
            if isinstance(kind, sa.JSON) and self.dialect == "postgresql":
                return _no_nul(value)
            if isinstance(kind, sa.JSON | sa.ARRAY):
                return value
            return orjson.dumps(value).decode()
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            want = python_type(column)
            if want is not None and want is not type(value) and want in (int, float, str):
                value = _unplain(value, want)
            if isinstance(value, str) and self.dialect == "postgresql":
                return _no_nul(value)
        return value

    def _statement(self, table: sa.Table, targets: list[str]) -> Any:
        if self.mode == "update":
            # Rows that already hold their values are not touched (nor their triggers).
            values = {
                t: sa.bindparam(f"_v_{i}", type_=table.c[t].type) for i, t in enumerate(targets)
            }
            return (
                table.update()
                .where(table.c[self.id_name] == sa.bindparam("_overnight_id"))
                .where(sa.or_(*(self._differs(table.c[t], v) for t, v in values.items())))
                .values(values)
            )
        if self.dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects import mysql

            stmt = mysql.insert(table)
            return stmt.on_duplicate_key_update({t: stmt.inserted[t] for t in targets})
        if self.dialect == "sqlite":
            from sqlalchemy.dialects import sqlite

            stmt = sqlite.insert(table)
        else:  # postgresql, duckdb
            stmt = postgresql.insert(table)
        if not targets:
            return stmt.on_conflict_do_nothing(index_elements=[self.id_name])
        # A row that already holds these values is left alone: a rerun that changed a few
        # results rewrites a few rows, not the table (no dead tuples on PostgreSQL).
        changed = sa.or_(*(self._differs(table.c[t], stmt.excluded[t]) for t in targets))
        return stmt.on_conflict_do_update(
            index_elements=[self.id_name],
            set_={t: stmt.excluded[t] for t in targets},
            where=changed,
        )

    def _differs(self, old: Any, new: Any) -> Any:
        # PostgreSQL's json (not jsonb) has no equality: compared as text.
        kind = old.type
        if (
            self.dialect == "postgresql"
            and isinstance(kind, sa.JSON)
            and not isinstance(kind, postgresql.JSONB)
        ):
            return sa.cast(old, sa.Text).is_distinct_from(sa.cast(new, sa.Text))
        return old.is_distinct_from(new)

    def _params(
        self, table: sa.Table, targets: list[str], mapping: dict[str, str], value: Any, row: dict
    ) -> dict:
        id_col = table.c[self.id_name]
        ident = _unplain(value, python_type(id_col))
        if self.mode == "update":
            out = {"_overnight_id": ident}
            for i, t in enumerate(targets):
                out[f"_v_{i}"] = self._cell(row.get(mapping[t]), table.c[t])
            return out
        out = {self.id_name: ident}
        for t in targets:
            out[t] = self.job if t == JOB_COLUMN else self._cell(row.get(mapping[t]), table.c[t])
        return out

    def _write(
        self,
        conn: sa.Connection,
        stmt: Any,
        batch: list[dict],
        keep: sa.Table | None = None,
        refused: list[tuple[dict, str]] | None = None,
    ) -> None:
        """One transaction. With `refused`, a batch the database refuses is written again
        row by row, and the rows it refuses alone are added to `refused`, (params, message)."""
        try:
            with conn.begin():
                conn.execute(stmt, batch)
                if keep is not None:
                    conn.execute(keep.insert(), [{"id": p[self.id_name]} for p in batch])
        except sa.exc.DBAPIError as exc:
            if refused is not None and not exc.connection_invalidated:
                if len(batch) == 1:
                    refused.append((batch[0], scrub(str(exc.orig), self.url)))
                    return
                for params in batch:
                    self._write(conn, stmt, [params], keep, refused)
                return
            hint = ""
            if self.mode == "upsert" and "conflict" in str(exc.orig).lower():
                hint = f" (the table needs a primary key or unique index on {self.id_name!r})"
            raise SqlError(
                f"[output] table: cannot write {self.where}:"
                f" {scrub(str(exc.orig), self.url)}{hint}."
                " The results are kept in the ledger: once this is fixed, `overnight export`"
                " writes them"
            ) from None

    def export(self, ledger: Ledger, job_id: int) -> int:
        """Write every good result; returns the rows written."""
        rows = self._rows(ledger, job_id)
        head = list(itertools.islice(rows, BATCH))  # the rows new columns' types fit
        first = head[0] if head else None
        record_fields = first[2] if first else set()
        mapping = self._mapping(first[1] if first else None, record_fields)
        mapping.pop(self.id_name, None)
        if self.mode == "upsert":
            mapping[JOB_COLUMN] = JOB_COLUMN  # whose row it is (see _delete_others)
        with connect(self.url, "[output] url") as conn:
            if self.mode == "update":
                table = self._existing(conn)
            else:
                table = reflect(conn, self.table, "[output] table", self.url)
                if table is None:
                    table = self._create(conn, mapping, head)
                elif self.id_name not in table.c:
                    raise SqlError(
                        f"[output] table: {self.table} has no id column {self.id_name!r}"
                    )
            table = self._add_columns(conn, table, mapping, head)
            targets = list(mapping)
            stmt = self._statement(table, targets)
            # Upsert: the ids written go to a temporary table too, so the rows no longer
            # among them can be deleted at the end without holding the ids in memory.
            keep = self._keep_table(conn, table) if self.mode == "upsert" else None
            try:
                batch: list[dict] = []
                refused: list[tuple[dict, str]] = []
                n = 0
                for value, row, _ in _chain(head, rows):
                    batch.append(self._params(table, targets, mapping, value, row))
                    n += 1
                    if len(batch) >= BATCH:
                        self._write(conn, stmt, batch, keep, refused)
                        batch = []
                if batch:
                    self._write(conn, stmt, batch, keep, refused)
                if keep is not None:
                    self._delete_others(conn, table, keep, n - len(refused))
                else:
                    self._clear_failed(conn, table, targets, ledger, job_id)
                if refused:
                    params, message = refused[0]
                    ident = params.get("_overnight_id", params.get(self.id_name))
                    raise RowsRefused(
                        f"[output] table: {self.where} refused {len(refused)} row(s), the"
                        f" others were written: id {ident}: {message}. The results are kept in"
                        " the ledger: once the table or the results are fixed, `overnight"
                        " export` writes them"
                    )
            finally:
                if keep is not None:
                    self._drop(conn, keep)
        return n

    def _keep_table(self, conn: sa.Connection, table: sa.Table) -> sa.Table:
        kind = table.c[self.id_name].type
        if self.dialect in ("mysql", "mariadb") and isinstance(kind, sa.Text):
            # A MySQL key needs a length; ids compare as the table's do.
            kind = sa.String(255, collation=kind.collation)
        keep = sa.Table(
            f"overnight_keep_{secrets.token_hex(4)}",
            sa.MetaData(),
            sa.Column("id", kind, primary_key=True, autoincrement=False),
            prefixes=["TEMPORARY"],
        )
        try:
            with conn.begin():
                keep.create(conn)
        except sa.exc.DBAPIError as exc:
            raise SqlError(
                f"[output] url: cannot create a temporary table at {safe_url(self.url)}:"
                f" {scrub(str(exc.orig), self.url)}"
            ) from None
        return keep

    def _drop(self, conn: sa.Connection, keep: sa.Table) -> None:
        try:
            if conn.in_transaction():
                conn.rollback()
            with conn.begin():
                keep.drop(conn, checkfirst=False)
        except sa.exc.SQLAlchemyError:  # the connection is gone: so is its temporary table
            log.debug("could not drop %s", keep.name, exc_info=True)

    def _delete_others(self, conn: sa.Connection, table: sa.Table, keep: sa.Table, n: int) -> None:
        """Rows whose id is not a good result now: gone from the source, or failed since."""
        id_col = table.c[self.id_name]
        total = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0
        conn.rollback()
        if total <= n:  # every row in it was just written
            return
        # Only this job's rows: another job upserting into the same table keeps its own.
        # (Rows an older overnight wrote have no job: they are taken as this job's.)
        mine = sa.or_(table.c[JOB_COLUMN] == self.job, table.c[JOB_COLUMN].is_(None))
        stale = table.delete().where(mine).where(~sa.exists().where(keep.c.id == id_col))
        with conn.begin():
            gone = conn.execute(stale).rowcount
        log.info("deleted %d rows no longer in the results from %s", gone, self.where)

    def _clear_failed(
        self, conn: sa.Connection, table: sa.Table, targets: list[str], ledger: Ledger, job_id: int
    ) -> None:
        """Update mode: a record that failed (since its last good result) holds no result."""
        if not targets:
            return
        kind = python_type(table.c[self.id_name])
        ids = [
            _unplain(f.custom_id, kind)
            for f in ledger.iter_failures(job_id)
            if f.custom_id is not None and f.error_class != "input_error"
        ]
        stmt = (
            table.update()
            .where(table.c[self.id_name] == sa.bindparam("_overnight_id"))
            .values({t: None for t in targets})
        )
        for i in range(0, len(ids), BATCH):
            self._write(conn, stmt, [{"_overnight_id": v} for v in ids[i : i + BATCH]])

    def export_errors(self, ledger: Ledger, job_id: int) -> int:
        """Replace the errors table's rows with the job's failures, in one transaction."""
        assert self.errors_table is not None
        mysql = self.dialect in ("mysql", "mariadb")
        # MySQL's VARCHAR(255) and TEXT (64 KiB) refused an id past 255 characters or a
        # longer message, and with that one row the whole table stayed empty: MEDIUMTEXT
        # (16 MiB) there. The table has no key: nothing needs a length.
        long_text = sa.Text().with_variant(MEDIUMTEXT(), "mysql", "mariadb")
        schema, name = split_table(self.errors_table)
        table = sa.Table(
            name,
            sa.MetaData(),
            sa.Column("id", long_text),
            sa.Column("line", sa.BigInteger()),
            sa.Column("state", sa.String(32)),
            sa.Column("error_class", sa.String(255) if mysql else sa.Text()),
            sa.Column("message", long_text),
            sa.Column("attempts", sa.Integer()),
            schema=schema,
        )
        rows = [
            {
                "id": f.custom_id,
                "line": f.line,
                "state": f.state,
                "error_class": f.error_class,
                "message": f.message,
                "attempts": f.attempts,
            }
            for f in ledger.iter_failures(job_id)
        ]
        if self.dialect == "postgresql":
            rows = _no_nul(rows)
        with connect(self.url, "[output] url") as conn:
            try:
                try:
                    with conn.begin():
                        table.create(conn, checkfirst=True)
                except sa.exc.DBAPIError:
                    # Another worker exporting at the same moment may have made it first.
                    if reflect(conn, self.errors_table, "[output] errors_table", self.url) is None:
                        raise
                self._check_errors_table(conn)
                with conn.begin():
                    if self.dialect == "postgresql":  # two exports at once: one after the other
                        quoted = conn.dialect.identifier_preparer.format_table(table)
                        conn.execute(sa.text(f"LOCK TABLE {quoted} IN EXCLUSIVE MODE"))
                    conn.execute(table.delete())
                    if rows:
                        conn.execute(table.insert(), rows)
            except sa.exc.DBAPIError as exc:
                raise SqlError(
                    f"[output] errors_table: cannot write {self.errors_table} at"
                    f" {safe_url(self.url)}: {scrub(str(exc.orig), self.url)}"
                ) from None
        return len(rows)


def _no_nul(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold NUL: U+FFFD instead, as the ledger stores it."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def _chain(first: list[Any], rest: Iterator[Any]) -> Iterator[Any]:
    yield from first
    yield from rest
