"""`overnight …`: the only layer that prints. Exit codes: 0 all good, 3 some items failed or
invalid (good results written), 2 bad job file / input / command line, 1 unexpected error,
130 interrupted (resumable)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .errors import OvernightError
from .estimate import usd
from .job import Job, Report
from .runner import Progress as RunProgress

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run a model over a data set in batches; lose nothing, pay for nothing twice.",
)
out = Console()
err = Console(stderr=True)

JobArg = Annotated[Path, typer.Argument(help="The job file (TOML).", show_default=False)]
StateOpt = Annotated[
    Path | None,
    typer.Option("--state", help="Ledger file (default: .overnight/ledger.db beside the job)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _fail(exc: BaseException) -> typer.Exit:
    code = exc.exit_code if isinstance(exc, OvernightError) else 1
    msg = str(exc) if isinstance(exc, OvernightError) else f"{type(exc).__name__}: {exc}"
    # Text, not markup: "[task] colour" must print as written, not as a style tag.
    err.print(Text.assemble(("error: ", "red"), msg), highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except OvernightError as exc:
        raise _fail(exc) from None


def _load(job: Path, state: Path | None) -> Job:
    return Job.from_file(job, state=state)


# -- progress ------------------------------------------------------------------------------


class _Reporter:
    """A live bar on a terminal; a plain line every few seconds otherwise (CI logs, files)."""

    def __init__(self, name: str, live: bool, every: float = 5.0) -> None:
        self.name, self.live, self.every = name, live, every
        self._last = 0.0
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> _Reporter:
        if self.live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]:.1f} items/s"),
                TextColumn("[red]{task.fields[failed]} failed"),
                TextColumn("{task.fields[remote]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=None, rate=0.0, failed=0, remote="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def __call__(self, p: RunProgress) -> None:
        now = time.monotonic()
        busy = p.elapsed - p.setup_seconds
        rate = p.processed / busy if busy > 0 else 0.0
        bad = p.failed + p.invalid
        if self._bar is not None:
            self._bar.update(
                self._task,
                completed=p.finished,
                total=p.total or None,
                rate=rate,
                failed=bad,
                remote=f"{p.in_batches:,} in {p.live_batches} batches" if p.live_batches else "",
            )
        elif now - self._last >= self.every:
            self._last = now
            total = f"/{p.total}" if p.ingest_done else f"/~{p.total}"
            extra = f", batch size {p.batch_size}" if p.batch_size else ""
            if p.live_batches:
                extra += f", {p.in_batches:,} in {p.live_batches} provider batches"
            if p.cost or p.list_cost:
                extra += f", cost {usd(p.cost)}"
            err.print(
                Text(
                    f"{self.name}: {p.finished}{total} done, {bad} failed or invalid, "
                    f"{rate:.1f} items/s{extra}"
                ),
                highlight=False,
                soft_wrap=True,  # one report, one line, however narrow the "terminal"
            )


@contextmanager
def _graceful_stop() -> Iterator[threading.Event]:
    """First Ctrl-C: finish the batch in flight, commit, stop. Second: abort now (still safe:
    uncommitted work is released or its lease expires)."""
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        err.print("[yellow]stopping after the batch in flight (Ctrl-C again to abort)…[/]")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_report(r: Report) -> None:
    c = r.counts
    table = Table(title=Text(f"job {r.job}"), show_header=False, box=None)
    table.add_row("items", str(c.total))
    table.add_row("succeeded", f"[green]{c['succeeded']}")
    if c.failed:
        table.add_row(
            "failed", f"[red]{c.failed}" + (f" ({c.rejected} at ingest)" if c.rejected else "")
        )
    if c["invalid"]:
        table.add_row("invalid", f"[red]{c['invalid']}")
    if c.open:
        table.add_row("still open", str(c.open))
    if c["cancelled"]:
        table.add_row("cancelled", str(c["cancelled"]))
    if r.processed:
        table.add_row(
            "processed", f"{r.processed} items in {r.seconds:.1f}s ({r.items_per_second:.1f}/s)"
        )
    if r.batch_size and r.processed:
        table.add_row("batch size", str(r.batch_size))
    if r.llm:
        table.add_row("tokens", f"{c.input_tokens:,} in, {c.output_tokens:,} out")
        cost = usd(c.cost)
        if c.input_tokens and not c.list_cost:
            cost = "unknown: no price for this model (add one with [run] prices)"
        elif c.saved > 0:
            cost += f" (saved {usd(c.saved)} vs {usd(c.list_cost)} at real-time prices)"
        table.add_row("cost", cost)
    if r.output:
        table.add_row("output", Text(str(r.output)))  # paths may hold [brackets]
    if r.errors and (c.failed or c["invalid"]):
        table.add_row("errors", Text(str(r.errors)))
    out.print(table)
    if r.remote_batches:
        _print_remote_batches(r.remote_batches)
    if r.deadline:
        d = r.deadline
        held = "[green]held[/]" if d.get("held") else "[red]missed[/]"
        out.print(
            Text.from_markup(f"deadline {d.get('deadline')}: {held}; ")
            + Text(str(d.get("summary", "")))
        )
    for note in r.notes:
        out.print(Text(note), soft_wrap=True)
    if r.detached:
        out.print("batches submitted: run the same command again to collect their results.")
    if r.stop_reason:
        out.print(Text.assemble(("stopped: ", "yellow"), r.stop_reason), soft_wrap=True)
    if r.interrupted:
        out.print("[yellow]interrupted: run the same command again to resume.[/]")
    elif r.cancelled:
        out.print("[yellow]cancelled: run again to resume.[/]")


def _print_remote_batches(batches: tuple[dict[str, Any], ...]) -> None:
    table = Table("chunk", "remote batch", "status", "requests", "counts", title="provider batches")
    for b in batches:
        counts = ", ".join(f"{k} {v}" for k, v in (b.get("counts") or {}).items() if v)
        cells = (
            str(b.get("chunk", "")),
            str(b.get("remote_id") or "(creating)"),
            str(b.get("status", "")),
            str(b.get("requests", "")),
            counts,
        )
        table.add_row(*(Text(c) for c in cells))
    out.print(table)


# -- commands ------------------------------------------------------------------------------


@app.command()
def run(
    job: JobArg,
    state: StateOpt = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard this job's ledger entry and start over.")
    ] = False,
    as_json: JsonOpt = False,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="Batch backends: submit the batches and return; run again later to collect.",
        ),
    ] = False,
) -> None:
    """Ingest the input (once) and process it; running again resumes where it stopped."""
    with _errors():
        j = _load(job, state)
        with _graceful_stop() as stop, _Reporter(j.name, live=err.is_terminal) as reporter:
            report = j.run(restart=restart, on_progress=reporter, stop=stop, detach=detach)
    if as_json:
        out.print_json(data=report.to_dict())
    else:
        _print_report(report)
    raise typer.Exit(report.exit_code)


@app.command()
def status(job: JobArg, state: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Counts by state and throughput."""
    with _errors():
        report = _load(job, state).status()
    if as_json:
        out.print_json(data=report.to_dict())
    else:
        _print_report(report)


@app.command()
def failures(
    job: JobArg,
    state: StateOpt = None,
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="Show at most this many (0: all).")] = 50,
) -> None:
    """Failed and invalid items with their errors."""
    with _errors():
        rows = _load(job, state).failures()
    if as_json:
        sys.stdout.write(orjson.dumps([f.__dict__ for f in rows]).decode() + "\n")
        return
    if not rows:
        out.print("no failed or invalid items")
        return
    table = Table("id", "line", "state", "error class", "attempts", "message")
    for f in rows[: limit or None]:
        cells = (str(f.custom_id), str(f.line), f.state, f.error_class, str(f.attempts), f.message)
        table.add_row(*(Text(c) for c in cells))  # ids and messages are data, not markup
    out.print(table)
    if limit and len(rows) > limit:
        out.print(f"… and {len(rows) - limit} more (--limit 0 shows all)")


@app.command()
def retry(
    job: JobArg,
    state: StateOpt = None,
    invalid: Annotated[bool, typer.Option("--invalid", help="Retry invalid items too.")] = False,
) -> None:
    """Move failed (with --invalid, also invalid) items back to pending; then `run` again."""
    with _errors():
        n = _load(job, state).retry(invalid=invalid)
    out.print(f"{n} items back to pending; run the job again to process them")


@app.command()
def export(job: JobArg, state: StateOpt = None) -> None:
    """(Re)write the output and errors files from the ledger."""
    with _errors():
        done = _load(job, state).export()
    out.print(
        Text(f"wrote {done.rows} rows to {done.output} and {done.errors_rows} to {done.errors}"),
        soft_wrap=True,
    )


@app.command()
def cancel(job: JobArg, state: StateOpt = None) -> None:
    """Stop the job: open items become cancelled, finished ones are kept. `run` resumes it."""
    with _errors():
        n = _load(job, state).cancel()
    out.print(f"cancelled {n} open items; finished results are kept")


@app.command()
def estimate(job: JobArg, state: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Items, tokens and cost in real time vs batch, before spending anything."""
    with _errors():
        est = _load(job, state).estimate()
    if as_json:
        out.print_json(data=est.to_dict())
        return
    for line in est.lines():
        out.print(Text(line), soft_wrap=True)


@app.command()
def demo(
    tickets: Annotated[int, typer.Option(help="How many support tickets to generate.")] = 2000,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where the demo writes its files.")
    ] = Path("demo-output"),
    seed: Annotated[int, typer.Option(help="Seed of the ticket generator.")] = 7,
) -> None:
    """Classify a week of synthetic support tickets on the embedded model, then report."""
    from .demo import run_demo
    from .demo.report import print_demo_report

    with _errors(), _graceful_stop() as stop, _Reporter("demo", err.is_terminal) as reporter:
        result = run_demo(directory, tickets=tickets, seed=seed, on_progress=reporter, stop=stop)
    print_demo_report(out, result)
    raise typer.Exit(result.report.exit_code)


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    try:
        return app(args=argv)
    except KeyboardInterrupt:
        err.print("[yellow]aborted; run again to resume[/]")
        sys.exit(130)
