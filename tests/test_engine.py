"""End-to-end behaviour of the engine through the Python API, on the python backend."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest

import overnight
from overnight.claim import JobBusy, claimed
from overnight.runner import Progress
from overnight.store import SQLiteLedger


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def make_function(tmp_path: Path, body: str) -> str:
    """A module in the job's folder with a `fn(records)`; a unique name per test."""
    name = f"fn_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(body)
    return f"{name}:fn"


def job(tmp_path: Path, function: str, **extra) -> overnight.Job:
    spec = {
        "name": "t",
        "source": {"path": "in.jsonl", "id": "id"},
        "model": {"backend": "python", "function": function},
        "output": {"path": "out.jsonl"},
    }
    for section, values in extra.items():
        spec.setdefault(section, {}).update(values)
    return overnight.Job(spec, base_dir=tmp_path)


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


DOUBLE = """
def fn(records):
    return [{"v": r["n"] * 2} for r in records]
"""


def test_outputs_in_input_order_with_ids(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"k{i}", "n": i} for i in range(2500)])
    report = job(tmp_path, make_function(tmp_path, DOUBLE)).run()
    assert report.exit_code == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [f"k{i}" for i in range(2500)]
    assert [r["output"]["v"] for r in rows] == [2 * i for i in range(2500)]
    assert (tmp_path / "out.errors.jsonl").read_bytes() == b""


def test_one_poison_record_fails_alone(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "n": i} for i in range(300)])
    fn = make_function(
        tmp_path,
        """
def fn(records):
    if any(r["n"] == 123 for r in records):
        raise ValueError("cannot handle 123")
    return [r["n"] for r in records]
""",
    )
    report = job(tmp_path, fn, run={"batch_size": 64}).run()
    assert report.exit_code == 3
    assert report.counts["succeeded"] == 299 and report.counts["failed"] == 1
    (err,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert err == {
        "id": "123",
        "line": 124,
        "state": "failed",
        "error_class": "ValueError",
        "message": "cannot handle 123",
        "attempts": 1,
    }
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 299


def test_transient_errors_are_retried_then_give_up(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "n": i} for i in range(20)])
    (tmp_path / "seen").mkdir()
    fn = make_function(
        tmp_path,
        f"""
import os, overnight
SEEN = {str(tmp_path / "seen")!r}
def fn(records):
    out = []
    for r in records:
        mark = os.path.join(SEEN, str(r["n"]))
        if r["n"] == 7:
            raise overnight.TransientError("always busy")
        if r["n"] % 5 == 0 and not os.path.exists(mark):
            open(mark, "w").close()
            raise TimeoutError("busy once")
        out.append(r["n"])
    return out
""",
    )
    report = job(tmp_path, fn, run={"batch_size": 4, "backoff_base": 0.01, "max_attempts": 3}).run()
    assert report.counts["succeeded"] == 19
    (err,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert err["id"] == "7" and err["error_class"] == "TransientError"
    assert err["attempts"] == 3 and "gave up after 3 attempts" in err["message"]


def test_schema_failures_are_invalid_never_exported(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "n": i} for i in range(10)])
    fn = make_function(
        tmp_path,
        "def fn(records):\n    return [{'v': r['n'] if r['n'] != 3 else 'x'} for r in records]\n",
    )
    schema = {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}
    report = job(tmp_path, fn, output={"schema": schema}).run()
    assert report.exit_code == 3 and report.counts["invalid"] == 1
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [
        str(i) for i in range(10) if i != 3
    ]
    (err,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert (
        err["state"] == "invalid" and err["error_class"] == "schema_error" and "v" in err["message"]
    )


def test_bad_records_fail_alone_with_line_numbers(tmp_path):
    good = [orjson.dumps({"id": i, "n": i}) for i in range(6)]
    lines = [
        good[0],
        b"{not json",
        good[1],
        b"",
        b"\xff\xfe{}",
        good[2],
        orjson.dumps({"id": 1, "n": 9}),
        b"[1, 2]",
        good[3],
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = job(tmp_path, make_function(tmp_path, DOUBLE)).run()
    assert report.exit_code == 3
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["0", "1", "2", "3"]
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["line"], e["error_class"]) for e in errors] == [
        (2, "input_error"),
        (5, "input_error"),
        (7, "input_error"),
        (8, "input_error"),
    ]
    assert "malformed JSON" in errors[0]["message"]
    assert "UTF-8" in errors[1]["message"]
    assert "duplicate id '1'" in errors[2]["message"] and "line 3" in errors[2]["message"]
    assert "not a JSON object" in errors[3]["message"]


def test_csv_wrong_field_count(tmp_path):
    (tmp_path / "in.csv").write_text('id,n\n1,1\n2,2,extra\n"3",3\n')
    fn = make_function(tmp_path, "def fn(records):\n    return [r['n'] for r in records]\n")
    report = job(tmp_path, fn, source={"path": "in.csv"}).run()
    assert report.exit_code == 3
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["1", "3"]
    (err,) = read_jsonl(tmp_path / "out.errors.jsonl")
    assert err["line"] == 3 and "3 fields, header has 2" in err["message"]


def test_stop_then_resume_computes_nothing_twice(tmp_path):
    n = 5000
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "n": i} for i in range(n)])
    log = tmp_path / "calls.log"
    fn = make_function(
        tmp_path,
        f"""
import time
def fn(records):
    time.sleep(0.005)
    with open({str(log)!r}, "a") as f:
        f.write("".join(f"{{r['id']}}\\n" for r in records))
    return [r["n"] for r in records]
""",
    )
    j = job(tmp_path, fn, run={"batch_size": 100})
    stop = threading.Event()

    def press_ctrl_c_after_1000_computed() -> None:
        while not stop.is_set():
            if log.exists() and log.read_text().count("\n") >= 1000:
                stop.set()
            time.sleep(0.002)

    watcher = threading.Thread(target=press_ctrl_c_after_1000_computed)
    watcher.start()
    first = j.run(stop=stop)
    stop.set()
    watcher.join()
    assert first.interrupted and first.exit_code == 130
    assert first.counts["leased"] == 0
    done_before = first.counts["succeeded"]
    assert 1000 <= done_before < n
    second = j.run()
    assert second.exit_code == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in rows] == [str(i) for i in range(n)]
    assert [r["output"] for r in rows] == list(range(n))
    calls = log.read_text().split()
    assert sorted(calls, key=int) == [str(i) for i in range(n)]  # each computed exactly once


def test_empty_input(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"")
    report = job(tmp_path, make_function(tmp_path, DOUBLE)).run()
    assert report.exit_code == 0 and report.counts.total == 0
    assert (tmp_path / "out.jsonl").read_bytes() == b""


def test_retry_after_fixing_the_cause(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "n": i} for i in range(10)])
    flag = tmp_path / "broken"
    flag.touch()
    fn = make_function(
        tmp_path,
        f"""
import os
def fn(records):
    if os.path.exists({str(flag)!r}) and any(r["n"] == 4 for r in records):
        raise RuntimeError("broken")
    return [r["n"] for r in records]
""",
    )
    j = job(tmp_path, fn)
    assert j.run().counts["failed"] == 1
    flag.unlink()
    assert j.retry().moved == 1
    report = j.run()
    assert report.exit_code == 0 and report.counts["succeeded"] == 10
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(10))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_formats_with_include(tmp_path, suffix):
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "n": i, "name": f"x{i}"} for i in range(5)])
    j = job(
        tmp_path,
        make_function(tmp_path, DOUBLE),
        output={"path": f"out{suffix}", "include": ["name"]},
    )
    assert j.run().exit_code == 0
    if suffix == ".csv":
        import csv

        with open(tmp_path / "out.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [(r["id"], orjson.loads(r["output"])["v"], r["name"]) for r in rows] == [
            (str(i), 2 * i, f"x{i}") for i in range(5)
        ]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
        assert [(r["id"], r["output"]["v"], r["name"]) for r in rows] == [
            (str(i), 2 * i, f"x{i}") for i in range(5)
        ]


def test_a_second_concurrent_run_is_refused_and_the_first_completes(tmp_path):
    n = 3000
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "n": i} for i in range(n)])
    fn = make_function(
        tmp_path,
        "import time\n"
        "def fn(records):\n"
        "    time.sleep(0.01)\n"
        "    return [r['n'] for r in records]\n",
    )
    first = job(tmp_path, fn, run={"batch_size": 10})
    result: dict = {}
    runner = threading.Thread(target=lambda: result.setdefault("report", first.run()))
    runner.start()
    ledger = tmp_path / ".overnight" / "ledger.db"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until the first run has committed something
        if ledger.exists():
            import sqlite3

            with sqlite3.connect(ledger) as con:
                try:
                    if con.execute("SELECT ingest_records FROM jobs").fetchone()[0] > 0:
                        break
                except (sqlite3.OperationalError, TypeError):
                    pass
        time.sleep(0.01)
    with pytest.raises(overnight.UsageError, match="is being run by process"):
        job(tmp_path, fn, run={"batch_size": 10}).run()
    runner.join()
    assert result["report"].exit_code == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert [r["output"] for r in rows] == list(range(n))


# -- the claim's heartbeat (claim.py), with a short ttl: beats every ttl / 4 -----------------


def test_a_runs_heartbeat_keeps_its_claim_past_the_ttl_and_records_its_progress(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = SQLiteLedger(path)
    with claimed(ledger, "j", lambda: SQLiteLedger(path), ttl=0.4) as run:
        first = ledger.get_claim("j")
        run.progress = Progress(processed=7)
        time.sleep(0.7)  # the first expiry has passed: only the heartbeat keeps the claim
        assert ledger.get_claim("j").expires > first.expires
        second = SQLiteLedger(path)
        with pytest.raises(JobBusy), claimed(second, "j", lambda: second, restart=True):
            pass  # a restart is refused, not let in by an expired claim
        second.close()
        live = ledger.last_run("j")
        assert (live.processed, live.ended_at, live.outcome) == (7, None, None)
        assert live.updated_at > live.started_at  # `status` sees the run's last beat
        run.finish("finished", 9, 1.5, 0.25)
    ended = ledger.last_run("j")
    assert (ended.outcome, ended.processed, ended.seconds, ended.setup_seconds) == (
        "finished",
        9,
        1.5,
        0.25,
    )
    assert ended.ended_at is not None
    assert ledger.get_claim("j") is None  # released: the next run may start
    ledger.close()


def test_a_run_whose_claim_is_taken_over_is_told_and_leaves_the_new_holders_claim(tmp_path):
    path = tmp_path / "ledger.db"
    ledger, other = SQLiteLedger(path), SQLiteLedger(path)
    lost = threading.Event()
    with claimed(ledger, "j", lambda: SQLiteLedger(path), on_lost=lost.set, ttl=0.4):
        mine, now = ledger.get_claim("j").owner, time.time()
        other.claim("j", "elsewhere:4242:1700000000/abcd", now, now + 60, take_from=mine)
        assert lost.wait(2.0)  # the heartbeat found the claim gone and said so
    assert ledger.get_claim("j").owner == "elsewhere:4242:1700000000/abcd"
    ledger.close()
    other.close()
