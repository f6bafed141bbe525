"""`python -m overnight …` as a user (or a script) runs it: exit codes, --json outputs, retry,
export, cancel, and plain progress lines when stderr is not a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from rich.console import Console

import overnight
from overnight.cli import bar_fields, make_bar
from overnight.runner import Progress as RunProgress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

BODY = """
import json
from pathlib import Path

HERE = Path(__file__).parent

def fn(records):
    broken = (HERE / "broken").exists()
    out = []
    for r in records:
        if broken and r["n"] == 1:
            raise ValueError(f"cannot do {r['id']}")
        out.append({"label": "zzz" if broken and r["n"] == 2 else "ok", "n": r["n"]})
    return out
"""


def setup_job(
    folder: Path, n: int = 5, broken: bool = False, extra: str = "", name: str = "cj"
) -> Path:
    module = f"fn_{uuid.uuid4().hex[:10]}"
    (folder / f"{module}.py").write_text(BODY)
    lines = [orjson.dumps({"id": f"k{i}", "n": i}) for i in range(n)]
    (folder / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    if broken:
        (folder / "broken").write_text("x")
    job = folder / "job.toml"
    job.write_text(
        f"""\
name = "{name}"

[source]
path = "in.jsonl"
id = "id"

[model]
backend = "python"
function = "{module}:fn"

[run]
batch_size = 4
backoff_base = 0.01

[output]
path = "out.jsonl"
errors = "out.errors.jsonl"
schema = {{ type = "object", properties = {{ label = {{ const = "ok" }} }} }}
{extra}
"""
    )
    return job


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def status_json(folder: Path) -> dict:
    proc = cli(folder, "status", "job.toml", "--json")
    assert proc.returncode == 0, proc.stderr
    return orjson.loads(proc.stdout)


def test_run_all_good_exits_0(tmp_path):
    setup_job(tmp_path)
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": f"k{i}", "output": {"label": "ok", "n": i}} for i in range(5)
    ]
    assert (tmp_path / "out.errors.jsonl").read_bytes() == b""
    assert "succeeded" in proc.stdout


def test_a_run_option_is_named_as_the_cli_flag_in_the_cli_and_as_the_keyword_in_python(tmp_path):
    """The library's messages name `Job.run`'s keyword (`detach=True`); the CLI shows the flag."""
    setup_job(tmp_path)
    proc = cli(tmp_path, "run", "job.toml", "--detach")
    assert proc.returncode == 2, proc.stderr
    assert "--detach applies to the batch backends" in proc.stderr
    assert "detach=True" not in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(overnight.UsageError, match="`detach=True` applies to the batch"):
        overnight.Job.from_file(tmp_path / "job.toml").run(detach=True)
    assert not (tmp_path / "out.jsonl").exists()  # refused before anything ran


def test_run_with_failures_exits_3_and_status_json(tmp_path):
    setup_job(tmp_path, broken=True)
    (tmp_path / "in.jsonl").write_bytes((tmp_path / "in.jsonl").read_bytes() + b"{nope\n")
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 3, proc.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["k0", "k3", "k4"]

    st = status_json(tmp_path)
    assert st["job"] == "cj"
    assert st["states"] == {"succeeded": 3, "failed": 2, "invalid": 1}
    assert st["total"] == 6
    assert st["succeeded"] == 3
    assert st["failed"] == 2  # one item plus one refused line
    assert st["invalid"] == 1
    assert st["open"] == 0
    assert st["ingest_done"] is True
    assert st["exit_code"] == 3


def test_failures_json(tmp_path):
    setup_job(tmp_path, broken=True)
    assert cli(tmp_path, "run", "job.toml").returncode == 3
    proc = cli(tmp_path, "failures", "job.toml", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = orjson.loads(proc.stdout)
    assert rows == [
        {
            "id": "k1",
            "line": 2,
            "state": "failed",
            "error_class": "ValueError",
            "message": "cannot do k1",
            "attempts": 1,
        },
        {
            "id": "k2",
            "line": 3,
            "state": "invalid",
            "error_class": "schema_error",
            "message": "schema: label: 'ok' was expected",
            "attempts": 1,
        },
    ]
    # One name for one thing: the same keys, the same rows, as the errors file.
    assert rows == read_jsonl(tmp_path / "out.errors.jsonl")
    table = cli(tmp_path, "failures", "job.toml")
    assert table.returncode == 0
    assert "k1" in table.stdout and "ValueError" in table.stdout


def test_failures_json_empty(tmp_path):
    setup_job(tmp_path)
    cli(tmp_path, "run", "job.toml")
    proc = cli(tmp_path, "failures", "job.toml", "--json")
    assert orjson.loads(proc.stdout) == []


def test_retry_and_retry_invalid(tmp_path):
    setup_job(tmp_path, broken=True)
    assert cli(tmp_path, "run", "job.toml").returncode == 3

    proc = cli(tmp_path, "retry", "job.toml")
    assert proc.returncode == 0
    assert proc.stdout.startswith("1 items back to pending")
    assert status_json(tmp_path)["states"] == {
        "succeeded": 3,
        "pending": 1,
        "invalid": 1,
    }
    proc = cli(tmp_path, "retry", "job.toml", "--invalid")
    assert proc.stdout.startswith("1 items back to pending")  # the invalid one
    assert status_json(tmp_path)["states"] == {"succeeded": 3, "pending": 2}

    (tmp_path / "broken").unlink()
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": f"k{i}", "output": {"label": "ok", "n": i}} for i in range(5)
    ]
    assert cli(tmp_path, "retry", "job.toml", "--invalid").stdout.startswith("0 items")


def test_retry_invalid_counts_both(tmp_path):
    setup_job(tmp_path, broken=True)
    cli(tmp_path, "run", "job.toml")
    proc = cli(tmp_path, "retry", "job.toml", "--invalid")
    assert proc.returncode == 0
    assert proc.stdout.startswith("2 items back to pending")


def test_export_rewrites_deleted_files(tmp_path):
    setup_job(tmp_path, broken=True)
    cli(tmp_path, "run", "job.toml")
    out, errs = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    before = out.read_bytes(), errs.read_bytes()
    out.unlink()
    errs.unlink()
    proc = cli(tmp_path, "export", "job.toml")
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())  # rich wraps long lines at 80 columns off a terminal
    assert said == f"wrote 3 rows to {out.resolve()} and 2 to {errs.resolve()}"
    assert (out.read_bytes(), errs.read_bytes()) == before
    assert [e["id"] for e in read_jsonl(errs)] == ["k1", "k2"]


def test_cancel_then_run_resumes(tmp_path):
    setup_job(tmp_path, n=6, broken=True)
    cli(tmp_path, "run", "job.toml")
    cli(tmp_path, "retry", "job.toml", "--invalid")
    proc = cli(tmp_path, "cancel", "job.toml")
    assert proc.returncode == 0
    assert proc.stdout.startswith("cancelled 2 open items")
    st = status_json(tmp_path)
    assert st["cancelled"] is True
    assert st["states"] == {"succeeded": 4, "cancelled": 2}
    assert st["exit_code"] == 3
    (tmp_path / "broken").unlink()
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 0, proc.stderr
    st = status_json(tmp_path)
    assert st["cancelled"] is False
    assert st["states"] == {"succeeded": 6}


def test_cancel_of_a_finished_job_changes_nothing(tmp_path):
    setup_job(tmp_path, n=3)
    assert cli(tmp_path, "run", "job.toml").returncode == 0
    proc = cli(tmp_path, "cancel", "job.toml")
    assert proc.returncode == 0
    assert proc.stdout.startswith("the job has finished: nothing to cancel")
    st = status_json(tmp_path)
    assert st["cancelled"] is False
    assert st["states"] == {"succeeded": 3}
    assert st["exit_code"] == 0


def test_commands_before_any_run_exit_2(tmp_path):
    setup_job(tmp_path)
    for command in ("status", "failures", "retry", "export", "cancel"):
        proc = cli(tmp_path, command, "job.toml")
        assert proc.returncode == 2, command
        assert "has not been run yet" in proc.stderr, command
    assert not (tmp_path / "out.jsonl").exists()


def test_a_mistyped_ledger_path_is_not_made_by_the_commands_that_read_it(tmp_path):
    setup_job(tmp_path)
    assert cli(tmp_path, "run", "job.toml").returncode == 0
    typo = tmp_path / "stat" / "ledger.db"
    for command in ("status", "failures", "retry", "export"):
        proc = cli(tmp_path, command, "job.toml", "--ledger", str(typo))
        assert proc.returncode == 2, command
        assert f"has not been run yet (no ledger at {typo})" in proc.stderr, command
    assert not typo.parent.exists()
    assert cli(tmp_path, "status", "job.toml").returncode == 0  # the right one still reads


def test_run_json_parses(tmp_path):
    setup_job(tmp_path)
    proc = cli(tmp_path, "run", "job.toml", "--json")
    assert proc.returncode == 0
    data = orjson.loads(proc.stdout)
    assert data["states"] == {"succeeded": 5}
    assert data["exit_code"] == 0
    assert data["output"] == str(tmp_path.resolve() / "out.jsonl")
    assert data["interrupted"] is False


def test_status_json_with_long_paths_parses(tmp_path):
    deep = tmp_path / ("a_rather_long_folder_name_" * 4) / ("and_another_one_" * 4)
    deep.mkdir(parents=True)
    setup_job(deep)
    proc = cli(deep, "run", "job.toml", "--json")
    assert orjson.loads(proc.stdout)["output"] == str(deep.resolve() / "out.jsonl")
    assert orjson.loads(cli(deep, "status", "job.toml", "--json").stdout)["total"] == 5


def test_non_tty_progress_is_plain_lines(tmp_path):
    setup_job(tmp_path, n=20)
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 0
    assert not ANSI.search(proc.stderr), repr(proc.stderr)
    assert not ANSI.search(proc.stdout), repr(proc.stdout)
    assert "\r" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "expected at least one progress line"
    assert lines[0].startswith("cj: ")
    assert "done" in proc.stderr
    assert "━" not in proc.stderr  # no rich bar
    (tmp_path / "out.jsonl").unlink()
    quiet = cli(tmp_path, "-q", "run", "job.toml", "--restart")
    assert quiet.returncode == 0 and quiet.stderr == ""  # -q: no progress


def test_non_tty_progress_line_is_one_line(tmp_path):
    name = "nightly-ticket-triage-for-the-support-team"
    setup_job(tmp_path, n=3, name=name)
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines
    assert all(line.startswith(f"{name}: ") for line in lines), lines


def test_restart_flag(tmp_path):
    setup_job(tmp_path)
    assert cli(tmp_path, "run", "job.toml").returncode == 0
    lines = [orjson.dumps({"id": f"z{i}", "n": i}) for i in range(2)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    proc = cli(tmp_path, "run", "job.toml")  # a changed input: an incremental run
    assert proc.returncode == 0, proc.stderr
    assert "the input changed since the last run" in proc.stdout
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["z0", "z1"]
    proc = cli(tmp_path, "run", "job.toml", "--restart")
    assert proc.returncode == 0
    assert "input changed" not in proc.stdout
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["z0", "z1"]


def test_state_option(tmp_path):
    setup_job(tmp_path)
    state = tmp_path / "elsewhere" / "ledger.db"
    assert cli(tmp_path, "run", "job.toml", "--state", str(state)).returncode == 0
    assert state.exists()
    assert not (tmp_path / ".overnight" / "ledger.db").exists()
    proc = cli(tmp_path, "status", "job.toml", "--state", str(state), "--json")
    assert orjson.loads(proc.stdout)["succeeded"] == 5


def test_bad_command_line_exits_2(tmp_path):
    setup_job(tmp_path)
    assert cli(tmp_path, "run", "job.toml", "--bogus").returncode == 2
    assert cli(tmp_path, "status").returncode == 2
    assert cli(tmp_path, "no-such-command", "job.toml").returncode == 2
    assert not (tmp_path / ".overnight").exists()


def test_unexpected_error_exits_1(tmp_path, monkeypatch, capsys):
    """A bug (an exception that is not one of overnight's) is exit 1 with its class, no
    traceback; a ledger that is a folder is not a bug but exit 2."""
    from overnight import cli as cli_module
    from overnight.job import Job

    setup_job(tmp_path)
    (tmp_path / "ledger").mkdir()
    proc = cli(tmp_path, "run", "job.toml", "--state", "ledger")
    assert proc.returncode == 2 and "is a folder" in proc.stderr

    def boom(self, **kwargs):
        raise RuntimeError("something nobody planned for")

    monkeypatch.setattr(Job, "run", boom)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli_module.main(["run", "job.toml"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "RuntimeError: something nobody planned for" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: (f / "out.jsonl").mkdir(), "[output] path: {f}/out.jsonl is a folder"),
        (lambda f: (f / "out.errors.jsonl").mkdir(), "[output] errors: {f}/out.errors.jsonl is"),
    ],
)
def test_an_output_that_cannot_be_a_file_is_exit_2_before_any_work(tmp_path, edit, message):
    setup_job(tmp_path)
    edit(tmp_path)
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 2, proc.stderr
    assert message.format(f=tmp_path.resolve()) in " ".join(proc.stderr.split())
    assert not (tmp_path / ".overnight").exists()


def test_an_output_under_a_file_is_exit_2(tmp_path):
    setup_job(tmp_path)
    job = tmp_path / "job.toml"
    job.write_text(job.read_text().replace('path = "out.jsonl"', 'path = "in.jsonl/out.jsonl"'))
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 2
    assert "in.jsonl is a file, not a folder" in proc.stderr


def test_failures_table_shows_brackets_verbatim(tmp_path):
    module = f"fn_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{module}.py").write_text(
        "def fn(records):\n    raise ValueError('missing [field] in record')\n"
    )
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "[red]x"}\n')
    (tmp_path / "job.toml").write_text(
        f'[source]\npath = "in.jsonl"\nid = "id"\n'
        f'[model]\nbackend = "python"\nfunction = "{module}:fn"\n'
    )
    assert cli(tmp_path, "run", "job.toml").returncode == 3
    env_wide = {**os.environ, "COLUMNS": "200"}
    env_wide.pop("FORCE_COLOR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "overnight", "failures", "job.toml"],
        cwd=tmp_path,
        env=env_wide,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "missing [field] in record" in proc.stdout
    assert "[red]x" in proc.stdout


# -- the first hour: version, completion, init, check, ls, --json --------------------------------


def test_version(tmp_path):
    proc = cli(tmp_path, "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"overnight {overnight.__version__}"


def test_shell_completion_script_and_completions(tmp_path, monkeypatch):
    # Typer detects the user's shell from the process tree, which under pytest may hold no
    # shell at all ("Shell  not supported"); its own switch for tests makes --show-completion
    # take the shell by name instead.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    proc = cli(tmp_path, "--show-completion", "bash")
    assert proc.returncode == 0, proc.stderr
    assert "_OVERNIGHT_COMPLETE=complete_bash" in proc.stdout  # registered for `overnight`
    # What the script asks at a <TAB> after "overnight ru": the commands that match.
    env = {**os.environ, "_OVERNIGHT_COMPLETE": "complete_bash"}
    env.update(COMP_WORDS="overnight ru", COMP_CWORD="1")
    done = subprocess.run(
        [sys.executable, "-m", "overnight"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.split() == ["run"], (done.stdout, done.stderr)


INIT_CASES = [
    ("local", "classify"),
    ("local", "embed"),
    ("python", "map"),
    *[
        (backend, task)
        for backend in ("openai", "openai-batch", "auto")
        for task in ("generate", "extract", "classify", "embed", "passthrough")
    ],
    *[
        (backend, task)
        for backend in ("anthropic", "anthropic-batch")
        for task in ("generate", "extract", "classify", "passthrough")
    ],
]


def keyed_cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-0123456789", "ANTHROPIC_API_KEY": "sk-x"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("backend", "task"), INIT_CASES)
def test_every_file_init_writes_passes_check(tmp_path, backend, task):
    made = keyed_cli(tmp_path, "init", "--backend", backend, "--task", task, "job.toml", "--json")
    assert made.returncode == 0, made.stderr
    written = orjson.loads(made.stdout)["written"]
    assert written[0] == "job.toml" and all(Path(tmp_path, p).is_file() for p in written)
    text = (tmp_path / "job.toml").read_text()
    assert text.startswith("# Written by `overnight init") and text.count("\n# ") >= 1
    assert f'backend = "{backend}"' in text and f'kind = "{task}"' in text
    checked = keyed_cli(tmp_path, "check", "job.toml", "--json")
    assert checked.returncode == 0, (checked.stdout, checked.stderr, text)
    assert orjson.loads(checked.stdout)["ok"] is True
    assert orjson.loads(checked.stdout)["warnings"] == []  # a priced, current model
    assert not (tmp_path / ".overnight").exists()  # check touches no ledger


def test_init_python_job_runs_as_written(tmp_path):
    assert cli(tmp_path, "init", "--backend", "python", "starter.toml").returncode == 0
    proc = cli(tmp_path, "run", "starter.toml", "--json")
    assert proc.returncode == 0, proc.stderr
    assert orjson.loads(proc.stdout)["succeeded"] == 3
    assert read_jsonl(tmp_path / "starter.out.jsonl")[0] == {"id": "1", "output": {"words": 9}}


def test_init_never_overwrites(tmp_path):
    (tmp_path / "job.input.jsonl").write_text("mine\n")
    proc = cli(tmp_path, "init", "--backend", "python", "job.toml")
    assert proc.returncode == 2
    assert "job.input.jsonl: already exists; overnight init does not overwrite" in proc.stderr
    assert (tmp_path / "job.input.jsonl").read_text() == "mine\n"
    assert not (tmp_path / "job.toml").exists()  # all or nothing
    assert cli(tmp_path, "init", "--backend", "python", "other.toml").returncode == 0
    before = (tmp_path / "other.toml").read_bytes()
    again = cli(tmp_path, "init", "--backend", "local", "other.toml")
    assert again.returncode == 2 and (tmp_path / "other.toml").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "anthropic", "--task", "embed"], "Anthropic has no embeddings endpoint"),
        (["--backend", "python", "--task", "classify"], "backend 'python' runs map"),
        (["--backend", "gpt"], "--backend: 'gpt' is not one of local, python"),
        (["--backend", "openai", "--provider", "anthropic"], "--provider applies to"),
    ],
)
def test_init_refuses_what_cannot_run(tmp_path, args, message):
    proc = cli(tmp_path, "init", *args, "job.toml")
    assert proc.returncode == 2 and message in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_check_ok_and_every_mistake_exit_2_without_a_ledger(tmp_path):
    setup_job(tmp_path)
    proc = cli(tmp_path, "check", "job.toml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("job.toml: ok (job 'cj', backend python")
    assert not (tmp_path / ".overnight").exists()
    text = (tmp_path / "job.toml").read_text()
    for broken, message in [
        (text.replace('path = "in.jsonl"', 'path = "gone.jsonl"'), "input file not found"),
        (text.replace('id = "id"', 'id = "key"'), ""),  # JSONL: ids are per record, still ok
        (text.replace(':fn"', ':nope"'), "has no 'nope'"),
        (text + '[task]\ntext = "{{ x "\n', "not a valid Jinja2 template"),
    ]:
        (tmp_path / "job.toml").write_text(broken)
        proc = cli(tmp_path, "check", "job.toml", "--json")
        data = orjson.loads(proc.stdout)
        if not message:
            assert proc.returncode == 0 and data["ok"] is True
            continue
        assert proc.returncode == 2, proc.stdout
        assert data["ok"] is False and message in data["error"]
    assert not (tmp_path / ".overnight").exists()


def test_check_needs_the_api_key_and_warns_on_an_unpriced_model(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"id": "1", "text": "hi"}\n')
    (tmp_path / "job.toml").write_text(
        '[source]\npath = "in.jsonl"\nid = "id"\n[task]\nkind = "generate"\n'
        '[model]\nbackend = "openai"\nname = "my-finetune-7"\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    proc = subprocess.run(
        [sys.executable, "-m", "overnight", "check", "job.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "OPENAI_API_KEY" in proc.stderr
    proc = keyed_cli(tmp_path, "check", "job.toml", "--json")
    assert proc.returncode == 0
    (warning,) = orjson.loads(proc.stdout)["warnings"]
    assert "no price for 'my-finetune-7'" in warning
    assert "warning: job.toml: [model] name: no price for 'my-finetune-7'" in proc.stderr


def test_ls_lists_the_jobs_of_a_ledger(tmp_path):
    setup_job(tmp_path, n=4, broken=True)
    assert cli(tmp_path, "run", "job.toml").returncode == 3
    other = tmp_path / "second.toml"
    other.write_text((tmp_path / "job.toml").read_text().replace('name = "cj"', 'name = "cj2"'))
    assert cli(tmp_path, "run", "second.toml").returncode == 3
    assert cli(tmp_path, "retry", "second.toml").returncode == 0
    proc = cli(tmp_path, "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in orjson.loads(proc.stdout)}
    assert set(rows) == {"cj", "cj2"}
    assert {k: rows["cj"][k] for k in ("state", "total", "succeeded", "failed", "invalid")} == {
        "state": "finished",
        "total": 4,
        "succeeded": 2,
        "failed": 1,
        "invalid": 1,
    }
    assert rows["cj2"]["state"] == "unfinished" and rows["cj2"]["open"] == 1
    table = cli(tmp_path, "ls")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert any(ln.split()[:7] == ["cj", "finished", "4", "2", "1", "1", "0"] for ln in lines), lines
    assert any(ln.split()[:3] == ["cj2", "unfinished", "4"] for ln in lines), lines
    assert all(len(ln) <= 80 for ln in lines), lines


def test_ls_without_a_ledger_or_with_another_file(tmp_path):
    proc = cli(tmp_path, "ls")
    assert proc.returncode == 2 and "no ledger at .overnight/ledger.db" in proc.stderr
    other = tmp_path / "notes.db"
    import sqlite3

    db = sqlite3.connect(other)
    db.execute("CREATE TABLE notes (x)")
    db.commit()
    db.close()
    before = other.read_bytes()
    proc = cli(tmp_path, "ls", "--state", "notes.db")
    assert proc.returncode == 2 and "notes.db is not an overnight ledger" in proc.stderr
    assert other.read_bytes() == before  # not turned into a ledger


def test_retry_and_export_json(tmp_path):
    setup_job(tmp_path, broken=True)
    assert cli(tmp_path, "run", "job.toml").returncode == 3
    proc = cli(tmp_path, "export", "job.toml", "--json")
    assert orjson.loads(proc.stdout) == {
        "job": "cj",
        "output": str((tmp_path / "out.jsonl").resolve()),
        "rows": 3,
        "errors": str((tmp_path / "out.errors.jsonl").resolve()),
        "errors_rows": 2,
    }
    proc = cli(tmp_path, "retry", "job.toml", "--invalid", "--json")
    data = orjson.loads(proc.stdout)
    assert (data["job"], data["moved"], data["invalid"]) == ("cj", 2, True)


# -- bad inputs at the CLI: exit 2 with a message, or a warning ----------------------------------


def test_empty_input_warns_and_exits_0(tmp_path):
    setup_job(tmp_path)
    (tmp_path / "in.jsonl").write_bytes(b"\n")
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 0, proc.stderr
    assert f"warning: job.toml: [source] path: {(tmp_path / 'in.jsonl').resolve()} holds no " in (
        " ".join(proc.stderr.split())
    )
    assert (tmp_path / "out.jsonl").read_bytes() == b""
    quiet = cli(tmp_path, "-q", "run", "job.toml")  # errors and the result only
    assert quiet.returncode == 0 and quiet.stderr == "" and "succeeded" in quiet.stdout
    both = cli(tmp_path, "-q", "-v", "run", "job.toml")
    assert both.returncode == 2 and "--verbose and --quiet" in both.stderr
    checked = cli(tmp_path, "check", "job.toml", "--json")
    assert (
        checked.returncode == 0
        and "holds no records" in orjson.loads(checked.stdout)["warnings"][0]
    )


def test_parquet_corrupt_inside_stops_with_exit_2(tmp_path):
    from test_sources import corrupt_second_row_group

    setup_job(tmp_path)
    corrupt_second_row_group(tmp_path / "in.parquet")
    job = tmp_path / "job.toml"
    job.write_text(job.read_text().replace('path = "in.jsonl"', 'path = "in.parquet"'))
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "in.parquet: cannot read the Parquet file after row" in proc.stderr


# -- progress: fits 80 columns, and shows what is known before the model loads ------------------


def render_bar(name: str, progress: RunProgress) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bar = make_bar(console)
    task = bar.add_task(name, total=progress.total, completed=progress.finished)
    bar.update(task, **bar_fields(progress))
    console.print(bar.make_tasks_table(bar.tasks))
    return buf.getvalue()


@pytest.mark.parametrize("live_batches", [0, 12])
def test_progress_bar_fits_80_columns_without_cutting_the_counts(live_batches):
    p = RunProgress(
        succeeded=987_654,
        failed=12_345,
        ingested=1_000_000,
        ingest_done=True,
        processed=5000,
        live_batches=live_batches,
    )
    line = render_bar("nightly-ticket-triage-for-the-support-team", p).rstrip("\n")
    assert "\n" not in line and len(line) <= 80, line
    assert "999999/1000000" in line, line  # the total is never cut ("200/2…")
    assert "12,345 failed" in line
    assert ("12 batches" if live_batches else "/s") in line
    assert "eta" in line
    assert line.startswith("nightly-ticket-tria…")  # only the name gives way


def test_progress_shows_the_ledger_counts_before_the_model_loads(tmp_path):
    setup_job(tmp_path, n=6, broken=True)
    assert cli(tmp_path, "run", "job.toml").returncode == 3
    assert cli(tmp_path, "retry", "job.toml", "--invalid").returncode == 0  # 2 pending of 6
    (tmp_path / "broken").unlink()
    seen: list[tuple[int, int, int, bool]] = []
    job = overnight.Job.from_file(tmp_path / "job.toml")
    report = job.run(
        on_progress=lambda p: seen.append((p.total, p.finished, p.processed, p.ingest_done))
    )
    assert report.exit_code == 0
    # The first report comes before anything is computed (or any model is loaded): the
    # known total and what the ledger already holds, not 0/?.
    assert seen[0] == (6, 4, 0, True)
    assert seen[-1] == (6, 6, 2, True)
