"""The day's support tickets, summarised overnight through a provider's batch API, as an
Airflow DAG (examples/airflow):

    tickets  ->  summarise (OvernightOperator, deferred while the batches run)  ->  digest

Offline, in one command: `./run_offline.sh` (an Airflow home of its own, the fake provider,
`dag.test()`). With a scheduler, a triggerer and a real key: put this folder in the DAGs
folder and see summarise.toml. The ledger is the job file's own (.overnight/ beside it) unless
OVERNIGHT_LEDGER names another: a PostgreSQL URL when workers and the triggerer run on
several machines. `tickets` stands in for the day's export from the help desk: the demo's
synthetic tickets, the same every run, so a second run computes (and pays for) nothing.
"""

import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
from airflow.sdk import DAG, task

from overnight.demo.tickets import generate_tickets, write_tickets_csv
from overnight.integrations.airflow import OvernightOperator

HERE = Path(__file__).resolve().parent.parent
DATA = HERE / "data"
TICKETS = 120

with DAG(
    "ticket_digest",
    schedule="0 2 * * *",  # nightly: the batches have until the morning
    start_date=datetime(2026, 11, 16, tzinfo=UTC),
    catchup=False,
    default_args={"retries": 2},  # a retried task resumes the job from its ledger
) as dag:

    @task
    def tickets() -> int:
        DATA.mkdir(exist_ok=True)
        write_tickets_csv(generate_tickets(TICKETS), DATA / "tickets.csv")
        return TICKETS

    summarise = OvernightOperator(
        task_id="summarise", job_file=HERE / "summarise.toml", poll_interval=5
    )

    @task
    def digest(report: dict) -> str:
        """The report from XCom (what `overnight run --json` prints) and the summaries."""
        rows = [orjson.loads(x) for x in (DATA / "summaries.jsonl").read_bytes().splitlines()]
        lines = [
            "# Support tickets, summarised overnight",
            "",
            f"tickets: {report['succeeded']} summarised, {report['failed']} failed;"
            f" cost ${report['cost']:.4f} (saved ${report['saved']:.4f} against real time)"
            f" in {len(report['remote_batches'])} provider batches",
            "",
        ]
        lines += [f"- **{r['subject']}** ({r['channel']}): {_line(r['output'])}" for r in rows[:20]]
        out = DATA / "digest.md"
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return str(out)

    tickets() >> summarise
    digest(summarise.output)


def _line(text: str, width: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


if __name__ == "__main__":
    run = dag.test()
    sys.exit(0 if run.state == "success" else 1)
