"""Ledger cost: N records through a python identity function, JSONL in, JSONL out, end to end
(ingest, process, export), against plain streaming loops with no ledger, in the same run.

    python benchmarks/bench_ledger.py [--records 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import orjson
from common import OUT, overnight_cmd, run_timed

JOB = """\
name = "ledger-bench"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "identity:identity"
[output]
path = "out.jsonl"
"""


def make_input(path: Path, n: int) -> None:
    rng = random.Random(1)
    words = [
        "lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet",
        "consectetur",
        "adipiscing",
        "elit",
        "sed",
        "do",
        "eiusmod",
    ]
    with path.open("wb") as f:
        buf = []
        for i in range(n):
            text = " ".join(rng.choices(words, k=rng.randint(5, 15)))
            buf.append(orjson.dumps({"id": f"r{i}", "text": text, "n": i}) + b"\n")
            if len(buf) >= 10000:
                f.write(b"".join(buf))
                buf = []
        f.write(b"".join(buf))


def identity(records: list) -> list:
    return records


def plain_loop(src: Path, dst: Path, loads, dumps) -> float:
    """The no-ledger baseline: read JSONL, call the function per 1,000, write JSONL."""
    t0 = time.perf_counter()
    with src.open("rb") as f, dst.open("wb") as out:
        batch = []
        for line in f:
            batch.append(loads(line))
            if len(batch) == 1000:
                out.write(b"".join(dumps(r) for r in identity(batch)))
                batch = []
        out.write(b"".join(dumps(r) for r in identity(batch)))
    return time.perf_counter() - t0


def profile(work: Path) -> str:
    """Where the time goes: one more run, in this process, under cProfile (which slows it
    down; read the shares, not the seconds)."""
    import cProfile
    import io
    import os
    import pstats
    import sys

    import overnight

    shutil.rmtree(work / ".overnight", ignore_errors=True)
    cwd = os.getcwd()
    os.chdir(work)
    sys.path.insert(0, str(work))
    try:
        job = overnight.Job.from_file(work / "job.toml")
        prof = cProfile.Profile()
        prof.runcall(job.run)
    finally:
        os.chdir(cwd)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    text = out.getvalue()
    return text[text.index("ncalls") :].rstrip() if "ncalls" in text else text


PG_SERVER = "postgresql://127.0.0.1:5432/test"


def postgres_runs(work: Path, n: int, runs: int) -> list[float]:
    """The same job on a PostgreSQL ledger (a schema of its own, dropped after): seconds of
    each run, each on a fresh schema."""
    import uuid

    import psycopg

    seconds = []
    for _ in range(runs):
        schema = f"bench_ledger_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(PG_SERVER, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
            try:
                url = f"{PG_SERVER}?options=-csearch_path%3D{schema}"
                cmd = [*overnight_cmd(), "run", "job.toml", "--json", "--ledger", url]
                ours = run_timed(cmd, cwd=work)
                assert json.loads(ours.stdout)["succeeded"] == n
                seconds.append(ours.seconds)
            finally:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")
    return seconds


def main(n: int, postgres: int = 2) -> dict:
    work = OUT / "ledger"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make_input(work / "in.jsonl", n)
    (work / "identity.py").write_text("def identity(records):\n    return records\n")
    (work / "job.toml").write_text(JOB)

    # The machine is shared: alternate overnight and the plain loops three times and keep
    # each one's best run. overnight goes first: ru_maxrss of children is a running maximum
    # (see common.run_timed), and no other child is larger.
    runs, orjson_runs, json_runs = [], [], []
    load_before = os.getloadavg()[0]
    for _ in range(3):
        shutil.rmtree(work / ".overnight", ignore_errors=True)  # a fresh job, not a restart
        ours = run_timed([*overnight_cmd(), "run", "job.toml", "--json"], cwd=work)
        report = json.loads(ours.stdout)
        assert report["succeeded"] == n, report
        lines = sum(1 for _ in (work / "out.jsonl").open("rb"))
        assert lines == n, lines
        runs.append((ours.seconds, ours, report))
        orjson_runs.append(
            plain_loop(
                work / "in.jsonl",
                work / "plain.jsonl",
                orjson.loads,
                lambda r: orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE),
            )
        )
        json_runs.append(
            plain_loop(
                work / "in.jsonl",
                work / "plain.jsonl",
                json.loads,
                lambda r: (json.dumps(r) + "\n").encode(),
            )
        )
    load_after = os.getloadavg()[0]
    ledger_bytes = sum(f.stat().st_size for f in (work / ".overnight").glob("ledger.db*"))
    _, ours, report = min(runs, key=lambda r: r[0])
    plain_orjson, plain_json = min(orjson_runs), min(json_runs)
    export = run_timed([*overnight_cmd(), "export", "job.toml"], cwd=work)
    pg = postgres_runs(work, n, postgres) if postgres else []
    return {
        "postgres_items_per_s": n / min(pg) if pg else None,
        "postgres_runs_items_per_s": [round(n / s) for s in pg],
        "profile": profile(work),
        "records": n,
        "overnight_seconds": ours.seconds,
        "overnight_items_per_s": n / ours.seconds,
        "overnight_peak_rss_mb": ours.peak_rss_mb,
        "run_processing_seconds": report["seconds"],
        "export_alone_seconds": export.seconds,
        "plain_orjson_items_per_s": n / plain_orjson,
        "plain_json_items_per_s": n / plain_json,
        "batch_size": report["batch_size"],
        "overnight_runs_items_per_s": [round(n / r[0]) for r in runs],
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "ledger_mb": ledger_bytes / 1e6,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--postgres", type=int, default=2, help="runs on a PostgreSQL ledger")
    a = ap.parse_args()
    print(json.dumps(main(a.records, a.postgres), indent=2))
