"""overnight.integrations.airflow, in Airflow 3: DAGs run by `dag.test()` against Airflow's
default metadata database (SQLite, in a temporary AIRFLOW_HOME made by `airflow db migrate`).

Airflow pins much of what the project's own venv needs newer, so it lives in a venv of its
own, .venv-airflow (`make setup-airflow`, which `make test` runs): every DAG here runs in a
`.venv-airflow/bin/python` process, and a test fails, naming the make target, when that venv
is missing. These tests stay in pytest's own process (the project's venv) to read what the
DAG wrote and to serve the fake provider, whose counts prove nothing was sent twice.

A kill is a real SIGKILL of the process running `dag.test()` (the task runs in it, and so does
the trigger, inline); running the DAG again for the same logical date clears the task and
runs it again, as a retry does: the ledger resumes the job."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from llm_helpers import KEY, read_jsonl, write_records

from overnight import Job
from overnight.testing.fake_provider import FakeProvider

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-airflow"

DAG = """\
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson
from airflow.sdk import DAG, task

from overnight.integrations.airflow import OvernightOperator

HERE = Path({folder!r})
WHEN = datetime(2026, 1, 5, tzinfo=timezone.utc)

with DAG({dag_id!r}, schedule=None, start_date=WHEN) as dag:
    job = OvernightOperator(task_id="enrich", job_file=HERE / "job.toml", poll_interval=0.2)

    @task
    def keep(report):  # what a downstream task gets: the report, through XCom
        (HERE / "report.json").write_bytes(orjson.dumps(report))

    keep(job.output)

if __name__ == "__main__":
    run = dag.test(logical_date=WHEN, run_after=WHEN)  # the same DAG run every time
    sys.exit(0 if run.state == "success" else 1)
"""

PYTHON_JOB = """\
name = "enrich"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "fn:score"
[run]
isolation = "none"
batch_size = 1
[output]
path = "out.jsonl"
"""

# One line per record computed, in calls.log. r0-r4 take 0.3 s each, so the runner records
# some of them before r5 (it commits what it computed every 0.5 s); r5 hangs the first time
# it is computed (the run is killed there), and goes through once calls.log shows it before.
FN = """\
import time
from pathlib import Path

CALLS = Path(__file__).with_name("calls.log")


def score(records):
    for r in records:
        seen = CALLS.read_text().split() if CALLS.exists() else []
        with CALLS.open("a") as f:
            f.write(r["id"] + "\\n")
        if r["n"] < 5:
            time.sleep(0.3)
        while r["id"] == "r5" and "r5" not in seen:
            time.sleep(1)
    return [r["n"] * 2 for r in records]
"""

BATCH_JOB = """\
name = "summaries"
[source]
path = "in.jsonl"
id = "id"
[task]
kind = "generate"
[model]
backend = "openai-batch"
name = "gpt-4o-mini"
base_url = "{url}"
poll_interval = 0.05
max_requests_per_batch = 10
params = {{ max_tokens = 32 }}
[output]
path = "out.jsonl"
"""


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of an Airflow 3 of its own: AIRFLOW_HOME with a fresh SQLite
    metadata database, and a DAGs folder."""
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: `make setup-airflow` makes the Airflow venv")
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONUNBUFFERED": "1",  # the logs the tests wait for, as they are written
        "OPENAI_API_KEY": KEY,
    }
    (home / "dags").mkdir()
    done = subprocess.run(
        [str(VENV / "bin" / "airflow"), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return env


def dag_file(env: dict[str, str], folder: Path, dag_id: str) -> Path:
    path = Path(env["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{dag_id}.py"
    path.write_text(DAG.format(folder=str(folder), dag_id=dag_id))
    return path


def start_dag(env: dict[str, str], dag: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [str(VENV / "bin" / "python"), str(dag)], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def finish(proc: subprocess.Popen, log: Path) -> str:
    """The output of `dag.test()` once it has ended (it must succeed)."""
    rc = proc.wait(timeout=300)
    text = log.read_text()
    assert rc == 0, text[-6000:]
    return text


def run_dag(env: dict[str, str], dag: Path, log: Path) -> str:
    return finish(start_dag(env, dag, log), log)


TRIGGER_POLLED = re.compile(r"provider batch \S+ is running")


def polled_then_end_batches(proc: subprocess.Popen, log: Path, fake: FakeProvider) -> str:
    """Once the trigger has found a batch running, the provider ends every batch; the
    output of the DAG run, to its end."""
    wait_for(lambda: TRIGGER_POLLED.search(log.read_text()) or proc.poll() is not None)
    fake.complete_batches()
    return finish(proc, log)


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_a_task_killed_mid_run_is_retried_and_resumes_the_job(
    airflow: dict[str, str], tmp_path: Path
) -> None:
    """A python function job: the process running the task is killed with SIGKILL while it
    computes r5; the DAG run again for the same date retries the task, which resumes the
    job: what was recorded is not computed again, and the report reaches the next task."""
    (tmp_path / "fn.py").write_text(FN)
    (tmp_path / "job.toml").write_text(PYTHON_JOB)
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(10))
    )
    dag = dag_file(airflow, tmp_path, "overnight_python_kill")
    calls = tmp_path / "calls.log"
    proc = start_dag(airflow, dag, tmp_path / "first.log")
    try:
        wait_for(lambda: calls.exists() and "r5" in calls.read_text().split())
    finally:
        proc.kill()  # SIGKILL
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "report.json").exists()
    recorded = Job.from_file(tmp_path / "job.toml").status().counts["succeeded"]
    assert 1 <= recorded < 5

    log = run_dag(airflow, dag, tmp_path / "second.log")
    assert "run_id=manual__2026-01-05T00:00:00+00:00" in log  # the same DAG run, its task again
    # What the ledger had recorded is not computed again; what was computed and not yet
    # recorded when the process died (r5, and the records since the last commit) is.
    seen = Counter(calls.read_text().split())
    again = {f"r{i}" for i in range(recorded, 6)}
    assert seen == Counter({f"r{i}": 2 if f"r{i}" in again else 1 for i in range(10)})
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["succeeded"] == 10 and report["exit_code"] == 0
    assert report["processed"] == 10 - recorded
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["output"] for r in rows] == [i * 2 for i in range(10)]


SLOW_FN = """\
import time
from pathlib import Path

CALLS = Path(__file__).with_name("calls.log")


def score(records):
    for r in records:
        with CALLS.open("a") as f:
            f.write(r["id"] + "\\n")
        time.sleep(0.3)
    return [r["n"] * 2 for r in records]
"""


def test_a_task_stopped_with_sigterm_commits_lets_go_and_its_retry_computes_the_rest(
    airflow: dict[str, str], tmp_path: Path
) -> None:
    """SIGTERM is how Airflow stops a running task (marked failed or cleared in the UI, a
    worker shut down): the task runner calls the operator's on_kill. The run ends after the
    record it is computing, commits it and lets go of the job, and the task fails (a retry
    resumes it); the DAG run again computes only the rest: no record is computed twice, and
    no lease or claim of the killed try is waited for."""
    (tmp_path / "fn.py").write_text(SLOW_FN)
    (tmp_path / "job.toml").write_text(PYTHON_JOB)
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(20))
    )
    dag = dag_file(airflow, tmp_path, "overnight_python_sigterm")
    calls = tmp_path / "calls.log"
    log = tmp_path / "first.log"
    proc = start_dag(airflow, dag, log)
    try:
        wait_for(lambda: calls.exists() and len(calls.read_text().split()) >= 3)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)  # on_kill ignored, it would run all 20 records (6 s) or hang
    finally:
        proc.kill()
    text = log.read_text()
    assert rc != 0 and "stopping the run (task killed)" in text, text[-4000:]
    assert "the run was interrupted; a retry of the task resumes it" in text, text[-4000:]
    status = Job.from_file(tmp_path / "job.toml").status()
    done = status.counts["succeeded"]
    assert 3 <= done < 20 and status.counts["leased"] == 0
    assert len(calls.read_text().split()) == done  # what it computed, it committed

    run_dag(airflow, dag, tmp_path / "second.log")  # at once: nothing of the first try held
    assert Counter(calls.read_text().split()) == Counter(f"r{i}" for i in range(20))
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["succeeded"] == 20 and report["processed"] == 20 - done


def test_a_batch_job_defers_while_its_batches_run_and_reports_through_xcom(
    airflow: dict[str, str], tmp_path: Path, fake: FakeProvider
) -> None:
    write_records(tmp_path, 25)
    (tmp_path / "job.toml").write_text(BATCH_JOB.format(url=fake.openai_url))
    dag = dag_file(airflow, tmp_path, "overnight_batch")
    fake.knobs.batch_seconds = 3600  # until the test ends them
    log = tmp_path / "run.log"
    text = polled_then_end_batches(start_dag(airflow, dag, log), log, fake)
    assert "deferring (no worker slot held)" in text
    assert "[DAG TEST] running trigger in line" in text
    assert TRIGGER_POLLED.search(text)  # the trigger polled the provider
    assert "[DAG TEST] Trigger completed" in text
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["succeeded"] == 25 and report["exit_code"] == 0
    assert len(report["remote_batches"]) == 3 and report["saved"] > 0
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"r{i}" for i in range(25)]
    assert fake.stats.batch_creations == 3
    assert sorted(set(fake.stats.batch_items.values())) == [1]


def test_a_batch_task_killed_while_deferred_is_retried_and_pays_nothing_twice(
    airflow: dict[str, str], tmp_path: Path, fake: FakeProvider
) -> None:
    """Killed while the trigger polls the provider; the retried task finds the batches in
    the ledger, submits nothing again, waits for them and collects every result once."""
    write_records(tmp_path, 25)
    (tmp_path / "job.toml").write_text(BATCH_JOB.format(url=fake.openai_url))
    dag = dag_file(airflow, tmp_path, "overnight_batch_kill")
    fake.knobs.batch_seconds = 3600  # until the test ends them
    first = tmp_path / "first.log"
    proc = start_dag(airflow, dag, first)
    polled = threading.Event()

    def kill_at_a_poll(method: str, path: str) -> None:
        if method == "GET" and re.fullmatch(r"/v1/batches/[^/]+", path) and not polled.is_set():
            polled.set()
            os.kill(proc.pid, signal.SIGKILL)

    fake.knobs.after_acting = kill_at_a_poll
    try:
        assert proc.wait(timeout=300) == -signal.SIGKILL
    finally:
        fake.knobs.after_acting = None
    assert "[DAG TEST] running trigger in line" in first.read_text()  # killed while deferred
    assert fake.stats.batch_creations == 3

    second = tmp_path / "second.log"
    text = polled_then_end_batches(start_dag(airflow, dag, second), second, fake)
    assert TRIGGER_POLLED.search(text)  # the task ran again, deferred again on the same batches
    assert fake.stats.batch_creations == 3  # none created again
    assert sorted(set(fake.stats.batch_items.values())) == [1]  # every item sent once
    assert sum(fake.stats.batch_items.values()) == 25
    report = orjson.loads((tmp_path / "report.json").read_bytes())
    assert report["succeeded"] == 25 and report["exit_code"] == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"r{i}" for i in range(25)]


POLICY_DAG = """\
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson
from airflow.sdk import DAG, task

from overnight.integrations.airflow import OvernightOperator

HERE = Path({folder!r})
WHEN = datetime(2026, 1, 5, tzinfo=timezone.utc)

with DAG({dag_id!r}, schedule=None, start_date=WHEN) as dag:
    for policy in ("fail", "warn"):
        job = OvernightOperator(
            task_id=policy, job_file=HERE / policy / "job.toml", on_failed=policy
        )

        @task(task_id=f"keep_{{policy}}")
        def keep(report, policy=policy):
            (HERE / policy / "report.json").write_bytes(orjson.dumps(report))

        keep(job.output)

if __name__ == "__main__":
    dag.test(logical_date=WHEN, run_after=WHEN)
"""

FAILING_FN = """\
def score(records):
    if any(r["n"] == 3 for r in records):
        raise ValueError("three is refused")
    return [r["n"] * 2 for r in records]
"""


def test_failed_items_fail_the_task_or_warn(airflow: dict[str, str], tmp_path: Path) -> None:
    """on_failed: "fail" fails the task (no report downstream), "warn" succeeds and hands the
    report on; either way what succeeded is written."""
    for policy in ("fail", "warn"):
        folder = tmp_path / policy
        folder.mkdir()
        (folder / "fn.py").write_text(FAILING_FN)
        (folder / "job.toml").write_text(PYTHON_JOB.replace("[run]", "[run]\nmax_attempts = 1"))
        (folder / "in.jsonl").write_bytes(
            b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(6))
        )
    dag = Path(airflow["AIRFLOW__CORE__DAGS_FOLDER"]) / "overnight_policy.py"
    dag.write_text(POLICY_DAG.format(folder=str(tmp_path), dag_id="overnight_policy"))
    text = run_dag(airflow, dag, tmp_path / "run.log")
    assert "enrich: 1 item(s) failed or invalid (see `overnight failures`)" in text
    assert not (tmp_path / "fail" / "report.json").exists()  # the task failed: no XCom
    report = orjson.loads((tmp_path / "warn" / "report.json").read_bytes())
    assert report["succeeded"] == 5 and report["failed"] == 1 and report["exit_code"] == 3
    for policy in ("fail", "warn"):
        assert len(read_jsonl(tmp_path / policy / "out.jsonl")) == 5


def test_a_bad_job_file_is_an_import_error_of_the_dag(
    airflow: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "job.toml").write_text(PYTHON_JOB.replace("[model]", "[model]\nbakend = 'x'"))
    code = (
        "from overnight.integrations.airflow import OvernightOperator\n"
        f"OvernightOperator(task_id='enrich', job_file={str(tmp_path / 'job.toml')!r})\n"
    )
    done = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", code],
        env=airflow,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "OvernightOperator(task_id='enrich')" in done.stderr and "bakend" in done.stderr


EXAMPLE = ROOT / "examples" / "airflow"


def test_the_example_dag_summarises_the_tickets_and_writes_the_digest(
    airflow: dict[str, str], tmp_path: Path, fake: FakeProvider
) -> None:
    """examples/airflow (the nightly ticket digest), run by `dag.test()` as run_offline.sh
    runs it, against this test's fake provider."""
    folder = tmp_path / "airflow"
    shutil.copytree(
        EXAMPLE, folder, ignore=shutil.ignore_patterns("data", ".airflow", ".overnight")
    )
    job = folder / "summarise.toml"
    job.write_text(job.read_text().replace("http://127.0.0.1:8000/v1", fake.openai_url))
    env = {**airflow, "AIRFLOW__CORE__DAGS_FOLDER": str(folder / "dags")}
    log = tmp_path / "run.log"
    text = polled_then_end_batches(
        start_dag(env, folder / "dags" / "ticket_digest.py", log), log, fake
    )
    assert "deferring (no worker slot held)" in text
    digest = (folder / "data" / "digest.md").read_text()
    assert "tickets: 120 summarised, 0 failed" in digest and "in 2 provider batches" in digest
    assert len(read_jsonl(folder / "data" / "summaries.jsonl")) == 120
