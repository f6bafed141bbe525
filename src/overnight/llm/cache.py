"""Response cache: request key → the provider's answer, in SQLite, or in the ledger itself
when the ledger is PostgreSQL (`LedgerResponseCache`: every worker shares it).

A response is committed the moment it arrives, before the runner commits the item: a
`kill -9` between the two costs nothing on the rerun, the answer comes from here. Scopes keep
jobs apart (`job:<name>`) unless the user shares one file across jobs (`[run] cache`).

The key is `cache_key(provider, endpoint, body)` (defined beside the requests it keys, in
`requests.py`, and re-exported here).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from ..errors import UsageError
from ..store.sqlite import switch_to_wal
from .requests import Answer, cache_key

__all__ = ["SCHEMA", "Answer", "LedgerResponseCache", "ResponseCache", "cache_key"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    scope         TEXT NOT NULL,
    key           TEXT NOT NULL,
    body          BLOB NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
"""
_MAX_PARAMS = 500  # keys per query: under SQLite's bound-parameter limit


class ResponseCache:
    """One connection of its own. Several processes may use one file at once (WAL, a busy
    timeout); within this process any thread may call it (a lock serialises the connection)."""

    def __init__(self, path: str | Path, scope: str) -> None:
        self.path, self.scope = Path(path), scope
        self.hits = 0
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Opened on the main thread, used from the real-time client's event-loop thread.
            # isolation_level=None: autocommit, each put is its own committed transaction.
            self._db = sqlite3.connect(
                self.path, isolation_level=None, timeout=30.0, check_same_thread=False
            )
            switch_to_wal(self._db, timeout=30.0)
            # NORMAL in WAL mode: a commit survives the process being killed (the OS has the
            # WAL); only a power cut can lose the last ones, which costs at most a re-send.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UsageError(f"{self.path}: not a usable response cache: {exc}") from None

    def get_many(self, keys: Iterable[str]) -> dict[str, Answer]:
        """The cached answers among `keys` (missing keys are absent), marked `cached=True`."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Answer] = {}
        with self._lock:
            for i in range(0, len(wanted), _MAX_PARAMS):
                part = wanted[i : i + _MAX_PARAMS]
                marks = ", ".join("?" * len(part))
                rows = self._db.execute(
                    "SELECT key, body, input_tokens, output_tokens FROM responses"
                    f" WHERE scope = ? AND key IN ({marks})",
                    (self.scope, *part),
                )
                for key, body, tin, tout in rows:
                    found[key] = Answer(orjson.loads(body), tin, tout, cached=True)
            self.hits += len(found)
        return found

    def get(self, key: str) -> Answer | None:
        return self.get_many([key]).get(key)

    def put(self, key: str, body: dict[str, Any], input_tokens: int, output_tokens: int) -> None:
        """Committed before it returns: a paid answer is durable the moment it arrives."""
        row = (self.scope, key, orjson.dumps(body), input_tokens, output_tokens, time.time())
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)

    def clear_scope(self) -> int:
        """Forget this scope's answers (other scopes in a shared file are kept)."""
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE scope = ?", (self.scope,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LedgerResponseCache(ResponseCache):
    """The cache as the ledger's `responses` table, on a connection of its own: the workers
    of one job on a shared (PostgreSQL) ledger get the answers any of them paid for."""

    def __init__(self, ledger_url: str, scope: str) -> None:
        from ..store import open_ledger

        self.path, self.scope = Path("ledger"), scope  # no file of its own
        self.hits = 0
        self._lock = threading.Lock()
        self._ledger = open_ledger(ledger_url)

    def get_many(self, keys: Iterable[str]) -> dict[str, Answer]:
        wanted = list(dict.fromkeys(keys))
        with self._lock:
            rows = self._ledger.cache_get(self.scope, wanted) if wanted else []
            found = {
                key: Answer(orjson.loads(body), tin, tout, cached=True)
                for key, body, tin, tout in rows
            }
            self.hits += len(found)
        return found

    def put(self, key: str, body: dict[str, Any], input_tokens: int, output_tokens: int) -> None:
        with self._lock:
            self._ledger.cache_put(self.scope, key, orjson.dumps(body), input_tokens, output_tokens)

    def clear_scope(self) -> int:
        with self._lock:
            return int(self._ledger.cache_clear(self.scope))

    def close(self) -> None:
        with self._lock:
            self._ledger.close()
