"""The dashboard in a real browser: headless Chromium (Debian's `chromium` package, installed
by `make chromium`) driven by Playwright. `overnight dashboard --keys-env` runs as a process
of its own over the ledger of a python job that runs in a thread of the test: the page asks
for the key, shows the job's progress moving by itself, lists its failures, and its retry
button turns them back to pending; run again, they succeed.

A screenshot of the page with the failures is saved beside the test's files, and also to
$DASHBOARD_SCREENSHOT when set (docs/dashboard.png is made so)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from dashboard_helpers import flaky_job
from playwright.sync_api import Page, expect, sync_playwright
from serve_helpers import free_port

from overnight.job import Job
from overnight.store import open_ledger

CHROMIUM = "/usr/bin/chromium"
KEY = "dash-key-1"


def _done(page: Page) -> int:
    return int(page.locator('article[data-job="job"]').get_attribute("data-done") or 0)


def test_the_page_shows_progress_moving_and_its_retry_button_works(tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make chromium` installs it"
    job_file = flaky_job(tmp_path, n=80, batch_size=2, sleep=0.15)  # ~6 s of work
    ledger = tmp_path / ".overnight" / "ledger.db"
    ledger.parent.mkdir()
    open_ledger(str(ledger)).close()  # the dashboard serves an existing ledger only
    port = free_port()
    env = {**os.environ, "DASH_KEYS": f"{KEY}:ops"}
    with open(tmp_path / "dashboard.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "overnight", "dashboard", "--ledger", str(ledger)]
            + ["--port", str(port), "--keys-env", "DASH_KEYS"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    runs: list[threading.Thread] = []

    def run_job() -> None:
        thread = threading.Thread(target=Job.from_file(job_file).run, daemon=True)
        thread.start()
        runs.append(thread)

    try:
        _wait_healthy(url, server, tmp_path)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            # the key first: the same keys as the API
            page.fill('input[name="key"]', KEY)
            page.click("button[type=submit]")
            expect(page.locator("header")).to_contain_text("tenant ops")
            expect(page.locator("#main")).to_contain_text("No jobs in this ledger")

            run_job()
            job = page.locator('article[data-job="job"]')
            # the page refreshes itself: the job appears, running, and its count moves on
            expect(job).to_have_attribute("data-state", "running", timeout=20_000)
            first = _done(page)
            page.wait_for_function(
                f"document.querySelector('article[data-job=\"job\"]').dataset.done > {first}",
                timeout=10_000,
            )
            second = _done(page)
            assert first < 80 and first < second, (first, second)
            width = job.locator(".progress .bar").get_attribute("style")
            assert width is not None and "width:" in width

            runs[-1].join(60)
            expect(job).to_have_attribute("data-state", "finished", timeout=10_000)
            expect(job).to_have_attribute("data-done", "80")
            expect(job.locator('[data-count="failed"]')).to_have_text("failed 8")
            expect(job.locator("tr.failure")).to_have_count(8)
            expect(job.locator("tr.failure").first).to_contain_text("record 7 is not allowed")
            expect(job.locator("tr.failure").first).to_contain_text('{"id":"r7","n":7}')
            expect(page.locator("svg.plot rect").first).to_be_visible()
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            if target := os.environ.get("DASHBOARD_SCREENSHOT"):
                shutil.copyfile(shot, target)

            job.locator("button.retry").click()
            expect(page.locator(".notice")).to_contain_text(
                "8 failed items of job moved back to pending"
            )
            expect(job.locator('[data-count="pending"]')).to_have_text("pending 8")
            expect(job.locator('[data-count="failed"]')).to_have_count(0)
            expect(job.locator("button.retry")).to_have_count(0)

            (tmp_path / "fixed").touch()
            run_job()
            expect(job.locator('[data-count="succeeded"]')).to_have_text(
                "succeeded 80", timeout=30_000
            )
            expect(job.locator('[data-count="pending"]')).to_have_count(0)
            browser.close()
        runs[-1].join(60)
    finally:
        server.terminate()
        server.wait(30)


def _wait_healthy(url: str, server: subprocess.Popen, folder: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        assert server.poll() is None, (folder / "dashboard.log").read_text()
        assert time.monotonic() < deadline, "the dashboard did not answer in 60 s"
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
