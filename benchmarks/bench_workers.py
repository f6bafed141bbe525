"""Several workers on one job: a python function that sleeps 20 ms per batch of 100 records
(a stand-in for a model call that waits on a device or a server), run by 1 worker, then by 4
workers (`overnight run` started 4 times at once on one job), in the same run. The goal is
at least 3.2x with 4 workers. Wall time from the first start to the last exit, each on a
fresh ledger; every record is checked to be computed once.

    python benchmarks/bench_workers.py [--records 100000] [--workers 4]
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import shutil
import subprocess
import time
from pathlib import Path

import orjson
from common import OUT, machine, overnight_cmd

FUNCTION = """
import os, time
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
def fn(records):
    time.sleep(0.02)
    with open(LOG, "a") as f:
        f.write(str(os.getpid()) + " " + str(len(records)) + "\\n")
    return [r["n"] for r in records]
"""

JOB = """\
name = "workers-bench"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "sleepfn:fn"
[run]
batch_size = 100
[output]
path = "out.jsonl"
"""


def run(folder: Path, n: int, workers: int) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with (folder / "in.jsonl").open("wb") as f:
        f.write(b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(n)))
    (folder / "sleepfn.py").write_text(FUNCTION)
    (folder / "job.toml").write_text(JOB)
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*overnight_cmd(), "--quiet", "run", "job.toml"],
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    errors = [p.communicate()[1] for p in procs]
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    if any(p.returncode != 0 for p in procs):
        raise SystemExit(f"a worker failed: {errors}")
    per_worker: collections.Counter[str] = collections.Counter()
    for line in (folder / "calls.log").read_text().splitlines():
        pid, count = line.split()
        per_worker[pid] += int(count)
    computed = sum(per_worker.values())
    lines = (folder / "out.jsonl").read_bytes().count(b"\n")
    assert computed == n == lines, (computed, n, lines)  # each record once, all exported
    return {
        "workers": workers,
        "seconds": round(seconds, 2),
        "records_per_second": round(n / seconds),
        "cpu_seconds": round(cpu, 2),  # of the workers and their function processes
        "records_per_worker": sorted(per_worker.values(), reverse=True),
    }


def main(n: int, workers: int) -> dict:
    work = OUT / "workers"
    one = run(work / "one", n, 1)
    many = run(work / "many", n, workers)
    return {
        "machine": machine(),
        "records": n,
        "one": one,
        "many": many,
        "speedup": round(one["seconds"] / many["seconds"], 2),
        "ideal_compute_seconds": {"one": n / 100 * 0.02, "many": n / 100 * 0.02 / workers},
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    print(json.dumps(main(a.records, a.workers), indent=2))
