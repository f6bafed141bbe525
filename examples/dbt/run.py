"""dbt around overnight, on one DuckDB file (warehouse.duckdb beside this script):

    python run.py             # seed + staging (dbt), enrich (overnight), marts + tests (dbt)
    python run.py --add 25    # 25 new tickets arrive: the rerun computes those 25 only

1. `dbt build --select +stg_tickets`: the raw tickets seed and the staging model, the
   overnight job's input table, with its tests.
2. `overnight run enrich.toml`: the local model classifies every ticket of stg_tickets and
   upserts category and confidence into tickets_enriched (a table of its own).
3. `dbt build --select source:overnight+`: the downstream model reads the
   enriched table (declared as a dbt source, with tests on what overnight wrote).

Each step stops the script on failure, with the step's exit code. The tickets come from
overnight's demo generator; `labelled.csv` (200 other tickets with their label) is what the
model's classifier head is fitted on. Run in a real project the same way: dbt builds, the
overnight job runs (or `overnight run` as a step of the orchestrator), dbt builds downstream.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from overnight.demo.tickets import generate_tickets, write_labelled_csv

HERE = Path(__file__).resolve().parent
SEED = HERE / "seeds" / "raw_tickets.csv"
COLUMNS = ["ticket_id", "created_at", "customer", "product", "channel", "subject", "body"]


def write_seed(n: int) -> None:
    SEED.parent.mkdir(exist_ok=True)
    with SEED.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(COLUMNS)
        for t in generate_tickets(n):
            out.writerow([getattr(t, c) for c in COLUMNS])


def count_seed() -> int:
    if not SEED.exists():
        return 0
    with SEED.open(newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.reader(f)) - 1  # bodies span lines: count rows, not lines


def dbt(*args: str) -> None:
    """dbt as a process of its own (what the `dbt` command runs): dbt-duckdb keeps the DuckDB
    file open, locked, for as long as its process lives."""
    cli = "import sys; from dbt.cli.main import cli; sys.exit(cli())"
    step(
        "dbt",
        [sys.executable, "-c", cli, *args],
        "--project-dir",
        str(HERE),
        "--profiles-dir",
        str(HERE),
    )


def step(name: str, command: list[str], *more: str) -> None:
    done = subprocess.run([*command, *more], cwd=HERE)
    if done.returncode != 0:
        print(f"{name} {' '.join(command[3:5])} failed (exit {done.returncode})")
        sys.exit(done.returncode)


def overnight(*args: str) -> None:
    step("overnight", [sys.executable, "-m", "overnight", *args])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=300)
    parser.add_argument("--add", type=int, default=0, help="this many new tickets arrive")
    args = parser.parse_args()
    os.chdir(HERE)
    have = count_seed()
    write_seed(have + args.add if args.add and have else args.tickets)
    if not (HERE / "labelled.csv").exists():
        write_labelled_csv(generate_tickets(200, seed=1007), HERE / "labelled.csv")

    dbt("build", "--select", "+stg_tickets")
    overnight("run", "enrich.toml")
    dbt("build", "--select", "source:overnight+")
    print("built: stg_tickets -> overnight -> tickets_enriched -> tickets_by_category")


if __name__ == "__main__":
    main()
