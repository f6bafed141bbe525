"""Content generation: a product description for each product of the catalogue.

    python run.py            # offline: the batch job runs against overnight's fake OpenAI API
    python run.py --real     # on the OpenAI Batch API itself (OPENAI_API_KEY): half price

describe.toml is a `generate` job over products.csv: the template fills each product's fields
into the prompt, the Batch API answers (out/descriptions.jsonl: one row per product, with
its name, category and price beside the text), and run.py writes them into a Markdown page
(out/catalogue.md). It prints the estimate first: tokens and cost, real time vs batch.
Rerunning after editing a row of products.csv computes that product only.

Offline, the fake's "model" echoes the start of the prompt instead of writing copy: the
pipeline is real (files, batches, polling, results), the prose is not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import overnight

HERE = Path(__file__).resolve().parent


def write_page(descriptions: Path, path: Path) -> int:
    rows = [json.loads(line) for line in descriptions.read_text(encoding="utf-8").splitlines()]
    lines = ["# Catalogue", ""]
    for row in rows:
        lines += [
            f"## {row['name']} ({row['sku']})",
            "",
            f"*{row['category']}, EUR {row['price']}*",
        ]
        lines += ["", row["output"].strip(), ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return len(rows)


def run_job(job_file: Path, real: bool) -> overnight.Report:
    """The job as its file says (real), or pointed at the fake provider (offline), whose
    batches end within a second: polled every 0.1 s instead of the file's 30 s.

    Offline runs keep a ledger (and response cache) of their own, .overnight/offline/: the
    ledger does not tell one base_url from another, so a --real run after an offline one
    would otherwise keep the fake's answers.
    """
    if real:
        job = overnight.Job.from_file(job_file)
        print("\n".join(job.estimate().lines()))
        return job.run()
    job = overnight.Job.from_file(job_file, state=HERE / ".overnight" / "offline" / "ledger.db")
    print("\n".join(job.estimate().lines()))
    from overnight.testing.fake_provider import FakeProvider

    os.environ.setdefault("OPENAI_API_KEY", "sk-fake")  # the fake takes any key
    with FakeProvider() as fake:
        update = {"base_url": fake.openai_url, "poll_interval": 0.1}
        job.spec = job.spec.model_copy(update={"model": job.spec.model.model_copy(update=update)})
        return job.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="call OpenAI, not the fake")
    args = parser.parse_args()
    os.chdir(HERE)
    report = run_job(HERE / "describe.toml", args.real)
    counts = report.counts
    print(
        f"described {counts['succeeded']} of {counts.total} products "
        f"({report.processed} computed in this run): out/descriptions.jsonl"
    )
    print(f"cost ${counts.cost:.6f}, saved ${counts.saved:.6f} against real time")
    if report.exit_code != 0:
        print(
            f"the job ended with exit code {report.exit_code}: `overnight failures describe.toml`"
        )
        sys.exit(report.exit_code)
    n = write_page(HERE / "out" / "descriptions.jsonl", HERE / "out" / "catalogue.md")
    print(f"wrote {n} descriptions into out/catalogue.md")


if __name__ == "__main__":
    try:
        main()
    except overnight.UsageError as exc:  # a missing key, a wrong job file: exit 2, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
