"""Two `overnight serve` on one PostgreSQL ledger share one catalogue (its tables in the
ledger's schema) and one files folder: a file or batch made on one is seen, listed,
cancelled and read on the other; one tenant's quota holds across both."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psycopg
import pytest
from serve_helpers import (
    chat_line,
    client,
    free_port,
    lines_of,
    serving,
    start_process,
    upload,
    wait_for,
    write_config,
)

CHAT = "/v1/chat/completions"
AUTH = '[auth]\nkeys_env = "SERVE_TEST_KEYS"\n'


def _config(folder: Path, ledger: str, extra: str = "", run: str = "batch_size = 2") -> Path:
    config = write_config(folder, extra=AUTH + extra, run=run)
    config.write_text(config.read_text().replace('"state/ledger.db"', f'"{ledger}"'))
    return config


def _calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().split() if log.exists() else []


def test_two_servers_share_files_and_batches_and_one_tenants_quota(
    tmp_path: Path, pg_ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:tenant-a,key-b:tenant-b")
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.2")
    config = _config(tmp_path, pg_ledger_url, "[batches]\nmax_active_per_tenant = 1\n")
    with serving(config) as one, serving(config) as two:
        a1, a2, b2 = client(one, "key-a"), client(two, "key-a"), client(two, "key-b")
        slow = upload(a1, [chat_line(f"s{i}", "sleep") for i in range(30)])
        assert a2.files.retrieve(slow).id == slow  # uploaded on one, seen on two
        assert [f.id for f in a2.files.list()] == [slow]
        assert list(b2.files.list()) == []  # tenants stay apart across servers

        # Four creates at once, two on each server: the quota of one holds across both.
        start = threading.Barrier(4)

        def create(n: int) -> str:
            oai = (a1, a2)[n % 2]
            start.wait()
            try:
                return oai.batches.create(
                    input_file_id=slow, endpoint=CHAT, completion_window="24h"
                ).id
            except openai.RateLimitError:
                return "429"

        with ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(create, range(4)))
        [batch_id] = [o for o in outcomes if o != "429"]
        assert outcomes.count("429") == 3
        assert [b.id for b in a1.batches.list()] == [b.id for b in a2.batches.list()] == [batch_id]
        with pytest.raises(openai.NotFoundError):
            b2.batches.retrieve(batch_id)

        # Cancelled on the server that does not run it: the run on the other stops.
        deadline = time.monotonic() + 60
        while not _calls(tmp_path):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        canceller = a2 if outcomes.index(batch_id) % 2 == 0 else a1  # the other server
        assert canceller.batches.cancel(batch_id).status == "cancelling"
        ended = wait_for(a1, batch_id, ("cancelled",), timeout=60)
        done = [line["custom_id"] for line in lines_of(a2, ended.output_file_id)]
        assert 0 < len(done) < 30
        assert ended.request_counts.completed == len(done)
        time.sleep(1)
        assert sorted(_calls(tmp_path)) == sorted(done)  # nothing ran after the cancel

        # The quota is free again: a batch made on two, finished and read on one.
        quick = upload(a2, [chat_line("x", "hello"), chat_line("y", "boom")])
        made = a2.batches.create(input_file_id=quick, endpoint=CHAT, completion_window="24h")
        finished = wait_for(a1, made.id, ("completed",))
        [out] = lines_of(a1, finished.output_file_id)
        assert out["response"]["body"]["choices"][0]["message"]["content"] == "olleh"
        assert [e["custom_id"] for e in lines_of(a1, finished.error_file_id)] == ["y"]
        assert a1.batches.retrieve(made.id).status == a2.batches.retrieve(made.id).status
    with psycopg.connect(pg_ledger_url, autocommit=True) as db:
        tables = {
            r[0]
            for r in db.execute(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        }
    assert {"serve_files", "serve_batches", "jobs", "items"} <= tables
    assert not (tmp_path / ".overnight" / "serve" / "catalogue.db").exists()


@pytest.mark.slow
def test_a_batch_outlives_a_rolling_restart_of_two_servers(
    tmp_path: Path, pg_ledger_url: str
) -> None:
    """Server one runs a batch; server two starts beside it (joining the batch's job: the
    ledger shares its items out); server one stops (SIGTERM). Server two finishes the batch:
    every custom_id once in the output file, none run twice but those in flight at the stop."""
    n = 60
    config = _config(tmp_path, pg_ledger_url)
    env = {**os.environ, "SERVE_TEST_KEYS": "key-a:tenant-a", "SERVE_TEST_SLEEP": "0.2"}
    ports = free_port(), free_port()
    first = start_process(config, ports[0], env)
    second = None
    try:
        one = client(f"http://127.0.0.1:{ports[0]}/v1", "key-a")
        created = one.batches.create(
            input_file_id=upload(one, [chat_line(f"r{i}", "sleep") for i in range(n)]),
            endpoint=CHAT,
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        while len(_calls(tmp_path)) < 4:
            assert time.monotonic() < deadline, "the batch did not start in 60 s"
            time.sleep(0.05)
        second = start_process(config, ports[1], env)
        two = client(f"http://127.0.0.1:{ports[1]}/v1", "key-a")
        assert two.batches.retrieve(created.id).status == "in_progress"
        first.send_signal(signal.SIGTERM)
        first.wait(60)
        assert len(_calls(tmp_path)) < n, "the batch ended before the first server stopped"
        batch = wait_for(two, created.id, ("completed", "failed"), timeout=180)
        assert batch.status == "completed", batch.errors
        out = lines_of(two, batch.output_file_id)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    assert batch.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
    assert batch.error_file_id is None
    ids = Counter(line["custom_id"] for line in out)
    assert sorted(ids) == sorted(f"r{i}" for i in range(n)) and set(ids.values()) == {1}
    again = [cid for cid, times in Counter(_calls(tmp_path)).items() if times > 1]
    assert len(again) <= 2, again  # at most the pair in flight at the stop


@pytest.mark.slow
def test_a_batch_left_by_a_killed_server_is_taken_up_by_the_other(
    tmp_path: Path, pg_ledger_url: str
) -> None:
    """Two servers run; the one running a batch is killed (SIGKILL). The other adopts the
    batch at its next look (every minute) and finishes it: every custom_id once."""
    n = 30
    config = _config(tmp_path, pg_ledger_url)
    env = {**os.environ, "SERVE_TEST_KEYS": "key-a:tenant-a", "SERVE_TEST_SLEEP": "0.2"}
    ports = free_port(), free_port()
    first, second = start_process(config, ports[0], env), start_process(config, ports[1], env)
    try:
        one = client(f"http://127.0.0.1:{ports[0]}/v1", "key-a")
        two = client(f"http://127.0.0.1:{ports[1]}/v1", "key-a")
        created = one.batches.create(
            input_file_id=upload(one, [chat_line(f"k{i}", "sleep") for i in range(n)]),
            endpoint=CHAT,
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        while (committed := one.batches.retrieve(created.id).request_counts.completed) < 2:
            assert time.monotonic() < deadline, "the batch did not start in 60 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed_at = time.monotonic()
        time.sleep(0.5)  # the function's worker process dies with the server
        before = _calls(tmp_path)
        assert len(before) < n, "the batch ended before the kill"
        batch = wait_for(two, created.id, ("completed", "failed"), timeout=150)
        taken_up = time.monotonic() - killed_at
        assert batch.status == "completed", batch.errors
        out = lines_of(two, batch.output_file_id)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    assert taken_up < 120
    assert batch.request_counts.model_dump() == {"total": n, "completed": n, "failed": 0}
    ids = Counter(line["custom_id"] for line in out)
    assert sorted(ids) == sorted(f"k{i}" for i in range(n)) and set(ids.values()) == {1}
    # Only lines the killed server had run but not committed ran again.
    again = [cid for cid, times in Counter(_calls(tmp_path)).items() if times > 1]
    assert set(again) <= set(before) and len(again) <= len(before) - committed, again


def test_on_postgresql_a_batch_expires_and_metrics_count_the_batches(
    tmp_path: Path, pg_ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalogue's queries that look inside the batch object (expires_at, the request
    counts of /metrics), on PostgreSQL."""
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:tenant-a")
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.3")
    config = _config(tmp_path, pg_ledger_url, "[batches]\ncompletion_window_hours = 0.001\n")
    with serving(config) as url:
        oai = client(url, "key-a")
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"e{i}", "sleep") for i in range(40)]),
            endpoint=CHAT,
            completion_window="24h",
        )
        batch = wait_for(oai, created.id, ("expired", "completed", "failed"), timeout=60)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as r:
            text = r.read().decode()
    assert batch.status == "expired"
    assert 0 < batch.request_counts.completed < 40
    assert batch.request_counts.failed == 40 - batch.request_counts.completed
    assert 'overnight_batches{api="openai",status="expired"} 1.0' in text
    assert 'overnight_batch_requests_sum{api="openai"} 40.0' in text
