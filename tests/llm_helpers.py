"""Shared by the LLM tests: records, job builders, output readers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

import overnight

KEY = "sk-test-secret-0123456789"
ANT_KEY = "sk-ant-test-secret-0123456789"
SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "enum": ["billing", "bug", "other"]},
        "urgent": {"type": "boolean"},
    },
    "required": ["topic", "urgent"],
    "additionalProperties": False,
}


def write_records(folder: Path, n: int, name: str = "in.jsonl") -> Path:
    path = folder / name
    path.write_bytes(
        b"".join(
            orjson.dumps({"id": f"r{i}", "text": f"ticket {i}: the invoice is wrong"}) + b"\n"
            for i in range(n)
        )
    )
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def llm_job(
    folder: Path,
    backend: str,
    url: str,
    *,
    kind: str = "generate",
    name: str = "job",
    model: dict[str, Any] | None = None,
    task: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> overnight.Job:
    anthropic = "anthropic" in backend or (model or {}).get("provider") == "anthropic"
    spec_model: dict[str, Any] = {
        "backend": backend,
        "name": "claude-3-5-haiku-20241022" if anthropic else "gpt-4o-mini",
        "base_url": url,
        "params": {"max_tokens": 64},
    }
    if backend.endswith("-batch") or backend == "auto":
        spec_model["poll_interval"] = 0.05
    spec_model.update(model or {})
    spec_task: dict[str, Any] = {"kind": kind, "text": "{{ text }}"}
    spec_task.update(task or {})
    return overnight.Job(
        name=name,
        source={"path": "in.jsonl", "id": "id"},
        task=spec_task,
        model=spec_model,
        run={"backoff_base": 0.01, "backoff_max": 0.05, **(run or {})},
        output={"path": f"{name}.out.jsonl"},
        base_dir=folder,
    )
