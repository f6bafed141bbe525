"""The dashboard: one page over a ledger, at `/` of `overnight serve` and of
`overnight dashboard --ledger URL`.

It shows every job a viewer may see (and the service's batches behind them): counts by state,
progress, throughput over time (a server-rendered SVG), cost and savings, the first failures
with their messages and input lines, and a button per job that moves its failed items back to
pending (as `overnight retry` does). The page is HTML rendered here with jinja2; a small
script of the package (static/dashboard.js, no CDN) fetches the page's main part again every
few seconds, so progress moves; without JavaScript the page reloads itself.

Who may look: with API keys (serve.toml's [auth], or `overnight dashboard --keys-env`) a
request needs one, as `Authorization: Bearer KEY` or from the page's form (kept in an HttpOnly,
SameSite=Strict cookie). On the service a tenant sees only the jobs of its own batches; without
[auth], and on `overnight dashboard`, a viewer sees every job in the ledger.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..claim import describe, holder_alive, live_workers
from ..store import Counts, Failure, Ledger, open_ledger
from .auth import OPEN_TENANT, tenant_of
from .batches import ENDED

COOKIE = "overnight_key"
REFRESH_SECONDS = 2
FAILURES_SHOWN = 20  # per job
RECORD_CHARS = 300  # of an input line shown beside its failure
BUCKETS = 60  # bars of the throughput plot
WINDOWS = {"5m": 300, "15m": 900, "1h": 3600, "24h": 86400, "7d": 7 * 86400}
DEFAULT_WINDOW = "15m"
FINAL_STATES = ("succeeded", "failed", "invalid", "cancelled")
STATIC = Path(__file__).parent / "static"

_env = Environment(
    loader=PackageLoader("overnight.service", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


# -- who sees what -------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """`keys`: {key: tenant}, or None when no key is asked for. `batches_of(tenant)`: the
    service's batches of a tenant (None: not a service). `every_job`: a viewer sees every job
    of the ledger, not only those of its batches."""

    keys: dict[str, str] | None
    batches_of: Callable[[str], list[dict[str, Any]]] | None = None
    every_job: bool = True


def service_access(keys: dict[str, str] | None, catalogue: Any, per_api: int = 100) -> Access:
    """The service's: a tenant sees its newest `per_api` batches of each API and their jobs;
    without [auth] (keys None), every job of the ledger too."""

    def batches_of(tenant: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for api in ("openai", "anthropic"):
            found += catalogue.list_batches(tenant, api, per_api)[0]
        return sorted(found, key=lambda b: b["created_at"], reverse=True)

    return Access(keys, batches_of, every_job=keys is None)


def viewer(access: Access, request: Request) -> str | None:
    """The tenant a request speaks for (its key: a bearer header, `x-api-key`, or the
    cookie the login form set), or None without a valid key."""
    if access.keys is None:
        return OPEN_TENANT
    header = request.headers.get("authorization")
    if header is None and "x-api-key" in request.headers:
        header = "Bearer " + request.headers["x-api-key"]
    if header is None and COOKIE in request.cookies:
        header = "Bearer " + request.cookies[COOKIE]
    return tenant_of(access.keys, header)


# -- what the page shows -------------------------------------------------------------------


@dataclass(frozen=True)
class FailureView:
    failure: Failure
    record: str | None  # the input line, cut to RECORD_CHARS


@dataclass
class JobView:
    name: str
    state: str  # running | finished | unfinished | cancelled
    counts: Counts
    ingest_done: bool
    created_at: float
    runner: str | None
    rate: float  # items per second: the last minute of a live run, else the last run's
    series: list[int]  # items finished per interval of the plot's window
    failures: list[FailureView]
    batch: dict[str, Any] | None = None  # the service's batch this job runs
    retry_note: str | None = None  # why the button is not offered

    @property
    def done(self) -> int:
        return sum(self.counts[s] for s in FINAL_STATES) + self.counts.rejected

    @property
    def progress(self) -> float:
        total = self.counts.total
        return self.done / total if total else (1.0 if self.ingest_done else 0.0)

    @property
    def eta(self) -> float | None:
        if self.state != "running" or not self.ingest_done or self.rate <= 0:
            return None
        return self.counts.open / self.rate

    @property
    def retryable(self) -> bool:
        return self.counts["failed"] > 0 and self.retry_note is None


@dataclass
class Overview:
    jobs: list[JobView]
    batches: list[dict[str, Any]]
    window: str
    width: float  # seconds per interval of the plot
    since: float  # the window's start (epoch seconds)
    at: float
    totals: dict[str, float] = field(default_factory=dict)

    @property
    def series(self) -> list[int]:
        return [sum(col) for col in zip(*(j.series for j in self.jobs), strict=True)] or [
            0
        ] * BUCKETS


def overview(
    ledger_url: str,
    access: Access,
    tenant: str,
    window: str = DEFAULT_WINDOW,
) -> Overview:
    """What `tenant` may see of the ledger now."""
    now = time.time()
    span = WINDOWS[window]
    width = span / BUCKETS
    since = now - span
    batches = access.batches_of(tenant) if access.batches_of is not None else []
    batch_of = {part["job"]: b for b in batches for part in (b.get("parts") or [])}
    ledger = open_ledger(ledger_url)
    try:
        jobs = [
            _job_view(ledger, job, batch_of.get(job.name), since, width, now)
            for job in ledger.list_jobs()
            if access.every_job or job.name in batch_of
        ]
    finally:
        ledger.close()
    jobs.sort(key=lambda j: (j.state != "running", -j.created_at))
    totals = {
        "cost": sum(j.counts.cost for j in jobs),
        "saved": sum(j.counts.saved for j in jobs),
        "total": sum(j.counts.total for j in jobs),
        "done": sum(j.done for j in jobs),
        "rate": sum(j.rate for j in jobs if j.state == "running"),
    }
    for state in ("pending", "leased", "submitted", "succeeded", "failed", "invalid", "cancelled"):
        totals[state] = sum(j.counts[state] for j in jobs)
    return Overview(jobs, batches, window, width, since, now, totals)


def _job_view(
    ledger: Ledger, job: Any, batch: dict[str, Any] | None, since: float, width: float, now: float
) -> JobView:
    counts = ledger.counts(job.id)
    claim = ledger.get_claim(job.name)
    workers = live_workers(ledger, job.name)
    held = claim is not None and holder_alive(claim, now)
    last = ledger.last_run(job.name)
    if held or workers:
        state = "running"
    elif ledger.is_cancelled(job.id):
        state = "cancelled"
    elif job.ingest_done and counts.open == 0:
        state = "finished"
    else:
        state = "unfinished"
    rate = 0.0
    if state == "running" and last is not None and last.ended_at is None:
        recent = min(60.0, max(1.0, now - last.started_at))
        rate = ledger.finished_since(job.id, now - recent) / recent
    elif last is not None:
        rate = last.items_per_second
    series = [0] * BUCKETS
    if counts.last_finished is not None and counts.last_finished >= since:
        for n, count in ledger.finished_per_interval(job.id, since, width).items():
            if 0 <= n < BUCKETS:
                series[n] += count
    failures = [
        FailureView(f, _record(payload))
        for f, payload in (
            ledger.failure_records(job.id, FAILURES_SHOWN)
            if counts.failed or counts["invalid"]
            else []
        )
    ]
    owner = claim.owner if held and claim else workers[0] if workers else None
    note = ended_note(batch) if batch is not None and batch["status"] in ENDED else None
    return JobView(
        name=job.name,
        state=state,
        counts=counts,
        ingest_done=job.ingest_done,
        created_at=job.created_at,
        runner=describe(owner) if owner else None,
        rate=rate,
        series=series,
        failures=failures,
        batch=batch,
        retry_note=note,
    )


def _record(payload: bytes | memoryview | None) -> str | None:
    if payload is None:
        return None
    text = bytes(payload).decode("utf-8", "replace")
    return text if len(text) <= RECORD_CHARS else text[: RECORD_CHARS - 1] + "…"


def ended_note(batch: dict[str, Any]) -> str:
    """Why the failed lines of an ended batch are not retried, and where they are.

    A batch that has ended is final, as at OpenAI and Anthropic: a client may already have
    read its output and error files (or results), and its status does not go back. Moving
    its failed items back to pending would run them into results nobody asks for again, so
    the dashboard refuses and says how to send them again."""
    if batch["api"] == "anthropic":
        return (
            f"Message batch {batch['id']} has ended: its results are final, so its failed"
            " requests are not retried here. They are its `errored` results; send them again"
            " as a new batch."
        )
    where = (
        f"They are in its error file {batch['error_file_id']}"
        if batch.get("error_file_id")
        else "They are in its error file"
    )
    return (
        f"Batch {batch['id']} has ended ({batch['status']}): its output and error files are"
        f" final, so its failed lines are not retried here. {where}; send them again as a"
        " new batch."
    )


def retry(ledger_url: str, access: Access, tenant: str, name: str) -> tuple[int, str | None]:
    """Moves the failed items of job `name` back to pending: (items moved, None), or
    (0, why not): "not found" when the job is not this viewer's, else `ended_note` when its
    batch has ended."""
    batches = access.batches_of(tenant) if access.batches_of is not None else []
    batch = next(
        (b for b in batches for part in (b.get("parts") or []) if part["job"] == name), None
    )
    if batch is None and not access.every_job:
        return 0, "not found"
    if batch is not None and batch["status"] in ENDED:
        return 0, ended_note(batch)
    ledger = open_ledger(ledger_url)
    try:
        job = ledger.get_job(name)
        if job is None:
            return 0, "not found"
        return ledger.retry(job.id, ("failed",)), None
    finally:
        ledger.close()


# -- rendering -----------------------------------------------------------------------------


def _plot(series: list[int], width: float, w: int = 720, h: int = 160) -> dict[str, Any]:
    """Bars of a throughput plot (items per second per interval), in SVG coordinates."""
    rates = [n / width for n in series]
    top = _nice(max(rates, default=0.0))
    pad_left, pad_bottom, pad_top = 48, 18, 8
    inner_w, inner_h = w - pad_left - 4, h - pad_bottom - pad_top
    step = inner_w / len(rates)
    bars = []
    for i, r in enumerate(rates):
        bh = 0.0 if top == 0 else inner_h * r / top
        bars.append(
            {
                "x": round(pad_left + i * step + 0.5, 1),
                "y": round(pad_top + inner_h - bh, 1),
                "w": round(max(step - 1, 1), 1),
                "h": round(bh, 1),
                "rate": r,
            }
        )
    return {
        "w": w,
        "h": h,
        "bars": bars,
        "top": top,
        "left": pad_left,
        "base": pad_top + inner_h,
        "mid": pad_top + inner_h / 2,
        "ceiling": pad_top,
    }


def _nice(value: float) -> float:
    """The plot's top: 1, 2 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 0.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value)


def _sparkline(series: list[int], w: int = 120, h: int = 24) -> str:
    top = max(series, default=0)
    if not top:
        return f"0,{h} {w},{h}"
    step = w / max(len(series) - 1, 1)
    return " ".join(f"{i * step:.1f},{h - h * n / top:.1f}" for i, n in enumerate(series))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _clock(ts: float | None) -> str:
    return "—" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _money(usd: float) -> str:
    return f"${usd:,.4f}" if usd < 1 else f"${usd:,.2f}"


_env.filters.update(duration=_duration, clock=_clock, money=_money, sparkline=_sparkline)


def render(template: str, **context: Any) -> str:
    return _env.get_template(template).render(refresh=REFRESH_SECONDS, **context)


# -- routes --------------------------------------------------------------------------------


def routes(ledger_url: str, access: Access, title: str = "overnight") -> list[BaseRoute]:
    """The page and its actions; mounted by `overnight serve` and `overnight dashboard`."""

    def window_of(request: Request) -> str:
        w = request.query_params.get("window", DEFAULT_WINDOW)
        return w if w in WINDOWS else DEFAULT_WINDOW

    def context(request: Request, tenant: str) -> dict[str, Any]:
        view = overview(ledger_url, access, tenant, window_of(request))
        notice = refusal = None
        if "retried" in request.query_params:
            notice = (
                f"{request.query_params.get('moved', '0')} failed items of"
                f" {request.query_params['retried']} moved back to pending."
            )
        elif "refused" in request.query_params:  # a form sent before its batch ended
            name = request.query_params["refused"]
            refusal = next(
                (j.retry_note for j in view.jobs if j.name == name and j.retry_note),
                f"The failed items of {name} were not retried.",
            )
        return {
            "view": view,
            "plot": _plot(view.series, view.width),
            "windows": list(WINDOWS),
            "tenant": tenant if access.keys is not None else None,
            "title": title,
            "notice": notice,
            "refusal": refusal,
            "service": access.batches_of is not None,
        }

    def login_page(error: str | None = None, status: int = 401) -> Response:
        return HTMLResponse(render("login.html", title=title, error=error), status_code=status)

    async def page(request: Request) -> Response:
        tenant = viewer(access, request)
        if tenant is None:
            return login_page()
        ctx = await run_in_threadpool(context, request, tenant)
        return HTMLResponse(render("dashboard.html", **ctx))

    async def main_part(request: Request) -> Response:
        tenant = viewer(access, request)
        if tenant is None:
            return JSONResponse({"error": "log in again"}, status_code=401)
        ctx = await run_in_threadpool(context, request, tenant)
        return HTMLResponse(render("main.html", **ctx))

    async def login(request: Request) -> Response:
        if (refused := _cross_site(request)) is not None:
            return refused
        if access.keys is None:
            return RedirectResponse("/", status_code=303)
        async with request.form(max_files=0, max_fields=4) as form:
            key = form.get("key")
        key = key.strip() if isinstance(key, str) else ""
        if not key or tenant_of(access.keys, "Bearer " + key) is None:
            return login_page("That key is not one of this server's API keys.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            key,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(request: Request) -> Response:
        if (refused := _cross_site(request)) is not None:
            return refused
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return response

    async def retry_job(request: Request) -> Response:
        wants_json = "application/json" in request.headers.get("accept", "")
        if (refused := _cross_site(request)) is not None:
            return refused
        tenant = viewer(access, request)
        if tenant is None:
            if wants_json:
                return JSONResponse({"error": "an API key is needed"}, status_code=401)
            return login_page()
        name: Any = request.query_params.get("job")
        window = DEFAULT_WINDOW
        if name is None:
            async with request.form(max_files=0, max_fields=4) as form:
                name = form.get("job")
                window = str(form.get("window") or DEFAULT_WINDOW)
        if not isinstance(name, str) or not name:
            return JSONResponse({"error": "which job? (field `job`)"}, status_code=400)
        moved, refusal = await run_in_threadpool(retry, ledger_url, access, tenant, name)
        if refusal == "not found":
            return JSONResponse({"error": f"no job {name!r}"}, status_code=404)
        if refusal is not None:  # its batch has ended: the page says why, and where to look
            if wants_json:
                return JSONResponse({"error": refusal}, status_code=409)
            query: dict[str, Any] = {"refused": name}
        elif wants_json:
            return JSONResponse({"job": name, "moved": moved})
        else:
            query = {"retried": name, "moved": moved}
        if window in WINDOWS and window != DEFAULT_WINDOW:
            query["window"] = window
        return RedirectResponse("/?" + urlencode(query), status_code=303)

    return [
        Route("/", page, methods=["GET"]),
        Route("/dashboard/main", main_part, methods=["GET"]),
        Route("/dashboard/login", login, methods=["POST"]),
        Route("/dashboard/logout", logout, methods=["POST"]),
        Route("/dashboard/retry", retry_job, methods=["POST"]),
        Mount("/dashboard/static", app=StaticFiles(directory=STATIC), name="dashboard-static"),
    ]


def _cross_site(request: Request) -> Response | None:
    """A refusal for a POST another site's page sent (its Origin is not this server): the
    cookie is SameSite=Strict already, and a dashboard without keys has no cookie at all."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser's cross-site POST
        return None
    if urlsplit(origin).netloc != request.headers.get("host", ""):
        return JSONResponse({"error": "a request from another site"}, status_code=403)
    return None


def create_dashboard_app(ledger_url: str, keys: dict[str, str] | None = None) -> Any:
    """`overnight dashboard`: the page over a ledger, with /metrics and /healthz, and no API.
    Every job of the ledger is shown; with `keys`, to a request that brings one of them."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from .metrics import Metrics, MetricsMiddleware

    metrics = Metrics(ledger_url)
    app = Starlette(
        routes=[*routes(ledger_url, Access(keys)), *metrics.routes()],
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
    )
    app.state.metrics = metrics
    return app
