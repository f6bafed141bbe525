"""A record that kills the process must not kill the job: real segfaults, hangs, SIGKILLs and
kill -9 of the runner, against `[run] isolation = "process"` (the default for python and
local) and `"none"`; attempts counted when they start; a wrong number of outputs."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import orjson
import psutil
import pytest
from job_helpers import ALL_ITEMS

import overnight
from overnight.backends.python import PythonFunction
from overnight.errors import JobFileError, WorkerStartError
from overnight.store import SQLiteLedger
from overnight.worker import Recipe, WorkerProcess

# The function under test: logs the ids of every call it *finishes* (calls.jsonl) and of
# every call it starts (started.jsonl), and misbehaves on record n == BAD as HOW says.
FUNCTION = """
import ctypes, json, os, resource, signal, time
from pathlib import Path

HERE = Path(__file__).parent
BAD = {bad}

def _log(name, records):
    with open(HERE / name, "a") as f:
        f.write(json.dumps([r["id"] for r in records]) + "\\n")

def misbehave():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the test folder
    how = {how!r}
    if how == "segfault":
        ctypes.string_at(0)  # a real SIGSEGV, from native code
    elif how == "hang":
        time.sleep(3600)
    elif how == "sigkill":  # what the kernel's OOM killer sends
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit":
        os._exit(7)

def fn(records):
    (HERE / "worker.pid").write_text(str(os.getpid()))
    _log("started.jsonl", records)
    if (HERE / "sleep.txt").exists() and any(r["n"] == BAD for r in records):
        time.sleep(float((HERE / "sleep.txt").read_text()))
    elif any(r["n"] == BAD for r in records):
        misbehave()
    _log("calls.jsonl", records)
    return [{{"v": r["n"] * 2}} for r in records]
"""

JOB = """
name = "w"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "{module}:fn"
[run]
batch_size = {batch_size}
backoff_base = 0.01
backoff_max = 0.05
{run}
[output]
path = "out.jsonl"
"""


def setup(
    folder: Path, n: int, bad: int, how: str, batch_size: int | str = 50, run: str = ""
) -> Path:
    """The input (n records), the function (a module of its own: a module name the test
    process imported already would be reused) and job.toml."""
    folder.joinpath("in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"k{i}", "n": i}) + b"\n" for i in range(n))
    )
    module = f"victim_{uuid.uuid4().hex[:10]}"
    folder.joinpath(f"{module}.py").write_text(FUNCTION.format(bad=bad, how=how))
    job = folder / "job.toml"
    job.write_text(JOB.format(batch_size=batch_size, run=run, module=module))
    return job


def function_file(folder: Path) -> Path:
    (path,) = folder.glob("victim_*.py")
    return path


def edit_function(folder: Path, old: str, new: str) -> None:
    path = function_file(folder)
    path.write_text(path.read_text().replace(old, new))


def cli(folder: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def logged(folder: Path, name: str = "calls.jsonl") -> list[list[str]]:
    """The calls logged so far (a line still being written is left out)."""
    path = folder / name
    text = path.read_text() if path.exists() else ""
    return [json.loads(x) for x in text[: text.rfind("\n") + 1].splitlines()]


def computed(folder: Path) -> collections.Counter:
    return collections.Counter(i for call in logged(folder) for i in call)


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def attempts(folder: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(folder / ".overnight" / "ledger.db") as con:
        return dict(con.execute(f"SELECT custom_id, attempts FROM {ALL_ITEMS}"))


def check_the_rest(folder: Path, n: int, bad: int) -> None:
    """Every other record succeeded, once, with its own output, in input order."""
    rows = read_jsonl(folder / "out.jsonl")
    assert [r["id"] for r in rows] == [f"k{i}" for i in range(n) if i != bad]
    assert all(r["output"] == {"v": int(r["id"][1:]) * 2} for r in rows)


def the_failure(folder: Path, bad: int) -> dict:
    (err,) = read_jsonl(folder / "out.errors.jsonl")
    assert err["id"] == f"k{bad}" and err["line"] == bad + 1 and err["state"] == "failed"
    # `overnight failures` names the same record and line
    listed = cli(folder, "failures", "job.toml", "--json")
    assert listed.returncode == 0, listed.stderr
    (f,) = json.loads(listed.stdout)
    assert f.get("id", f.get("custom_id")) == f"k{bad}" and f["line"] == bad + 1
    assert (f["error_class"], f["message"]) == (err["error_class"], err["message"])
    return err


def no_worker_left() -> None:
    """Every worker this test process started has ended (none left computing or hung)."""
    workers = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "overnight.worker" in " ".join(p.cmdline()) and p.status() != "zombie":
                workers.append(p)
        except psutil.NoSuchProcess:
            pass
    assert workers == []


# -- a crash or a hang in the worker costs one call -----------------------------------------


def test_a_segfault_on_one_record_fails_that_record_and_the_job_goes_on(tmp_path):
    n, bad = 100, 37
    setup(tmp_path, n, bad, "segfault")
    done = cli(tmp_path, "run", "job.toml")
    assert done.returncode == 3, done.stderr  # one run, the job finished
    check_the_rest(tmp_path, n, bad)
    # Each other record was computed exactly once; the bad one never finished a call.
    assert computed(tmp_path) == {f"k{i}": 1 for i in range(n) if i != bad}
    err = the_failure(tmp_path, bad)
    assert err["error_class"] == "worker_crashed"
    assert "SIGSEGV" in err["message"] and "gave up after 3 attempts" in err["message"]
    assert err["attempts"] == 3
    # The batch was split until the record was alone, then it alone was tried 3 times.
    alone = [call for call in logged(tmp_path, "started.jsonl") if call == [f"k{bad}"]]
    assert len(alone) == 3


def test_a_hanging_record_times_out_and_the_job_goes_on(tmp_path):
    # A normal call takes milliseconds: 2 s leaves it a wide margin on a loaded machine.
    n, bad = 40, 29
    setup(tmp_path, n, bad, "hang", batch_size=16, run="timeout = 2")
    report = overnight.Job.from_file(tmp_path / "job.toml").run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"succeeded": n - 1, "failed": 1}
    check_the_rest(tmp_path, n, bad)
    assert computed(tmp_path) == {f"k{i}": 1 for i in range(n) if i != bad}
    err = the_failure(tmp_path, bad)
    assert err["error_class"] == "worker_timeout"
    assert "timeout = 2 s" in err["message"] and err["attempts"] == 3
    no_worker_left()  # the hung workers were killed, not abandoned


@pytest.mark.parametrize(
    ("how", "said"),
    [("sigkill", "SIGKILL (signal 9): killed from outside"), ("exit", "exited with code 7")],
)
def test_a_worker_killed_or_exiting_costs_that_record_only(tmp_path, how, said):
    n, bad = 30, 12
    setup(tmp_path, n, bad, how, batch_size=10)
    report = overnight.Job.from_file(tmp_path / "job.toml").run()
    assert report.exit_code == 3
    check_the_rest(tmp_path, n, bad)
    assert computed(tmp_path) == {f"k{i}": 1 for i in range(n) if i != bad}
    err = the_failure(tmp_path, bad)
    assert err["error_class"] == "worker_crashed" and said in err["message"]
    no_worker_left()


def test_an_exception_that_cannot_cross_processes_keeps_its_class_and_message(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"k{i}", "n": i}) + b"\n" for i in range(8))
    )
    module = f"odd_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            """
            class Odd(Exception):  # does not unpickle: __init__ takes two arguments
                def __init__(self, a, b):
                    super().__init__(f"odd {a}/{b}")

            def fn(records):
                for r in records:
                    if r["n"] == 5:
                        raise Odd(r["n"], "x")
                return [r["n"] for r in records]
            """
        )
    )
    job = overnight.Job(
        {
            "source": {"path": "in.jsonl", "id": "id"},
            "model": {"backend": "python", "function": f"{module}:fn"},
            "run": {"batch_size": 8},
        },
        base_dir=tmp_path,
    )
    report = job.run()
    assert report.counts.by_state == {"succeeded": 7, "failed": 1}
    (f,) = job.failures()
    assert (f.custom_id, f.error_class, f.message, f.attempts) == ("k5", "Odd", "odd 5/x", 1)


def test_a_worker_that_dies_while_loading_is_a_clear_error():
    with pytest.raises(WorkerStartError, match=r"killed by SIGSEGV .* while loading"):
        WorkerProcess(Recipe("ctypes:string_at", {"ptr": 0}), PythonFunction)
    no_worker_left()


# -- a record that kills the runner itself (isolation = "none", kill -9) --------------------


def test_without_isolation_reruns_after_segfaults_converge(tmp_path):
    """Each rerun counts the death of what was in flight; the record is computed alone until
    it has killed the process max_attempts (3) times, then fails; the rest succeed."""
    n, bad = 100, 37
    setup(tmp_path, n, bad, "segfault", run='isolation = "none"')
    codes = []
    for _ in range(6):
        codes.append(cli(tmp_path, "run", "job.toml").returncode)
        if codes[-1] != -signal.SIGSEGV:
            break
    assert codes == [-signal.SIGSEGV] * 3 + [3]
    check_the_rest(tmp_path, n, bad)
    assert computed(tmp_path) == {f"k{i}": 1 for i in range(n) if i != bad}
    err = the_failure(tmp_path, bad)
    assert err["error_class"] == "process_died" and err["attempts"] == 3
    assert "died while computing this record" in err["message"]
    assert "gave up after 3 attempts" in err["message"]
    # After the first death, the records of the window in flight were computed one by one.
    assert [len(c) for c in logged(tmp_path) if c[0] in {f"k{i}" for i in range(50)}] == [1] * 49


def test_suspects_of_a_dead_run_are_found_with_another_batch_size(tmp_path):
    """Run 1 dies in a window of 50 (records 0-49); run 2 reads windows of 20: the suspects
    are never computed in a batch, the records beside them are, as usual."""
    n, bad = 80, 37
    job = setup(tmp_path, n, bad, "segfault", run='isolation = "none"')
    assert cli(tmp_path, "run", "job.toml").returncode == -signal.SIGSEGV
    job.write_text(job.read_text().replace("batch_size = 50", "batch_size = 20"))
    before = len(logged(tmp_path, "started.jsonl"))
    assert cli(tmp_path, "run", "job.toml").returncode == -signal.SIGSEGV
    started = logged(tmp_path, "started.jsonl")[before:]
    suspects = {f"k{i}" for i in range(50)}
    batched = [c for c in started if len(c) > 1]
    assert [f"k{i}" for i in range(50, 60)] in batched  # the rest of the window 40-59
    assert not any(set(c) & suspects for c in batched)
    while (code := cli(tmp_path, "run", "job.toml").returncode) == -signal.SIGSEGV:
        pass
    assert code == 3
    check_the_rest(tmp_path, n, bad)
    assert attempts(tmp_path)[f"k{bad}"] == 3


def gone(pid: int) -> bool:
    """Dead (a zombie nobody reaped yet counts as dead)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_kill_9_of_the_runner_counts_an_attempt_for_what_was_in_flight(tmp_path, isolation):
    """The runner is killed while its function computes one window. In its own process
    (isolation none) the rerun counts an attempt for exactly that window's records and
    computes them one by one; isolated, nothing is counted and the worker did not outlive
    the runner."""
    n, bad = 60, 25
    setup(tmp_path, n, bad, "none", batch_size=10, run=f'isolation = "{isolation}"')
    (tmp_path / "sleep.txt").write_text("60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", "job.toml"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    in_flight = [f"k{i}" for i in range(20, 30)]
    wait_for(lambda: in_flight in logged(tmp_path, "started.jsonl"))
    worker = int((tmp_path / "worker.pid").read_text())
    proc.kill()
    proc.wait()
    wait_for(lambda: gone(worker))
    (tmp_path / "sleep.txt").unlink()
    before = len(logged(tmp_path, "started.jsonl"))
    done = cli(tmp_path, "run", "job.toml")
    assert done.returncode == 0, done.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"k{i}" for i in range(n)]
    counts = attempts(tmp_path)
    rerun = logged(tmp_path, "started.jsonl")[before:]
    if isolation == "process":
        # A record cannot kill an isolated runner: its death costs the records nothing.
        assert set(counts.values()) == {1}
        assert [c for c in rerun if set(c) & set(in_flight)] == [in_flight]
        return
    assert {k for k, a in counts.items() if a == 2} == set(in_flight)  # the death, then success
    assert {k for k, a in counts.items() if a != 2} == {f"k{i}" for i in range(n)} - set(in_flight)
    assert [c for c in rerun if set(c) & set(in_flight)] == [[k] for k in in_flight]


def test_kill_9_during_a_leased_batch_counts_that_batch_only(tmp_path):
    """Items computed again (retry) are leased: a death counts an attempt for the leased
    items being computed, not for everything the runner held."""
    n, bad = 40, 15
    setup(tmp_path, n, bad, "none", batch_size=10, run='isolation = "none"')
    edit_function(
        tmp_path,
        "def fn(records):",
        "def fn(records):\n    if (HERE / 'broken').exists(): raise ValueError('broken')",
    )
    (tmp_path / "broken").write_text("")
    assert cli(tmp_path, "run", "job.toml").returncode == 3  # every record failed
    assert cli(tmp_path, "retry", "job.toml").returncode == 0
    (tmp_path / "broken").unlink()
    (tmp_path / "sleep.txt").write_text("60")
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", "job.toml"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    in_flight = [f"k{i}" for i in range(10, 20)]
    wait_for(lambda: in_flight in logged(tmp_path, "started.jsonl"))
    proc.kill()
    proc.wait()
    (tmp_path / "sleep.txt").unlink()
    done = cli(tmp_path, "run", "job.toml")
    assert done.returncode == 0, done.stderr
    counts = attempts(tmp_path)
    assert {k for k, a in counts.items() if a == 2} == set(in_flight)
    assert all(a == 1 for k, a in counts.items() if k not in in_flight)


def test_max_attempts_one_fails_a_suspect_without_computing_it_again(tmp_path):
    n, bad = 20, 7
    setup(tmp_path, n, bad, "segfault", batch_size=10, run='isolation = "none"\nmax_attempts = 1')
    assert cli(tmp_path, "run", "job.toml").returncode == -signal.SIGSEGV
    done = cli(tmp_path, "run", "job.toml")
    assert done.returncode == 3, done.stderr
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    # The whole window was in flight: with one attempt allowed, each of its records fails.
    assert [e["id"] for e in errors] == [f"k{i}" for i in range(10)]
    assert {e["error_class"] for e in errors} == {"process_died"}
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"k{i}" for i in range(10, n)]


def test_ctrl_c_to_the_process_group_finishes_the_call_in_flight(tmp_path):
    """A terminal's Ctrl-C reaches the worker too: it must finish its call, so the runner
    commits it and exits 130, and a rerun resumes without computing anything twice."""
    n = 200
    setup(tmp_path, n, -1, "none", batch_size=20)
    log = '    _log("calls.jsonl", records)'
    edit_function(tmp_path, log, "    time.sleep(0.3)\n" + log)
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", "job.toml"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def inside_a_call() -> bool:  # the worker started a call and has not finished it
        done = len(logged(tmp_path))
        return done >= 2 and len(logged(tmp_path, "started.jsonl")) > done

    wait_for(inside_a_call)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert len(logged(tmp_path, "started.jsonl")) == len(logged(tmp_path))  # none cut short
    assert cli(tmp_path, "run", "job.toml").returncode == 0
    assert computed(tmp_path) == {f"k{i}": 1 for i in range(n)}


# -- a wrong number of outputs ----------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_a_wrong_number_of_outputs_fails_the_whole_batch(tmp_path, isolation):
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"k{i}", "n": i}) + b"\n" for i in range(6))
    )
    module = f"short_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(
        "import json\nfrom pathlib import Path\n"
        "def fn(records):\n"
        "    with open(Path(__file__).parent / 'calls.jsonl', 'a') as f:\n"
        "        f.write(json.dumps([r['id'] for r in records]) + '\\n')\n"
        "    return [records[0]['n']]\n"
    )
    job = overnight.Job(
        {
            "source": {"path": "in.jsonl", "id": "id"},
            "model": {"backend": "python", "function": f"{module}:fn"},
            "run": {"batch_size": 2, "isolation": isolation},
            "output": {"path": "out.jsonl"},
        },
        base_dir=tmp_path,
    )
    report = job.run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"failed": 6}
    # No split into single records (each of which would "succeed" with 1 output for 1).
    assert logged(tmp_path) == [["k0", "k1"], ["k2", "k3"], ["k4", "k5"]]
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["id"] for e in errors] == [f"k{i}" for i in range(6)]
    assert {(e["error_class"], e["attempts"]) for e in errors} == {("wrong_output_count", 1)}
    assert {e["message"] for e in errors} == {
        "function returned 1 outputs for 2 records (expected a list of the same length)"
    }


# -- the memory ceiling and the local model -------------------------------------------------


def test_the_auto_batch_size_measures_the_workers_memory(tmp_path):
    """The worker holds 3 MB per record of its last batch. At the first size tried (128)
    the worker is over the 400 MB ceiling while the runner is far under it: auto must see
    the worker and settle on half that size."""
    n = 1000
    setup(tmp_path, n, -1, "none", batch_size='"auto"', run="memory_limit_mb = 400")
    edit_function(
        tmp_path,
        "def fn(records):",
        "KEEP = None\ndef fn(records):\n    global KEEP\n"
        "    KEEP = b'x' * (3 * 2**20 * len(records))\n    time.sleep(0.3)",
    )
    done = cli(tmp_path, "run", "job.toml", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["batch_size"] == 64
    assert [len(c) for c in logged(tmp_path)][:3] == [128, 128, 64]


LOCAL = """
import json, sys
from pathlib import Path
import orjson
import overnight

folder = Path(sys.argv[1])
out = {}
for isolation in ("process", "none"):
    job = overnight.Job(
        {
            "name": isolation,
            "source": {"path": "in.jsonl", "id": "id"},
            "task": {"kind": "embed", "text": "{{ text }}"},
            "model": {"backend": "local", "device": "cpu"},
            "run": {"batch_size": 4, "isolation": isolation},
            "output": {"path": f"{isolation}.jsonl"},
        },
        base_dir=folder,
    )
    report = job.run()
    out[isolation] = {
        "exit": report.exit_code,
        "torch_in_runner": "torch" in sys.modules,
        "vectors": [
            orjson.loads(x)["output"]
            for x in (folder / f"{isolation}.jsonl").read_bytes().splitlines()
        ],
    }
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_local_model_runs_in_a_worker_and_the_runner_never_imports_torch(tmp_path):
    texts = ["The invoice charged my card twice.", "The app crashes on start.", "Add dark mode"]
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in enumerate(texts * 3))
    )
    (tmp_path / "local_job.py").write_text(LOCAL)
    done = subprocess.run(
        [sys.executable, "local_job.py", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    isolated, inline = result["process"], result["none"]
    assert isolated["exit"] == 0 and inline["exit"] == 0
    assert isolated["torch_in_runner"] is False  # the model lived in the worker only
    assert inline["torch_in_runner"] is True  # (the check above can fail)
    assert len(isolated["vectors"]) == 9 and all(len(v) == 384 for v in isolated["vectors"])
    for a, b in zip(isolated["vectors"], inline["vectors"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


# -- the job file ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "run", "message"),
    [
        (
            {"backend": "python", "function": "m:fn"},
            {"isolation": "none", "timeout": 5},
            "[run] timeout needs isolation = 'process'",
        ),
        ({"backend": "openai", "name": "gpt-4o-mini"}, {"isolation": "process"}, "[run] isolation"),
        ({"backend": "openai", "name": "gpt-4o-mini"}, {"timeout": 5}, "[run] timeout applies"),
        ({"backend": "python", "function": "m:fn"}, {"isolation": "thread"}, "[run] isolation"),
        ({"backend": "python", "function": "m:fn"}, {"timeout": 0}, "[run] timeout"),
    ],
)
def test_isolation_and_timeout_are_checked(model, run, message):
    task = {"kind": "map"} if model["backend"] == "python" else {"kind": "generate"}
    with pytest.raises(JobFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        overnight.Job({"source": {"path": "in.jsonl"}, "task": task, "model": model, "run": run})


def test_isolation_defaults():
    from overnight.spec import parse_spec

    def isolation(model: dict, kind: str) -> str:
        spec = {"source": {"path": "x.jsonl"}, "task": {"kind": kind}, "model": model}
        return parse_spec(spec).isolation

    assert isolation({"backend": "python", "function": "m:fn"}, "map") == "process"
    assert isolation({"backend": "local"}, "embed") == "process"
    assert isolation({"backend": "openai", "name": "gpt-4o-mini"}, "generate") == "none"


def test_a_mark_is_one_row_per_runner_and_release_dead_counts_only_inside_it(tmp_path):
    from overnight.records import Cursor, Fingerprint, Row
    from overnight.store import Lease

    ledger = SQLiteLedger(tmp_path / "l.db")
    job = ledger.create_job("j", "h", Fingerprint(1, 1, "d"))
    rows = [Row(i + 1, f"k{i}", b"{}", {}, None) for i in range(10)]
    ledger.add_items(job.id, 0, rows, Cursor(10, 11, 0))
    assert len(ledger.lease(job.id, 10, Lease("dead:1:1", time.time() + 60, time.time()))) == 10
    ledger.mark_inflight(job.id, "dead:1:1", 2, 4)
    ledger.mark_inflight(job.id, "dead:1:1", 5, 7)  # replaces the first
    ledger.mark_inflight(job.id, "other:2:2", 20, 29)
    assert ledger.inflight(job.id) == [("dead:1:1", 5, 7), ("other:2:2", 20, 29)]
    assert ledger.release_dead(job.id, "dead:1:1", 3, "process_died", "died") == 3
    items = ledger.lease(job.id, 10, Lease("me:3:3", time.time() + 60, time.time()))
    assert [(it.seq, it.attempts, it.error_class) for it in items] == [
        (s, 1 if 5 <= s <= 7 else 0, "process_died" if 5 <= s <= 7 else None) for s in range(10)
    ]
    # The dead runner's mark (all its records are items) is gone; another's past the cursor stays.
    assert ledger.inflight(job.id) == [("other:2:2", 20, 29)]
    ledger.delete_job(job.id)
    assert ledger.inflight(job.id) == []
