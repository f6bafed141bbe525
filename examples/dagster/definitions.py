"""The weekly support report as a scheduled Dagster job (the "reporting" use case):

    weekly_tickets  ->  weekly_triage (overnight, local model)  ->  weekly_report

Run it once, offline:

    dagster asset materialize -f definitions.py --select '*'

or serve it with its schedule (Mondays 06:00): `dagster dev -f definitions.py`. The ledger is
the job file's own (.overnight/ beside it) unless OVERNIGHT_LEDGER names another, e.g. a
PostgreSQL URL shared by every Dagster run and machine. `weekly_tickets` stands in for the
real source of a week's tickets (an export from the help desk); it writes the demo's synthetic
week, the same every run, so a re-materialisation computes nothing again.
"""

from collections import Counter
from pathlib import Path

import dagster as dg
import orjson

from overnight.demo.chart import write_chart
from overnight.demo.tickets import generate_tickets, write_labelled_csv, write_tickets_csv
from overnight.integrations.dagster import OvernightLedger, overnight_asset

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TICKETS = 300


@dg.asset(description="The week's support tickets (data/tickets.csv) and labelled examples")
def weekly_tickets() -> dg.MaterializeResult:
    DATA.mkdir(exist_ok=True)
    write_tickets_csv(generate_tickets(TICKETS), DATA / "tickets.csv")
    write_labelled_csv(generate_tickets(200, seed=1007), DATA / "labelled.csv")
    return dg.MaterializeResult(metadata={"tickets": TICKETS})


weekly_triage = overnight_asset(HERE / "triage.toml", deps=[weekly_tickets], on_failed="warn")


@dg.asset(deps=[weekly_triage], description="data/weekly_report.md and its chart")
def weekly_report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    rows = [orjson.loads(x) for x in (DATA / "triaged.jsonl").read_bytes().splitlines()]
    by_category = Counter(r["output"] for r in rows)
    chart = write_chart(
        ((r["created_at"], r["output"]) for r in rows), DATA / "tickets_per_category.png"
    )
    lines = [
        "# Support tickets this week",
        "",
        f"tickets classified: {len(rows)}",
        "",
        "| category | tickets | share |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {c} | {n} | {n / len(rows):.0%} |" for c, n in by_category.most_common()]
    lines += ["", f"![tickets per category per day]({chart.name})", ""]
    report = DATA / "weekly_report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    context.log.info(f"wrote {report}")
    return dg.MaterializeResult(
        metadata={"report": dg.MetadataValue.path(str(report)), **dict(by_category)}
    )


weekly = dg.define_asset_job("weekly_report_job", selection="*")

defs = dg.Definitions(
    assets=[weekly_tickets, weekly_triage, weekly_report],
    jobs=[weekly],
    schedules=[dg.ScheduleDefinition(job=weekly, cron_schedule="0 6 * * 1")],
    # OvernightLedger(url="postgresql://...") for a ledger every run and machine shares; without
    # a url, the job file's own (or OVERNIGHT_LEDGER).
    resources={"overnight": OvernightLedger()},
)
