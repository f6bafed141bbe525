"""Connections to the user's databases (SQL sources and sinks) through SQLAlchemy 2.

PostgreSQL goes through psycopg 3, MariaDB/MySQL through pymysql, DuckDB through
duckdb-engine, SQLite through the standard library. A URL's password never appears in a
message: every error names the URL as `safe_url` renders it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from .errors import UsageError

log = logging.getLogger(__name__)

# Plain `postgresql://` would pick psycopg2, which is not installed: psycopg 3 it is.
_DRIVERS = {
    "postgresql": "postgresql+psycopg",
    "postgres": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mariadb+pymysql",
}
_FILE_DIALECTS = ("sqlite", "duckdb")

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


class SqlError(UsageError):
    """A database the job names cannot be used (bad URL, refused connection, a missing table
    or column): exit 2, naming the key. The message never holds a password."""


def parse_url(text: str, base_dir: Path, key: str) -> URL:
    """The SQLAlchemy URL, with the driver overnight uses, and a relative SQLite or DuckDB
    file taken relative to the job file's folder."""
    try:
        url = make_url(text)
    except (sa.exc.ArgumentError, ValueError):
        raise SqlError(
            f"{key}: not a database URL: {hide_password(text)!r} (e.g. postgresql://host/db,"
            " mysql+pymysql://user@host/db, sqlite:///file.db, duckdb:///file.duckdb)"
        ) from None
    if url.drivername in _DRIVERS:
        url = url.set(drivername=_DRIVERS[url.drivername])
    if url.get_backend_name() in _FILE_DIALECTS and url.database not in (None, "", ":memory:"):
        path = Path(url.database).expanduser()
        if not path.is_absolute():
            url = url.set(database=str(base_dir / path))
    return url


def hide_password(text: str) -> str:
    try:
        return safe_url(make_url(text))
    except Exception:
        return "<the URL>" if "@" in text or "password" in text else text


def safe_url(url: URL) -> str:
    # The drivers take `?password=` as well as `user:password@`.
    return url.difference_update_query(["password"]).render_as_string(hide_password=True)


def scrub(message: str, url: URL) -> str:
    """A driver's message with the URL's passwords taken out, on one line."""
    text = " ".join(str(message).split())
    query = url.query.get("password")
    hidden = [url.password, *(query if isinstance(query, tuple) else [query])]
    for password in hidden:
        if password:
            text = text.replace(str(password), "***")
    return text[:500]


def engine(url: URL, key: str) -> Engine:
    """One engine per URL in this process (a source and a sink on one DuckDB file share it:
    DuckDB lets one process hold a file once)."""
    name = url.render_as_string(hide_password=False)
    with _lock:
        found = _engines.get(name)
        if found is not None:
            return found
        try:
            made = sa.create_engine(url, pool_pre_ping=True)
        except (sa.exc.NoSuchModuleError, sa.exc.ArgumentError, ImportError) as exc:
            raise SqlError(
                f"{key}: {safe_url(url)}: no driver for {url.drivername!r} ({scrub(str(exc), url)})"
            ) from None
        _engines[name] = made
        return made


def dispose_all() -> None:
    """Close every pooled connection (tests; a DuckDB file is then free for others)."""
    with _lock:
        for made in _engines.values():
            made.dispose()
        _engines.clear()


@contextmanager
def connect(url: URL, key: str) -> Iterator[sa.Connection]:
    """A connection, with a refused one (host down, bad password, no such database) as one
    clear message naming `key`."""
    eng = engine(url, key)
    try:
        conn = eng.connect()
    except sa.exc.DBAPIError as exc:
        raise SqlError(
            f"{key}: cannot connect to {safe_url(url)}: {scrub(str(exc.orig), url)}"
        ) from None
    except Exception as exc:  # a driver's own error type (duckdb's IOException, ...)
        raise SqlError(
            f"{key}: cannot connect to {safe_url(url)}: {scrub(str(exc), url)}"
        ) from None
    try:
        yield conn
    finally:
        conn.close()


def split_table(name: str) -> tuple[str | None, str]:
    """`schema.table` -> (schema, table); a bare name has no schema."""
    schema, dot, table = name.rpartition(".")
    return (schema or None) if dot else None, table


def same_table(a: URL, a_table: str, b: URL, b_table: str) -> bool:
    """Whether two (URL, table) settings name one table: the default port may be spelled
    out or not, and a table's schema given or left to the default."""
    (sa_, ta), (sb, tb) = split_table(a_table), split_table(b_table)
    return (
        a.get_backend_name() == b.get_backend_name()
        and a.host == b.host
        and a.database == b.database
        and (a.port == b.port or None in (a.port, b.port))
        and ta == tb
        and (sa_ == sb or None in (sa_, sb))
    )


def reflect(conn: sa.Connection, name: str, key: str, url: URL) -> sa.Table | None:
    """The table's columns and types, or None when there is no such table."""
    schema, table = split_table(name)
    if url.get_backend_name() == "duckdb":
        return _reflect_duckdb(conn, schema, table, key, url)
    try:
        if not sa.inspect(conn).has_table(table, schema=schema):
            return None
        return sa.Table(table, sa.MetaData(), schema=schema, autoload_with=conn)
    except sa.exc.DBAPIError as exc:
        raise SqlError(
            f"{key}: {name}: cannot read the table: {scrub(str(exc.orig), url)}"
        ) from None
    finally:
        conn.rollback()  # end the read: writes after it begin their own transactions


def python_type(column: Any) -> type | None:
    try:
        return column.type.python_type  # type: ignore[no-any-return]
    except (NotImplementedError, AttributeError):
        return None


_DUCK_TYPES = {
    "BIGINT": sa.BigInteger,
    "HUGEINT": sa.BigInteger,
    "INTEGER": sa.Integer,
    "SMALLINT": sa.SmallInteger,
    "TINYINT": sa.SmallInteger,
    "UBIGINT": sa.BigInteger,
    "UINTEGER": sa.BigInteger,
    "VARCHAR": sa.String,
    "DOUBLE": sa.Float,
    "FLOAT": sa.Float,
    "REAL": sa.Float,
    "BOOLEAN": sa.Boolean,
    "DATE": sa.Date,
    "TIMESTAMP": sa.DateTime,
    "TIMESTAMP WITH TIME ZONE": sa.DateTime,
    "BLOB": sa.LargeBinary,
    "UUID": sa.Uuid,
    "JSON": sa.JSON,
}


def _reflect_duckdb(
    conn: sa.Connection, schema: str | None, table: str, key: str, url: URL
) -> sa.Table | None:
    """duckdb-engine's reflection runs PostgreSQL catalog queries DuckDB does not have (with
    SQLAlchemy 2.1): read information_schema instead."""
    try:
        rows = conn.execute(
            sa.text(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_name = :t AND table_schema = coalesce(:s, current_schema())"
                " ORDER BY ordinal_position"
            ),
            {"t": table, "s": schema},
        ).all()
    except sa.exc.DBAPIError as exc:
        raise SqlError(
            f"{key}: {table}: cannot read the table: {scrub(str(exc.orig), url)}"
        ) from None
    finally:
        conn.rollback()
    if not rows:
        return None
    columns = []
    for name, kind in rows:
        kind = str(kind).upper()
        if kind.startswith("DECIMAL"):
            made: Any = sa.Numeric()
        elif kind.endswith("[]"):
            made = sa.ARRAY(sa.Float)
        else:
            made = _DUCK_TYPES.get(kind, sa.types.NullType)()
        columns.append(sa.Column(str(name), made))
    return sa.Table(table, sa.MetaData(), *columns, schema=schema)
