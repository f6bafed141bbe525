"""The README's runnable examples: examples/llm/*.toml against the fake provider, and
examples/self-hosted/*.toml on the real SmolLM2 in the process."""

from __future__ import annotations

import json
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


# -- a worked example per use case: each folder's run.py, the one command its README shows ---

USE_CASES = Path(__file__).resolve().parent.parent / "examples"


def run_example(tmp_path: Path, name: str, *args: str) -> tuple[Path, str]:
    """Copy examples/<name> (without what running it by hand left) and run its run.py there,
    as `python run.py` does; returns the copy and what it printed."""
    import subprocess
    import sys

    folder = tmp_path / name
    if not folder.exists():
        source = USE_CASES / name
        ignored = (source / ".gitignore").read_text().split()
        shutil.copytree(
            source, folder, ignore=shutil.ignore_patterns(*(i.strip("/") for i in ignored))
        )
    done = subprocess.run(
        [sys.executable, "run.py", *args], cwd=folder, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, done.stdout


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_documents_example_chunks_extracts_and_merges(tmp_path: Path) -> None:
    """examples/documents: 2 PDFs (3 pages) and 2 HTML files -> chunks with doc, page and chunk
    number -> one schema-valid extraction per chunk (fake provider) -> one row per document."""
    import jsonschema

    folder, out = run_example(tmp_path, "documents")
    chunks = read_jsonl(folder / "out" / "chunks.jsonl")
    pages = {(c["doc_id"], c["page"]) for c in chunks}
    assert {("invoice-acme-2026-031", 1), ("invoice-acme-2026-031", 2)} <= pages
    assert {d for d, _ in pages} == {
        "invoice-acme-2026-031",
        "invoice-ledgerly-88213",
        "receipt-shiptrack-5512",
        "order-nimbus-q4",
    }
    text = "\n".join(c["text"] for c in chunks)
    assert "Total due" in text and "GBP   2371.20" in text  # read from the PDF's second page
    assert "Total paid: EUR 319.00" in text and "console.log" not in text  # HTML, no script
    assert all(len(c["text"]) <= 400 for c in chunks)

    schema = json.loads((folder / "invoice.schema.json").read_text())
    fields = read_jsonl(folder / "out" / "fields.jsonl")
    assert sorted(f["chunk_id"] for f in fields) == sorted(c["chunk_id"] for c in chunks)
    for f in fields:
        jsonschema.validate(f["output"], schema)
    docs = read_jsonl(folder / "out" / "documents.jsonl")
    assert len(docs) == 4 and sum(d["chunks"] for d in docs) == len(chunks)
    assert f"({len(chunks)} computed in this run)" in out

    # A changed document: only its chunks are extracted again.
    html = folder / "docs" / "receipt-shiptrack-5512.html"
    html.write_text(html.read_text().replace("319.00", "329.00"))
    _, out = run_example(tmp_path, "documents")
    assert "(1 computed in this run)" in out, out


def test_catalogue_example_generates_a_description_per_product(tmp_path: Path) -> None:
    """examples/catalogue: a generate job through the OpenAI Batch API (the fake) writes one
    description per product of products.csv, and run.py a Markdown page of them."""
    folder, out = run_example(tmp_path, "catalogue")
    rows = read_jsonl(folder / "out" / "descriptions.jsonl")
    assert len(rows) == 8 and all(r["output"] and r["name"] for r in rows)
    # The template filled the product's fields into the prompt (the fake echoes its start).
    assert all(r["output"].startswith("echo: Write a product description") for r in rows)
    page = (folder / "out" / "catalogue.md").read_text()
    assert all(f"## {r['name']} ({r['sku']})" in page for r in rows)
    assert "cost with the batch API" in out and "(8 computed in this run)" in out


@pytest.mark.slow
def test_evaluation_example_scores_the_classifier_and_judges_it(tmp_path: Path) -> None:
    """examples/evaluation on 60 tickets: the local model's labels against the gold set
    (accuracy, confusion matrix PNG) and an LLM judge's schema-valid verdict on each label."""
    import re

    import jsonschema

    pytest.importorskip("sentence_transformers")
    folder, out = run_example(tmp_path, "evaluation", "--tickets", "60")
    accuracy = float(re.search(r"accuracy (\d\.\d+) on 60 tickets", out).group(1))
    assert accuracy >= 0.7, out  # ~0.87 on 200 of these tickets
    png = (folder / "out" / "confusion.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    schema = json.loads((folder / "verdict.schema.json").read_text())
    verdicts = read_jsonl(folder / "out" / "verdicts.jsonl")
    assert len(verdicts) == 60
    for v in verdicts:
        jsonschema.validate(v["output"], schema)
    report = (folder / "out" / "report.md").read_text()
    assert f"**{accuracy:.3f}**" in report and "confusion.png" in report
