"""`python -m overnight …` as a user (or a script) runs it: exit codes, --json outputs, retry,
export, cancel, and plain progress lines when stderr is not a terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import orjson

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
            "custom_id": "k1",
            "line": 2,
            "state": "failed",
            "error_class": "ValueError",
            "message": "cannot do k1",
            "attempts": 1,
        },
        {
            "custom_id": "k2",
            "line": 3,
            "state": "invalid",
            "error_class": "schema_error",
            "message": "schema: label: 'ok' was expected",
            "attempts": 1,
        },
    ]
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


def test_commands_before_any_run_exit_2(tmp_path):
    setup_job(tmp_path)
    for command in ("status", "failures", "retry", "export", "cancel"):
        proc = cli(tmp_path, command, "job.toml")
        assert proc.returncode == 2, command
        assert "has not been run yet" in proc.stderr, command
    assert not (tmp_path / "out.jsonl").exists()


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


def test_unexpected_error_exits_1(tmp_path):
    setup_job(tmp_path)
    (tmp_path / "out.jsonl").mkdir()  # the output cannot be written
    proc = cli(tmp_path, "run", "job.toml")
    assert proc.returncode == 1
    assert "IsADirectoryError" in proc.stderr


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
