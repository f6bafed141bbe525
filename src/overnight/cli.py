"""`overnight …`: the only layer that prints. Exit codes: 0 all good, 3 some items failed or
invalid (good results written), 2 bad job file / input / command line, 1 unexpected error,
130 interrupted (resumable)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table
from rich.text import Text

from . import __version__
from .errors import OvernightError, option
from .estimate import usd
from .job import Job, Report
from .runner import Progress as RunProgress

app = typer.Typer(
    no_args_is_help=True,
    help="Run a model over a data set in batches; lose nothing, pay for nothing twice.",
)
out = Console()
err = Console(stderr=True)


class _Warnings(logging.Handler):
    """Warnings logged below the CLI (an empty input, truncated texts, ...), printed on stderr
    and kept for the --json reports that list them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []
        self.quiet = False  # -q: kept for --json, not printed

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        self.seen.append(msg)
        if self.quiet:
            return
        err.print(Text.assemble(("warning: ", "yellow"), msg), highlight=False, soft_wrap=True)


warnings = _Warnings()


def _version(value: bool) -> None:
    if value:
        out.print(f"overnight {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Log what overnight does (and an unexpected error's traceback)."
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Print errors and the command's result only: no progress, no warnings.",
        ),
    ] = False,
) -> None:
    """Run a model over a data set in batches; lose nothing, pay for nothing twice."""
    if verbose and quiet:
        raise typer.BadParameter("choose one of --verbose and --quiet", param_hint="-v/-q")
    logger = logging.getLogger("overnight")
    if warnings not in logger.handlers:
        logger.addHandler(warnings)
    warnings.quiet = quiet
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)


JobArg = Annotated[Path, typer.Argument(help="The job file (TOML).", show_default=False)]
LEDGER_HELP = (
    "The ledger: a PostgreSQL URL or a SQLite file path (default: $OVERNIGHT_LEDGER, else"
    " [run] ledger, else .overnight/ledger.db beside the job). --state is an older name."
)
StateOpt = Annotated[str | None, typer.Option("--ledger", "--state", help=LEDGER_HELP)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _print_json(data: Any) -> None:
    """JSON on stdout as is: no wrapping, no markup (rich's print_json wraps long strings)."""
    sys.stdout.write(orjson.dumps(data).decode() + "\n")


def _words(exc: OvernightError) -> str:
    """The library's message in the CLI's words: a `Job.run` option it names
    (`restart=True`) as the flag that sets it (--restart)."""
    msg = str(exc)
    for name in ("restart", "detach"):
        msg = msg.replace(option(name), f"--{name}")
    return msg


def _fail(exc: BaseException) -> typer.Exit:
    code = exc.exit_code if isinstance(exc, OvernightError) else 1
    msg = _words(exc) if isinstance(exc, OvernightError) else f"{type(exc).__name__}: {exc}"
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
    except Exception as exc:  # a bug: one line, exit 1; the traceback with -v
        logging.getLogger("overnight").debug("unexpected error", exc_info=True)
        failed = _fail(exc)
        err.print(
            Text("(an unexpected error: run again with -v for its traceback, and report it)"),
            soft_wrap=True,
        )
        raise failed from None


def _load(job: Path, state: str | None) -> Job:
    return Job.from_file(job, state=state)


# -- progress ------------------------------------------------------------------------------


class _Reporter:
    """A live bar on a terminal; a plain line every few seconds otherwise (CI logs, files).

    The bar fits 80 columns: the name is cut to 20 characters, the bar takes what is left,
    and the counts, speed, failures and ETA are never cut (tests/test_cli.py renders it)."""

    def __init__(self, name: str, live: bool, every: float = 5.0) -> None:
        # -q: no progress at all, neither the bar nor the plain lines.
        self.quiet = warnings.quiet
        self.name, self.live, self.every = name, live and not self.quiet, every
        self._last = 0.0
        self._bar: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> _Reporter:
        if self.live:
            self._bar = make_bar(err)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.name, total=None, speed="", failed="")
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
            known = p.total if (p.total or p.ingest_done) else None  # None: "?" until known
            self._bar.update(self._task, completed=p.finished, total=known, **bar_fields(p))
        elif not self.quiet and now - self._last >= self.every:
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


def make_bar(console: Console) -> Progress:
    """The live progress bar (see _Reporter)."""
    fixed = {"no_wrap": True}
    return Progress(
        TextColumn(
            "[bold]{task.description}",
            table_column=Column(max_width=20, no_wrap=True, overflow="ellipsis"),
        ),
        BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=6)),
        MofNCompleteColumn(table_column=Column(**fixed)),
        TextColumn("{task.fields[speed]}", table_column=Column(**fixed)),
        TextColumn("[red]{task.fields[failed]}", table_column=Column(**fixed)),
        TextColumn("eta", table_column=Column(**fixed)),
        TimeRemainingColumn(compact=True, table_column=Column(**fixed)),
        console=console,
        expand=True,
        transient=False,
    )


def bar_fields(p: RunProgress) -> dict[str, str]:
    """The bar's text fields: items/s (or the live provider batches), failures if any."""
    if p.live_batches:
        speed = f"{p.live_batches} batch{'es' if p.live_batches > 1 else ''}"
    else:
        busy = p.elapsed - p.setup_seconds
        speed = f"{p.processed / busy if busy > 0 else 0.0:.1f}/s"
    bad = p.failed + p.invalid
    return {"speed": speed, "failed": f"{bad:,} failed" if bad else ""}


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
        label = "processed" if r.activity is None else "last run"
        table.add_row(
            label, f"{r.processed} items in {r.seconds:.1f}s ({r.items_per_second:.1f}/s)"
        )
    if r.batch_size and r.processed:
        table.add_row("batch size", str(r.batch_size))
    if r.tokens:
        table.add_row("tokens", f"{c.input_tokens:,} in, {c.output_tokens:,} out")
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
    if r.activity is not None:
        _print_activity(r.activity)
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


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _print_activity(a: Any) -> None:
    if a.running:
        rate = f"{a.items_per_second:.1f} items/s over the last minute"
        eta = f", about {_duration(a.eta_seconds)} to go" if a.eta_seconds is not None else ""
        out.print(Text.assemble(("running: ", "green"), f"{a.runner}; {rate}{eta}"))
    if a.unfinished:
        out.print(Text("unfinished:", style="yellow"))
        for why in a.unfinished:
            out.print(Text(f"  - {why}"), soft_wrap=True)
    else:
        out.print(Text("finished: every record has a final state", style="green"))


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
def consume(
    job: JobArg,
    state: StateOpt = None,
    exit_idle: Annotated[
        float | None,
        typer.Option(
            "--exit-idle",
            help="Stop once no message has arrived, and none waits, for this many seconds.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Collect records from the job's [source] queue and process them in batches, until
    stopped (Ctrl-C or SIGTERM: the batch in flight is finished first)."""
    from .intake import Consumer

    with _errors():
        j = _load(job, state)
        with _graceful_stop() as stop:
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
            try:
                report = Consumer(j, stop=stop, idle_exit=exit_idle).run()
            finally:
                signal.signal(signal.SIGTERM, previous)
    if as_json:
        _print_json(report.to_dict())
    else:
        r = report
        out.print(
            f"received {r.received:,} messages: {r.added:,} new records, {r.redelivered:,}"
            f" redelivered (already in the ledger), {r.rejected:,} refused; {r.flushes:,} batches"
        )


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
    if as_json:  # the errors file's names: `id`, not the ledger's custom_id
        _print_json([_failure_dict(f) for f in rows])
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


def _failure_dict(f: Any) -> dict[str, Any]:
    return {
        "id": f.custom_id,
        "line": f.line,
        "state": f.state,
        "error_class": f.error_class,
        "message": f.message,
        "attempts": f.attempts,
    }


@app.command()
def retry(
    job: JobArg,
    state: StateOpt = None,
    invalid: Annotated[bool, typer.Option("--invalid", help="Retry invalid items too.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Move failed (with --invalid, also invalid) items back to pending; then `run` again."""
    with _errors():
        j = _load(job, state)
        result = j.retry(invalid=invalid)
    if as_json:
        _print_json({"job": j.name, "invalid": invalid, **result.to_dict()})
        return
    out.print(f"{result.moved} items back to pending; run the job again to process them")
    if result.input_errors:
        lines = ", ".join(str(n) for n in result.input_error_lines)
        more = ", …" if result.input_errors > len(result.input_error_lines) else ""
        out.print(
            Text(
                f"{result.input_errors} input lines could not be read (line {lines}{more}) and"
                " cannot be retried from here: fix them in the input file and run the job"
                " again; the run reads the changed lines and computes only those"
            ),
            soft_wrap=True,
        )


@app.command()
def export(job: JobArg, state: StateOpt = None, as_json: JsonOpt = False) -> None:
    """(Re)write the output and errors files from the ledger."""
    with _errors():
        j = _load(job, state)
        done = j.export()
    if as_json:
        _print_json(
            {
                "job": j.name,
                "output": str(done.output),
                "rows": done.rows,
                "errors": str(done.errors),
                "errors_rows": done.errors_rows,
            }
        )
        return
    out.print(
        Text(f"wrote {done.rows} rows to {done.output} and {done.errors_rows} to {done.errors}"),
        soft_wrap=True,
    )


@app.command()
def cancel(job: JobArg, state: StateOpt = None) -> None:
    """Stop the job: open items become cancelled, finished ones are kept. `run` resumes it."""
    with _errors():
        result = _load(job, state).cancel()
    for line in result.lines():
        out.print(Text(line), soft_wrap=True)


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
    as_json: JsonOpt = False,
) -> None:
    """Classify a week of synthetic support tickets on the embedded model, then report."""
    from .demo import run_demo
    from .demo.report import print_demo_report

    with _errors(), _graceful_stop() as stop, _Reporter("demo", err.is_terminal) as reporter:
        result = run_demo(directory, tickets=tickets, seed=seed, on_progress=reporter, stop=stop)
    if as_json:
        _print_json(
            {
                "directory": str(result.directory),
                "job_file": str(result.job_file),
                "tickets": result.tickets,
                "per_category": result.per_category,
                "accuracy": result.accuracy,
                "chart": str(result.chart) if result.chart else None,
                "seconds": round(result.seconds, 3),
                "report": result.report.to_dict(),
            }
        )
    else:
        print_demo_report(out, result)
    raise typer.Exit(result.report.exit_code)


@app.command()
def init(
    job: Annotated[Path, typer.Argument(help="The job file to write (TOML).", show_default=False)],
    backend: Annotated[
        str,
        typer.Option(
            help="local, python, openai, anthropic, openai-batch, anthropic-batch or auto."
        ),
    ] = "local",
    task: Annotated[
        str | None,
        typer.Option(
            help="classify, embed (local); map (python); generate, extract, classify, embed,"
            " passthrough (LLM backends). Default: the backend's first."
        ),
    ] = None,
    provider: Annotated[
        str | None, typer.Option(help="--backend auto: openai or anthropic.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a commented starter job file (and the sample files it names); never overwrites."""
    from . import scaffold

    with _errors():
        written = scaffold.write(scaffold.build(job, backend, task, provider))
    if as_json:
        _print_json({"job_file": str(job), "written": [str(p) for p in written]})
        return
    for path in written:
        out.print(Text(f"wrote {path}"), soft_wrap=True)
    out.print(Text(f"next: overnight check {job}, then overnight run {job}"), soft_wrap=True)


@app.command()
def check(job: JobArg, as_json: JsonOpt = False) -> None:
    """Validate everything a run would (job file, input, id column, examples, schema, function,
    model name, API key) without touching the ledger or the provider: exit 0 or 2."""
    warnings.seen.clear()
    try:
        j = _load(job, None)
        j.check()
        _check_model(j)
    except OvernightError as exc:
        if as_json:
            _print_json({"ok": False, "job_file": str(job), "error": _words(exc)})
            raise typer.Exit(exc.exit_code) from None
        raise _fail(exc) from None
    if as_json:
        _print_json(
            {"ok": True, "job_file": str(job), "job": j.name, "warnings": list(warnings.seen)}
        )
        return
    m = j.spec.model
    what = m.function if m.backend == "python" else m.name or "the lines' own models"
    out.print(
        Text(f"{job}: ok (job {j.name!r}, backend {m.backend}, {what}; input {j.input_name})"),
        soft_wrap=True,
    )


def _check_model(j: Job) -> None:
    """What only a warning can say about an LLM model name: overnight cannot price it."""
    name = j.spec.model.name
    if j.is_llm and name and j.prices.price(name) is None:
        logging.getLogger("overnight").warning(
            "%s: [model] name: no price for %r in the price table: costs will show as unknown"
            " and [run] max_cost cannot stop the job (add it with [run] prices)",
            j.origin,
            name,
        )


@app.command()
def serve(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The service's settings (serve.toml).")
    ],
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8000,
) -> None:
    """Serve OpenAI's Files and Batches API over the models of serve.toml; every batch is a
    job in the ledger, resumed when the server starts again."""
    try:
        import uvicorn

        from .service.app import create_app
        from .service.config import load_config
    except ImportError as exc:
        raise _fail(
            OvernightError(
                f"overnight serve needs the `serve` extra ({exc.name} is missing):"
                " pip install 'overnight[serve]'"
            )
        ) from None
    with _errors():
        application = create_app(load_config(config))
    uvicorn.run(application, host=host, port=port, log_level="info")


@app.command()
def dashboard(
    state: Annotated[
        str | None,
        typer.Option(
            "--ledger",
            "--state",
            help="The ledger: a PostgreSQL URL or a SQLite file path (default:"
            " $OVERNIGHT_LEDGER, else .overnight/ledger.db).",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8080,
    keys_env: Annotated[
        str | None,
        typer.Option(
            "--keys-env",
            help='An environment variable holding API keys ("key1:name-a,key2:name-b"): the'
            " page then asks for one. Without it the page is open to whoever reaches it, so"
            " it listens on a loopback address only.",
        ),
    ] = None,
) -> None:
    """The dashboard alone over a ledger (no API): every job's progress, throughput, cost and
    failures, a button to retry failed items; /metrics and /healthz."""
    try:
        import uvicorn

        from .service.dashboard import create_dashboard_app
    except ImportError as exc:
        raise _fail(
            OvernightError(
                f"overnight dashboard needs the `serve` extra ({exc.name} is missing):"
                " pip install 'overnight[serve]'"
            )
        ) from None
    import ipaddress

    from .errors import UsageError
    from .listing import existing_ledger
    from .service.auth import parse_keys

    with _errors():
        keys = None
        if keys_env:
            value = os.environ.get(keys_env)
            if value is None:
                raise UsageError(f"--keys-env: ${keys_env} is not set")
            keys = parse_keys(value, f"--keys-env: ${keys_env}")
        else:
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise UsageError(
                    f"--host {host}: without --keys-env the dashboard (and its retry button)"
                    " is open to whoever reaches it; listen on 127.0.0.1, or give --keys-env"
                )
        application = create_dashboard_app(existing_ledger(state), keys)
    uvicorn.run(application, host=host, port=port, log_level="info")


@app.command("ls")
def list_jobs(
    state: Annotated[
        str | None,
        typer.Option(
            "--ledger",
            "--state",
            help="The ledger: a PostgreSQL URL or a SQLite file path (default:"
            " $OVERNIGHT_LEDGER, else .overnight/ledger.db). --state is an older name.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The jobs in a ledger, with their state and counts."""
    from .listing import list_jobs as jobs_in

    with _errors():
        jobs = jobs_in(state)
    if as_json:
        _print_json([job.to_dict() for job in jobs])
        return
    if not jobs:
        from .store.connector import safe_url

        where = state or os.environ.get("OVERNIGHT_LEDGER") or ".overnight/ledger.db"
        out.print(Text(f"no jobs in {safe_url(where)}"), soft_wrap=True)
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    widest = min(max(len(s.name) for s in jobs), 24)  # a long name is cut, never the counts
    table.add_column("job", min_width=widest, max_width=24, no_wrap=True, overflow="ellipsis")
    for head in ("state", "items", "succeeded", "failed", "invalid", "open", "created"):
        right = head not in ("state", "created")
        table.add_column(head, justify="right" if right else "left", no_wrap=True)
    for s in jobs:
        created = datetime.fromtimestamp(s.created_at).strftime("%m-%d %H:%M")
        cells = (s.name, s.state, s.total, s.succeeded, s.failed, s.invalid, s.open, created)
        table.add_row(*(Text(f"{c:,}" if isinstance(c, int) else c) for c in cells))
    out.print(table)


def main(argv: list[str] | None = None) -> Callable[..., Any] | None:
    try:
        # prog_name: shell completion registers for `overnight`, however it was started.
        return app(args=argv, prog_name="overnight")
    except KeyboardInterrupt:
        err.print("[yellow]aborted; run again to resume[/]")
        sys.exit(130)
