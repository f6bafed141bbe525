"""Jobs on the embedded local model, end to end, on real inputs (nothing mocked)."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

import overnight
from overnight.demo.tickets import (
    CATEGORIES,
    generate_tickets,
    write_labelled_csv,
    write_tickets_csv,
    write_truth_csv,
)

pytestmark = pytest.mark.slow

SENTENCES = [
    "The invoice charged my card twice this month.",
    "The app crashes every time I open the settings page.",
    "Could you add an export to Excel?",
    "I cannot log in since I reset my password.",
    "The invoice charged my card twice this month.",
    "Our team wants to partner with you on a webinar.",
]


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_embed_job_and_a_missing_template_field(tmp_path):
    records = [{"id": f"s{i}", "subject": s, "body": "thanks"} for i, s in enumerate(SENTENCES)]
    records.insert(3, {"id": "nobody", "subject": "where is my body?"})  # lacks "body"
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    job = overnight.Job(
        {
            "name": "embed",
            "source": {"path": "in.jsonl", "id": "id"},
            "task": {"kind": "embed", "text": "{{ subject }} {{ body }}"},
            "model": {"backend": "local", "device": "auto"},
            "run": {"batch_size": 4},
            "output": {"path": "vectors.jsonl"},
        },
        base_dir=tmp_path,
    )
    report = job.run()
    assert report.exit_code == 3  # one record failed, the rest are written
    rows = read_jsonl(tmp_path / "vectors.jsonl")
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(len(SENTENCES))]
    for r in rows:
        assert len(r["output"]) == 384
        assert math.isclose(math.fsum(x * x for x in r["output"]), 1.0, abs_tol=1e-3)
    assert rows[0]["output"] == rows[4]["output"]  # same text, same vector
    (err,) = read_jsonl(tmp_path / "vectors.errors.jsonl")
    assert err["id"] == "nobody" and err["line"] == 4 and err["error_class"] == "input_error"
    assert "body" in err["message"]


def test_embeddings_are_float32_in_parquet_and_compact_in_the_ledger(tmp_path):
    import sqlite3

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from overnight.backends.local import LocalModel

    records = [{"id": f"s{i}", "text": s} for i, s in enumerate(SENTENCES)]
    (tmp_path / "in.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    spec = {
        "name": "vec",
        "source": {"path": "in.jsonl", "id": "id"},
        "task": {"kind": "embed"},
        "model": {"backend": "local"},
        "output": {"path": "vectors.parquet", "include": ["text"]},
    }
    assert overnight.Job(spec, base_dir=tmp_path).run().exit_code == 0
    table = pq.read_table(tmp_path / "vectors.parquet")
    assert table.schema.field("output").type == pa.list_(pa.float32(), 384)
    assert table.column_names == ["id", "output", "text"]
    got = np.asarray(table.column("output").to_pylist(), dtype=np.float32)
    want = LocalModel().embed(SENTENCES)
    assert np.allclose(got, want, atol=1e-5)
    with sqlite3.connect(tmp_path / ".overnight" / "ledger.db") as db:
        sizes = db.execute("SELECT max(length(result)), max(length(vector)) FROM items").fetchone()
    assert sizes[1] == 384 * 4  # float32 bytes beside the JSON ...
    assert sizes[0] < 64  # ... which no longer holds the vector as text

    # The same ledger exported as JSONL: plain lists of numbers, equal to the float32 values.
    spec["output"] = {"path": "vectors.jsonl"}
    overnight.Job(spec, base_dir=tmp_path).export()
    rows = read_jsonl(tmp_path / "vectors.jsonl")
    assert np.array_equal(np.asarray([r["output"] for r in rows], dtype=np.float32), got)


def test_classify_job_zero_shot_and_with_examples(tmp_path):
    tickets = generate_tickets(300, seed=7)
    write_tickets_csv(tickets, tmp_path / "tickets.csv")
    write_truth_csv(tickets, tmp_path / "truth.csv")
    write_labelled_csv(generate_tickets(200, seed=11), tmp_path / "labelled.csv")
    truth = {t.ticket_id: t.category for t in tickets}

    def run(name: str, **task) -> float:
        job = overnight.Job(
            {
                "name": name,
                "source": {"path": "tickets.csv", "id": "ticket_id"},
                "task": {
                    "kind": "classify",
                    "text": "{{ subject }}\n\n{{ body }}",
                    "labels": CATEGORIES,
                    **task,
                },
                "model": {"backend": "local"},
                "run": {"batch_size": "auto"},
                "output": {"path": f"{name}.jsonl", "include": ["created_at"]},
            },
            base_dir=tmp_path,
        )
        report = job.run()
        assert report.exit_code == 0
        assert report.batch_size is not None and report.batch_trials
        rows = read_jsonl(tmp_path / f"{name}.jsonl")
        assert [r["ticket_id"] for r in rows] == [t.ticket_id for t in tickets]
        for r in rows:
            assert set(r["scores"]) == set(CATEGORIES)
            assert math.isclose(sum(r["scores"].values()), 1.0, abs_tol=1e-3)
            assert r["output"] == max(r["scores"], key=r["scores"].get)
            assert r["created_at"].startswith("2026-11-")
        return sum(r["output"] == truth[r["ticket_id"]] for r in rows) / len(rows)

    zero_shot = run("zero")
    fitted = run("fitted", examples="labelled.csv")
    # Measured on these 300 tickets: zero-shot 0.567, fitted head 0.853.
    assert 0.3 <= zero_shot <= 0.75
    assert fitted >= 0.78
    assert fitted > zero_shot + 0.15
