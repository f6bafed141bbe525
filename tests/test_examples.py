"""The README's runnable examples: examples/llm/*.toml against the fake provider, and
examples/self-hosted/*.toml on the real SmolLM2 in the process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import overnight
from overnight.testing.fake_provider import FakeProvider

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "llm"


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.toml")))
def test_example_runs(tmp_path: Path, fake: FakeProvider, name: str) -> None:
    for f in EXAMPLES.iterdir():
        if f.is_file():  # not out/ or .overnight/ left by running the examples by hand
            shutil.copy(f, tmp_path / f.name)
    job_file = tmp_path / f"{name}.toml"
    text = job_file.read_text().replace("http://127.0.0.1:8000", f"http://127.0.0.1:{fake.port}")
    job_file.write_text(text)
    job = overnight.Job.from_file(job_file)
    # Every example that waits on provider batches polls the fake (batches of 0.2 s) fast,
    # whatever its own poll_interval says: set on the loaded spec, not by editing the text.
    model = job.spec.model.model_copy(update={"poll_interval": 0.05})
    job.spec = job.spec.model_copy(update={"model": model})
    assert job.estimate().items >= 3
    report = job.run()
    assert report.exit_code == 0, (report.to_dict(), job.failures())
    assert report.output is not None and report.output.exists()


SELF_HOSTED = Path(__file__).resolve().parent.parent / "examples" / "self-hosted"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in SELF_HOSTED.glob("*.toml")))
def test_self_hosted_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The self-hosted examples (examples/self-hosted/*.toml) on the real SmolLM2, in the
    worker process, as the README shows them."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker's torch: see test_transformers.py
    for f in SELF_HOSTED.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    report = overnight.Job.from_file(tmp_path / f"{name}.toml").run()
    assert report.exit_code == 0, report.to_dict()
    assert report.output is not None and report.counts["succeeded"] == 5
    assert report.counts.input_tokens > 0


TICKETS = Path(__file__).resolve().parent.parent / "examples" / "tickets"


@pytest.mark.slow
def test_tickets_example_enriches_a_postgresql_table(tmp_path: Path) -> None:
    """examples/tickets as the README shows it, in a schema of its own: setup_tickets.py fills
    the table, the job writes category and confidence into its rows on the local model, and
    after 20 new tickets a rerun computes those 20 only."""
    import os
    import subprocess
    import sys
    import uuid

    import sqlalchemy as sa

    from overnight.demo.tickets import CATEGORIES, generate_tickets

    pytest.importorskip("sentence_transformers")
    schema = f"ov_{uuid.uuid4().hex[:10]}"
    url = "postgresql+psycopg://127.0.0.1:5432/test"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        for f in TICKETS.iterdir():
            if f.is_file():
                shutil.copy(f, tmp_path / f.name)
        job_file = tmp_path / "triage.toml"
        text = job_file.read_text()
        text = text.replace('table = "tickets"', f'table = "{schema}.tickets"')
        text = text.replace('"ticket_triage_errors"', f'"{schema}.ticket_triage_errors"')
        job_file.write_text(text)

        def setup(*args: str) -> None:
            subprocess.run(
                [sys.executable, "setup_tickets.py", "--table", f"{schema}.tickets", *args],
                cwd=tmp_path,
                check=True,
                capture_output=True,
                env={**os.environ},
                timeout=120,
            )

        setup()
        report = overnight.Job.from_file(job_file).run()
        assert report.exit_code == 0, report.to_dict()
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(f"SELECT ticket_id, category, confidence FROM {schema}.tickets")
            ).all()
        assert len(rows) == 200
        assert all(r.category in CATEGORIES and 0 < r.confidence <= 1 for r in rows)
        truth = {t.ticket_id: t.category for t in generate_tickets(200)}
        right = sum(truth[r.ticket_id] == r.category for r in rows)
        assert right >= 140, right  # the head fitted on labelled.csv: ~0.9 on these tickets

        setup("--add", "20")
        report = overnight.Job.from_file(job_file).run()
        assert report.exit_code == 0 and report.processed == 20, report.to_dict()
        with engine.connect() as conn:
            done = conn.execute(
                sa.text(f"SELECT count(*) FROM {schema}.tickets WHERE category IS NOT NULL")
            ).scalar()
        assert done == 220
    finally:
        from overnight.sqldb import dispose_all

        dispose_all()
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


DBT = Path(__file__).resolve().parent.parent / "examples" / "dbt"


@pytest.mark.slow
def test_dbt_example_builds_around_an_overnight_job(tmp_path: Path) -> None:
    """examples/dbt as the README shows it: dbt builds stg_tickets, overnight classifies it
    into tickets_enriched on the same DuckDB file, dbt's downstream model and the tests on
    overnight's table pass; 25 new tickets later, the rerun computes those 25 only."""
    import subprocess
    import sys

    import duckdb

    pytest.importorskip("dbt.cli.main")
    pytest.importorskip("sentence_transformers")
    folder = tmp_path / "dbt"
    shutil.copytree(
        DBT, folder, ignore=shutil.ignore_patterns(*(DBT / ".gitignore").read_text().split())
    )

    def run(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "run.py", *args],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    out = run("--tickets", "120")
    assert "processed   120 items" in out, out[-2000:]
    db = duckdb.connect(str(folder / "warehouse.duckdb"), read_only=True)
    try:
        assert db.execute("SELECT count(*) FROM tickets_enriched").fetchone() == (120,)
        by_category = db.execute("SELECT sum(tickets) FROM tickets_by_category").fetchone()
        assert by_category == (120,)
    finally:
        db.close()

    out = run("--add", "25")
    assert "processed   25 items" in out, out[-2000:]
    db = duckdb.connect(str(folder / "warehouse.duckdb"), read_only=True)
    try:
        assert db.execute("SELECT sum(tickets) FROM tickets_by_category").fetchone() == (145,)
        cats = {
            r[0] for r in db.execute("SELECT DISTINCT category FROM tickets_enriched").fetchall()
        }
        assert cats <= {"billing", "bug", "feature request", "account", "other"} and len(cats) >= 3
    finally:
        db.close()
