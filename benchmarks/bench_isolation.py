"""What `[run] isolation = "process"` costs against `"none"`, in the same run: the 1M-record
python identity job (the cheapest function there is: the worst case for a worker process)
and the local model embedding 20,000 texts; plus what counting attempts when they start
costs (the in-flight mark written before each call).

    python benchmarks/bench_isolation.py [--records 1000000] [--texts 20000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from bench_ledger import make_input
from bench_local import make_texts
from common import OUT, overnight_cmd, run_timed

LEDGER_JOB = """\
name = "isolation-{isolation}"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "identity:identity"
[run]
isolation = "{isolation}"
[output]
path = "out-{isolation}.jsonl"
"""

LOCAL_JOB = """\
name = "embed-{isolation}"
[source]
path = "texts.jsonl"
id = "id"
[task]
kind = "embed"
text = "{{{{ text }}}}"
[model]
backend = "local"
name = "all-MiniLM-L6-v2"
[run]
batch_size = {batch_size}
isolation = "{isolation}"
[output]
path = "vectors-{isolation}.jsonl"
"""

ISOLATIONS = ("process", "none")


def ledger(n: int, rounds: int = 3) -> dict:
    """`overnight run` as a process, end to end (start-up, ingest, compute, commit, export),
    alternating the two isolations; each keeps its best wall time."""
    work = OUT / "isolation-ledger"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make_input(work / "in.jsonl", n)
    (work / "identity.py").write_text("def identity(records):\n    return records\n")
    runs: dict[str, list[float]] = {i: [] for i in ISOLATIONS}
    cpu: dict[str, list[float]] = {i: [] for i in ISOLATIONS}
    reports: dict[str, dict] = {}
    for _ in range(rounds):
        for isolation in ISOLATIONS:
            (work / f"{isolation}.toml").write_text(LEDGER_JOB.format(isolation=isolation))
            shutil.rmtree(work / ".overnight", ignore_errors=True)
            before = _children_cpu()
            timed = run_timed([*overnight_cmd(), "run", f"{isolation}.toml", "--json"], cwd=work)
            cpu[isolation].append(_children_cpu() - before)
            report = json.loads(timed.stdout)
            assert report["succeeded"] == n, report
            runs[isolation].append(timed.seconds)
            reports[isolation] = report
    best = {i: min(runs[i]) for i in ISOLATIONS}
    return {
        "records": n,
        "items_per_s": {i: n / best[i] for i in ISOLATIONS},
        "runs_items_per_s": {i: [round(n / s) for s in runs[i]] for i in ISOLATIONS},
        # user + system CPU of the run (runner and worker), per record: steadier than wall
        # time on a machine that others share
        "cpu_us_per_record": {i: min(cpu[i]) / n * 1e6 for i in ISOLATIONS},
        "batch_size": {i: reports[i]["batch_size"] for i in ISOLATIONS},
    }


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (a worker counts in its runner's)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def marks(n: int) -> dict:
    """One more run of the identity job (isolation = "none"), in this process, timing every
    in-flight mark the runner writes (the benchmark wraps the ledger method)."""
    import os
    import sys

    import overnight
    from overnight.store.sqlite import SQLiteLedger

    work = OUT / "isolation-ledger"
    spent: list[float] = []
    mark = SQLiteLedger.mark_inflight

    def timed(self, *args):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        mark(self, *args)
        spent.append(time.perf_counter() - t0)

    shutil.rmtree(work / ".overnight", ignore_errors=True)
    cwd = os.getcwd()
    os.chdir(work)
    sys.path.insert(0, str(work))
    SQLiteLedger.mark_inflight = timed  # type: ignore[method-assign]
    try:
        report = overnight.Job.from_file(work / "none.toml").run()
    finally:
        SQLiteLedger.mark_inflight = mark  # type: ignore[method-assign]
        os.chdir(cwd)
    spent.sort()
    return {
        "records": n,
        "marks": len(spent),
        "seconds": sum(spent),
        "median_us": spent[len(spent) // 2] * 1e6,
        "run_seconds": report.seconds,
        "batch_size": report.batch_size,
    }


def local(n: int, batch_size: int, rounds: int = 2) -> dict:
    """The embedding job at a fixed batch size, alternating the two isolations; each keeps
    its best processing throughput (the report's items/s, model load left out)."""
    work = OUT / "isolation-local"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    import orjson

    with (work / "texts.jsonl").open("wb") as f:
        for i, t in enumerate(make_texts(n)):
            f.write(orjson.dumps({"id": i, "text": t}) + b"\n")
    rates: dict[str, list[float]] = {i: [] for i in ISOLATIONS}
    setup: dict[str, list[float]] = {i: [] for i in ISOLATIONS}
    for _ in range(rounds):
        for isolation in ISOLATIONS:
            job = work / f"{isolation}.toml"
            job.write_text(LOCAL_JOB.format(isolation=isolation, batch_size=batch_size))
            timed = run_timed([*overnight_cmd(), "run", job.name, "--json", "--restart"], cwd=work)
            report = json.loads(timed.stdout)
            assert report["succeeded"] == n, report
            rates[isolation].append(report["items_per_second"])
            setup[isolation].append(report["setup_seconds"])
    return {
        "texts": n,
        "batch_size": batch_size,
        "items_per_s": {i: max(rates[i]) for i in ISOLATIONS},
        "runs_items_per_s": {i: [round(r, 1) for r in rates[i]] for i in ISOLATIONS},
        "setup_seconds": {i: min(setup[i]) for i in ISOLATIONS},
    }


def main(records: int, texts: int, batch_size: int = 32) -> dict:
    result = {"ledger": ledger(records)}
    result["marks"] = marks(records)
    result["local"] = local(texts, batch_size)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--texts", type=int, default=20_000)
    a = ap.parse_args()
    print(json.dumps(main(a.records, a.texts), indent=2))
