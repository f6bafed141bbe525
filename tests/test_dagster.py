"""overnight.integrations.dagster, through Dagster's own `materialize`: an asset from a job
file, its metadata, the failed-item policy, partitions as jobs of their own, the ledger
resource (SQLite and PostgreSQL), and the example definitions run by `dagster asset
materialize`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

dg = pytest.importorskip("dagster")

from overnight.integrations.dagster import OvernightLedger, overnight_asset  # noqa: E402

JOB = """\
name = "enrich"
[source]
path = "{src}"
id = "id"
[model]
backend = "python"
function = "fn:score"
[run]
isolation = "none"
batch_size = 4
max_attempts = 1
[output]
path = "{out}"
"""

FN = """\
def score(records):
    return [r["n"] * 2 for r in records]
"""

FAILING_FN = """\
def score(records):
    if any(r["n"] == 5 for r in records) and len(records) == 1:
        raise ValueError("five is refused")
    if any(r["n"] == 5 for r in records):
        raise ValueError("a batch with five")
    return [r["n"] * 2 for r in records]
"""


def folder_with(
    tmp_path: Path, fn: str = FN, src: str = "in.jsonl", out: str = "out.jsonl"
) -> Path:
    (tmp_path / "fn.py").write_text(fn)
    job = tmp_path / "enrich.toml"
    job.write_text(JOB.format(src=src, out=out))
    return job


def write_input(path: Path, n: int, start: int = 0) -> None:
    path.write_bytes(
        b"".join(orjson.dumps({"id": f"r{i}", "n": i}) + b"\n" for i in range(start, start + n))
    )


def metadata(result: dg.ExecuteInJobResult, key: str = "enrich") -> dict:
    (mat,) = result.asset_materializations_for_node(key)
    return {k: v.value for k, v in mat.metadata.items()}


@pytest.fixture(autouse=True)
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # fn.py, as `overnight run` finds it


def test_an_asset_runs_the_job_and_reports_it_and_a_second_materialisation_computes_nothing(
    tmp_path: Path,
) -> None:
    job = folder_with(tmp_path)
    write_input(tmp_path / "in.jsonl", 10)
    asset = overnight_asset(job)
    resources = {"overnight": OvernightLedger()}
    result = dg.materialize([asset], resources=resources)
    assert result.success
    meta = metadata(result)
    assert meta["items_succeeded"] == 10 and meta["processed"] == 10
    assert meta["output"] == str(tmp_path / "out.jsonl")
    assert "| id | output |" in meta["preview"] and "| r0 | 0 |" in meta["preview"]
    rows = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert [r["output"] for r in rows] == [i * 2 for i in range(10)]
    again = dg.materialize([asset], resources=resources)
    assert again.success and metadata(again)["processed"] == 0  # resumed: nothing twice


@pytest.mark.parametrize("policy", ["fail", "warn"])
def test_failed_items_fail_the_run_or_warn(tmp_path: Path, policy: str) -> None:
    job = folder_with(tmp_path, FAILING_FN)
    write_input(tmp_path / "in.jsonl", 10)
    asset = overnight_asset(job, on_failed=policy)
    result = dg.materialize(
        [asset], resources={"overnight": OvernightLedger()}, raise_on_error=False
    )
    rows = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    assert len(rows) == 9  # what succeeded is written either way
    if policy == "fail":
        assert not result.success
        (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "1 item(s) failed or invalid" in str(failure.event_specific_data.error)
    else:
        assert result.success and metadata(result)["items_failed"] == 1


def test_each_partition_is_a_job_of_its_own(tmp_path: Path) -> None:
    job = folder_with(tmp_path, src="in-{partition_key}.jsonl", out="out-{partition_key}.jsonl")
    write_input(tmp_path / "in-a.jsonl", 3)
    write_input(tmp_path / "in-b.jsonl", 5, start=100)
    parts = dg.StaticPartitionsDefinition(["a", "b"])
    asset = overnight_asset(job, partitions_def=parts)
    resources = {"overnight": OvernightLedger()}
    assert (
        metadata(dg.materialize([asset], resources=resources, partition_key="a"))["processed"] == 3
    )
    assert (
        metadata(dg.materialize([asset], resources=resources, partition_key="b"))["processed"] == 5
    )
    write_input(tmp_path / "in-a.jsonl", 4)  # partition a gets one more record
    assert (
        metadata(dg.materialize([asset], resources=resources, partition_key="a"))["processed"] == 1
    )  # incremental: the new one only
    assert len((tmp_path / "out-a.jsonl").read_bytes().splitlines()) == 4
    assert len((tmp_path / "out-b.jsonl").read_bytes().splitlines()) == 5


def test_the_ledger_resource_puts_the_job_on_postgresql(tmp_path: Path, pg_ledger_url: str) -> None:
    job = folder_with(tmp_path)
    write_input(tmp_path / "in.jsonl", 6)
    result = dg.materialize(
        [overnight_asset(job)], resources={"overnight": OvernightLedger(url=pg_ledger_url)}
    )
    meta = metadata(result)
    assert result.success and meta["items_succeeded"] == 6
    assert meta["ledger"].startswith("postgresql://") and not (tmp_path / ".overnight").exists()


def test_a_bad_job_file_fails_when_the_definitions_load(tmp_path: Path) -> None:
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="nope.toml"):
        overnight_asset(tmp_path / "nope.toml")
    job = folder_with(tmp_path)
    job.write_text(job.read_text().replace("[model]", "[model]\nbakend = 'x'"))
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="bakend"):
        overnight_asset(job)
    job = folder_with(tmp_path)
    with pytest.raises(dg.DagsterInvalidDefinitionError, match="partition_key"):
        overnight_asset(job, partitions_def=dg.StaticPartitionsDefinition(["a"]))


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "dagster"


@pytest.mark.slow
def test_the_example_definitions_materialise_with_the_dagster_cli(tmp_path: Path) -> None:
    """examples/dagster (the weekly report, scheduled): `dagster asset materialize` builds the
    week's tickets, classifies them with the local model and writes the report."""
    import shutil

    pytest.importorskip("sentence_transformers")
    folder = tmp_path / "dagster"
    shutil.copytree(EXAMPLE, folder)
    home = tmp_path / "dagster_home"
    home.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-f",
            "definitions.py",
            "--select",
            "*",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DAGSTER_HOME": str(home)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (folder / "data" / "weekly_report.md").read_text()
    assert "tickets classified: 300" in report
    assert (folder / "data" / "tickets_per_category.png").stat().st_size > 1000
