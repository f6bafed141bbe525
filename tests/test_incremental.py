"""Incremental runs: a rerun on a changed input computes exactly the new and changed records.

DESIGN.md: a rerun matches records by id and content; an unchanged record keeps its result, a
new id is processed, a changed record is processed again and its result replaces the old one,
an id no longer in the source leaves the output, and a line that failed to parse is read again.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import orjson
import pytest

import overnight


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def logging_function(tmp_path: Path) -> tuple[str, Path]:
    """fn(records) doubles `n` and appends each record's id to calls.log."""
    name = f"fn_{uuid.uuid4().hex[:8]}"
    log = tmp_path / "calls.log"
    (tmp_path / f"{name}.py").write_text(
        f"""
def fn(records):
    with open({str(log)!r}, "a") as f:
        f.write("".join(str(r["id"]) + "\\n" for r in records))
    return [r["n"] * 2 for r in records]
"""
    )
    return f"{name}:fn", log


def calls(log: Path) -> list[str]:
    """The ids computed since the last call (and forget them)."""
    if not log.exists():
        return []
    ids = log.read_text().split()
    log.unlink()
    return ids


def make_job(tmp_path: Path, function: str, **extra) -> overnight.Job:
    spec = {
        "name": "inc",
        "source": {"path": "in.jsonl", "id": "id"},
        "model": {"backend": "python", "function": function},
        "output": {"path": "out.jsonl"},
    }
    for section, values in extra.items():
        spec.setdefault(section, {}).update(values)
    return overnight.Job(spec, base_dir=tmp_path)


def outputs(tmp_path: Path) -> list[tuple[str, int]]:
    return [(r["id"], r["output"]) for r in read_jsonl(tmp_path / "out.jsonl")]


@pytest.fixture
def first_run(tmp_path):
    fn, log = logging_function(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "n": i} for i in range(10)])
    job = make_job(tmp_path, fn)
    assert job.run().exit_code == 0
    assert len(calls(log)) == 10
    return job, log


def test_appending_a_record_computes_only_that_record(tmp_path, first_run):
    job, log = first_run
    with (tmp_path / "in.jsonl").open("ab") as f:
        f.write(orjson.dumps({"id": "r10", "n": 10}) + b"\n")
    report = job.run()
    assert report.exit_code == 0
    assert calls(log) == ["r10"]
    assert outputs(tmp_path) == [(f"r{i}", 2 * i) for i in range(11)]
    assert any("1 new or changed" in note for note in report.notes)


def test_a_same_size_edit_with_its_mtime_restored_is_detected(tmp_path, first_run):
    job, log = first_run
    path = tmp_path / "in.jsonl"
    before = path.stat()
    data = path.read_bytes().replace(b'"n":3}', b'"n":7}')
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert job.run().exit_code == 0
    assert calls(log) == ["r3"]
    assert dict(outputs(tmp_path))["r3"] == 14  # the new value, not the old result


def test_removed_ids_leave_the_output_and_a_new_order_is_kept(tmp_path, first_run):
    job, log = first_run
    order = [9, 0, 5, 1]
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "n": i} for i in order])
    report = job.run()
    assert report.exit_code == 0
    assert calls(log) == []  # nothing changed in the records that are left
    assert outputs(tmp_path) == [(f"r{i}", 2 * i) for i in order]
    assert report.counts.total == 4
    assert any("6 no longer in it" in note for note in report.notes)


def test_fixing_a_bad_line_processes_exactly_that_line(tmp_path):
    fn, log = logging_function(tmp_path)
    good = [orjson.dumps({"id": f"r{i}", "n": i}) for i in range(6)]
    lines = [*good[:2], b'{"id": "r2", "n": ', *good[3:]]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    job = make_job(tmp_path, fn)
    report = job.run()
    assert report.exit_code == 3
    (failure,) = job.failures()
    assert failure.line == 3 and failure.error_class == "input_error"
    calls(log)

    result = job.retry()
    assert result.moved == 0
    assert result.input_errors == 1  # said, with what to do, not "0 items back to pending"

    lines[2] = good[2]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = job.run()
    assert report.exit_code == 0
    assert calls(log) == ["r2"]
    assert outputs(tmp_path) == [(f"r{i}", 2 * i) for i in range(6)]
    assert job.failures() == []


def test_an_unchanged_failed_record_stays_failed_and_a_changed_one_is_retried(tmp_path):
    name = f"fn_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def fn(records):\n"
        "    for r in records:\n"
        "        if r['n'] < 0:\n"
        "            raise ValueError('negative')\n"
        "    return [r['n'] for r in records]\n"
    )
    rows = [{"id": "a", "n": -1}, {"id": "b", "n": -2}, {"id": "c", "n": 3}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, f"{name}:fn")
    assert job.run().exit_code == 3
    rows[1]["n"] = 2
    rows.append({"id": "d", "n": 4})
    write_jsonl(tmp_path / "in.jsonl", rows)
    report = job.run()
    assert report.exit_code == 3  # "a" is unchanged: still failed, not recomputed
    assert [f.custom_id for f in job.failures()] == ["a"]
    assert outputs(tmp_path) == [("b", 2), ("c", 3), ("d", 4)]


def test_hashed_ids_a_changed_record_is_a_new_one(tmp_path):
    fn, log = logging_function(tmp_path)
    rows = [{"id": f"r{i}", "n": i} for i in range(4)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = make_job(tmp_path, fn, source={"path": "in.jsonl", "id": None})
    assert job.run().exit_code == 0
    calls(log)
    rows[2]["n"] = 20
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert job.run().exit_code == 0
    assert calls(log) == ["r2"]
    assert [r["output"] for r in read_jsonl(tmp_path / "out.jsonl")] == [0, 2, 40, 6]


def test_a_change_of_task_or_model_is_still_refused_without_restart(tmp_path, first_run):
    job, log = first_run
    fn2, _ = logging_function(tmp_path)
    changed = make_job(tmp_path, fn2)
    with pytest.raises(overnight.InputChangedError, match="restart=True"):
        changed.run()
    assert changed.run(restart=True).exit_code == 0


def test_restart_recomputes_everything(tmp_path, first_run):
    job, log = first_run
    assert job.run(restart=True).exit_code == 0
    assert sorted(calls(log)) == sorted(f"r{i}" for i in range(10))


def test_stopped_while_reading_the_changed_input_the_old_results_are_intact(tmp_path):
    fn, log = logging_function(tmp_path)
    n = 6000  # several read chunks
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "n": i} for i in range(n)])
    job = make_job(tmp_path, fn)
    assert job.run().exit_code == 0
    calls(log)
    write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "n": i} for i in range(n + 1)])
    stop = threading.Event()

    def on_progress(p):
        if p.ingested >= 2000:
            stop.set()

    report = job.run(stop=stop, on_progress=on_progress)
    assert report.interrupted and report.exit_code == 130
    assert calls(log) == []
    from overnight.listing import list_jobs

    listed = list_jobs(tmp_path / ".overnight" / "ledger.db")  # not the half-read generation
    assert [(j.name, j.total) for j in listed] == [("inc", n)]
    assert job.status().counts["succeeded"] == n  # the old generation, untouched
    report = job.run()
    assert report.exit_code == 0
    assert calls(log) == [f"r{n}"]
    assert len(read_jsonl(tmp_path / "out.jsonl")) == n + 1


def test_reading_the_same_file_another_way_is_a_changed_input(tmp_path):
    """Another id column (or delimiter, or format) makes other records of the same bytes."""
    fn, log = logging_function(tmp_path)
    rows = [{"id": f"r{i}", "key": f"k{i}", "n": i} for i in range(3)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert make_job(tmp_path, fn).run().exit_code == 0
    calls(log)
    by_key = make_job(tmp_path, fn, source={"path": "in.jsonl", "id": "key"})
    report = by_key.run()
    assert report.exit_code == 0
    assert sorted(calls(log)) == ["r0", "r1", "r2"]  # new ids: computed again
    assert [r["key"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["k0", "k1", "k2"]
