"""Where the ledger lives: `--ledger URL` (alias `--state`) > OVERNIGHT_LEDGER > `[run] ledger`
> .overnight/ledger.db beside the job file; a PostgreSQL URL or a SQLite file path. A bad
value is exit 2 naming where it came from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

import overnight
from overnight.errors import UsageError

JOB = """\
name = "lj"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "lfn:fn"
[run]
batch_size = 4
{run}
[output]
path = "out.jsonl"
"""


def project(folder: Path, run: str = "", n: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"k{i}", "n": i}) + b"\n" for i in range(n))
    )
    (folder / "lfn.py").write_text("def fn(records):\n    return [r['n'] for r in records]\n")
    job = folder / "job.toml"
    job.write_text(JOB.format(run=run))
    return job


def cli(folder: Path, *args: str, env: dict[str, str] | None = None):
    environ = {k: v for k, v in os.environ.items() if k != "OVERNIGHT_LEDGER"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=folder,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_precedence_flag_then_env_then_job_file_then_default(tmp_path, monkeypatch):
    job = project(tmp_path / "p", run='ledger = "state/in-file.db"')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OVERNIGHT_LEDGER", raising=False)
    # [run] ledger: a relative path is beside the job file, not the current folder.
    assert overnight.Job.from_file(job).ledger_url == str(tmp_path / "p" / "state" / "in-file.db")
    monkeypatch.setenv("OVERNIGHT_LEDGER", "env.db")
    assert overnight.Job.from_file(job).ledger_url == str(tmp_path / "env.db")
    flag = overnight.Job.from_file(job, state="sqlite:///flag.db")
    assert flag.ledger_url == str(tmp_path / "flag.db")
    monkeypatch.delenv("OVERNIGHT_LEDGER")
    plain = project(tmp_path / "q")
    assert overnight.Job.from_file(plain).state_path == tmp_path / "q" / ".overnight" / "ledger.db"
    url = "postgresql://127.0.0.1:5432/test?options=-csearch_path%3Ds"
    pg = overnight.Job.from_file(plain, state=url)
    assert pg.ledger_url == url and pg.state_path is None


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        ("flag", "mysql://root@127.0.0.1/test", "--ledger: mysql:// is not a ledger"),
        ("file", "mysql://root@127.0.0.1/test", "job.toml: [run] ledger: mysql://"),
        ("env", "postgresql://[::1/test", "OVERNIGHT_LEDGER: not a valid PostgreSQL URL"),
        ("flag", "postgresql://h:port/test", "--ledger: not a valid PostgreSQL URL"),
    ],
)
def test_a_bad_ledger_setting_is_exit_2_naming_it(tmp_path, monkeypatch, where, value, named):
    monkeypatch.delenv("OVERNIGHT_LEDGER", raising=False)
    job = project(tmp_path, run=f'ledger = "{value}"' if where == "file" else "")
    if where == "env":
        monkeypatch.setenv("OVERNIGHT_LEDGER", value)
    with pytest.raises(UsageError, match=named.replace("[", r"\[").replace("]", r"\]")) as e:
        overnight.Job.from_file(job, state=value if where == "flag" else None)
    assert e.value.exit_code == 2


def test_a_job_on_a_postgresql_ledger_from_the_command_line(tmp_path, pg_ledger_url):
    project(tmp_path)
    proc = cli(tmp_path, "run", "job.toml", "--ledger", pg_ledger_url)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / ".overnight" / "ledger.db").exists()
    assert len((tmp_path / "out.jsonl").read_bytes().splitlines()) == 6
    # The environment variable finds it too, and `ls` lists it.
    env = {"OVERNIGHT_LEDGER": pg_ledger_url}
    status = cli(tmp_path, "status", "job.toml", "--json", env=env)
    assert orjson.loads(status.stdout)["succeeded"] == 6
    listed = cli(tmp_path, "ls", "--json", "--ledger", pg_ledger_url)
    assert [(j["name"], j["state"]) for j in orjson.loads(listed.stdout)] == [("lj", "finished")]


def test_an_unreachable_postgresql_ledger_is_exit_2_without_the_password(tmp_path):
    project(tmp_path)
    proc = cli(tmp_path, "run", "job.toml", "--ledger", "postgresql://me:pw123@127.0.0.1:1/x")
    assert proc.returncode == 2
    assert "postgresql://me@127.0.0.1:1/x" in proc.stderr and "pw123" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_password_in_the_ledger_urls_query_is_not_shown_either(tmp_path):
    """libpq takes `?password=` as well as `user:password@`: hidden the same way."""
    project(tmp_path)
    url = "postgresql://me@127.0.0.1:1/x?sslmode=disable&password=pw123"
    proc = cli(tmp_path, "run", "job.toml", "--ledger", url)
    assert proc.returncode == 2
    assert "postgresql://me@127.0.0.1:1/x?sslmode=disable" in proc.stderr
    assert "pw123" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_schema_holding_another_applications_jobs_table_is_named_as_such(tmp_path, pg_ledger_url):
    """The ledger's tables are `jobs`, `items`, ...: in a schema where an application has a
    `jobs` table of its own, the error says so, not "check the database name and the user"."""
    import psycopg

    schema = pg_ledger_url.rpartition("%3D")[2]
    with psycopg.connect("postgresql://127.0.0.1:5432/test", autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {schema}.jobs (id serial PRIMARY KEY, title text)")
    project(tmp_path)
    proc = cli(tmp_path, "run", "job.toml", "--ledger", pg_ledger_url)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "check the database name" not in proc.stderr
    assert "a schema of its own" in proc.stderr, proc.stderr
