"""What the README promises of a python function's failures: a `ConnectionError` or a
`MemoryError` let through is retried with backoff, up to `max_attempts`, and the ledger's
attempts say how many tries were made."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import orjson

import overnight

FUNCTION = """
import os
SEEN = {seen!r}

def fn(records):
    out = []
    for r in records:
        n = r["n"]
        if n == 13:
            raise MemoryError("never enough for 13")
        mark = os.path.join(SEEN, str(n))
        if n % 4 in (1, 2) and not os.path.exists(mark):  # once per record
            open(mark, "w").close()
            raise ConnectionError(f"reset by peer on {{n}}") if n % 4 == 1 else MemoryError()
        out.append(n * 10)
    return out
"""


def test_connection_and_memory_errors_from_a_function_are_retried(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"k{n}", "n": n}) + b"\n" for n in range(16))
    )
    (tmp_path / "seen").mkdir()
    module = f"fn_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(FUNCTION.format(seen=str(tmp_path / "seen")))
    job = overnight.Job(
        {
            "name": "t",
            "source": {"path": "in.jsonl", "id": "id"},
            "model": {"backend": "python", "function": f"{module}:fn"},
            "run": {"batch_size": 1, "backoff_base": 0.01, "backoff_max": 0.02, "max_attempts": 3},
            "output": {"path": "out.jsonl"},
        },
        base_dir=tmp_path,
    )
    report = job.run()
    assert report.counts["succeeded"] == 15 and report.counts.failed == 1
    rows = {r["id"]: r["output"] for r in map(orjson.loads, (tmp_path / "out.jsonl").open("rb"))}
    assert rows == {f"k{n}": n * 10 for n in range(16) if n != 13}
    (failure,) = job.failures()
    assert failure.custom_id == "k13" and failure.error_class == "MemoryError"
    assert failure.attempts == 3 and "gave up after 3 attempts" in failure.message
    db = sqlite3.connect(tmp_path / ".overnight" / "ledger.db")
    attempts = dict(db.execute("SELECT custom_id, attempts FROM items"))
    db.close()
    # Failed once, then answered: two tries each; the others one. (Batches of one record,
    # so that no split of a failing batch calls the function again in the same attempt.)
    assert {k for k, n in attempts.items() if n == 2} == {
        f"k{n}" for n in range(16) if n % 4 in (1, 2) and n != 13
    }
    assert {k for k, n in attempts.items() if n == 1} == {
        f"k{n}" for n in range(16) if n % 4 in (0, 3)
    }
