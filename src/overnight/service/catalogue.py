"""The service's catalogue: its files and batches, one SQLite file in the service's folder.

The items of a batch, their states and results are the ledger's (a batch is a ledger job
named after it); the catalogue holds what OpenAI's API shows about files and batches: owner
(tenant), names, sizes, the batch object and its status. It is SQLite in the folder whatever
the ledger is, because the folder also holds the files' bytes (written once, served as they
are): the two move, and are backed up, together. Every write is one transaction; a change of
a batch's status names the statuses it may change from, so two threads (the batch's runner
and a cancel) never both win.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    api TEXT NOT NULL,  -- 'openai' or 'anthropic': each API lists its own batches
    status TEXT NOT NULL,
    object TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_status ON batches (status);
"""

_FILE_COLUMNS = "id, filename, purpose, bytes, created_at"


class Catalogue:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30)
        try:
            db.executescript(_SCHEMA)  # commits by itself
        finally:
            db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # -- files ----------------------------------------------------------------------------

    def add_file(self, tenant: str, obj: dict[str, Any]) -> None:
        """Records a file (its bytes are already in place); the same id again replaces it."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO files (id, tenant, filename, purpose, bytes, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " bytes = excluded.bytes, filename = excluded.filename",
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
        with self._tx() as db:
            row = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ? AND tenant = ?",
                (file_id, tenant),
            ).fetchone()
        return _file(row) if row else None

    def list_files(
        self, tenant: str, after: str | None, limit: int, order: str, purpose: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        desc = order == "desc"
        where, params = ["tenant = ?"], [tenant]
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        with self._tx() as db:
            if after is not None:
                row = db.execute(
                    "SELECT seq FROM files WHERE id = ? AND tenant = ?", (after, tenant)
                ).fetchone()
                if row is None:
                    return [], False
                where.append("seq < ?" if desc else "seq > ?")
                params.append(row[0])
            rows = db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE {' AND '.join(where)}"
                f" ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?",
                (*params, limit + 1),
            ).fetchall()
        return [_file(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
        return cur.rowcount > 0

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
        in one transaction, so two creates at once cannot both slip under the limit)."""
        with self._tx() as db:
            if max_active is not None:
                marks = ",".join("?" * len(active))
                (n,) = db.execute(
                    f"SELECT count(*) FROM batches WHERE tenant = ? AND status IN ({marks})",
                    (tenant, *active),
                ).fetchone()
                if n >= max_active:
                    return int(n)
            db.execute(
                "INSERT INTO batches (id, tenant, api, status, object) VALUES (?, ?, ?, ?, ?)",
                (obj["id"], tenant, obj["api"], obj["status"], orjson.dumps(obj).decode()),
            )
        return None

    def get_batch(self, batch_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The batch object; with `tenant`, only that tenant's."""
        with self._tx() as db:
            row = db.execute(
                "SELECT object, tenant FROM batches WHERE id = ?", (batch_id,)
            ).fetchone()
        if row is None or (tenant is not None and row[1] != tenant):
            return None
        return orjson.loads(row[0])

    def tenant_of_batch(self, batch_id: str) -> str | None:
        with self._tx() as db:
            row = db.execute("SELECT tenant FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return row[0] if row else None

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
                row = db.execute(
                    "SELECT seq FROM batches WHERE id = ? AND tenant = ? AND api = ?",
                    (after if after is not None else before, tenant, api),
                ).fetchone()
                if row is None:
                    return [], False
                bound = row[0]
            if before is not None:
                rows = db.execute(
                    "SELECT object FROM batches WHERE tenant = ? AND api = ? AND seq > ?"
                    " ORDER BY seq ASC LIMIT ?",
                    (tenant, api, bound, limit + 1),
                ).fetchall()
                more = len(rows) > limit
                rows = rows[:limit][::-1]
            else:
                rows = db.execute(
                    "SELECT object FROM batches WHERE tenant = ? AND api = ? AND seq < ?"
                    " ORDER BY seq DESC LIMIT ?",
                    (tenant, api, bound if bound is not None else 2**62, limit + 1),
                ).fetchall()
                more = len(rows) > limit
                rows = rows[:limit]
        return [orjson.loads(r[0]) for r in rows], more

    def delete_batch(self, tenant: str, batch_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant))
        return cur.rowcount > 0

    def update_batch(
        self, batch_id: str, changes: dict[str, Any], when: tuple[str, ...] | None = None
    ) -> dict[str, Any] | None:
        """Applies `changes` to the batch object, if its status is one of `when` (any status
        when None); the object after, or None when the status did not allow it."""
        with self._tx() as db:
            row = db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                return None
            obj = orjson.loads(row[0])
            if when is not None and obj["status"] not in when:
                return None
            obj.update(changes)
            db.execute(
                "UPDATE batches SET status = ?, object = ? WHERE id = ?",
                (obj["status"], orjson.dumps(obj).decode(), batch_id),
            )
        return obj

    def batches_in(self, statuses: tuple[str, ...]) -> list[str]:
        """Ids of the batches in these statuses, oldest first (start-up resumes them)."""
        marks = ",".join("?" * len(statuses))
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY seq", statuses
            ).fetchall()
        return [r[0] for r in rows]

    def expiring(self, statuses: tuple[str, ...], now: float) -> tuple[list[str], float | None]:
        """The batches in these statuses whose `expires_at` has passed, oldest first, and the
        earliest `expires_at` still to come among the others (None: none)."""
        marks = ",".join("?" * len(statuses))
        with self._tx() as db:
            due = db.execute(
                f"SELECT id FROM batches WHERE status IN ({marks})"
                " AND json_extract(object, '$.expires_at') <= ? ORDER BY seq",
                (*statuses, now),
            ).fetchall()
            (upcoming,) = db.execute(
                f"SELECT min(json_extract(object, '$.expires_at')) FROM batches"
                f" WHERE status IN ({marks}) AND json_extract(object, '$.expires_at') > ?",
                (*statuses, now),
            ).fetchone()
        return [r[0] for r in due], upcoming

    def sizes(self) -> list[tuple[str, str, int]]:
        """(api, status, requests) of every batch (the service's metrics)."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT api, status, coalesce(json_extract(object, '$.request_counts.total'), 0)"
                " FROM batches"
            ).fetchall()
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
