"""overnight in Dagster: an asset from a job file, a resource for the ledger.

    from dagster import Definitions
    from overnight.integrations.dagster import OvernightLedger, overnight_asset

    triage = overnight_asset("triage.toml", deps=["tickets"], on_failed="warn")
    defs = Definitions(
        assets=[triage],
        resources={"overnight": OvernightLedger(url="postgresql://db/overnight")},
    )

Materialising the asset runs the job (`overnight run`): the ledger makes it resumable, so a
retried or re-launched run finishes the job without computing (or paying for) anything twice,
and a job whose input changed computes only the new and changed records. The asset's value is
the job's output (its file or table, named in the metadata), not an object in Dagster's IO
manager. Metadata: items by state, processed, seconds, cost and savings, the output and errors,
and a preview of the first rows of a file output.

Partitions: with `partitions_def`, `{partition_key}` in the job file's strings (a source path
or query, an output path or table) is replaced by the partition's key, and each partition is a
job of its own in the ledger (`<name>-<key>`): re-materialising a partition is an incremental
run of that partition.

Failed items: `on_failed="fail"` (the default) fails the Dagster run when any item failed or
was invalid (after the job has run: what succeeded is kept and written); `"warn"` logs them and
materialises. A run that was interrupted, cancelled or stopped early always fails.
"""

import tomllib  # noqa: I001 - no __future__ annotations: Dagster reads the real types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import orjson

from ..errors import UsageError
from ..job import Job, Report
from ..spec import load_job_file

PLACEHOLDER = "{partition_key}"
_PREVIEW_COLUMNS = 8


class OvernightLedger(dg.ConfigurableResource):
    """Where the assets' jobs keep their ledger: a PostgreSQL URL shared by every run and
    machine, or a SQLite file. None: each job file's own (`[run] ledger`, or
    `.overnight/ledger.db` beside it)."""

    url: str | None = None


def overnight_asset(
    job_file: str | Path,
    *,
    name: str | None = None,
    key_prefix: str | Sequence[str] | None = None,
    deps: Sequence[Any] | None = None,
    group_name: str | None = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    on_failed: Literal["fail", "warn"] = "fail",
    preview_rows: int = 5,
    description: str | None = None,
) -> dg.AssetsDefinition:
    """A Dagster asset that runs the overnight job in `job_file` (see the module docstring).

    The job file is read now, so a missing file or a bad key fails when the definitions load,
    naming the file; `name` defaults to the job's name."""
    path = Path(job_file).resolve()
    if on_failed not in ("fail", "warn"):
        raise dg.DagsterInvalidDefinitionError(
            f"overnight_asset({str(job_file)!r}): on_failed must be 'fail' or 'warn',"
            f" not {on_failed!r}"
        )
    try:
        text = path.read_text(encoding="utf-8")
        Job(load_job_file(path), base_dir=path.parent, origin=str(path))
    except (OSError, UsageError) as exc:
        raise dg.DagsterInvalidDefinitionError(f"overnight_asset: {exc}") from None
    if partitions_def is not None and PLACEHOLDER not in text:
        raise dg.DagsterInvalidDefinitionError(
            f"overnight_asset: {path}: partitioned, but the job file has no {PLACEHOLDER}"
            " in its source or output: every partition would be the same job"
        )
    spec = tomllib.loads(text)
    job_name = str(spec.get("name") or path.stem)
    asset_name = name or _identifier(job_name)

    @dg.asset(
        name=asset_name,
        key_prefix=key_prefix,
        deps=deps,
        group_name=group_name,
        partitions_def=partitions_def,
        description=description or f"overnight job {job_name} ({path.name})",
        kinds={"overnight"},
    )
    def _materialize(
        context: dg.AssetExecutionContext, overnight: OvernightLedger
    ) -> dg.MaterializeResult:
        key = context.partition_key if context.has_partition_key else None
        job = _job(path, spec, key, overnight.url)
        context.log.info(f"overnight: running {job.name} (ledger {job.ledger_name})")
        try:
            report = job.run()
        except UsageError as exc:  # a bad setting, a ledger or database out of reach
            raise dg.Failure(description=str(exc)) from None
        metadata = _metadata(job, report, preview_rows)
        problem = _problem(report)
        if problem is not None:
            raise dg.Failure(description=f"{job.name}: {problem}", metadata=metadata)
        bad = report.counts["failed"] + report.counts["invalid"] + report.counts.rejected
        if bad:
            message = f"{job.name}: {bad:,} item(s) failed or invalid (see `overnight failures`)"
            if on_failed == "fail":
                raise dg.Failure(description=message, metadata=metadata)
            context.log.warning(message)
        return dg.MaterializeResult(metadata=metadata)

    return _materialize


def _identifier(name: str) -> str:
    """A Dagster asset name (letters, digits, underscores) from a job name."""
    out = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return out if out and not out[0].isdigit() else f"job_{out}"


def _substitute(value: Any, key: str) -> Any:
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, key)
    if isinstance(value, dict):
        return {k: _substitute(v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, key) for v in value]
    return value


def _job(path: Path, spec: dict[str, Any], partition: str | None, ledger: str | None) -> Job:
    if partition is None:
        job = Job.from_file(path, state=ledger)
    else:
        spec = _substitute(spec, partition)
        spec["name"] = f"{spec.get('name') or path.stem}-{partition}"
        job = Job(spec, base_dir=path.parent, state=ledger, origin=f"{path} [{partition}]")
        job.job_file = path
    return job


def _problem(report: Report) -> str | None:
    if report.cancelled:
        return "the job was cancelled (`overnight run` resumes it)"
    if report.interrupted:
        return "the run was interrupted; materialise again to resume it"
    if report.stop_reason:
        return f"the run stopped early: {report.stop_reason}"
    if report.detached:
        return "batches were submitted and not waited for"
    if not report.ingest_done:
        return "the input was not read to its end"
    return None


def _metadata(job: Job, report: Report, preview_rows: int) -> dict[str, Any]:
    counts = report.counts
    meta: dict[str, Any] = {
        f"items_{state}": dg.MetadataValue.int(n) for state, n in sorted(counts.by_state.items())
    }
    meta["items_rejected"] = dg.MetadataValue.int(counts.rejected)
    meta["processed"] = dg.MetadataValue.int(report.processed)
    meta["seconds"] = dg.MetadataValue.float(round(report.seconds, 3))
    meta["cost_usd"] = dg.MetadataValue.float(round(counts.cost, 6))
    meta["saved_usd"] = dg.MetadataValue.float(round(counts.saved, 6))
    meta["ledger"] = dg.MetadataValue.text(job.ledger_name)
    if isinstance(report.output, Path):
        meta["output"] = dg.MetadataValue.path(str(report.output))
        preview = _preview(report.output, preview_rows)
        if preview:
            meta["preview"] = dg.MetadataValue.md(preview)
    elif report.output is not None:
        meta["output"] = dg.MetadataValue.text(str(report.output))
    if report.errors is not None:
        meta["errors"] = dg.MetadataValue.text(str(report.errors))
    return meta


def _preview(path: Path, rows: int) -> str | None:
    """The first rows of a JSONL output as a Markdown table (other formats: none)."""
    if rows <= 0 or path.suffix != ".jsonl" or not path.exists():
        return None
    records: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for line in f:
            if len(records) >= rows:
                break
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                records.append(value)
    if not records:
        return None
    columns = list(dict.fromkeys(k for r in records for k in r))[:_PREVIEW_COLUMNS]

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 60 else text[:57] + "..."

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in records]
    return "\n".join(lines)
