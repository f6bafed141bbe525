"""How the ledger talks to a database: named queries, one file of them per dialect.

`sql/<dialect>.sql` holds blocks headed `-- name: query(a, b, ...)`, the parameters in the
order a caller passes them, used in the body as `:a`, `:b` (each as often as needed). Both
files hold the same names with the same parameters, so the one ledger class (ledger.py) runs
on either; where the dialects differ only in SQL text, the difference lives in those files.

A connector runs the queries of one dialect on one connection and translates the driver's
errors, once, where they enter, into `LedgerError` with a hint (exit 2).

Parameters are passed as a tuple in the declared order, not as a dict: binding by name costs
the SQLite driver about half again as much per row, and ingest binds a million rows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

_HEADER = re.compile(r"^-- name: *(?P<name>[^(]+?) *\((?P<params>[^)]*)\) *$", re.M)
# `:name`, not `::type` (a PostgreSQL cast) nor `a:b` inside a word.
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")

Params = Sequence[Any]


@dataclass(frozen=True)
class Query:
    name: str
    params: tuple[str, ...]
    sql: str  # with `:name` placeholders, as written


def load_queries(dialect: str) -> dict[str, Query]:
    """The named queries of `sql/<dialect>.sql`. A body whose placeholders are not exactly
    the declared parameters is refused here (a mistake in the file, found at import)."""
    text = files(__package__).joinpath("sql", f"{dialect}.sql").read_text(encoding="utf-8")
    heads = list(_HEADER.finditer(text))
    queries: dict[str, Query] = {}
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        body = text[head.end() : nxt.start() if nxt else len(text)]
        lines = body.strip("\n").splitlines()
        while lines and (not lines[-1].strip() or lines[-1].lstrip().startswith("--")):
            lines.pop()  # comments between blocks introduce the next one
        name = head["name"].strip()
        params = tuple(p.strip() for p in head["params"].split(",") if p.strip())
        sql = "\n".join(lines)
        used = set(_PARAM.findall(sql))
        if used != set(params) or name in queries:
            raise RuntimeError(
                f"sql/{dialect}.sql, query {name}: declares {params}, uses {sorted(used)}"
            )
        queries[name] = Query(name, params, sql)
    return queries


def positional(query: Query, mark: str) -> str:
    """The query's SQL with `:name` as numbered placeholders: `?1` (SQLite), `$1` (libpq)."""
    index = {p: i + 1 for i, p in enumerate(query.params)}
    return _PARAM.sub(lambda m: f"{mark}{index[m[1]]}", query.sql)


def statements(sql: str) -> list[str]:
    """A script's statements, comments left out (the schema: no `;` or `--` in a literal)."""
    code = re.sub(r"--[^\n]*", "", sql)
    return [s.strip() for s in code.split(";") if s.strip()]


def safe_url(url: str) -> str:
    """The URL to show in messages: without its password."""
    try:
        parts = urlsplit(url)
        query = parts.query.split("&")
        kept = [p for p in query if unquote(p.partition("=")[0]) != "password"]
        if len(kept) < len(query):  # libpq takes ?password= too
            parts = parts._replace(query="&".join(kept))
        if parts.password is not None:
            host = parts.hostname or ""
            netloc = f"{parts.username}@{host}" if parts.username else host
            if parts.port:
                netloc += f":{parts.port}"
            parts = parts._replace(netloc=netloc)
        return urlunsplit(parts)
    except ValueError:
        return url.split("@")[-1]


class Connector(Protocol):
    """One connection to a ledger's database, running named queries.

    Outside `transaction()` each statement commits on its own; inside, all of them commit
    together or not at all, and a write lock is held that keeps other processes' writers of
    the same rows out (SQLite: the whole file; PostgreSQL: the rows, plus `lock_job`)."""

    url: str  # for messages, without a password
    # The longest id (UTF-8 bytes) the database's unique index on ids holds; None: no limit.
    max_id_bytes: int | None

    def names(self, prefix: str) -> list[str]: ...
    def execute(self, query: str, params: Params = ()) -> int: ...
    def executemany(self, query: str, rows: Sequence[Params]) -> int: ...
    def fetchone(self, query: str, params: Params = ()) -> tuple | None: ...
    def fetchall(self, query: str, params: Params = ()) -> list[tuple]: ...
    def iterate(self, query: str, params: Params = (), size: int = 1000) -> Iterator[list]: ...
    def script(self, query: str) -> None: ...
    def array(self, values: Sequence[str]) -> Any: ...
    def text(self, value: str) -> str:
        """`value` as the database stores it (and so compares it: PostgreSQL's text holds
        NUL as U+FFFD)."""

    def transaction(self) -> AbstractContextManager[None]: ...
    def snapshot(self) -> AbstractContextManager[None]:
        """Reads that see one state of the database, while other connections write on (a
        read-only transaction; inside one already, that one's). No write inside it."""

    def reconnect(self) -> None:
        """After `ConnectionLost`: a new connection in place of the broken one (or
        `LedgerError` when the server stays out of reach)."""

    def close(self) -> None: ...
