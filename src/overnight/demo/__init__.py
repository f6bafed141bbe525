"""`overnight demo`: the seed's own example. A week of synthetic support tickets is classified
on the embedded model for a weekly report: counts per category, accuracy against the
generator's labels, throughput, failures, and a chart of tickets per category per day.

The demo writes a real job file beside its data, so `overnight run|status|failures|export`
work on it afterwards exactly as on the user's own jobs.
"""

from __future__ import annotations

import csv
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..job import Job, Report
from ..runner import Progress
from .tickets import (
    CATEGORIES,
    generate_tickets,
    write_labelled_csv,
    write_tickets_csv,
    write_truth_csv,
)

LABELLED_EXAMPLES = 200

JOB_TEMPLATE = """\
# Written by `overnight demo`. Run it yourself: overnight run {job_name}
name = "ticket-triage"

[source]
path = "tickets.csv"
id = "ticket_id"

[task]
kind = "classify"
text = "{{{{ subject }}}}\\n\\n{{{{ body }}}}"
examples = "labelled.csv"   # {examples} labelled tickets: a classifier head is fitted on them

[task.labels]
{labels}

[model]
backend = "local"
name = "all-MiniLM-L6-v2"
device = "auto"

[run]
batch_size = "auto"
max_attempts = 3

[output]
path = "triaged.jsonl"
errors = "triaged.errors.jsonl"
include = ["created_at", "product", "channel"]
"""


@dataclass
class DemoResult:
    directory: Path
    job_file: Path
    tickets: int
    report: Report
    per_category: dict[str, int] = field(default_factory=dict)
    accuracy: float | None = None
    chart: Path | None = None
    seconds: float = 0.0


def write_demo_files(directory: Path, tickets: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = generate_tickets(tickets, seed=seed)
    write_tickets_csv(data, directory / "tickets.csv")
    write_truth_csv(data, directory / "truth.csv")
    # Labelled examples come from another seed: the head never sees the tickets it grades.
    write_labelled_csv(
        generate_tickets(LABELLED_EXAMPLES, seed=seed + 1000), directory / "labelled.csv"
    )
    labels = "\n".join(f'"{k}" = "{v}"' for k, v in CATEGORIES.items())
    job_file = directory / "triage.toml"
    job_file.write_text(
        JOB_TEMPLATE.format(job_name=job_file, labels=labels, examples=LABELLED_EXAMPLES),
        encoding="utf-8",
    )
    return job_file


def run_demo(
    directory: Path,
    tickets: int = 2000,
    seed: int = 7,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
) -> DemoResult:
    t0 = time.monotonic()
    directory = Path(directory).resolve()
    job_file = write_demo_files(directory, tickets, seed)
    job = Job.from_file(job_file)
    report = job.run(restart=True, on_progress=on_progress, stop=stop)
    result = DemoResult(directory, job_file, tickets, report)
    if report.output is None:  # interrupted: nothing exported to report on
        result.seconds = time.monotonic() - t0
        return result

    with open(directory / "truth.csv", newline="", encoding="utf-8") as f:
        truth = {row["ticket_id"]: row["category"] for row in csv.DictReader(f)}
    per_category: Counter[str] = Counter()
    per_day: list[tuple[str, str]] = []
    right = 0
    with open(report.output, "rb") as f:
        for line in f:
            row = orjson.loads(line)
            per_category[row["output"]] += 1
            per_day.append((row["created_at"], row["output"]))
            right += row["output"] == truth.get(row["ticket_id"])
    result.per_category = dict(per_category.most_common())
    result.accuracy = right / len(per_day) if per_day else None
    if per_day:
        from .chart import write_chart

        result.chart = write_chart(per_day, directory / "tickets-per-day.png")
    result.seconds = time.monotonic() - t0
    return result
