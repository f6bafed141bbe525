"""Response cache: request key → the provider's answer, in SQLite.

A response is committed the moment it arrives, before the runner commits the item: a
`kill -9` between the two costs nothing on the rerun, the answer comes from here. Scopes keep
jobs apart (`job:<name>`) unless the user shares one file across jobs (`[run] cache`).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from .requests import Answer

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


class ResponseCache:
    def __init__(self, path: str | Path, scope: str) -> None:
        self.path, self.scope = Path(path), scope
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Used from the real-time client's event-loop thread only, opened on the main one.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, timeout=30.0, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self.hits = 0

    def get_many(self, keys: list[str]) -> dict[str, Answer]:
        found: dict[str, Answer] = {}
        for i in range(0, len(keys), 500):  # SQLite's bound-parameter limit
            part = keys[i : i + 500]
            marks = ", ".join("?" * len(part))
            for key, body, tin, tout in self._db.execute(
                "SELECT key, body, input_tokens, output_tokens FROM responses"
                f" WHERE scope = ? AND key IN ({marks})",
                (self.scope, *part),
            ):
                found[key] = Answer(orjson.loads(body), tin, tout, cached=True)
        self.hits += len(found)
        return found

    def get(self, key: str) -> Answer | None:
        return self.get_many([key]).get(key)

    def put(self, key: str, body: dict[str, Any], input_tokens: int, output_tokens: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
            (self.scope, key, orjson.dumps(body), input_tokens, output_tokens, time.time()),
        )

    def clear_scope(self) -> int:
        return self._db.execute("DELETE FROM responses WHERE scope = ?", (self.scope,)).rowcount

    def close(self) -> None:
        self._db.close()
