"""LLM backends against the fake provider (real HTTP on loopback, official SDKs as clients).

1. Real-time saturation: N requests, 50 ms latency, `rpm = 6000` on both sides: the achieved
   rate against the limit, items lost, 429s not retried.
2. Overhead per request: a zero-latency server at high concurrency, overnight (ledger,
   limiter, cache, retries) against a bare AsyncOpenAI loop with the same concurrency.
3. Batch file building: N requests ingested, split into files, written and uploaded to the
   fake's Files API and submitted: MB/s and peak RSS of the process.

python benchmarks/bench_llm.py [--requests N] [--overhead N] [--batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from common import OUT, overnight_cmd, run_timed

from overnight.testing.fake_provider import FakeProvider, Knobs

ENV = {"OPENAI_API_KEY": "sk-bench-not-a-real-key"}


def _write_records(path: Path, n: int) -> None:
    with path.open("wb") as f:
        for i in range(n):
            f.write(
                orjson.dumps({"id": f"r{i}", "text": f"ticket {i}: the invoice total looks wrong"})
                + b"\n"
            )


def _job(folder: Path, name: str, model: str, run: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        f"""
[source]
path = "in.jsonl"
id = "id"

[task]
kind = "generate"
text = "Summarise in five words: {{{{ text }}}}"

[model]
{model}
params = {{ max_tokens = 16, temperature = 0 }}

[run]
max_attempts = 8
{run}

[output]
path = "{name}.out.jsonl"
"""
    )
    return path


def _run(job: Path) -> tuple[Any, dict[str, Any]]:
    timed = run_timed([*overnight_cmd(), "run", str(job), "--json"], job.parent, ENV)
    return timed, json.loads(timed.stdout)


def saturation(n: int) -> dict[str, Any]:
    folder = OUT / "llm-saturation"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _write_records(folder / "in.jsonl", n)
    with FakeProvider(Knobs(latency=0.05, rpm_limit=6000)) as fake:
        job = _job(
            folder,
            "sat",
            f'backend = "openai"\nname = "gpt-4o-mini"\nbase_url = "{fake.openai_url}"\n'
            "rpm = 6000\nconcurrency = 32",
        )
        timed, report = _run(job)
        status = dict(fake.stats.status_counts)
        sent = sum(fake.stats.requests.values())
    secs = report["seconds"]
    return {
        "requests": n,
        "succeeded": report["succeeded"],
        "lost": n - report["succeeded"] - report["failed"] - report["invalid"],
        "failed": report["failed"],
        "seconds": secs,
        "wall_seconds": timed.seconds,
        "requests_per_s": report["processed"] / secs,
        "limit_per_s": 100.0,
        "tokens_per_s": (report["input_tokens"] + report["output_tokens"]) / secs,
        "http_requests": sent,
        "status_counts": status,
        "rate_limited": status.get(429, 0),
        "peak_rss_mb": timed.peak_rss_mb,
    }


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _raw_loop(url: str, n: int, concurrency: int) -> float:
    """The bare SDK loop, as its own process (the fake server runs in this one)."""
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("raw_openai_loop.py")),
            url,
            str(n),
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip())


def overhead(n: int, concurrency: int = 64) -> dict[str, Any]:
    folder = OUT / "llm-overhead"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _write_records(folder / "in.jsonl", n)
    best_ours = best_raw = cpu_ours = cpu_raw = float("inf")
    with FakeProvider(Knobs(latency=0.0)) as fake:
        job = _job(
            folder,
            "ovh",
            f'backend = "openai"\nname = "gpt-4o-mini"\nbase_url = "{fake.openai_url}"\n'
            f"concurrency = {concurrency}",
        )
        for _ in range(2):  # alternate, keep the best of each: the machine is noisy
            (folder / ".overnight").exists() and shutil.rmtree(folder / ".overnight")
            c0 = _cpu()
            _, report = _run(job)
            c1 = _cpu()
            raw = _raw_loop(fake.openai_url, n, concurrency)
            c2 = _cpu()
            best_ours = min(best_ours, report["seconds"])
            best_raw = min(best_raw, raw)
            cpu_ours = min(cpu_ours, c1 - c0)
            cpu_raw = min(cpu_raw, c2 - c1)
    return {
        "requests": n,
        "concurrency": concurrency,
        "overnight_seconds": best_ours,
        "raw_seconds": best_raw,
        "overnight_requests_per_s": n / best_ours,
        "raw_requests_per_s": n / best_raw,
        "overhead_ms_per_request": (best_ours - best_raw) / n * 1000,
        # CPU of the client process (start-up included): what a request costs the client.
        "overnight_cpu_ms_per_request": cpu_ours / n * 1000,
        "raw_cpu_ms_per_request": cpu_raw / n * 1000,
    }


def batch_files(n: int) -> dict[str, Any]:
    """`overnight run --detach` on openai-batch: ingest N records, build the request files
    (split at 50,000 requests / 200 MB), upload each to the fake's Files API and create the
    batches. The fake's batches are left running; the figure is overnight's side."""
    folder = OUT / "llm-batch"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _write_records(folder / "in.jsonl", n)
    with FakeProvider(Knobs(batch_seconds=3600)) as fake:
        job = _job(
            folder,
            "batch",
            f'backend = "openai-batch"\nname = "gpt-4o-mini"\nbase_url = "{fake.openai_url}"',
        )
        timed = run_timed(
            [*overnight_cmd(), "run", str(job), "--detach", "--json"], job.parent, ENV
        )
        uploaded = fake.stats.bytes_uploaded
        files = fake.stats.files_uploaded
        creations = fake.stats.batch_creations
        items = sum(fake.stats.batch_items.values())
    return {
        "requests": n,
        "items_submitted": items,
        "batches": creations,
        "files": files,
        "mb_uploaded": uploaded / 1e6,
        "seconds": timed.seconds,
        "mb_per_s": uploaded / 1e6 / timed.seconds,
        "requests_per_s": n / timed.seconds,
        "peak_rss_mb": timed.peak_rss_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--overhead", type=int, default=5_000)
    ap.add_argument("--batch", type=int, default=1_000_000)
    ap.add_argument("--only", choices=["saturation", "overhead", "batch"])
    a = ap.parse_args()
    out: dict[str, Any] = {}
    if a.only in (None, "saturation"):
        out["saturation"] = saturation(a.requests)
    if a.only in (None, "overhead"):
        out["overhead"] = overhead(a.overhead)
    if a.only in (None, "batch"):
        out["batch_files"] = batch_files(a.batch)
    sys.stdout.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
