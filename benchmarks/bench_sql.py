"""Reading a large SQL table through the SQL source (keyset pages), and optionally a whole job
from a table into a results table, with the peak RSS of the process that does it.

    python benchmarks/bench_sql.py [--rows 1000000] [--url postgresql://127.0.0.1:5432/test]
                                   [--job-rows 100000]

The table lives in a schema of its own (dropped at the end). Each measurement runs in a child
process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

from common import OUT, machine, overnight_cmd, run_timed

HERE = Path(__file__).resolve().parent
PG_URL = "postgresql://127.0.0.1:5432/test"


def sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


def make_table(url: str, table: str, rows: int) -> float:
    import sqlalchemy as sa

    t0 = time.perf_counter()
    engine = sa.create_engine(sa_url(url))
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {table} (id bigint PRIMARY KEY, body text, n int,"
                " price numeric(10, 2), created timestamp)"
            )
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {table} SELECT i, 'ticket ' || i || ' about something broken"
                " in the export screen again', i % 1000, (i % 10000) / 100.0,"
                " timestamp '2026-01-01' + i * interval '1 second'"
                " FROM generate_series(1, :n) AS i"
            ),
            {"n": rows},
        )
    engine.dispose()
    return time.perf_counter() - t0


def child_read(url: str, table: str) -> None:
    """Read the whole table through SqlSource.read, as an ingest does; print rows and time."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from overnight.records import Cursor
    from overnight.sql_source import SqlSource
    from overnight.sqldb import parse_url

    source = SqlSource(parse_url(url, Path.cwd(), "url"), "id", table)
    t0 = time.perf_counter()
    n = 0
    for rows in source.read(Cursor(), 2000):
        n += len(rows)
    print(json.dumps({"rows": n, "seconds": time.perf_counter() - t0}))


def main(url: str, rows: int, job_rows: int) -> dict:
    import sqlalchemy as sa

    schema = f"bench_sql_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(sa_url(url))
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    out: dict = {"machine": machine(), "url": url, "rows": rows}
    work = OUT / "sql"
    work.mkdir(parents=True, exist_ok=True)
    try:
        out["fill_seconds"] = make_table(url, f"{schema}.items", rows)
        timed = run_timed(
            [sys.executable, __file__, "--child-read", "--url", url, "--table", f"{schema}.items"],
            cwd=work,
        )
        got = json.loads(timed.stdout.strip().splitlines()[-1])
        out["read"] = {
            "rows": got["rows"],
            "seconds": round(got["seconds"], 2),
            "rows_per_second": round(got["rows"] / got["seconds"]),
            "peak_rss_mb": round(timed.peak_rss_mb, 1),
        }
        if job_rows:
            table = f"{schema}.job_items"
            make_table(url, table, job_rows)
            (work / "identity.py").write_text("def identity(records):\n    return records\n")
            (work / ".overnight").mkdir(exist_ok=True)
            for f in (work / ".overnight").iterdir():
                f.unlink()
            (work / "job.toml").write_text(
                f'name = "sql-bench"\n[source]\nurl = "{url}"\ntable = "{table}"\nid = "id"\n'
                '[model]\nbackend = "python"\nfunction = "identity:identity"\n'
                f'[output]\nurl = "{url}"\ntable = "{schema}.results"\n'
                'columns = { n = "n" }\n'
            )
            timed = run_timed([*overnight_cmd(), "run", "job.toml"], cwd=work)
            out["job"] = {
                "rows": job_rows,
                "seconds": round(timed.seconds, 2),
                "rows_per_second": round(job_rows / timed.seconds),
                "peak_rss_mb": round(timed.peak_rss_mb, 1),
            }
            timed = run_timed([*overnight_cmd(), "run", "job.toml"], cwd=work)
            out["job_rerun_unchanged_seconds"] = round(timed.seconds, 2)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default=PG_URL)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--job-rows", type=int, default=100_000)
    parser.add_argument("--child-read", action="store_true")
    parser.add_argument("--table")
    a = parser.parse_args()
    if a.child_read:
        child_read(a.url, a.table)
    else:
        os.environ.setdefault("PYTHONPATH", str(HERE.parent / "src"))
        print(json.dumps(main(a.url, a.rows, a.job_rows), indent=2))
