"""What the second hostile week found (after issue 7's fixes): each test here failed on main.

Tried as a new user and as an adversary would: job files that point the output at the input,
exports onto a disk that cannot take them, inputs written by Windows tools or with a quote
never closed, user code that forks and crashes or prints, numbers TOML allows that no timeout
can take, a ledger written by an older overnight with batches still running, two job files
sharing one ledger."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from pathlib import Path
from threading import Event

import orjson
import pytest
from llm_helpers import KEY, read_jsonl, write_records

import overnight
from overnight import records, sources
from overnight.errors import InputChangedError, JobFileError, UsageError
from overnight.store import SQLiteLedger
from overnight.testing.fake_provider import FakeProvider

# -- small helpers ----------------------------------------------------------------------------

RECORDS = b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n'


def python_job(folder: Path, output: str = "out.jsonl", errors: str | None = None) -> Path:
    """A python job over in.jsonl (two records) in `folder`; returns the job file."""
    (folder / "in.jsonl").write_bytes(RECORDS)
    (folder / "fn.py").write_text("def f(records):\n    return [r['text'] for r in records]\n")
    extra = f'errors = "{errors}"\n' if errors else ""
    path = folder / "job.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [source]
            path = "in.jsonl"
            id = "id"
            [task]
            kind = "map"
            [model]
            backend = "python"
            function = "fn:f"
            [run]
            isolation = "none"
            [output]
            path = "{output}"
            """
        )
        + extra
    )
    return path


def cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **env},
        timeout=300,
    )


# -- an output must never replace a file the job needs (data loss) -----------------------------


@pytest.mark.parametrize(
    ("output", "errors", "victim"),
    [
        ("in.jsonl", None, "in.jsonl"),  # the input became the output
        ("out.jsonl", "in.jsonl", "in.jsonl"),  # the input became the (empty) errors file
        ("out.jsonl", "job.toml", "job.toml"),  # the job file, emptied
        ("out.jsonl", "fn.py", "fn.py"),  # the user's code, emptied
        ("out.jsonl", "out.jsonl", "out.jsonl"),  # the results, replaced by the errors file
        ("link.jsonl", None, "in.jsonl"),  # the input, through a symlink
    ],
)
def test_an_output_that_would_replace_a_file_the_job_needs_is_exit_2(
    tmp_path: Path, output: str, errors: str | None, victim: str
) -> None:
    """On main each of these exited 0 having overwritten the file: `[output] path` or
    `errors` naming the input, the job file or the function's module destroyed it."""
    job_file = python_job(tmp_path, output, errors)
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    (tmp_path / "out.jsonl").write_bytes(b'{"id": "a", "output": "an earlier result"}\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    job = overnight.Job.from_file(job_file)
    with pytest.raises(UsageError, match=r"\[output\] (path|errors)"):
        job.run()
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before
    done = cli("run", str(job_file))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "[output]" in done.stderr and "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_export_with_an_output_that_would_replace_the_input_is_refused(tmp_path: Path) -> None:
    """`overnight export` after the job file was edited to write onto the input: exit 2, the
    input intact (on main the export replaced it)."""
    job_file = python_job(tmp_path)
    assert overnight.Job.from_file(job_file).run().exit_code == 0
    text = job_file.read_text().replace('path = "out.jsonl"', 'path = "in.jsonl"')
    job_file.write_text(text)
    done = cli("export", str(job_file))
    assert done.returncode == 2, done.stdout + done.stderr
    assert (tmp_path / "in.jsonl").read_bytes() == RECORDS


def test_the_ledger_is_no_output_either(tmp_path: Path) -> None:
    job_file = python_job(tmp_path, "state.jsonl")
    job = overnight.Job.from_file(job_file, state=tmp_path / "state.jsonl")
    with pytest.raises(UsageError, match=r"\[output\] path: .* is the ledger"):
        job.run()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_output_that_cannot_be_written_is_exit_2_and_the_results_are_kept(
    tmp_path: Path,
) -> None:
    """On main: "error: FileNotFoundError: … (an unexpected error … report it)", exit 1,
    after computing everything. (A folder under /proc cannot be made, even by root: the
    same path as a read-only folder or a full disk.)"""
    job_file = python_job(tmp_path, "/proc/overnight-test-no-such-folder/out.jsonl")
    done = cli("run", str(job_file))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "[output] path: cannot write /proc/overnight-test-no-such-folder/out.jsonl" in (
        done.stderr
    )
    assert "unexpected" not in done.stderr
    job_file.write_text(job_file.read_text().replace("/proc/overnight-test-no-such-folder/", ""))
    exported = cli("export", str(job_file))
    assert exported.returncode == 0, exported.stderr
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["x", "y"]


# -- inputs as they come ------------------------------------------------------------------------


def test_a_jsonl_file_with_a_byte_order_mark_loses_no_record(tmp_path: Path) -> None:
    """Notepad and PowerShell write UTF-8 with a BOM; on main line 1 failed as "not valid
    UTF-8" (it is valid UTF-8)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + RECORDS)
    rows = [r for chunk in sources.read_jsonl(path, "id") for r in chunk]
    assert [(r.custom_id, r.error) for r in rows] == [("a", None), ("b", None)]
    # Resuming after the first record does not trip over the mark either.
    again = sources.read_jsonl(path, "id", records.cursor_after(rows[0], 1))
    assert [r.custom_id for chunk in again for r in chunk] == ["b"]


def test_a_csv_quote_never_closed_is_an_error_not_a_field_that_swallows_records(
    tmp_path: Path,
) -> None:
    """On main `a,"unterminated` took every following line into record a's text: records b
    and c vanished without an error, exit 0."""
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,text\nz,"multi\nline"\na,"unterminated\nb,y\nc,z\n')
    rows = [r for chunk in sources.read_csv(path, "id") for r in chunk]
    assert (rows[0].custom_id, rows[0].record) == ("z", {"id": "z", "text": "multi\nline"})
    assert [r.custom_id for r in rows[1:] if r.error is None] == []
    assert rows[1].error is not None and rows[1].error.startswith("line 4: malformed CSV")


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('isolation = "none"', "timeout = inf", "[run] timeout"),  # OverflowError, exit 1
        ("[run]", "[run]\nbackoff_max = inf", "[run] backoff_max"),  # a retry never due
        ('id = "id"', 'id = ""', "[source] id"),  # every record failed alone, exit 3
    ],
)
def test_values_no_run_can_use_are_job_file_errors(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    job_file = python_job(tmp_path)
    job_file.write_text(job_file.read_text().replace(old, new, 1))
    with pytest.raises(JobFileError, match=key.replace("[", r"\[").replace("]", r"\]")):
        overnight.Job.from_file(job_file)
    done = cli("run", str(job_file))
    assert done.returncode == 2 and key in done.stderr, done.stderr


def test_two_jobs_in_one_process_each_run_their_own_function(tmp_path: Path) -> None:
    """Two projects, each with its `fn.py`, run one after the other from one Python process
    (a notebook, a script): on main the second job imported `fn` from the module cache, ran
    the first job's function and recorded its answers as the second's, exit 0."""
    for name, word in (("a", "from a"), ("b", "from b")):
        folder = tmp_path / name
        folder.mkdir()
        job_file = python_job(folder)
        (folder / "fn.py").write_text(f"def f(records):\n    return [{word!r} for r in records]\n")
        assert overnight.Job.from_file(job_file).run().exit_code == 0
        assert [r["output"] for r in read_jsonl(folder / "out.jsonl")] == [word, word]


# -- user code in the worker --------------------------------------------------------------------

FORK_AND_CRASH = """
import ctypes, os, resource, time
from pathlib import Path

def f(records):
    out = []
    for r in records:
        if r["id"] == "b":
            pid = os.fork()
            if pid == 0:  # a helper process, as libraries start them; it outlives its parent
                time.sleep(600)
                os._exit(0)
            (Path(__file__).parent / "helper.pid").write_text(str(pid))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            ctypes.string_at(0)  # SIGSEGV
        out.append(r["text"])
    return out
"""


def test_a_worker_that_dies_while_a_process_it_forked_lives_on_is_a_crash(
    tmp_path: Path,
) -> None:
    """The forked process keeps the worker's socket open. On main the runner waited for an
    answer until `[run] timeout` and reported `worker_timeout` (with the default timeout,
    10 minutes per try); the worker had died of SIGSEGV at once."""
    job_file = python_job(tmp_path)
    (tmp_path / "fn.py").write_text(FORK_AND_CRASH)
    text = job_file.read_text().replace('isolation = "none"', "timeout = 30\nmax_attempts = 1")
    job_file.write_text(text)
    try:
        report = overnight.Job.from_file(job_file).run()
    finally:
        pid = tmp_path / "helper.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
    assert report.counts["succeeded"] == 1
    (failure,) = overnight.Job.from_file(job_file).failures()
    assert (failure.custom_id, failure.error_class) == ("b", "worker_crashed")
    assert "SIGSEGV" in failure.message


def test_what_user_code_prints_leaves_run_json_parseable(tmp_path: Path) -> None:
    """On main the function's print went to the runner's stdout, before the report: `overnight
    run --json | jq` broke."""
    job_file = python_job(tmp_path)
    (tmp_path / "fn.py").write_text(
        "def f(records):\n    print('hello from user code')\n    return [1 for r in records]\n"
    )
    job_file.write_text(job_file.read_text().replace('isolation = "none"', ""))
    done = cli("run", "--json", str(job_file))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["succeeded"] == 2
    assert "hello from user code" in done.stderr


# -- the batch API refusing the key, or not there ----------------------------------------------


def batch_job(folder: Path, backend: str, url: str) -> Path:
    write_records(folder, 5)
    model = "claude-3-5-haiku-20241022" if "anthropic" in backend else "gpt-4o-mini"
    path = folder / "job.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [source]
            path = "in.jsonl"
            id = "id"
            [task]
            kind = "generate"
            [model]
            backend = "{backend}"
            name = "{model}"
            base_url = "{url}"
            poll_interval = 0.05
            timeout = 5
            params = {{ max_tokens = 16 }}
            [output]
            path = "out.jsonl"
            """
        )
    )
    return path


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_a_refused_key_on_the_batch_api_is_exit_2_naming_the_variable(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """On main: "error: AuthenticationError: … (an unexpected error: … report it)", exit 1."""
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job_file = batch_job(tmp_path, backend, url)
    fake.knobs.require_key = "sk-the-right-key-0001"
    env = {"OPENAI_API_KEY": "sk-a-wrong-key-0002", "ANTHROPIC_API_KEY": "sk-a-wrong-key-0002"}
    done = cli("run", str(job_file), **env)
    assert done.returncode == 2, done.stdout + done.stderr
    variable = "ANTHROPIC_API_KEY" if "anthropic" in backend else "OPENAI_API_KEY"
    assert f"refused the API key in {variable}" in done.stderr
    assert "unexpected" not in done.stderr and "sk-a-wrong-key-0002" not in done.stderr
    env = {"OPENAI_API_KEY": "sk-the-right-key-0001", "ANTHROPIC_API_KEY": "sk-the-right-key-0001"}
    assert cli("run", str(job_file), **env).returncode == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 5


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_a_batch_api_that_cannot_be_reached_pauses_the_job(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """On main: "error: APIConnectionError: Connection error. (an unexpected error … report
    it)", exit 1. The README's promise for an endpoint that is down: one message, exit 3,
    run again to resume."""
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job_file = batch_job(tmp_path, backend, url)
    fake.stop()  # the port is closed: connection refused
    done = cli("run", str(job_file), OPENAI_API_KEY=KEY, ANTHROPIC_API_KEY=KEY)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "cannot reach the batch API" in done.stderr and "unexpected" not in done.stderr
    fake.start()
    again = cli("run", str(job_file), OPENAI_API_KEY=KEY, ANTHROPIC_API_KEY=KEY)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 5


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_a_garbled_result_line_costs_its_request_not_the_job(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """One results line cut short (a download that broke off, a mangling proxy). On main:
    "JSONDecodeError … (an unexpected error)", exit 1, on every rerun: the other results,
    paid for, were never collected, and the job could not finish."""
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job_file = batch_job(tmp_path, backend, url)
    fake.knobs.garble_result_lines = 1
    done = cli("run", str(job_file), OPENAI_API_KEY=KEY, ANTHROPIC_API_KEY=KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = read_jsonl(tmp_path / "out.jsonl")
    want = [f"echo: ticket {i}: the invoice is wrong" for i in range(5)]
    assert [r["output"] for r in rows] == want
    # Only the request whose answer could not be read was sent again.
    assert sorted(fake.stats.billed.values()) == [1, 1, 1, 1, 2]
    # Another job's start reads the newest ended batches' first lines (Anthropic: to find
    # earlier runs): a garbled one there does not stop it either.
    other = job_file.with_name("other.toml")
    other.write_text(job_file.read_text().replace("out.jsonl", "other.jsonl"))
    assert cli("run", str(other), OPENAI_API_KEY=KEY, ANTHROPIC_API_KEY=KEY).returncode == 0


def test_a_wrong_key_in_real_time_stops_the_job_instead_of_failing_every_record(
    tmp_path: Path, fake: FakeProvider
) -> None:
    write_records(tmp_path, 20)
    job_file = tmp_path / "job.toml"
    job_file.write_text(
        f'[source]\npath = "in.jsonl"\nid = "id"\n[task]\nkind = "generate"\n[model]\n'
        f'backend = "openai"\nname = "gpt-4o-mini"\nbase_url = "{fake.openai_url}"\n'
        '[output]\npath = "out.jsonl"\n'
    )
    fake.knobs.require_key = "sk-the-right-key-0001"
    done = cli("run", str(job_file), OPENAI_API_KEY="sk-a-wrong-key-0002")
    assert fake.stats.status_counts[401] < 20  # not every record sent with a refused key
    assert done.returncode == 2 and "OPENAI_API_KEY" in done.stderr
    fixed = cli("run", str(job_file), OPENAI_API_KEY="sk-the-right-key-0001")
    assert fixed.returncode == 0


# -- a ledger written by an older overnight ----------------------------------------------------


def make_legacy(ledger: Path, input_path: Path) -> None:
    """Turn a ledger into what overnight wrote before the fingerprint covered how the input is
    read: the input's plain content hash, and no fp_how column (nor versioned migrations)."""
    with closing(sqlite3.connect(ledger)) as db:
        db.execute("DROP TABLE IF EXISTS schema_version")
        columns = {r[1] for r in db.execute("PRAGMA table_info(jobs)")}
        if "fp_how" in columns:
            db.execute("ALTER TABLE jobs DROP COLUMN fp_how")
        items = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        if "follow_up" in items:  # nor the columns of later migrations
            db.execute("DROP INDEX IF EXISTS items_leased")
            db.execute("ALTER TABLE items DROP COLUMN follow_up")
        db.execute("UPDATE jobs SET fp_digest = ?", (sources.fingerprint(input_path).digest,))
        db.commit()


def test_an_older_ledgers_live_batches_are_collected_after_an_upgrade(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Batches submitted by an older overnight (--detach), collected by this one. On main:
    exit 2, "in.jsonl changed while 1 provider batch(es) … are still running … or run with
    --restart" — the input had not changed, and --restart pays for the batch again."""
    write_records(tmp_path, 6)
    job_file = tmp_path / "job.toml"
    job_file.write_text(
        textwrap.dedent(
            f"""
            [source]
            path = "in.jsonl"
            id = "id"
            [task]
            kind = "generate"
            [model]
            backend = "openai-batch"
            name = "gpt-4o-mini"
            base_url = "{fake.openai_url}"
            poll_interval = 0.05
            params = {{ max_tokens = 16 }}
            [output]
            path = "out.jsonl"
            """
        )
    )
    fake.knobs.batch_seconds = 2.0
    detached = cli("run", "--detach", str(job_file), OPENAI_API_KEY=KEY)
    assert detached.returncode == 0, detached.stderr
    make_legacy(tmp_path / ".overnight" / "ledger.db", tmp_path / "in.jsonl")
    done = cli("run", str(job_file), OPENAI_API_KEY=KEY)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 6
    assert fake.stats.batch_creations == 1
    # Upgraded: a real change of the input is still seen.
    write_records(tmp_path, 7)
    again = cli("run", str(job_file), OPENAI_API_KEY=KEY)
    assert again.returncode == 0, again.stderr
    assert "the input changed" in again.stdout + again.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 7


def test_an_older_ledger_is_not_read_again_as_a_changed_input(tmp_path: Path) -> None:
    job_file = python_job(tmp_path)
    assert overnight.Job.from_file(job_file).run().exit_code == 0
    make_legacy(tmp_path / ".overnight" / "ledger.db", tmp_path / "in.jsonl")
    report = overnight.Job.from_file(job_file).run()
    assert not any("input changed" in n for n in report.notes), report.notes


# -- overnight cancel, whenever it comes -------------------------------------------------------

SLOW_FN = """import time
def f(records):
    time.sleep(0.05)
    return [r['n'] for r in records]
"""


def slow_job(folder: Path, n: int) -> Path:
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(n))
    )
    (folder / "fn.py").write_text(SLOW_FN)
    path = folder / "job.toml"
    path.write_text(
        '[source]\npath = "in.jsonl"\nid = "id"\n[task]\nkind = "map"\n[model]\n'
        'backend = "python"\nfunction = "fn:f"\n[run]\nisolation = "none"\nbatch_size = 10\n'
        '[output]\npath = "out.jsonl"\n'
    )
    return path


def run_in_thread(job: overnight.Job) -> tuple[threading.Thread, dict]:
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(report=job.run()), daemon=True)
    thread.start()
    return thread, result


def hold(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> tuple[Event, Event]:
    """Make `owner.name` wait (once entered: `entered`) until `release` is set."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(owner, name)

    def held(*args, **kwargs):  # type: ignore[no-untyped-def]
        entered.set()
        assert release.wait(60)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, held)
    return entered, release


def test_cancel_while_a_run_is_starting_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run holds the job's claim but has no ledger entry yet (it hashes the input, or asks
    the provider for earlier batches: seconds on a big input). On main `overnight cancel`
    said "job has not been run yet", exit 2, and the run went on to the end."""
    job_file = slow_job(tmp_path, 400)
    from overnight.inputs import FileInput

    entered, release = hold(monkeypatch, FileInput, "fingerprint")  # hashing the input
    thread, result = run_in_thread(overnight.Job.from_file(job_file))
    assert entered.wait(60)
    threading.Timer(1.0, release.set).start()  # the run goes on a moment later
    overnight.Job.from_file(job_file).cancel()  # waits for the starting run's entry
    thread.join(120)
    report = result["report"]
    assert report.cancelled and report.counts["succeeded"] < 400
    resumed = overnight.Job.from_file(job_file).run()  # and `run` resumes it
    assert resumed.exit_code == 0 and resumed.counts["succeeded"] == 400


def test_cancel_while_a_changed_input_is_read_again_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new generation replaced the job's row and dropped its cancel flag: on main the run
    computed every new record after `overnight cancel` had said it would stop."""
    job_file = slow_job(tmp_path, 20)
    assert overnight.Job.from_file(job_file).run().exit_code == 0
    with open(tmp_path / "in.jsonl", "ab") as f:  # 300 new records: an incremental run
        f.write(b"".join(orjson.dumps({"id": f"n{i}", "n": i}) + b"\n" for i in range(300)))
    entered, release = hold(monkeypatch, SQLiteLedger, "carry_results")
    thread, result = run_in_thread(overnight.Job.from_file(job_file))
    assert entered.wait(60)
    overnight.Job.from_file(job_file).cancel()
    release.set()
    thread.join(120)
    report = result["report"]
    assert report.cancelled and report.counts["succeeded"] < 320


# -- open defects ------------------------------------------------------------------------------


def test_two_job_files_of_one_name_in_one_ledger_do_not_mix(tmp_path: Path) -> None:
    """Two projects sharing a ledger (--state), or a job file copied beside the first with the
    same `name` and another input. On main the second run said "the input changed since the
    last run: 0 of 2 records kept their results" and replaced the first job's results; an
    `export` of the first job then wrote the second's results into the first's output."""
    state = tmp_path / "shared" / "ledger.db"
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a, b = python_job(a_dir), python_job(b_dir)
    (b_dir / "in.jsonl").write_bytes(RECORDS.replace(b'"x"', b'"B"'))
    assert overnight.Job.from_file(a, state=state).run().exit_code == 0
    with pytest.raises(UsageError, match="already holds a job named 'job'"):
        overnight.Job.from_file(b, state=state).run()
    with pytest.raises(UsageError, match="already holds a job named 'job'"):
        overnight.Job.from_file(b, state=state).export()
    overnight.Job.from_file(a, state=state).export()
    assert [r["output"] for r in read_jsonl(a_dir / "out.jsonl")] == ["x", "y"]
    # A copy of the job file beside it, with the same name and another input: refused too.
    copy = a_dir / "copy.toml"
    copy.write_text(a.read_text().replace("in.jsonl", "b.jsonl").replace("out.", "copy."))
    (a_dir / "b.jsonl").write_bytes(RECORDS.replace(b'"x"', b'"B"'))
    done = cli("run", str(copy))
    assert done.returncode == 0  # its own ledger entry: the name is the file's stem, "copy"
    copy.write_text('name = "job"\n' + copy.read_text())
    done = cli("run", "--state", str(state), str(copy))
    assert done.returncode == 2 and "already holds a job named 'job'" in done.stderr


def test_a_project_moved_with_its_ledger_is_still_the_same_job(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    python_job(old)
    assert overnight.Job.from_file(old / "job.toml").run().exit_code == 0
    new = tmp_path / "new"
    old.rename(new)
    with open(new / "in.jsonl", "ab") as f:
        f.write(b'{"id": "c", "text": "z"}\n')
    report = overnight.Job.from_file(new / "job.toml").run()
    assert report.exit_code == 0 and report.processed == 1  # a and b kept their results


REWRITER = """
from pathlib import Path
HERE = Path(__file__).parent
def f(records):
    if any(r["id"] == "r3000" for r in records):  # halfway through, the input changes
        old = (HERE / "in.jsonl").read_bytes()
        (HERE / "old.jsonl").write_bytes(old)
        with open(HERE / "in.jsonl", "{mode}") as f:
            {change}
    return [r["text"] for r in records]
"""


def rewriter_job(folder: Path, mode: str, change: str) -> tuple[Path, int]:
    n = 3 * sources.CHUNK  # read in chunks: the last is read after the change
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "text": f"old{i}"}) + b"\n" for i in range(n))
    )
    (folder / "fn.py").write_text(REWRITER.format(mode=mode, change=change))
    path = folder / "job.toml"
    path.write_text(
        '[source]\npath = "in.jsonl"\nid = "id"\n[task]\nkind = "map"\n[model]\n'
        'backend = "python"\nfunction = "fn:f"\n[run]\nisolation = "none"\nbatch_size = 10\n'
        '[output]\npath = "out.jsonl"\n'
    )
    return path, n


def test_an_input_rewritten_while_it_is_read_is_never_exported_as_one(tmp_path: Path) -> None:
    """On main the run exported records of two inputs (and input errors where reading went
    on mid-line), exit 3; and with the first content put back, the mix was never read again:
    the output stayed wrong for good."""
    path, n = rewriter_job(
        tmp_path, "r+b", 'f.truncate(0)\n            f.write(old.replace(b"old", b"newer"))'
    )
    with pytest.raises(InputChangedError, match="changed while this run read it"):
        overnight.Job.from_file(path).run()
    assert not (tmp_path / "out.jsonl").exists()
    (tmp_path / "in.jsonl").write_bytes((tmp_path / "old.jsonl").read_bytes())  # put back
    (tmp_path / "fn.py").write_text("def f(records):\n    return [r['text'] for r in records]\n")
    report = overnight.Job.from_file(path).run()
    assert report.exit_code == 0
    outputs = [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert outputs == [f"old{i}" for i in range(n)]
    assert report.processed < n  # what was read before the change kept its results


def test_an_input_appended_to_while_it_is_read_is_fine(tmp_path: Path) -> None:
    path, n = rewriter_job(tmp_path, "ab", 'f.write(b\'{"id": "late", "text": "late"}\\n\')')
    report = overnight.Job.from_file(path).run()
    assert report.exit_code == 0
    again = overnight.Job.from_file(path).run()
    outputs = [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert again.exit_code == 0 and outputs == [f"old{i}" for i in range(n)] + ["late"]


@pytest.mark.parametrize("backend", ["openai-batch", "anthropic-batch"])
def test_identical_requests_in_batches_are_paid_once(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    url = fake.anthropic_url if "anthropic" in backend else fake.openai_url
    job_file = batch_job(tmp_path, backend, url)
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "text": "refund please"}) + b"\n" for i in range(20))
    )
    first = cli("run", "--json", str(job_file), OPENAI_API_KEY=KEY, ANTHROPIC_API_KEY=KEY)
    assert first.returncode == 0, first.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 20
    assert fake.stats.billed["refund please"] == 1  # one line for 20 identical requests
    paid = json.loads(first.stdout)["cost"]
    assert paid > 0
    again = cli(
        "run", "--json", "--restart", str(job_file), OPENAI_API_KEY=KEY, ANTHROPIC_API_KEY=KEY
    )
    assert again.returncode == 0, again.stderr
    assert fake.stats.billed["refund please"] == 1  # --restart keeps the cache: nothing sent
    assert fake.stats.batch_creations == 1
    report = json.loads(again.stdout)
    assert report["succeeded"] == 20 and report["cost"] == 0
    assert report["cost_at_realtime_prices"] > paid  # what the cache saved, at list prices
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 20


@pytest.mark.slow
def test_kill_9_of_the_runner_never_fails_a_good_record_under_process_isolation(
    tmp_path: Path,
) -> None:
    job_file = python_job(tmp_path)
    (tmp_path / "fn.py").write_text(
        textwrap.dedent(
            """
            import time
            from pathlib import Path
            def f(records):
                (Path(__file__).parent / "computing").write_text("1")
                time.sleep(600)
                return [r["text"] for r in records]
            """
        )
    )
    job_file.write_text(job_file.read_text().replace('isolation = "none"', "max_attempts = 3"))
    for _ in range(3):  # kill -9 the runner while it computes, three times
        (tmp_path / "computing").unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "overnight", "run", str(job_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120
        while not (tmp_path / "computing").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    (tmp_path / "fn.py").write_text("def f(records):\n    return [r['text'] for r in records]\n")
    report = overnight.Job.from_file(job_file).run()
    assert report.counts["failed"] == 0
    assert report.exit_code == 0
