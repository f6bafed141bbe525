"""The demo's weekly report, printed by the CLI (the only layer that prints)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from . import DemoResult


def print_demo_report(console: Console, r: DemoResult) -> None:
    rep = r.report
    c = rep.counts
    if rep.interrupted:
        console.print(f"[yellow]interrupted; resume with: overnight run {r.job_file}[/]")
        return
    table = Table(title=f"Weekly ticket report ({r.tickets} tickets)", show_footer=True)
    table.add_column("category", footer="total")
    table.add_column("tickets", justify="right", footer=str(sum(r.per_category.values())))
    table.add_column("share", justify="right")
    total = sum(r.per_category.values()) or 1
    for label, n in r.per_category.items():
        table.add_row(label, str(n), f"{100 * n / total:.1f}%")
    console.print(table)
    if r.accuracy is not None:
        console.print(
            f"accuracy against the generator's labels: [bold]{100 * r.accuracy:.1f}%[/] "
            "(classifier head fitted on 200 labelled examples)"
        )
    console.print(
        f"throughput: {rep.items_per_second:.1f} tickets/s on the embedded model "
        f"(batch size {rep.batch_size}); {rep.processed} classified in {rep.seconds:.1f}s, "
        f"demo total {r.seconds:.1f}s"
    )
    bad = c.failed + c["invalid"]
    console.print(f"failures: {bad}" + (f" (see {rep.errors})" if bad else ""))
    console.print(f"results:  {rep.output}")
    if r.chart:
        console.print(f"chart:    {r.chart}")
    console.print(f"job file: {r.job_file}  (try: overnight status {r.job_file})")
