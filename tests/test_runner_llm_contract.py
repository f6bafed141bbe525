"""The runner's contract with LLM predictors, without any HTTP: per-item errors, invalid answers
that still cost, usage and cost summed per job, a paused endpoint, max_cost, and old ledgers."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from overnight import sources
from overnight.batching import BatchSizer
from overnight.errors import EndpointDown, InvalidOutput, TransientError
from overnight.retry import RetryPolicy
from overnight.runner import Progress, Runner, Usage, ingest_only
from overnight.store.sqlite import SQLiteLedger


class Ans:
    def __init__(self, text: str, tin: int = 10, tout: int = 5) -> None:
        self.text, self.tin, self.tout = text, tin, tout


class Task:
    kind = "generate"

    def build(self, record: dict[str, Any]) -> str:
        return record["text"]

    def parse(self, answer: Ans) -> dict[str, Any]:
        if answer.text.startswith("bad"):
            raise InvalidOutput(f"schema: not a label: {answer.text}", answer)
        return {"output": answer.text, "usage": {"input_tokens": answer.tin}}


class Predictor:
    """Answers per item; a record's text decides: 'boom' fails it alone, 'bad' is invalid,
    'flaky' is transient, 'down' takes the whole endpoint down."""

    auto_start = auto_max = window = 4

    def __init__(self) -> None:
        self.seen: list[str] = []

    def process(self, inputs: list[str], batch_size: int) -> list[Any]:
        if any(t == "down" for t in inputs):
            raise EndpointDown("cannot reach http://127.0.0.1:9/v1 (20 requests in a row)")
        self.seen += inputs
        out: list[Any] = []
        for t in inputs:
            if t == "boom":
                out.append(ValueError("400 bad request: context too long"))
            elif t == "flaky":
                out.append(TransientError("503 overloaded"))
            else:
                out.append(Ans(t))
        return out

    def close(self) -> None:
        pass


def meter(answer: Ans) -> Usage:
    return Usage(answer.tin, answer.tout, 0.001, 0.002)


def setup(tmp_path: Path, texts: list[str]) -> tuple[SQLiteLedger, Any, Any]:
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b"".join(orjson.dumps({"id": str(i), "text": t}) + b"\n" for i, t in enumerate(texts))
    )
    ledger = SQLiteLedger(tmp_path / "ledger.db")
    job = ledger.create_job("j", "h", sources.fingerprint(src))

    def reader(cursor: sources.Cursor):
        return sources.read("jsonl", src, "id", cursor, 100)

    return ledger, job, reader


def runner(ledger, job, reader, predictor, **kw) -> Runner:
    return Runner(
        ledger,
        job,
        Task(),
        lambda: predictor,
        reader=reader,
        sizer=BatchSizer.fixed(4),
        window=4,
        retry_policy=RetryPolicy(2, 0.0, 0.0),
        lease_seconds=60,
        meter=meter,
        commit_each_call=True,
        **kw,
    )


def test_per_item_errors_invalid_and_usage(tmp_path: Path) -> None:
    ledger, job, reader = setup(tmp_path, ["a", "boom", "bad1", "b", "flaky", "c"])
    r = runner(ledger, job, reader, Predictor())
    r.run()
    c = ledger.counts(job.id)
    assert (c["succeeded"], c["failed"], c["invalid"]) == (3, 2, 1)
    fails = {f.custom_id: f for f in ledger.iter_failures(job.id)}
    assert "context too long" in fails["1"].message and fails["1"].state == "failed"
    assert fails["2"].state == "invalid" and "not a label" in fails["2"].message
    assert "gave up after 2 attempts" in fails["4"].message
    # Usage of every answer, the invalid one included (it was paid for): 4 answers.
    assert (c.input_tokens, c.output_tokens) == (40, 20)
    assert c.cost == pytest.approx(0.004) and c.list_cost == pytest.approx(0.008)
    assert c.saved == pytest.approx(0.004)
    assert r.progress.cost == pytest.approx(0.004)


def test_endpoint_down_pauses_and_resume_finishes(tmp_path: Path) -> None:
    ledger, job, reader = setup(tmp_path, ["a", "b", "c", "d", "down", "e", "f", "g"])
    p = Predictor()
    with pytest.raises(EndpointDown):
        runner(ledger, job, reader, p).run()
    c = ledger.counts(job.id)
    assert c["succeeded"] == 4 and c["failed"] == 0  # the second window is not failed
    assert ledger.get_job("j").cursor.records == 4  # ... and will be read again

    class Up(Predictor):
        def process(self, inputs, batch_size):
            return [Ans(t) for t in inputs]

    runner(ledger, ledger.get_job("j"), reader, Up()).run()
    c = ledger.counts(job.id)
    assert c["succeeded"] == 8 and c.open == 0


def test_max_cost_stops_new_work(tmp_path: Path) -> None:
    ledger, job, reader = setup(tmp_path, [f"t{i}" for i in range(20)])
    p = Predictor()
    r = runner(ledger, job, reader, p, max_cost=0.006)
    r.run()
    c = ledger.counts(job.id)
    # Two windows of 4 cost 0.008 >= 0.006: nothing more was sent.
    assert len(p.seen) == 8 and c["succeeded"] == 8
    assert "max_cost reached" in (r.progress.stop_reason or "")


def test_ingest_only_then_pending(tmp_path: Path) -> None:
    ledger, job, reader = setup(tmp_path, ["a", "b", "c"])
    progress = Progress()
    assert ingest_only(ledger, job, reader, progress=progress, stop=threading.Event())
    c = ledger.counts(job.id)
    assert c["pending"] == 3 and ledger.get_job("j").ingest_done


def test_old_ledger_gains_usage_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL, custom_id TEXT"
        " NOT NULL, line INTEGER NOT NULL, payload BLOB NOT NULL, state TEXT NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL DEFAULT 0,"
        " lease_owner TEXT, lease_expires REAL, error_class TEXT, message TEXT, result BLOB,"
        " started_at REAL, finished_at REAL)"
    )
    con.commit()
    con.close()
    ledger = SQLiteLedger(db)
    cols = {r[1] for r in ledger._db.execute("PRAGMA table_info(items)")}
    assert {"input_tokens", "output_tokens", "cost", "list_cost"} <= cols
