"""Shared by the dashboard's tests: a python job whose records fail 1 in 10 until fixed."""

from __future__ import annotations

from pathlib import Path

import orjson

# Records whose n ends in 7 fail (PermanentError) until a file `fixed` sits beside the job.
FUNCTION = """
import os
import time
from overnight import PermanentError
HERE = os.path.dirname(os.path.abspath(__file__))
def f(records):
    time.sleep({sleep})
    out = []
    for r in records:
        if r["n"] % 10 == 7 and not os.path.exists(os.path.join(HERE, "fixed")):
            raise PermanentError(f"record {{r['n']}} is not allowed")
        out.append(r["n"] * 2)
    return out
"""


def flaky_job(folder: Path, n: int = 40, batch_size: int = 4, sleep: float = 0.0) -> Path:
    """`n` records, 1 in 10 failing until `fixed` exists; job.toml, its ledger beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(n))
    )
    (folder / "flaky.py").write_text(FUNCTION.format(sleep=sleep))
    job = folder / "job.toml"
    job.write_text(
        '[source]\npath = "in.jsonl"\nid = "id"\n'
        '[model]\nbackend = "python"\nfunction = "flaky:f"\n'
        f"[run]\nbatch_size = {batch_size}\nmax_attempts = 1\n"
        '[output]\npath = "out.jsonl"\n'
    )
    return job
