"""`/metrics` (Prometheus' text format, with prometheus_client) and `/healthz`.

/metrics is open by default, as Prometheus exporters usually are (the server listens on
127.0.0.1 unless told otherwise); serve.toml's `[metrics] require_key = true` asks for an API
key of [auth] (`tenants` narrows which), since the exposition names every tenant's batches.
/healthz is always open.

What a request measures (the middleware): requests by route, method and status, and their
latency. What the ledger holds, read when Prometheus scrapes: items by state and cost of every
job, the service's batches by status and their sizes. What the real-time endpoints report as
they run: the depth of each model's queue (`Metrics.set_queue_depth`), and the requests each
model call served and how long it took (`Metrics.observe_model_batch`).

Each app has its own registry (`Metrics.registry`): two apps in one process (the tests) count
apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import OvernightError
from ..store import STATES, open_ledger
from .catalogue import Catalogue

log = logging.getLogger(__name__)

# Requests in one batch of the Batches APIs (OpenAI allows 50,000).
BATCH_SIZE_BUCKETS = (1, 10, 100, 1_000, 10_000, 50_000)
# Requests served by one model call (micro-batching).
MODEL_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HEALTH_TIMEOUT = 5.0  # seconds /healthz waits for the ledger before it answers 503


class Metrics:
    """The service's metrics, in a registry of their own."""

    def __init__(self, ledger_url: str, catalogue: Catalogue | None = None) -> None:
        self.ledger_url = ledger_url
        # Inputs waiting per model, read at each scrape (set by the app: Realtime.queue_depths).
        self.queue_depths: Callable[[], dict[str, int]] | None = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "overnight_http_requests",
            "HTTP requests answered, by route (its path template), method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "overnight_http_request_duration_seconds",
            "Time to answer an HTTP request, by route and method.",
            ["route", "method"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "overnight_queue_depth",
            "Requests waiting in a model's real-time queue.",
            ["model"],
            registry=self.registry,
        )
        self.model_batch = Histogram(
            "overnight_model_batch_size",
            "Requests served by one model call (micro-batching), by model.",
            ["model"],
            buckets=MODEL_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.model_call = Histogram(
            "overnight_model_call_duration_seconds",
            "Time one model call took (one micro-batch), by model: a batch time under the load"
            " of the moment, what a request's latency is made of.",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_LedgerCollector(ledger_url, catalogue))

    def set_queue_depth(self, model: str, depth: int) -> None:
        """The requests now waiting in `model`'s real-time queue."""
        self.queue_depth.labels(model=model).set(depth)

    def observe_model_batch(self, model: str, size: int, seconds: float | None = None) -> None:
        """One call of `model` served `size` requests (in `seconds`)."""
        self.model_batch.labels(model=model).observe(size)
        if seconds is not None:
            self.model_call.labels(model=model).observe(seconds)

    def exposition(self) -> bytes:
        if self.queue_depths is not None:
            for model, depth in self.queue_depths().items():
                self.set_queue_depth(model, depth)
        return generate_latest(self.registry)

    def routes(self, may_scrape: Callable[[Request], bool] | None = None) -> list[BaseRoute]:
        """/metrics (to a request `may_scrape` allows; every request without it) and
        /healthz (always open: a load balancer's probe brings no key)."""

        async def metrics(request: Request) -> Response:
            if may_scrape is not None and not may_scrape(request):
                return JSONResponse(
                    {"error": "/metrics needs an API key: send it as `Authorization: Bearer KEY`"},
                    status_code=401,
                    headers={"www-authenticate": "Bearer"},
                )
            body = await run_in_threadpool(self.exposition)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        async def healthz(request: Request) -> Response:
            return await health(self.ledger_url)

        return [
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]


async def health(ledger_url: str) -> Response:
    """200 when the ledger answers within HEALTH_TIMEOUT, else 503 with the reason."""
    try:
        await asyncio.wait_for(run_in_threadpool(_reach, ledger_url), HEALTH_TIMEOUT)
    except TimeoutError:
        reason = f"the ledger did not answer in {HEALTH_TIMEOUT:.0f} s"
    except OvernightError as exc:
        reason = str(exc)
    else:
        return JSONResponse({"status": "ok", "ledger": "reachable"})
    log.warning("healthz: %s", reason)
    return JSONResponse({"status": "unavailable", "ledger": reason}, status_code=503)


def _reach(url: str) -> None:
    ledger = open_ledger(url)  # connects and reads the schema version
    try:
        ledger.get_claim("")
    finally:
        ledger.close()


class _LedgerCollector(Collector):
    """What the ledger and the catalogue hold, read at each scrape."""

    def __init__(self, ledger_url: str, catalogue: Catalogue | None) -> None:
        self.ledger_url = ledger_url
        self.catalogue = catalogue

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("overnight_ledger_up", "1 when the ledger answered this scrape.")
        items = GaugeMetricFamily(
            "overnight_job_items", "Items of a job by state.", labels=["job", "state"]
        )
        cost = GaugeMetricFamily(
            "overnight_job_cost_usd", "USD spent on a job's items so far.", labels=["job"]
        )
        saved = GaugeMetricFamily(
            "overnight_job_saved_usd",
            "What a job's batch discounts and cache saved, in USD (its tokens at real-time"
            " prices, less what they cost).",
            labels=["job"],
        )
        try:
            ledger = open_ledger(self.ledger_url)
            try:
                for job in ledger.list_jobs():
                    counts = ledger.counts(job.id)
                    for state in STATES:
                        items.add_metric([job.name, state], counts[state])
                    items.add_metric([job.name, "rejected"], counts.rejected)
                    cost.add_metric([job.name], counts.cost)
                    saved.add_metric([job.name], counts.saved)
            finally:
                ledger.close()
        except OvernightError as exc:
            log.warning("metrics: the ledger did not answer: %s", exc)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
        yield from (up, items, cost, saved)
        if self.catalogue is not None:
            yield from _batch_metrics(self.catalogue.sizes())


def _batch_metrics(sizes: list[tuple[str, str, int]]) -> Iterator[Metric]:
    by_status: dict[tuple[str, str], int] = {}
    by_api: dict[str, list[int]] = {}
    for api, status, total in sizes:
        by_status[api, status] = by_status.get((api, status), 0) + 1
        by_api.setdefault(api, []).append(total)
    batches = GaugeMetricFamily(
        "overnight_batches", "The service's batches by API and status.", labels=["api", "status"]
    )
    for (api, status), n in sorted(by_status.items()):
        batches.add_metric([api, status], n)
    yield batches
    hist = HistogramMetricFamily(
        "overnight_batch_requests",
        "Requests per batch of the Batches APIs (0 until a batch is validated).",
        labels=["api"],
    )
    for api, totals in sorted(by_api.items()):
        buckets: list[tuple[str, float]] = [
            (str(bound), sum(1 for t in totals if t <= bound)) for bound in BATCH_SIZE_BUCKETS
        ]
        buckets.append(("+Inf", len(totals)))
        hist.add_metric([api], buckets, sum_value=sum(totals))
    yield hist


class MetricsMiddleware:
    """Counts and times every HTTP request, labelled with its route's path template
    (`/v1/batches/{batch_id}`, never the id itself: a label per batch would grow without
    bound); a path no route matches is `other`."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before it answers

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = _route_of(scope)
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)


def _route_of(scope: Scope) -> str:
    app: Any = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", ())
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "other") or "other"
        if match == Match.PARTIAL and partial is None:
            partial = getattr(route, "path", None)
    return partial or "other"
