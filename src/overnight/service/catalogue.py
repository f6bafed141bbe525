"""The service's catalogue: its files and batches.

The items of a batch, their states and results are the ledger's (a batch is a ledger job
named after it); the catalogue holds what OpenAI's API shows about files and batches: owner
(tenant), names, sizes, the batch object and its status. Its queries are named SQL beside the
ledger's (store/sql/*.sql, `catalogue_*`), run by the ledger's connectors:

- with a SQLite ledger, in a SQLite file of its own in the service's folder (catalogue.db),
  beside the files' bytes (written once, served as they are): the two move, and are backed
  up, together;
- with a PostgreSQL ledger, in the ledger's schema (tables `serve_files`, `serve_batches`):
  every `overnight serve` on that ledger shares it, so a batch created on one is seen, and
  can be cancelled, on another. The files' bytes stay in the `[files] folder`, which those
  servers then share (one machine, or a shared mount).

Every write is one transaction; a change of a batch's status names the statuses it may
change from, so two threads or servers (the batch's runner and a cancel) never both win.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from ..store import is_postgres
from ..store.base import ConnectionLost
from ..store.connector import Connector

POOL = 8  # connections kept between uses; more are opened while more threads need one


def _connect(location: str) -> Connector:
    if is_postgres(location):
        from ..store.postgresql import PostgresConnector  # psycopg only when needed

        return PostgresConnector(location)
    from ..store.sqlite import SQLiteConnector

    connector = SQLiteConnector(location)
    connector.execute("catalogue_durable")
    return connector


class Catalogue:
    """`location`: the PostgreSQL ledger's URL, or the path of the SQLite file."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)
        self._idle: list[Connector] = []  # connections between uses
        self._lock = threading.Lock()
        with self._tx() as db:
            db.execute("lock_schema")  # two servers starting at once create the tables once
            db.script("catalogue_schema")

    @classmethod
    def for_service(cls, ledger_url: str, folder: Path) -> Catalogue:
        """The catalogue of a service on this ledger whose files are in `folder`."""
        return cls(ledger_url if is_postgres(ledger_url) else folder / "catalogue.db")

    @contextmanager
    def _db(self) -> Iterator[Connector]:
        """A connection of the pool (a new one when all are in use); a lost one is dropped."""
        with self._lock:
            db = self._idle.pop() if self._idle else None
        if db is None:
            db = _connect(self.location)
        lost = False
        try:
            yield db
        except ConnectionLost:
            lost = True
            raise
        finally:
            with self._lock:
                kept = not lost and len(self._idle) < POOL
                if kept:
                    self._idle.append(db)
            if not kept:
                db.close()

    @contextmanager
    def _tx(self) -> Iterator[Connector]:
        with self._db() as db, db.transaction():
            yield db

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for db in idle:
            db.close()

    # -- files ----------------------------------------------------------------------------

    def add_file(self, tenant: str, obj: dict[str, Any]) -> None:
        """Records a file (its bytes are already in place); the same id again replaces it."""
        with self._db() as db:
            db.execute(
                "catalogue_add_file",
                (
                    obj["id"],
                    tenant,
                    obj["filename"],
                    obj["purpose"],
                    obj["bytes"],
                    obj["created_at"],
                ),
            )

    def get_file(self, tenant: str, file_id: str) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.fetchone("catalogue_get_file", (file_id, tenant))
        return _file(row) if row else None

    def list_files(
        self, tenant: str, after: str | None, limit: int, order: str, purpose: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        desc = order == "desc"
        with self._tx() as db:
            bound = 2**62 if desc else -1
            if after is not None:
                row = db.fetchone("catalogue_file_seq", (after, tenant))
                if row is None:
                    return [], False
                bound = row[0]
            query = "catalogue_files_desc" if desc else "catalogue_files_asc"
            rows = db.fetchall(query, (tenant, purpose, bound, limit + 1))
        return [_file(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self._db() as db:
            return db.execute("catalogue_delete_file", (file_id, tenant)) > 0

    # -- batches --------------------------------------------------------------------------

    def add_batch(
        self,
        tenant: str,
        obj: dict[str, Any],
        active: tuple[str, ...] = (),
        max_active: int | None = None,
    ) -> int | None:
        """Records the batch, unless the tenant already has `max_active` batches in the
        `active` statuses: then returns that count and records nothing (counted and inserted
        in one transaction that holds the tenant's lock, so two creates at once, on one
        server or two, cannot both slip under the limit)."""
        with self._tx() as db:
            if max_active is not None:
                db.execute("catalogue_lock_tenant", (tenant,))
                row = db.fetchone("catalogue_count_active", (tenant, db.array(active)))
                n = int(row[0]) if row else 0
                if n >= max_active:
                    return n
            db.execute(
                "catalogue_add_batch",
                (obj["id"], tenant, obj["api"], obj["status"], orjson.dumps(obj).decode()),
            )
        return None

    def get_batch(self, batch_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The batch object; with `tenant`, only that tenant's."""
        with self._db() as db:
            row = db.fetchone("catalogue_get_batch", (batch_id,))
        if row is None or (tenant is not None and row[1] != tenant):
            return None
        return orjson.loads(row[0])

    def tenant_of_batch(self, batch_id: str) -> str | None:
        with self._db() as db:
            row = db.fetchone("catalogue_get_batch", (batch_id,))
        return row[1] if row else None

    def list_batches(
        self,
        tenant: str,
        api: str,
        limit: int,
        after: str | None = None,
        before: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first. `after`: the page after that batch (older ones); `before`: the page
        before it (newer ones). Also whether more batches lie beyond the page."""
        with self._tx() as db:
            bound = None
            if after is not None or before is not None:
                row = db.fetchone(
                    "catalogue_batch_seq",
                    (after if after is not None else before, tenant, api),
                )
                if row is None:
                    return [], False
                bound = row[0]
            if before is not None:
                rows = db.fetchall("catalogue_batches_newer", (tenant, api, bound, limit + 1))
                more = len(rows) > limit
                rows = rows[:limit][::-1]
            else:
                rows = db.fetchall(
                    "catalogue_batches_older",
                    (tenant, api, bound if bound is not None else 2**62, limit + 1),
                )
                more = len(rows) > limit
                rows = rows[:limit]
        return [orjson.loads(r[0]) for r in rows], more

    def delete_batch(self, tenant: str, batch_id: str) -> bool:
        with self._db() as db:
            return db.execute("catalogue_delete_batch", (batch_id, tenant)) > 0

    def update_batch(
        self, batch_id: str, changes: dict[str, Any], when: tuple[str, ...] | None = None
    ) -> dict[str, Any] | None:
        """Applies `changes` to the batch object, if its status is one of `when` (any status
        when None); the object after, or None when the status did not allow it."""
        with self._tx() as db:
            row = db.fetchone("catalogue_batch_for_update", (batch_id,))
            if row is None:
                return None
            obj = orjson.loads(row[0])
            if when is not None and obj["status"] not in when:
                return None
            obj.update(changes)
            db.execute(
                "catalogue_update_batch", (batch_id, obj["status"], orjson.dumps(obj).decode())
            )
        return obj

    def batches_in(self, statuses: tuple[str, ...]) -> list[str]:
        """Ids of the batches in these statuses, oldest first (start-up resumes them)."""
        with self._db() as db:
            return [r[0] for r in db.fetchall("catalogue_batches_in", (db.array(statuses),))]

    def expiring(self, statuses: tuple[str, ...], now: float) -> tuple[list[str], float | None]:
        """The batches in these statuses whose `expires_at` has passed, oldest first, and the
        earliest `expires_at` still to come among the others (None: none)."""
        with self._tx() as db:
            due = db.fetchall("catalogue_expired", (db.array(statuses), now))
            row = db.fetchone("catalogue_next_expiry", (db.array(statuses), now))
        return [r[0] for r in due], (row[0] if row else None)

    def sizes(self) -> list[tuple[str, str, int]]:
        """(api, status, requests) of every batch (the service's metrics)."""
        with self._db() as db:
            rows = db.fetchall("catalogue_sizes")
        return [(api, status, int(total)) for api, status, total in rows]


def _file(row: tuple[Any, ...]) -> dict[str, Any]:
    file_id, filename, purpose, size, created_at = row
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
