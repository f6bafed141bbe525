"""The dashboard, /metrics and /healthz, over HTTP: `overnight dashboard`'s app on a ledger
with a real job in it, and `overnight serve`'s with tenants and their batches (the browser
test is test_dashboard_browser.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import uvicorn
from dashboard_helpers import flaky_job
from serve_helpers import chat_line, client, free_port, serving, upload, wait_for, write_config

from overnight.job import Job
from overnight.service.dashboard import Access, create_dashboard_app, overview
from overnight.store import open_ledger


@contextmanager
def running(app: Any) -> Iterator[str]:
    """`app` under uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
        if found == labels:
            return float(m[3])
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


@pytest.fixture
def finished_job(tmp_path: Path) -> tuple[Path, str]:
    """A job that ran: 36 records succeeded, 4 failed (r7, r17, r27, r37)."""
    job = flaky_job(tmp_path / "job")
    report = Job.from_file(job).run()
    assert (report.counts["succeeded"], report.counts["failed"]) == (36, 4)
    return job, str(job.parent / ".overnight" / "ledger.db")


def test_the_page_shows_counts_progress_throughput_and_failures_with_their_lines(
    finished_job: tuple[Path, str],
) -> None:
    _, ledger = finished_job
    with running(create_dashboard_app(ledger)) as url, httpx.Client(base_url=url) as http:
        page = http.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        job = re.search(r'<article class="job" data-job="job"[^>]*>', html)
        assert job is not None
        assert 'data-state="finished"' in job[0] and 'data-done="40"' in job[0]
        assert 'data-total="40"' in job[0]
        assert "succeeded 36" in html and "failed 4" in html
        assert "<b>40</b> of 40 done (100%)" in html
        # each failure: its id, line, message and the input line itself (escaped)
        for n in (7, 17, 27, 37):
            assert f"record {n} is not allowed" in html
            assert f"{{&#34;id&#34;:&#34;r{n}&#34;,&#34;n&#34;:{n}}}" in html
        assert re.search(r'<td class="mono">r17</td>\s*<td class="num">18</td>', html)
        # the throughput plot: bars for the 40 items finished a moment ago
        assert '<svg class="plot"' in html and "<rect " in html
        assert "Retry 4 failed" in html
        # the script that refreshes the page is served from the package, not a CDN
        assert "https://" not in html
        js = http.get("/dashboard/static/dashboard.js")
        assert js.status_code == 200 and "/dashboard/main" in js.text
        part = http.get("/dashboard/main", params={"window": "1h"})
        assert part.status_code == 200 and "<html" not in part.text
        assert 'data-job="job"' in part.text and 'class="on">1h</a>' in part.text


def test_retry_moves_failed_items_back_to_pending_and_a_run_finishes_them(
    finished_job: tuple[Path, str],
) -> None:
    job_file, ledger = finished_job
    with running(create_dashboard_app(ledger)) as url, httpx.Client(base_url=url) as http:
        # another site's page cannot press the button
        refused = http.post(
            "/dashboard/retry", data={"job": "job"}, headers={"origin": "http://evil.example"}
        )
        assert refused.status_code == 403
        assert http.post("/dashboard/retry", data={"job": "nope"}).status_code == 404

        pressed = http.post("/dashboard/retry", data={"job": "job"})  # the page's form
        assert pressed.status_code == 303
        assert pressed.headers["location"] == "/?retried=job&moved=4"
        page = http.get(pressed.headers["location"]).text
        assert "4 failed items of job moved back to pending." in page
        assert "pending 4" in page and "Retry" not in page
        counts = _counts(ledger)
        assert (counts["pending"], counts["failed"], counts["succeeded"]) == (4, 0, 36)

        (job_file.parent / "fixed").touch()
        Job.from_file(job_file).run()
        assert 'data-done="40"' in http.get("/").text
        assert "succeeded 40" in http.get("/").text
        again = http.post(
            "/dashboard/retry", data={"job": "job"}, headers={"accept": "application/json"}
        )
        assert again.json() == {"job": "job", "moved": 0}
    assert _counts(ledger)["succeeded"] == 40


def _counts(url: str) -> Any:
    ledger = open_ledger(url)
    try:
        job = ledger.get_job("job")
        assert job is not None
        return ledger.counts(job.id)
    finally:
        ledger.close()


def test_with_keys_the_page_and_the_button_ask_for_one(finished_job: tuple[Path, str]) -> None:
    _, ledger = finished_job
    app = create_dashboard_app(ledger, {"ops-key": "ops"})
    with running(app) as url, httpx.Client(base_url=url) as http:
        asked = http.get("/")
        assert asked.status_code == 401 and 'name="key"' in asked.text
        assert http.get("/dashboard/main").status_code == 401
        blind = http.post(
            "/dashboard/retry", data={"job": "job"}, headers={"accept": "application/json"}
        )
        assert blind.status_code == 401
        assert _counts(ledger)["failed"] == 4

        wrong = http.post("/dashboard/login", data={"key": "guess"})
        assert wrong.status_code == 401 and "not one of this server" in wrong.text
        assert http.get("/", headers={"authorization": "Bearer ops-key"}).status_code == 200

        logged_in = http.post("/dashboard/login", data={"key": "ops-key"})
        assert logged_in.status_code == 303
        cookie = logged_in.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert http.get("/").status_code == 200  # the client keeps the cookie
        moved = http.post(
            "/dashboard/retry", data={"job": "job"}, headers={"accept": "application/json"}
        )
        assert moved.json() == {"job": "job", "moved": 4}
        http.post("/dashboard/logout")
        assert http.get("/").status_code == 401


def test_metrics_and_healthz(finished_job: tuple[Path, str]) -> None:
    _, ledger = finished_job
    app = create_dashboard_app(ledger)
    with running(app) as url, httpx.Client(base_url=url) as http:
        assert http.get("/").status_code == 200
        assert http.get("/nothing-here").status_code == 404
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        app.state.metrics.set_queue_depth("enrich", 7)
        for size, seconds in ((3, 0.02), (64, 0.4)):
            app.state.metrics.observe_model_batch("enrich", size, seconds)
        scraped = http.get("/metrics")
        assert scraped.headers["content-type"].startswith("text/plain; version=")
        text = scraped.text
    assert metric(text, "overnight_http_requests_total", method="GET", route="/", status="200")
    assert metric(text, "overnight_http_requests_total", method="GET", route="other", status="404")
    assert metric(
        text, "overnight_http_request_duration_seconds_count", method="GET", route="/healthz"
    )
    assert metric(text, "overnight_job_items", job="job", state="succeeded") == 36
    assert metric(text, "overnight_job_items", job="job", state="failed") == 4
    assert metric(text, "overnight_job_items", job="job", state="pending") == 0
    assert metric(text, "overnight_job_cost_usd", job="job") == 0
    assert metric(text, "overnight_ledger_up") == 1
    assert metric(text, "overnight_queue_depth", model="enrich") == 7
    assert metric(text, "overnight_model_batch_size_bucket", model="enrich", le="4.0") == 1
    assert metric(text, "overnight_model_batch_size_count", model="enrich") == 2
    assert metric(text, "overnight_model_batch_size_sum", model="enrich") == 67
    assert metric(text, "overnight_model_call_duration_seconds_count", model="enrich") == 2
    assert metric(
        text, "overnight_model_call_duration_seconds_sum", model="enrich"
    ) == pytest.approx(0.42)
    assert (
        metric(text, "overnight_model_call_duration_seconds_bucket", model="enrich", le="0.25") == 1
    )


def test_healthz_is_503_when_the_ledger_cannot_be_reached() -> None:
    app = create_dashboard_app("postgresql://127.0.0.1:1/test")  # nothing listens there
    with running(app) as url, httpx.Client(base_url=url) as http:
        health = http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert "127.0.0.1:1" in health.json()["ledger"]
        text = http.get("/metrics").text
    assert metric(text, "overnight_ledger_up") == 0


def test_on_postgresql_the_page_shows_the_same(tmp_path: Path, pg_ledger_url: str) -> None:
    job = flaky_job(tmp_path / "job")
    Job.from_file(job, state=pg_ledger_url).run()
    view = overview(pg_ledger_url, Access(None), "default", "5m")
    [seen] = view.jobs
    assert (seen.name, seen.state, seen.done, seen.counts["failed"]) == ("job", "finished", 40, 4)
    assert sum(seen.series) == 40  # every item finished inside the window
    assert [fv.failure.custom_id for fv in seen.failures] == ["r7", "r17", "r27", "r37"]
    assert seen.failures[0].record == '{"id":"r7","n":7}'


# -- on `overnight serve`: tenants see their own batches' jobs ------------------------------


def test_on_the_service_a_tenant_sees_and_retries_only_its_own_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:tenant-a,key-b:tenant-b")
    config = write_config(tmp_path, extra='[auth]\nkeys_env = "SERVE_TEST_KEYS"')
    with serving(config) as base:
        root = base.removesuffix("/v1")
        a, b = client(base, "key-a"), client(base, "key-b")
        done = {}
        for who, oai in (("a", a), ("b", b)):
            file_id = upload(oai, [chat_line(f"{who}1", "hello"), chat_line(f"{who}2", "boom")])
            batch = oai.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done[who] = wait_for(oai, batch.id, ("completed",))
        with httpx.Client(base_url=root) as http:
            assert http.get("/").status_code == 401
            page = http.get("/", headers={"authorization": "Bearer key-a"}).text
            assert f'data-job="{done["a"].id}"' in page and done["b"].id not in page
            assert f'data-batch="{done["a"].id}"' in page
            assert "tenant <b>tenant-a</b>" in page
            # The batch has ended: its files are final (a client may have read them), so no
            # button; the page says where the failed line is and to send it as a new batch.
            note = (
                f"Batch {done['a'].id} has ended (completed): its output and error files are"
                " final, so its failed lines are not retried here. They are in its error file"
                f" {done['a'].error_file_id}; send them again as a new batch."
            )
            assert "Retry 1 failed" not in page and note in page
            as_a = {"authorization": "Bearer key-a", "accept": "application/json"}
            ended = http.post("/dashboard/retry", data={"job": done["a"].id}, headers=as_a)
            assert ended.status_code == 409 and ended.json() == {"error": note}
            # A form sent from a page drawn before the batch ended: the page, saying why.
            form = http.post(
                "/dashboard/retry",
                data={"job": done["a"].id},
                headers={"authorization": "Bearer key-a"},
            )
            assert form.status_code == 303
            assert form.headers["location"] == f"/?refused={done['a'].id}"
            shown = http.get(form.headers["location"], headers={"authorization": "Bearer key-a"})
            assert f'<p class="notice refused" role="alert">{note}</p>' in shown.text
            failed = a.files.content(done["a"].error_file_id).content  # type: ignore[arg-type]
            assert b'"custom_id":"a2"' in failed  # where the note says
            other = http.post("/dashboard/retry", data={"job": done["b"].id}, headers=as_a)
            assert other.status_code == 404

            assert http.get("/healthz").status_code == 200
            text = http.get("/metrics").text
    assert metric(text, "overnight_batches", api="openai", status="completed") == 2
    assert metric(text, "overnight_batch_requests_bucket", api="openai", le="10") == 2
    assert metric(text, "overnight_batch_requests_sum", api="openai") == 4
    assert metric(text, "overnight_job_items", job=done["a"].id, state="failed") == 1
    assert metric(
        text, "overnight_http_requests_total", method="POST", route="/v1/batches", status="200"
    )
    assert metric(
        text,
        "overnight_http_requests_total",
        method="GET",
        route="/v1/batches/{batch_id}",
        status="200",
    )


# -- the command ---------------------------------------------------------------------------


def _dashboard(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "overnight", "dashboard", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_command_refuses_an_open_page_off_loopback_and_a_missing_ledger(
    finished_job: tuple[Path, str], tmp_path: Path
) -> None:
    _, ledger = finished_job
    wide = _dashboard("--ledger", ledger, "--host", "0.0.0.0", cwd=tmp_path)
    assert wide.returncode == 2 and "give --keys-env" in wide.stderr
    assert "Traceback" not in wide.stderr
    missing = _dashboard("--ledger", str(tmp_path / "none.db"), cwd=tmp_path)
    assert missing.returncode == 2 and "no ledger at" in missing.stderr
    unset = _dashboard("--ledger", ledger, "--keys-env", "NO_SUCH_VARIABLE_X", cwd=tmp_path)
    assert unset.returncode == 2 and "$NO_SUCH_VARIABLE_X is not set" in unset.stderr


def test_an_ended_message_batch_says_where_its_failed_requests_are(tmp_path: Path) -> None:
    import anthropic

    with serving(write_config(tmp_path)) as base:
        root = base.removesuffix("/v1")
        api = anthropic.Anthropic(base_url=root, api_key="x", max_retries=0)
        params = {"model": "rev", "max_tokens": 8}
        created = api.messages.batches.create(
            requests=[  # type: ignore[list-item]
                {
                    "custom_id": "ok",
                    "params": {**params, "messages": [{"role": "user", "content": "hi"}]},
                },
                {
                    "custom_id": "no",
                    "params": {**params, "messages": [{"role": "user", "content": "boom"}]},
                },
            ]
        )
        deadline = time.monotonic() + 60
        while api.messages.batches.retrieve(created.id).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        note = (
            f"Message batch {created.id} has ended: its results are final, so its failed"
            " requests are not retried here. They are its `errored` results; send them again"
            " as a new batch."
        )
        with httpx.Client(base_url=root) as http:
            page = http.get("/").text
            refused = http.post(
                "/dashboard/retry",
                data={"job": f"{created.id}.0"},
                headers={"accept": "application/json"},
            )
    assert note in page
    assert "Retry 1 failed" not in page
    assert refused.status_code == 409 and refused.json() == {"error": note}
