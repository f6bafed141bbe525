"""The PostgreSQL connector (psycopg 3): a ledger every worker on every machine can share.

One connection per ledger object. Outside a transaction each statement commits on its own
(autocommit); `transaction()` is an explicit BEGIN ... COMMIT. Items several workers may
want (`lease`) are taken with `FOR UPDATE SKIP LOCKED`, so two workers never get the same
item and never wait on each other's.

Which schema: the tables live in the first schema of the connection's search_path, which a
ledger URL sets with libpq's `options` parameter, e.g.

    postgresql://user@host:5432/db?options=-csearch_path%3Dmy_schema

(`%3D` is `=`). The schema must exist (`CREATE SCHEMA my_schema`); without the option the
ledger uses the server's default (`public`). Several ledgers can share a database this way.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.abc import Buffer
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.string import StrDumperUnknown

from ..retry import Fault, RetryPolicy
from .base import ConnectionLost, Contention, LedgerError
from .connector import Params, load_queries, positional, safe_url, statements
from .ledger import SQLLedger

_QUERIES = load_queries("postgresql")
_SQL = {name: positional(q, "$") for name, q in _QUERIES.items()}
_CURSOR_NAMES = itertools.count(1)
# Connecting again after a lost connection: 8 tries, 0.25 s doubling to 8 s, ~25 s in all.
_RECONNECT = RetryPolicy(max_attempts=8, base=0.25, cap=8.0)
log = logging.getLogger(__name__)

_HINTS = {
    "no schema has been selected": "the schema named in the URL's search_path does not exist:"
    " create it first (CREATE SCHEMA ...)",
    "permission denied": "the database user may not do this (GRANT the rights it needs)",
    # A table the ledger made lacks a column: not the ledger's table (an application's
    # `jobs` in the same schema).
    'column "': "the schema holds tables of another application with the ledger's names (jobs,"
    " items, ...): give the ledger a schema of its own (?options=-csearch_path%3Dname)",
    "does not exist": "check the database name and the user in the ledger URL",
    "password authentication failed": "check the user and password in the ledger URL",
    "connection refused": "is PostgreSQL running and listening at that host and port?",
    "could not translate host name": "check the host name in the ledger URL",
}


def _translate(url: str, exc: psycopg.Error) -> LedgerError:
    """psycopg's errors, once, as the error users catch (exit 2): what failed and a hint."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.OperationalError) and not isinstance(
        exc, psycopg.errors.QueryCanceled
    ):
        hint = next((h for k, h in _HINTS.items() if k in text.lower()), None)
        hint = hint or "the connection to the database failed or was lost"
    else:
        hint = next((h for k, h in _HINTS.items() if k in text.lower()), None)
    return LedgerError(f"ledger {url}: {text}" + (f" ({hint})" if hint else ""))


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


class _TextDumper(StrDumperUnknown):
    """PostgreSQL's text cannot hold NUL, which an error message (a user function's, a
    provider's) or an id may: it is stored as U+FFFD rather than failing the commit it
    belongs to (so "x\\0" and "x\\uFFFD" are one id there: SQLLedger._repeats)."""

    def dump(self, obj: str) -> Buffer | None:
        return super().dump(_text(obj))


class PostgresConnector:
    # A btree index entry holds at most ~2,700 bytes (a third of a page): a longer id made
    # its whole batch's commit fail ("index row size ... exceeds btree maximum").
    max_id_bytes = 2600

    def __init__(self, url: str) -> None:
        self.url = safe_url(url)
        self._dsn = url
        self.db = self._connect()

    def _connect(self) -> psycopg.Connection:
        # The URL's own application_name wins (a user tells their workers apart by it).
        try:
            named = "application_name" in conninfo_to_dict(self._dsn)
            db = psycopg.connect(
                self._dsn,
                autocommit=True,
                cursor_factory=psycopg.RawCursor,
                connect_timeout=30,
                **({} if named else {"application_name": "overnight"}),
            )
        except psycopg.Error as exc:
            raise _translate(self.url, exc) from None
        db.server_cursor_factory = psycopg.RawServerCursor
        db.adapters.register_dumper(str, _TextDumper)
        return db

    def _error(self, exc: psycopg.Error) -> LedgerError:
        if self.db.broken:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return ConnectionLost(f"ledger {self.url}: connection lost: {text}")
        if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure):
            return Contention(f"ledger {self.url}: {str(exc).strip().splitlines()[0]}")
        return _translate(self.url, exc)

    def reconnect(self) -> None:
        """A new connection, tried with backoff for about half a minute (a restarting
        server refuses connections for a few seconds)."""
        with contextlib.suppress(psycopg.Error):
            self.db.close()
        for attempt in itertools.count(1):
            try:
                self.db = self._connect()
                log.warning("ledger %s: connected again", self.url)
                return
            except LedgerError:
                decision = _RECONNECT.decide(attempt, Fault("unreachable"), 0.0)
                if not decision.retry:
                    raise
                time.sleep(decision.wait)

    def names(self, prefix: str) -> list[str]:
        return [n for n in _QUERIES if n.startswith(prefix)]

    def execute(self, query: str, params: Params = ()) -> int:
        try:
            return self.db.execute(_SQL[query], params or None).rowcount
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def executemany(self, query: str, rows: Sequence[Params]) -> int:
        try:
            with self.db.cursor() as cur:
                cur.executemany(_SQL[query], rows)
                return cur.rowcount
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def fetchone(self, query: str, params: Params = ()) -> tuple | None:
        try:
            return self.db.execute(_SQL[query], params or None).fetchone()
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def fetchall(self, query: str, params: Params = ()) -> list[tuple]:
        try:
            return self.db.execute(_SQL[query], params or None).fetchall()
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def iterate(self, query: str, params: Params = (), size: int = 1000) -> Iterator[list]:
        """A server-side cursor: a million results are not held in memory at once. WITH
        HOLD, so it lives outside a transaction while the caller works between batches."""
        try:
            with self.db.cursor(name=f"overnight_{next(_CURSOR_NAMES)}", withhold=True) as cur:
                cur.execute(_SQL[query], params or None)
                while batch := cur.fetchmany(size):
                    yield batch
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def script(self, query: str) -> None:
        for statement in statements(_SQL[query]):
            try:
                self.db.execute(statement)
            except psycopg.Error as exc:
                raise self._error(exc) from None

    def array(self, values: Sequence[str]) -> Any:
        return list(values)  # a text[]

    text = staticmethod(_text)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        if self.db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            yield
            return
        try:
            self.db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        except psycopg.Error as exc:
            raise self._error(exc) from None
        try:
            yield
        finally:
            with contextlib.suppress(psycopg.Error):
                self.db.execute("COMMIT")  # a lost connection: nothing to end

    @contextmanager
    def transaction(self) -> Iterator[None]:
        try:
            with self.db.transaction():
                yield
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        self.db.close()


class PostgresLedger(SQLLedger):
    """The ledger in a PostgreSQL database (`postgresql://...`, see the module's docstring)."""

    def __init__(self, url: str) -> None:
        super().__init__(PostgresConnector(url))
