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
import asyncio
import json
import os
import shutil
import sys
import time
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


async def _raw_loop(url: str, n: int, concurrency: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=ENV["OPENAI_API_KEY"], max_retries=0)
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"ticket {i}: the invoice total"}],
                max_tokens=16,
                temperature=0,
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return time.perf_counter() - t0


def overhead(n: int, concurrency: int = 64) -> dict[str, Any]:
    folder = OUT / "llm-overhead"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _write_records(folder / "in.jsonl", n)
    best_ours, best_raw = float("inf"), float("inf")
    with FakeProvider(Knobs(latency=0.0)) as fake:
        job = _job(
            folder,
            "ovh",
            f'backend = "openai"\nname = "gpt-4o-mini"\nbase_url = "{fake.openai_url}"\n'
            f"concurrency = {concurrency}",
        )
        for _ in range(2):  # alternate, keep the best of each: the machine is noisy
            (folder / ".overnight").exists() and shutil.rmtree(folder / ".overnight")
            _, report = _run(job)
            best_ours = min(best_ours, report["seconds"])
            best_raw = min(best_raw, asyncio.run(_raw_loop(fake.openai_url, n, concurrency)))
    return {
        "requests": n,
        "concurrency": concurrency,
        "overnight_seconds": best_ours,
        "raw_seconds": best_raw,
        "overnight_requests_per_s": n / best_ours,
        "raw_requests_per_s": n / best_raw,
        "overhead_ms_per_request": (best_ours - best_raw) / n * 1000,
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
    sys.stdout.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
