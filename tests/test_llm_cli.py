"""The CLI for LLM jobs: estimate, run and status with cost, and clear exit-2 messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from llm_helpers import KEY, write_records

from overnight.testing.fake_provider import FakeProvider


def cli(args: list[str], cwd: Path, key: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("OPENAI_API_KEY", None)
    if key:
        env["OPENAI_API_KEY"] = KEY
    return subprocess.run(
        [sys.executable, "-m", "overnight", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def job(folder: Path, model: str, run: str = "", task: str = 'kind = "generate"') -> Path:
    path = folder / "job.toml"
    path.write_text(
        f"""
[source]
path = "in.jsonl"
id = "id"

[task]
{task}
text = "Reply to: {{{{ text }}}}"

[model]
{model}

[run]
{run}
"""
    )
    return path


def test_estimate_then_run_then_status(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 40)
    path = job(
        tmp_path,
        f'backend = "openai-batch"\nname = "gpt-4o-mini"\nbase_url = "{fake.openai_url}"\n'
        "poll_interval = 0.05\nparams = { max_tokens = 100 }",
    )
    est = cli(["estimate", str(path)], tmp_path, key=False)  # no key needed to estimate
    assert est.returncode == 0, est.stderr
    assert "items: 40" in est.stdout and "output tokens: 4,000" in est.stdout
    assert "cost in real time: $" in est.stdout and "batch API" in est.stdout
    data = orjson.loads(cli(["estimate", str(path), "--json"], tmp_path).stdout)
    assert data["cost_batch"] == pytest.approx(data["cost_realtime"] / 2)
    assert sum(fake.stats.requests.values()) == 0 and fake.stats.batch_creations == 0

    run = cli(["run", str(path)], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "saved $" in run.stdout and "provider batches" in run.stdout
    status = cli(["status", str(path), "--json"], tmp_path)
    data = orjson.loads(status.stdout)
    assert data["succeeded"] == 40 and data["saved"] > 0
    assert data["remote_batches"][0]["status"] == "completed"


@pytest.mark.parametrize(
    ("model", "run", "message"),
    [
        (
            'backend = "openai-batch"\nname = "m"\nrpm = 10',
            "",
            "[model] (top level): `rpm` applies to real-time backends, not openai-batch",
        ),
        (
            'backend = "openai"\nname = "m"',
            'deadline = "2026-12-01T00:00:00Z"',
            "[run] deadline needs [model] backend = 'auto'",
        ),
        ('backend = "auto"\nname = "m"', "", "backend = 'auto' needs `provider"),
        ('backend = "anthropic"\nname = "m"', "", "OPENAI_API_KEY"),
        ('backend = "openai"', "", "needs [model] name"),
        ('backend = "openai"\nname = "m"\nconcurrency = "8"', "", "[model] concurrency"),
        (
            'backend = "auto"\nprovider = "openai"\nname = "m"',
            'deadline = "tomorrow"',
            "not an ISO 8601 date-time",
        ),
    ],
)
def test_bad_llm_job_files_exit_2(tmp_path: Path, model: str, run: str, message: str) -> None:
    write_records(tmp_path, 2)
    proc = cli(["run", str(job(tmp_path, model, run))], tmp_path)
    assert proc.returncode == 2
    if message == "OPENAI_API_KEY":  # anthropic: its own variable is named
        assert "ANTHROPIC_API_KEY" in proc.stderr
    else:
        assert message.split(": ", 1)[-1] in proc.stderr.replace("\n", " "), proc.stderr
    assert not (tmp_path / ".overnight").exists()


def test_extract_schema_problems_exit_2(tmp_path: Path) -> None:
    write_records(tmp_path, 2)
    model = 'backend = "openai"\nname = "m"'
    path = job(tmp_path, model, task='kind = "extract"\nschema = "nope.json"')
    proc = cli(["run", str(path)], tmp_path)
    assert proc.returncode == 2 and "[task] schema: file not found" in proc.stderr
    (tmp_path / "models_mod.py").write_text(
        "from pydantic import BaseModel\nclass Ticket(BaseModel):\n    topic: str\n"
    )
    path = job(tmp_path, model, task='kind = "extract"\nschema = "models_mod:Nope"')
    proc = cli(["run", str(path)], tmp_path)
    assert proc.returncode == 2 and "cannot load pydantic model" in proc.stderr


def test_pydantic_model_schema(tmp_path: Path, fake: FakeProvider) -> None:
    write_records(tmp_path, 3)
    (tmp_path / "models_mod2.py").write_text(
        "from typing import Literal\nfrom pydantic import BaseModel\n"
        "class Ticket(BaseModel):\n    topic: Literal['billing', 'bug']\n    urgent: bool\n"
    )
    path = job(
        tmp_path,
        f'backend = "anthropic"\nname = "claude-3-5-haiku"\nbase_url = "{fake.anthropic_url}"',
        task='kind = "extract"\nschema = "models_mod2:Ticket"',
    )
    env_key = {"ANTHROPIC_API_KEY": KEY}
    proc = subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(path), "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **env_key},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [orjson.loads(x) for x in (tmp_path / "job.out.jsonl").read_bytes().splitlines()]
    assert all(r["output"]["topic"] in ("billing", "bug") for r in rows)


# -- requests over the model's context window are refused per record, not sent ---------------


def write_lines(folder: Path, texts: list[str]) -> None:
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "text": t}) + b"\n" for i, t in enumerate(texts))
    )


@pytest.mark.parametrize("backend", ["openai", "openai-batch"])
def test_a_request_over_the_context_window_fails_alone_and_is_not_sent(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    # 900,000 characters: ~225,000 tokens by the 4-characters rule, more by tiktoken; either
    # way over gpt-4o-mini's 128,000 (the shipped table), as the 2.5M-token request was.
    huge = "ab " * 300_000
    write_lines(tmp_path, ["short one", huge, "short two"])
    extra = "poll_interval = 0.05" if backend.endswith("batch") else ""
    path = job(
        tmp_path,
        f'backend = "{backend}"\nname = "gpt-4o-mini"\nbase_url = "{fake.openai_url}"\n{extra}',
    )
    run = cli(["run", str(path)], tmp_path)
    assert run.returncode == 3, run.stderr
    fails = orjson.loads(cli(["failures", str(path), "--json"], tmp_path).stdout)
    assert [(f["id"], f["line"], f["state"], f["error_class"]) for f in fails] == [
        ("r1", 2, "failed", "context_exceeded")
    ]
    assert "over the 128,000 of gpt-4o-mini's context window" in fails[0]["message"]
    sent = (
        sum(fake.stats.batch_items.values())
        if backend.endswith("batch")
        else fake.stats.requests["/v1/chat/completions"]
    )
    assert sent == 2  # the two short ones; the huge one never left
    assert fake.stats.bytes_uploaded < 100_000


def test_context_from_a_user_price_file_and_unknown_models_unchecked(
    tmp_path: Path, fake: FakeProvider
) -> None:
    (tmp_path / "p.toml").write_text(
        '[models."small-model"]\ninput = 1.0\noutput = 1.0\ncontext = 1000\n'
    )
    write_lines(tmp_path, ["hello", "x " * 3000, "bye"])
    base = f'base_url = "{fake.openai_url}"'
    path = job(tmp_path, f'backend = "openai"\nname = "small-model"\n{base}', 'prices = "p.toml"')
    assert cli(["run", str(path)], tmp_path).returncode == 3
    fails = orjson.loads(cli(["failures", str(path), "--json"], tmp_path).stdout)
    assert [(f["line"], f["error_class"]) for f in fails] == [(2, "context_exceeded")]
    assert fake.stats.requests["/v1/chat/completions"] == 2

    # A model the table does not know has no window to check against: everything is sent.
    (tmp_path / "other").mkdir()
    write_lines(tmp_path / "other", ["hello", "x " * 3000, "bye"])
    path = job(tmp_path / "other", f'backend = "openai"\nname = "unknown-model"\n{base}')
    assert cli(["run", str(path)], tmp_path / "other").returncode == 0
    assert fake.stats.requests["/v1/chat/completions"] == 5
