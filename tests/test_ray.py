"""[run] executor = "ray" on a real local Ray cluster (`ray start --head` on loopback, two
CPUs: two actors), shared by the module: the results equal the local executor's, a killed
actor loses nothing, and a record that kills its actor fails alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

import overnight
from overnight.errors import JobFileError, UsageError

SRC = str(Path(overnight.__file__).resolve().parent.parent)
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    # A short temp dir: Ray's socket paths live under it (107 characters at most).
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    port = _free_port()
    # On loopback, for this test alone: no token to hand around.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    env = {**os.environ, "PYTHONPATH": SRC, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--temp-dir={temp}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, check=False)
        mp.undo()


FUNCTIONS = """
import os, time
from pathlib import Path

HERE = Path(__file__).parent

def double(records):
    out = []
    for r in records:
        if r["n"] % 97 == 5:
            raise ValueError(f"bad record {r['n']}")
        out.append({"double": r["n"] * 2, "text": r["text"].upper()})
    return out

def slow(records):
    (HERE / "pids").mkdir(exist_ok=True)
    (HERE / "pids" / str(os.getpid())).touch()
    time.sleep(0.05)
    with open(HERE / f"calls-{os.getpid()}.txt", "a") as f:
        f.write(" ".join(r["id"] for r in records) + "\\n")
    return [{"n": r["n"]} for r in records]

def exits(records):
    for r in records:
        if r["n"] == 13:
            os._exit(1)
    return [{"n": r["n"]} for r in records]
"""


def make_job(folder: Path, n: int, function: str, **run: object) -> overnight.Job:
    folder.mkdir(exist_ok=True)
    (folder / "funcs.py").write_text(FUNCTIONS)
    (folder / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": f"k{i}", "n": i, "text": f"t{i}"}) + b"\n" for i in range(n))
    )
    spec = {
        "name": "rayjob",
        "source": {"path": "in.jsonl", "id": "id"},
        "model": {"backend": "python", "function": f"funcs:{function}"},
        "run": {"batch_size": 16, "backoff_base": 0.01, "backoff_max": 0.05, **run},
        "output": {"path": "out.jsonl"},
    }
    return overnight.Job(spec, base_dir=folder)


def lines(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def test_same_results_as_the_local_executor(cluster: str, tmp_path: Path) -> None:
    n = 2500  # two reads of the input (the driver reads on as the actors need more)
    local = make_job(tmp_path / "local", n, "double").run()
    ray = make_job(
        tmp_path / "ray", n, "double", executor="ray", ray_address=cluster, workers=2
    ).run()
    bad = [i for i in range(n) if i % 97 == 5]
    expected = {"succeeded": n - len(bad), "failed": len(bad)}
    assert local.counts.by_state == ray.counts.by_state == expected
    for name in ("out.jsonl", "out.errors.jsonl"):
        mine = sorted(lines(tmp_path / "ray" / name), key=lambda r: r["id"])
        theirs = sorted(lines(tmp_path / "local" / name), key=lambda r: r["id"])
        assert mine == theirs and len({r["id"] for r in mine}) == len(mine)
    errors = lines(tmp_path / "ray" / "out.errors.jsonl")
    assert {e["id"] for e in errors} == {f"k{i}" for i in bad}


def test_a_killed_actor_loses_only_its_pages(cluster: str, tmp_path: Path) -> None:
    folder = tmp_path / "job"
    job = make_job(folder, 800, "slow", executor="ray", ray_address=cluster, workers=2)
    killed: list[int] = []

    def kill_one() -> None:  # kill -9 of an actor's process once both have computed a bit
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = list(folder.glob("calls-*.txt"))
            if len(done) == 2 and all(len(p.read_text().splitlines()) >= 3 for p in done):
                pid = int(done[0].name[6:-4])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    report = job.run()
    killer.join()
    assert killed, "no actor was killed"
    assert report.counts.by_state == {"succeeded": 800}
    out = lines(folder / "out.jsonl")
    assert Counter(r["id"] for r in out) == Counter(f"k{i}" for i in range(800))
    assert all(r["output"]["n"] == int(r["id"][1:]) for r in out)
    # A new actor took the dead one's place.
    assert len(list((folder / "pids").iterdir())) == 3


def test_a_record_that_kills_its_actor_fails_alone(cluster: str, tmp_path: Path) -> None:
    folder = tmp_path / "job"
    job = make_job(
        folder,
        120,
        "exits",
        executor="ray",
        ray_address=cluster,
        workers=2,
        batch_size=8,
        max_attempts=2,
    )
    report = job.run()
    assert report.counts.by_state == {"succeeded": 119, "failed": 1}
    (error,) = lines(folder / "out.errors.jsonl")
    assert error["id"] == "k13"
    assert error["error_class"] == "worker_crashed"
    assert "Ray actor died" in error["message"]
    assert len(lines(folder / "out.jsonl")) == 119


def test_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JobFileError, match=r"\[run\] executor"):
        make_job(tmp_path, 1, "double", executor="spark")
    with pytest.raises(JobFileError, match="workers"):
        make_job(tmp_path, 1, "double", workers=2)
    spec = {
        "source": {"path": "in.jsonl"},
        "model": {"backend": "openai-batch", "name": "gpt-4o-mini"},
        "task": {"kind": "generate"},
        "run": {"executor": "ray"},
    }
    with pytest.raises(JobFileError, match=r"\[run\] executor = 'ray' runs backend"):
        overnight.Job(spec, base_dir=tmp_path)
    # A cluster that is not there: exit 2 at once, naming the key.
    job = make_job(tmp_path, 3, "double", executor="ray", ray_address=f"127.0.0.1:{_free_port()}")
    with pytest.raises(UsageError, match=r"\[run\] ray_address: nothing answers") as err:
        job.run()
    assert err.value.exit_code == 2
    # Without the [ray] extra: exit 2, saying how to install it.
    monkeypatch.setitem(sys.modules, "ray", None)
    job = make_job(tmp_path, 3, "double", executor="ray")
    with pytest.raises(UsageError, match=r"pip install 'overnight\[ray\]'") as err:
        job.run()
    assert err.value.exit_code == 2
