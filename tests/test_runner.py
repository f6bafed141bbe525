"""End to end through `overnight.Job` with backend = "python": order, ids, poison isolation,
retries with backoff, schema validation, retry, export formats, changed inputs, stop, cancel,
empty input and the automatic batch size."""

from __future__ import annotations

import collections
import csv
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import psutil
import pyarrow.parquet as pq
import pytest
from job_helpers import ALL_ITEMS

import overnight
from overnight import sources
from overnight.errors import InputChangedError
from overnight.store import Lease, SQLiteLedger

# -- helpers ---------------------------------------------------------------------------------

# Every test function logs its calls as one JSON line per call: the ids it was handed.
PRELUDE = """
import json, os, time
from pathlib import Path
import overnight

HERE = Path(__file__).parent

def log_call(records, key="id"):
    with open(HERE / "calls.jsonl", "a") as f:
        f.write(json.dumps([r.get(key) for r in records]) + "\\n")

def mode():
    p = HERE / "mode.txt"
    return p.read_text().strip() if p.exists() else ""
"""


def make_function(folder: Path, body: str) -> str:
    name = f"fn_{uuid.uuid4().hex[:10]}"
    (folder / f"{name}.py").write_text(PRELUDE + body)
    return f"{name}:fn"


def calls(folder: Path) -> list[list]:
    path = folder / "calls.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def called_ids(folder: Path) -> collections.Counter:
    return collections.Counter(i for call in calls(folder) for i in call)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def make_job(folder: Path, function: str, **sections) -> overnight.Job:
    spec = {
        "name": "rt",
        "source": {"path": "in.jsonl", "id": "id"},
        "model": {"backend": "python", "function": function},
        "run": {"batch_size": 8, "backoff_base": 0.01, "backoff_max": 0.05},
        "output": {"path": "out.jsonl"},
    }
    for section, values in sections.items():
        if values is None:
            spec.pop(section, None)
        elif isinstance(values, dict):
            spec[section] = {**spec.get(section, {}), **values}
        else:
            spec[section] = values
    return overnight.Job(spec, base_dir=folder)


def records(n: int, prefix: str = "k") -> list[dict]:
    return [{"id": f"{prefix}{i}", "n": i, "text": f"text {i}"} for i in range(n)]


DOUBLE = """
def fn(records):
    log_call(records)
    return [{"double": r["n"] * 2} for r in records]
"""


# Fails every batch while mode.txt says "broken"; logs the ids it computed otherwise.
BROKEN_UNTIL_FIXED = """
def fn(records):
    if mode() == "broken":
        raise RuntimeError("broken")
    log_call(records)
    return [r["n"] for r in records]
"""


# -- order and ids ---------------------------------------------------------------------------


def test_output_in_input_order_under_the_id_column(tmp_path):
    recs = [{"ticket": f"t{i:03d}", "n": i} for i in range(50)]
    recs[10]["ticket"] = 12345  # an int id becomes a string
    write_jsonl(tmp_path / "in.jsonl", recs)
    body = """
def fn(records):
    log_call(records, "ticket")
    return [{"double": r["n"] * 2} for r in records]
"""
    job = make_job(tmp_path, make_function(tmp_path, body), source={"id": "ticket"})
    report = job.run()
    assert report.exit_code == 0
    assert report.counts.by_state == {"succeeded": 50}
    assert report.counts.rejected == 0
    assert report.processed == 50
    assert report.output == tmp_path.resolve() / "out.jsonl"
    rows = read_jsonl(tmp_path / "out.jsonl")
    expected_ids = [f"t{i:03d}" for i in range(50)]
    expected_ids[10] = "12345"
    assert rows == [
        {"ticket": tid, "output": {"double": 2 * i}} for i, tid in enumerate(expected_ids)
    ]
    assert (tmp_path / "out.errors.jsonl").read_bytes() == b""
    assert all(len(c) <= 8 for c in calls(tmp_path))
    assert sum(len(c) for c in calls(tmp_path)) == 50


def test_hashed_ids_go_under_custom_id(tmp_path):
    lines = [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    job = make_job(tmp_path, make_function(tmp_path, DOUBLE), source={"id": None})
    assert job.run().exit_code == 0
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert rows == [
        {"custom_id": sources.content_id(line), "output": {"double": 2 * (i + 1)}}
        for i, line in enumerate(lines)
    ]


def test_default_output_paths_beside_the_job(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(3))
    job = make_job(tmp_path, make_function(tmp_path, DOUBLE), output=None)
    report = job.run()
    assert report.output == tmp_path.resolve() / "rt.out.jsonl"
    assert report.errors == tmp_path.resolve() / "rt.out.errors.jsonl"
    assert [r["id"] for r in read_jsonl(report.output)] == ["k0", "k1", "k2"]


# -- failures --------------------------------------------------------------------------------


POISON = """
def fn(records):
    log_call(records)
    for r in records:
        if r["n"] == 5:
            raise ValueError(f"cannot handle record {r['id']}")
    return [r["n"] + 100 for r in records]
"""


def test_poison_record_fails_alone(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(16))
    report = make_job(tmp_path, make_function(tmp_path, POISON), run={"batch_size": 16}).run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"succeeded": 15, "failed": 1}
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert rows == [{"id": f"k{i}", "output": i + 100} for i in range(16) if i != 5]
    # the batch is split in halves until the poison is alone
    assert [len(c) for c in calls(tmp_path)] == [16, 8, 4, 4, 2, 1, 1, 2, 8]
    assert calls(tmp_path)[6] == ["k5"]
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert errors == [
        {
            "id": "k5",
            "line": 6,
            "state": "failed",
            "error_class": "ValueError",
            "message": "cannot handle record k5",
            "attempts": 1,
        }
    ]
    fails = make_job(tmp_path, "x:fn").failures()
    assert [(f.custom_id, f.error_class) for f in fails] == [("k5", "ValueError")]


def test_bad_input_lines_are_failures_not_crashes(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(
        b'{"id": "a", "n": 1}\n{oops\n\n{"id": "b", "n": 2}\n{"id": "a", "n": 3}\n[1]\n{"n": 4}\n'
    )
    report = make_job(tmp_path, make_function(tmp_path, DOUBLE)).run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"succeeded": 2}
    assert report.counts.rejected == 4
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": "a", "output": {"double": 2}},
        {"id": "b", "output": {"double": 4}},
    ]
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["id"], e["line"], e["state"], e["error_class"], e["attempts"]) for e in errors] == [
        (None, 2, "failed", "input_error", 0),
        ("a", 5, "failed", "input_error", 0),
        (None, 6, "failed", "input_error", 0),
        (None, 7, "failed", "input_error", 0),
    ]
    assert "malformed JSON" in errors[0]["message"]
    assert "duplicate id 'a'" in errors[1]["message"]
    assert "line 1" in errors[1]["message"]
    assert errors[2]["message"] == "line 6: not a JSON object"
    assert errors[3]["message"] == "line 7: record has no 'id'"


def test_wrong_number_of_outputs_fails_the_batch(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(4))
    body = """
def fn(records):
    log_call(records)
    return []
"""
    report = make_job(tmp_path, make_function(tmp_path, body), run={"batch_size": 4}).run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"failed": 4}
    assert calls(tmp_path) == [["k0", "k1", "k2", "k3"]]  # not split into single records
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert {e["error_class"] for e in errors} == {"wrong_output_count"}
    assert errors[0]["message"].startswith("function returned 0 outputs for 4 records")


def test_unserialisable_output_is_invalid(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(3))
    body = """
def fn(records):
    return [object() if r["n"] == 1 else r["n"] for r in records]
"""
    report = make_job(tmp_path, make_function(tmp_path, body)).run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"succeeded": 2, "invalid": 1}
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [(e["id"], e["state"], e["error_class"]) for e in errors] == [
        ("k1", "invalid", "unserialisable_output")
    ]


TRANSIENT_ONCE = """
def fn(records):
    log_call(records)
    out = []
    for r in records:
        if r["n"] in (1, 3):
            marker = HERE / f"seen_{r['id']}"
            if not marker.exists():
                marker.write_text("x")
                raise overnight.TransientError(f"busy with {r['id']}")
        out.append(r["n"] * 10)
    return out
"""


def test_transient_errors_are_retried_within_one_run(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(6))
    job = make_job(tmp_path, make_function(tmp_path, TRANSIENT_ONCE), run={"batch_size": 1})
    report = job.run()
    assert report.exit_code == 0
    assert report.counts.by_state == {"succeeded": 6}
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": f"k{i}", "output": i * 10} for i in range(6)
    ]
    assert called_ids(tmp_path) == {"k0": 1, "k1": 2, "k2": 1, "k3": 2, "k4": 1, "k5": 1}
    assert read_jsonl(tmp_path / "out.errors.jsonl") == []


ALWAYS_TRANSIENT = """
def fn(records):
    log_call(records)
    if any(r["n"] == 2 for r in records):
        raise overnight.TransientError("rate limited")
    return [r["n"] for r in records]
"""


def test_always_transient_gives_up_after_max_attempts(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(4))
    job = make_job(
        tmp_path,
        make_function(tmp_path, ALWAYS_TRANSIENT),
        run={"batch_size": 1, "max_attempts": 3},
    )
    report = job.run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"succeeded": 3, "failed": 1}
    assert called_ids(tmp_path)["k2"] == 3
    (fail,) = job.failures()
    assert fail.custom_id == "k2"
    assert fail.state == "failed"
    assert fail.error_class == "TransientError"
    assert fail.attempts == 3
    assert "rate limited" in fail.message
    assert "gave up" in fail.message
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert errors[0]["attempts"] == 3


def test_always_transient_in_a_batch(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(8))
    job = make_job(
        tmp_path,
        make_function(tmp_path, ALWAYS_TRANSIENT),
        run={"batch_size": 4, "max_attempts": 2},
    )
    report = job.run()
    assert report.exit_code == 3
    assert report.counts.by_state == {"succeeded": 7, "failed": 1}
    (fail,) = job.failures()
    assert (fail.custom_id, fail.attempts) == ("k2", 2)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [
        f"k{i}" for i in range(8) if i != 2
    ]


# -- schema validation and retry ---------------------------------------------------------------

LABELS = """
def fn(records):
    log_call(records)
    fixed = mode() == "fixed"
    return [{"label": "a" if (fixed or r["n"] % 3) else "zzz"} for r in records]
"""

SCHEMA = {
    "type": "object",
    "required": ["label"],
    "properties": {"label": {"enum": ["a", "b"]}},
}


def _check_schema_run(tmp_path: Path, report) -> None:
    assert report.exit_code == 3
    assert report.counts.by_state == {"succeeded": 6, "invalid": 3}
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert rows == [{"id": f"k{i}", "output": {"label": "a"}} for i in range(9) if i % 3]
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["id"] for e in errors] == ["k0", "k3", "k6"]
    for e in errors:
        assert set(e) == {"id", "line", "state", "error_class", "message", "attempts"}
        assert e["state"] == "invalid"
        assert e["error_class"] == "schema_error"
        assert e["message"] == "schema: label: 'zzz' is not one of ['a', 'b']"
        assert e["attempts"] == 1
    assert [e["line"] for e in errors] == [1, 4, 7]


def test_inline_schema_marks_invalid_outputs(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(9))
    job = make_job(tmp_path, make_function(tmp_path, LABELS), output={"schema": SCHEMA})
    _check_schema_run(tmp_path, job.run())


def test_schema_file_marks_invalid_outputs(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(9))
    (tmp_path / "schema.json").write_bytes(orjson.dumps(SCHEMA))
    job = make_job(tmp_path, make_function(tmp_path, LABELS), output={"schema": "schema.json"})
    _check_schema_run(tmp_path, job.run())


def test_schema_from_a_job_file(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(9))
    fn = make_function(tmp_path, LABELS)
    (tmp_path / "job.toml").write_text(
        f"""
name = "rt"
[source]
path = "in.jsonl"
id = "id"
[model]
backend = "python"
function = "{fn}"
[output]
path = "out.jsonl"
schema = {{ type = "object", required = ["label"], """
        f"""properties = {{ label = {{ enum = ["a", "b"] }} }} }}
"""
    )
    _check_schema_run(tmp_path, overnight.Job.from_file(tmp_path / "job.toml").run())


def test_retry_invalid_after_fixing_the_function(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(9))
    fn = make_function(tmp_path, LABELS)
    job = make_job(tmp_path, fn, output={"schema": SCHEMA})
    _check_schema_run(tmp_path, job.run())
    (tmp_path / "mode.txt").write_text("fixed")
    assert job.retry().moved == 0  # plain retry leaves invalid items alone
    assert job.retry(invalid=True).moved == 3
    assert job.status().counts.by_state == {"succeeded": 6, "pending": 3}
    before = called_ids(tmp_path)
    report = make_job(tmp_path, fn, output={"schema": SCHEMA}).run()
    assert report.exit_code == 0
    assert report.counts.by_state == {"succeeded": 9}
    assert report.processed == 3
    after = called_ids(tmp_path)
    assert after - before == {"k0": 1, "k3": 1, "k6": 1}  # only the retried ones ran
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": f"k{i}", "output": {"label": "a"}} for i in range(9)
    ]
    assert read_jsonl(tmp_path / "out.errors.jsonl") == []


def test_retry_failed_after_fixing_the_function(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(6))
    body = """
def fn(records):
    log_call(records)
    if mode() != "fixed" and any(r["n"] == 4 for r in records):
        raise KeyError("n")
    return [r["n"] for r in records]
"""
    job = make_job(tmp_path, make_function(tmp_path, body))
    report = job.run()
    assert report.exit_code == 3
    assert [(f.custom_id, f.error_class) for f in job.failures()] == [("k4", "KeyError")]
    (tmp_path / "mode.txt").write_text("fixed")
    assert job.retry().moved == 1
    report = job.run()
    assert report.exit_code == 0
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(6))
    assert job.failures() == []


# -- export formats ------------------------------------------------------------------------------

SHAPE = """
def fn(records):
    if any(r["n"] == 2 for r in records):
        raise RuntimeError("no twos")
    return [{"len": len(r["text"]), "tag": "t" + str(r["n"])} for r in records]
"""


def _export_input(tmp_path: Path) -> None:
    recs = [{"id": f"k{i}", "n": i, "text": "x" * i, "extra": i * 1.5} for i in range(5)]
    lines = [orjson.dumps(r) for r in recs]
    lines.insert(3, b"{broken")
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _check_errors_file(path: Path) -> None:
    errors = read_jsonl(path)
    assert [set(e) for e in errors] == [
        {"id", "line", "state", "error_class", "message", "attempts"}
    ] * 2
    assert [(e["id"], e["line"], e["state"], e["error_class"], e["attempts"]) for e in errors] == [
        ("k2", 3, "failed", "RuntimeError", 1),
        (None, 4, "failed", "input_error", 0),
    ]
    assert errors[0]["message"] == "no twos"


def test_export_csv_with_include(tmp_path):
    _export_input(tmp_path)
    job = make_job(
        tmp_path,
        make_function(tmp_path, SHAPE),
        output={"path": "out.csv", "errors": "errs.jsonl", "include": ["text", "n"]},
    )
    report = job.run()
    assert report.exit_code == 3
    with open(tmp_path / "out.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["id", "output", "text", "n"]
        rows = list(reader)
    assert [(r["id"], orjson.loads(r["output"]), r["text"], r["n"]) for r in rows] == [
        (f"k{i}", {"len": i, "tag": f"t{i}"}, "x" * i, str(i)) for i in (0, 1, 3, 4)
    ]
    _check_errors_file(tmp_path / "errs.jsonl")


def test_export_parquet_with_include(tmp_path):
    _export_input(tmp_path)
    job = make_job(
        tmp_path,
        make_function(tmp_path, SHAPE),
        output={"path": "out.parquet", "errors": "errs.jsonl", "include": ["text", "extra"]},
    )
    assert job.run().exit_code == 3
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column_names == ["id", "output", "text", "extra"]
    assert table.to_pylist() == [
        {"id": f"k{i}", "output": {"len": i, "tag": f"t{i}"}, "text": "x" * i, "extra": i * 1.5}
        for i in (0, 1, 3, 4)
    ]
    _check_errors_file(tmp_path / "errs.jsonl")


def test_export_jsonl_with_include(tmp_path):
    _export_input(tmp_path)
    job = make_job(
        tmp_path, make_function(tmp_path, SHAPE), output={"include": ["text", "missing"]}
    )
    job.run()
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": f"k{i}", "output": {"len": i, "tag": f"t{i}"}, "text": "x" * i, "missing": None}
        for i in (0, 1, 3, 4)
    ]


def test_export_rewrites_from_the_ledger(tmp_path):
    _export_input(tmp_path)
    job = make_job(tmp_path, make_function(tmp_path, SHAPE))
    job.run()
    out, errs = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    first_out, first_errs = out.read_bytes(), errs.read_bytes()
    out.unlink()
    errs.unlink()
    done = job.export()
    assert (done.rows, done.errors_rows) == (4, 2)
    assert out.read_bytes() == first_out
    assert errs.read_bytes() == first_errs
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_include_of_a_reserved_name_is_refused(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(2))
    job = make_job(tmp_path, make_function(tmp_path, DOUBLE), output={"include": ["output"]})
    with pytest.raises(overnight.UsageError, match="include"):
        job.run()


# -- a changed input or configuration -------------------------------------------------------------


def test_changed_model_is_refused(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(3))
    assert make_job(tmp_path, make_function(tmp_path, DOUBLE)).run().exit_code == 0
    other = make_function(tmp_path, DOUBLE)  # same code, another function
    with pytest.raises(InputChangedError) as info:
        make_job(tmp_path, other).run()
    assert "[task] or [model]" in str(info.value)
    assert "`restart=True`" in str(info.value)  # the CLI says --restart
    assert make_job(tmp_path, other).run(restart=True).exit_code == 0


def test_changed_task_is_refused(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(3))
    fn = make_function(tmp_path, DOUBLE)
    assert make_job(tmp_path, fn).run().exit_code == 0
    with pytest.raises(InputChangedError):
        make_job(tmp_path, fn, task={"text": "{{ n }}"}).run()


def test_run_and_output_settings_may_change(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(3))
    fn = make_function(tmp_path, DOUBLE)
    assert make_job(tmp_path, fn).run().exit_code == 0
    report = make_job(
        tmp_path, fn, run={"batch_size": 2, "max_attempts": 5}, output={"path": "other.jsonl"}
    ).run()
    assert report.exit_code == 0
    assert report.processed == 0
    assert [r["id"] for r in read_jsonl(tmp_path / "other.jsonl")] == ["k0", "k1", "k2"]


def test_touched_input_is_fine(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(3))
    fn = make_function(tmp_path, DOUBLE)
    assert make_job(tmp_path, fn).run().exit_code == 0
    st = os.stat(tmp_path / "in.jsonl")
    os.utime(tmp_path / "in.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 3 * 10**9))
    report = make_job(tmp_path, fn).run()
    assert report.exit_code == 0
    assert report.processed == 0
    assert sum(called_ids(tmp_path).values()) == 3


# -- stop (Ctrl-C) and resume ----------------------------------------------------------------------

SLOW = """
def fn(records):
    log_call(records)
    time.sleep(float(mode() or "0.05"))
    return [r["n"] for r in records]
"""


def test_stop_during_ingest_then_resume_without_recomputing(tmp_path):
    n = 150
    write_jsonl(tmp_path / "in.jsonl", records(n))
    fn = make_function(tmp_path, SLOW)
    stop = threading.Event()
    seen = []

    def on_progress(p):
        seen.append(p.finished)
        if p.finished >= 10:
            stop.set()

    report = make_job(tmp_path, fn, run={"batch_size": 5}).run(on_progress=on_progress, stop=stop)
    assert report.interrupted is True
    assert report.exit_code == 130
    assert report.ingest_done is False
    assert report.output is None  # nothing exported on an interrupted run
    done = report.counts["succeeded"]
    assert 10 <= done < n
    assert "leased" not in report.counts.by_state
    assert report.counts.total == done

    (tmp_path / "mode.txt").write_text("0")  # the rest runs at full speed
    report2 = make_job(tmp_path, fn, run={"batch_size": 5}).run()
    assert report2.exit_code == 0
    assert report2.interrupted is False
    assert report2.counts.by_state == {"succeeded": n}
    assert report2.processed == n - done
    ids = [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert ids == [f"k{i}" for i in range(n)]
    assert called_ids(tmp_path) == {f"k{i}": 1 for i in range(n)}


def test_stop_while_draining_releases_leases(tmp_path):
    n = 40
    write_jsonl(tmp_path / "in.jsonl", records(n))
    body = BROKEN_UNTIL_FIXED
    (tmp_path / "mode.txt").write_text("broken")
    fn = make_function(tmp_path, body)
    job = make_job(tmp_path, fn, run={"batch_size": 5})
    assert job.run().counts.by_state == {"failed": n}
    assert job.retry().moved == n
    (tmp_path / "mode.txt").write_text("ok")
    stop = threading.Event()

    def on_progress(p):
        if p.processed >= 5:
            stop.set()

    report = make_job(tmp_path, fn, run={"batch_size": 5}).run(on_progress=on_progress, stop=stop)
    assert report.exit_code == 130
    assert report.counts.by_state == {"succeeded": 5, "pending": n - 5}
    report2 = make_job(tmp_path, fn, run={"batch_size": 5}).run()
    assert report2.exit_code == 0
    assert report2.counts.by_state == {"succeeded": n}
    assert called_ids(tmp_path) == {f"k{i}": 1 for i in range(n)}
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(n))


def test_stop_before_the_run_starts(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(5))
    stop = threading.Event()
    stop.set()
    fn = make_function(tmp_path, DOUBLE)
    report = make_job(tmp_path, fn).run(stop=stop)
    assert report.exit_code == 130
    assert calls(tmp_path) == []
    assert make_job(tmp_path, fn).run().counts.by_state == {"succeeded": 5}


# -- cancel ----------------------------------------------------------------------------------------


def test_cancel_from_another_connection_mid_ingest(tmp_path):
    n = 150
    write_jsonl(tmp_path / "in.jsonl", records(n))
    fn = make_function(tmp_path, SLOW)
    canceller = make_job(tmp_path, fn)

    def on_progress(p):
        if p.finished and not p.ingest_done:
            canceller.cancel()

    report = make_job(tmp_path, fn, run={"batch_size": 5}).run(on_progress=on_progress)
    assert report.cancelled is True
    assert report.interrupted is False
    assert report.exit_code == 3
    done = report.counts["succeeded"]
    assert 0 < done < n
    assert make_job(tmp_path, fn).status().cancelled is True
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [f"k{i}" for i in range(done)]

    (tmp_path / "mode.txt").write_text("0")
    report2 = make_job(tmp_path, fn, run={"batch_size": 5}).run()
    assert report2.exit_code == 0
    assert report2.cancelled is False
    assert report2.counts.by_state == {"succeeded": n}
    assert called_ids(tmp_path) == {f"k{i}": 1 for i in range(n)}
    assert make_job(tmp_path, fn).status().cancelled is False


BLOCKING = """
def fn(records):
    if mode() == "broken":
        raise RuntimeError("broken")
    log_call(records)
    started = HERE / "started"
    if not started.exists():
        started.write_text("x")
        deadline = time.monotonic() + 20
        while not (HERE / "cancelled").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return [r["n"] for r in records]
"""


def test_cancel_from_another_thread_while_draining(tmp_path):
    n = 30
    write_jsonl(tmp_path / "in.jsonl", records(n))
    (tmp_path / "mode.txt").write_text("broken")
    fn = make_function(tmp_path, BLOCKING)
    job = make_job(tmp_path, fn, run={"batch_size": 5})
    assert job.run().counts.by_state == {"failed": n}
    job.retry()
    (tmp_path / "mode.txt").write_text("ok")

    def cancel_when_started():
        deadline = time.monotonic() + 20
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        make_job(tmp_path, fn).cancel()
        (tmp_path / "cancelled").write_text("x")

    thread = threading.Thread(target=cancel_when_started)
    thread.start()
    report = make_job(tmp_path, fn, run={"batch_size": 5}).run()
    thread.join()
    assert report.cancelled is True
    assert report.exit_code == 3
    # the batch in flight was cancelled under the runner: its results are not committed
    assert report.counts.by_state == {"cancelled": n}
    assert read_jsonl(tmp_path / "out.jsonl") == []

    report2 = make_job(tmp_path, fn, run={"batch_size": 5}).run()
    assert report2.exit_code == 0
    assert report2.counts.by_state == {"succeeded": n}
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(n))


def test_cancel_between_runs_then_resume(tmp_path):
    n = 90
    write_jsonl(tmp_path / "in.jsonl", records(n))
    fn = make_function(tmp_path, SLOW)
    stop = threading.Event()

    def on_progress(p):
        if p.finished:
            stop.set()

    first = make_job(tmp_path, fn, run={"batch_size": 3}).run(on_progress=on_progress, stop=stop)
    assert first.exit_code == 130
    done = first.counts["succeeded"]
    result = make_job(tmp_path, fn).cancel()
    assert result.items == 0 and result.unread == n - done  # nothing open in the ledger yet
    status = make_job(tmp_path, fn).status()
    assert status.cancelled is True
    assert status.counts.by_state == {"succeeded": done}
    assert done < n
    (tmp_path / "mode.txt").write_text("0")
    report = make_job(tmp_path, fn, run={"batch_size": 3}).run()
    assert report.exit_code == 0
    assert report.counts.by_state == {"succeeded": n}
    assert called_ids(tmp_path) == {f"k{i}": 1 for i in range(n)}


def test_cancel_with_open_items_then_resume(tmp_path):
    n = 12
    write_jsonl(tmp_path / "in.jsonl", records(n))
    body = BROKEN_UNTIL_FIXED
    (tmp_path / "mode.txt").write_text("broken")
    fn = make_function(tmp_path, body)
    job = make_job(tmp_path, fn)
    job.run()
    assert job.retry().moved == n
    assert job.cancel().items == n
    assert job.status().counts.by_state == {"cancelled": n}
    assert job.status().exit_code == 3
    (tmp_path / "mode.txt").write_text("ok")
    report = job.run()
    assert report.exit_code == 0
    assert report.counts.by_state == {"succeeded": n}
    assert called_ids(tmp_path) == {f"k{i}": 1 for i in range(n)}


# -- empty input, batch size ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_empty_input(tmp_path, suffix):
    if suffix == ".parquet":
        import pyarrow as pa

        pq.write_table(pa.table({"id": pa.array([], pa.string())}), tmp_path / "in.parquet")
    else:
        (tmp_path / f"in{suffix}").write_bytes(b"" if suffix == ".jsonl" else b"id,n\n")
    fn = make_function(tmp_path, DOUBLE)
    job = make_job(tmp_path, fn, source={"path": f"in{suffix}"})
    report = job.run()
    assert report.exit_code == 0
    assert report.counts.total == 0
    assert report.processed == 0
    assert (tmp_path / "out.jsonl").read_bytes() == b""
    assert (tmp_path / "out.errors.jsonl").read_bytes() == b""
    assert calls(tmp_path) == []


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_input_to_csv_and_parquet_output(tmp_path, suffix):
    (tmp_path / "in.jsonl").write_bytes(b"")
    job = make_job(tmp_path, make_function(tmp_path, DOUBLE), output={"path": f"out{suffix}"})
    assert job.run().exit_code == 0
    if suffix == ".csv":
        assert (tmp_path / "out.csv").read_text().splitlines() == ["id,output"]
    else:
        assert pq.read_table(tmp_path / "out.parquet").num_rows == 0


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_inputs(tmp_path, fmt):
    recs = [{"id": f"k{i}", "n": i} for i in range(7)]
    if fmt == "csv":
        with open(tmp_path / "in.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["id", "n"])
            w.writeheader()
            w.writerows(recs)
        body = "def fn(records):\n    return [int(r['n']) * 3 for r in records]\n"
    else:
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(recs), tmp_path / "in.parquet", row_group_size=3)
        body = "def fn(records):\n    return [r['n'] * 3 for r in records]\n"
    job = make_job(tmp_path, make_function(tmp_path, body), source={"path": f"in.{fmt}"})
    assert job.run().exit_code == 0
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"id": f"k{i}", "output": i * 3} for i in range(7)
    ]


def test_fixed_batch_size_is_respected(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(23))
    report = make_job(tmp_path, make_function(tmp_path, DOUBLE), run={"batch_size": 7}).run()
    assert report.batch_size == 7
    assert report.batch_trials == ()
    assert [len(c) for c in calls(tmp_path)] == [7, 7, 7, 2]


def test_auto_batch_size(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(3000))
    body = """
def fn(records):
    log_call(records)
    time.sleep(0.004 + 0.0003 * len(records))
    return [r["n"] for r in records]
"""
    job = make_job(tmp_path, make_function(tmp_path, body), run={"batch_size": "auto"})
    report = job.run()
    assert report.exit_code == 0
    assert report.counts.by_state == {"succeeded": 3000}
    assert 128 <= report.batch_size <= 4096
    assert len(report.batch_trials) >= 1
    sizes = [size for size, _ in report.batch_trials]
    assert sizes[0] == 128
    assert sizes == sorted(sizes)
    assert all(rate > 0 for _, rate in report.batch_trials)
    assert max(len(c) for c in calls(tmp_path)) <= 4096
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == list(range(3000))


def test_parquet_export_of_mixed_output_types_explains_itself(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", records(2))
    body = "def fn(records):\n    return [1 if r['n'] == 0 else 'x' for r in records]\n"
    job = make_job(tmp_path, make_function(tmp_path, body), output={"path": "out.parquet"})
    with pytest.raises(ValueError, match="do not share one type"):
        job.run()


def test_parquet_export_of_types_that_change_past_the_first_chunk_explains_itself(tmp_path):
    """The first 10,000 rows set the columns' types; a struct in a later chunk (no cast from
    it to int64) gets the same clear error, not an unexpected ArrowNotImplementedError."""
    write_jsonl(tmp_path / "in.jsonl", records(10_005))
    body = (
        "def fn(records):\n    return [r['n'] if r['n'] < 10_000 else {'x': 1} for r in records]\n"
    )
    job = make_job(tmp_path, make_function(tmp_path, body), output={"path": "out.parquet"})
    with pytest.raises(ValueError, match="do not share one type"):
        job.run()
    assert job.status().counts.by_state == {"succeeded": 10_005}  # the results are kept


# -- a runner that died ----------------------------------------------------------------------
# What a runner killed while computing (kill -9, a crash in the function, the OOM killer)
# leaves in the ledger, made here by hand so that the next run is this test's own process:
# its mark of the records in flight and, for leased items, the leases. The same through a
# real kill -9 of the CLI: tests/test_worker.py.


def dead_runner() -> str:
    """The lease owner of a runner on this host that is gone (its pid is no longer it)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = f"{socket.gethostname()}:{proc.pid}:{int(psutil.Process(proc.pid).create_time())}"
    proc.kill()
    proc.wait()
    return owner


def ledger_attempts(folder: Path) -> dict[str, int]:
    with sqlite3.connect(folder / ".overnight" / "ledger.db") as db:
        return dict(db.execute(f"SELECT custom_id, attempts FROM {ALL_ITEMS}"))


def unrun_job(folder: Path, n: int, **run) -> tuple[overnight.Job, SQLiteLedger, int]:
    """A job whose first run stopped before it read anything: no item, the cursor at 0."""
    write_jsonl(folder / "in.jsonl", records(n))
    job = make_job(
        folder, make_function(folder, DOUBLE), run={"batch_size": 5, "isolation": "none", **run}
    )
    stop = threading.Event()
    stop.set()
    assert job.run(stop=stop).exit_code == 130
    ledger = SQLiteLedger(folder / ".overnight" / "ledger.db")
    return job, ledger, ledger.get_job("rt").id


def test_fresh_records_a_dead_runner_was_computing_cost_an_attempt_and_run_alone(tmp_path):
    job, ledger, job_id = unrun_job(tmp_path, 30)
    ledger.mark_inflight(job_id, dead_runner(), 12, 14)  # k12..k14, past the ingest cursor
    ledger.close()
    report = job.run()
    assert report.exit_code == 0 and report.counts.by_state == {"succeeded": 30}
    suspects = {"k12", "k13", "k14"}
    assert [c for c in calls(tmp_path) if suspects & set(c)] == [["k12"], ["k13"], ["k14"]]
    assert called_ids(tmp_path) == {f"k{i}": 1 for i in range(30)}
    assert {k for k, a in ledger_attempts(tmp_path).items() if a == 2} == suspects  # death + 1
    assert {k for k, a in ledger_attempts(tmp_path).items() if a != 2} == {
        f"k{i}" for i in range(30)
    } - suspects
    ledger = SQLiteLedger(tmp_path / ".overnight" / "ledger.db")
    assert ledger.inflight(job_id) == []  # the dead runner's mark went with its records
    ledger.close()


def test_with_max_attempts_1_a_dead_runners_record_fails_without_running_again(tmp_path):
    job, ledger, job_id = unrun_job(tmp_path, 20, max_attempts=1)
    ledger.mark_inflight(job_id, dead_runner(), 7, 7)
    ledger.close()
    report = job.run()
    assert report.counts.by_state == {"succeeded": 19, "failed": 1}
    assert "k7" not in called_ids(tmp_path)
    (failure,) = job.failures()
    assert (failure.custom_id, failure.error_class, failure.attempts) == ("k7", "process_died", 1)
    assert "gave up after 1 attempts" in failure.message


def test_leased_items_of_a_dead_runner_come_back_at_once_an_attempt_counted_inside_its_mark(
    tmp_path,
):
    """It held ten items (leases good for ten more minutes) and was computing three: those
    three count an attempt and run alone; the other seven come back as they were."""
    write_jsonl(tmp_path / "in.jsonl", records(20))
    (tmp_path / "mode.txt").write_text("broken")
    fn = make_function(tmp_path, BROKEN_UNTIL_FIXED)
    job = make_job(tmp_path, fn, run={"batch_size": 5, "isolation": "none", "max_attempts": 1})
    assert job.run().counts.by_state == {"failed": 20}
    assert job.retry().moved == 20  # pending again, attempts 0
    (tmp_path / "mode.txt").write_text("ok")
    ledger = SQLiteLedger(tmp_path / ".overnight" / "ledger.db")
    job_id = ledger.get_job("rt").id
    dead, now = dead_runner(), time.time()
    assert len(ledger.lease(job_id, 10, Lease(dead, now + 600, now))) == 10  # k0..k9
    ledger.mark_inflight(job_id, dead, 4, 6)
    ledger.close()
    report = make_job(tmp_path, fn, run={"batch_size": 5, "isolation": "none"}).run()
    assert report.exit_code == 0 and report.counts.by_state == {"succeeded": 20}
    in_flight = {"k4", "k5", "k6"}
    assert [c for c in calls(tmp_path) if in_flight & set(c)] == [["k4"], ["k5"], ["k6"]]
    assert called_ids(tmp_path) == {f"k{i}": 1 for i in range(20)}
    attempts = ledger_attempts(tmp_path)
    assert {k for k, a in attempts.items() if a == 2} == in_flight
    assert {k for k, a in attempts.items() if a == 1} == {f"k{i}" for i in range(20)} - in_flight
