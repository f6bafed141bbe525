"""How far one ledger carries a Ray job (docs/ray.md): the real ledger (SQLite, PostgreSQL)
driven by D simulated drivers, each a process of its own that does what the Ray executor's
driver does with the ledger and nothing else (actors answer at once): lease a page of P
items, complete it (every item succeeded, a ~100-byte result), renew its leases after each
page (the worst case: the executor renews every lease_seconds / 3). Measures items/s and the
ledger round trips per item, for page sizes and numbers of drivers.

    python benchmarks/sim_ledger_scale.py [--items 40000] [--pages 16,64,256,1024]
        [--drivers 1,2,4] [--backends sqlite,postgresql]

One job, its items ingested first (pending), as the executor's driver does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import orjson

from overnight.records import Cursor, Fingerprint, Row
from overnight.store import Lease, Outcome, open_ledger

PG_SERVER = "postgresql://127.0.0.1:5432/test"
RESULT = orjson.dumps({"output": {"label": "billing", "score": 0.93, "tokens": list(range(8))}})


def ingest(url: str, n: int) -> int:
    ledger = open_ledger(url)
    job = ledger.create_job("sim", "h", Fingerprint(1, 1, "d"))
    chunk = 10_000
    for first in range(0, n, chunk):
        rows = [
            Row(i + 1, f"r{i}", orjson.dumps({"id": f"r{i}", "text": "t" * 60}), None, None)
            for i in range(first, min(n, first + chunk))
        ]
        ledger.add_items(job.id, first, rows, Cursor(first + len(rows), first + len(rows) + 1))
    ledger.finish_ingest(job.id)
    ledger.close()
    return job.id


def driver(url: str, job_id: int, page: int, start: mp.Event, out: mp.Queue) -> None:  # type: ignore[type-arg]
    ledger = open_ledger(url)
    owner = f"sim:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    start.wait()
    done = trips = 0
    while True:
        now = time.time()
        items = ledger.lease(job_id, page, Lease(owner, now + 300, now))
        trips += 1
        if not items:
            break
        ledger.complete(
            job_id, owner, [Outcome(it.seq, "succeeded", RESULT) for it in items], time.time()
        )
        ledger.renew(job_id, owner, time.time() + 300)
        trips += 2
        done += len(items)
    ledger.close()
    out.put((done, trips))


def measure(url: str, n: int, page: int, drivers: int) -> dict:
    job_id = ingest(url, n)
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=driver, args=(url, job_id, page, start, out)) for _ in range(drivers)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)  # connected and waiting
    t0 = time.perf_counter()
    start.set()
    results = [out.get() for _ in procs]
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join()
    done = sum(r[0] for r in results)
    trips = sum(r[1] for r in results)
    assert done == n, (done, n)
    return {
        "page": page,
        "drivers": drivers,
        "items_per_s": round(n / seconds),
        "round_trips_per_item": round(trips / n, 4),
        "seconds": round(seconds, 2),
    }


def sqlite_url() -> tuple[str, Path]:
    folder = Path(tempfile.mkdtemp(prefix="simledger"))
    return str(folder / "ledger.db"), folder


def main(n: int, pages: list[int], drivers: list[int], backends: list[str]) -> dict:
    rows = []
    for backend in backends:
        for page in pages:
            for d in drivers:
                if backend == "sqlite":
                    url, folder = sqlite_url()
                    try:
                        r = measure(url, n, page, d)
                    finally:
                        shutil.rmtree(folder, ignore_errors=True)
                else:
                    import psycopg

                    schema = f"sim_{uuid.uuid4().hex[:10]}"
                    with psycopg.connect(PG_SERVER, autocommit=True) as admin:
                        admin.execute(f"CREATE SCHEMA {schema}")
                        try:
                            r = measure(f"{PG_SERVER}?options=-csearch_path%3D{schema}", n, page, d)
                        finally:
                            admin.execute(f"DROP SCHEMA {schema} CASCADE")
                r["backend"] = backend
                print(json.dumps(r), flush=True)
                rows.append(r)
    return {"items": n, "cpus": os.cpu_count(), "load_average": os.getloadavg(), "runs": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=40_000)
    ap.add_argument("--pages", default="16,64,256,1024")
    ap.add_argument("--drivers", default="1,2,4")
    ap.add_argument("--backends", default="sqlite,postgresql")
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    result = main(a.items, ints(a.pages), ints(a.drivers), a.backends.split(","))
    print(json.dumps(result, indent=2))
