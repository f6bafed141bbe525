"""Shared by the tests of `overnight serve`: serve.toml in a folder, a server on a free
loopback port (in a thread of the test's process, or as a real `overnight serve` process),
and the official OpenAI SDK pointed at it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import orjson
import uvicorn

from overnight.service.app import create_app
from overnight.service.config import load_config

# The python model of most tests: a chat line's answer is its first message, reversed; a line
# whose message is "boom" fails; "sleep" lines take SLEEP seconds each and log their id.
FUNCTION = """
import os
import time
from overnight import PermanentError
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
SLEEP = float(os.environ.get("SERVE_TEST_SLEEP", "0.3"))
def answer(lines):
    out = []
    for line in lines:
        if line["url"] == "/v1/embeddings":
            out.append([float(len(line["body"]["input"])), 1.0])
            continue
        text = line["body"]["messages"][0]["content"]
        if text == "boom":
            raise PermanentError("the model refused this one")
        if text == "sleep":
            time.sleep(SLEEP)
            with open(LOG, "a") as f:
                f.write(line["custom_id"] + "\\n")
        out.append(text[::-1])
    return out
"""


def write_config(folder: Path, extra: str = "", run: str = "batch_size = 4") -> Path:
    (folder / "serving.py").write_text(FUNCTION)
    config = folder / "serve.toml"
    config.write_text(
        'ledger = "state/ledger.db"\n'
        f"{extra}\n"
        f"[run]\n{run}\n"
        '[models.rev]\nbackend = "python"\nfunction = "serving:answer"\n'
        '[models."all-MiniLM-L6-v2"]\nbackend = "local"\n'
    )
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(config: Path) -> Iterator[str]:
    """The app of `config` under uvicorn in a thread; yields its base URL (…/v1)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(load_config(config)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        assert time.monotonic() < deadline, "the server did not start in 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(60)


def start_process(config: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`overnight serve` as a process of its own, its log in serve.log beside `config` (a
    file, not a pipe: a pipe nobody reads would fill and stall the server); returns once it
    answers /healthz."""
    with open(config.parent / "serve.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "overnight", "serve", "--config", str(config)]
            + ["--port", str(port)],
            env=env or dict(os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the server exited: {server_log(config)}"
        assert time.monotonic() < deadline, "the server did not answer in 60 s"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:  # not listening yet
            time.sleep(0.1)


def server_log(config: Path) -> str:
    return (config.parent / "serve.log").read_text()


def client(base_url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)


def chat_line(custom_id: str, text: str, model: str = "rev") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": text}]},
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else orjson.dumps(line)) + b"\n" for line in lines
    )


def upload(oai: openai.OpenAI, lines: list[Any], name: str = "in.jsonl") -> str:
    return oai.files.create(file=(name, jsonl(lines)), purpose="batch").id


def wait_for(oai: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 120):
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout} s"
        time.sleep(0.1)


def lines_of(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(line) for line in oai.files.content(file_id).content.splitlines()]
