"""Adversarial checks of the SQL sources and sinks, the PostgreSQL ledger and several workers
(real PostgreSQL at 127.0.0.1:5432, database test, a schema per test)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import overnight
from overnight.sqldb import dispose_all

PG = "postgresql://127.0.0.1:5432/test"


@pytest.fixture
def schema() -> Iterator[tuple[str, sa.Engine]]:
    name = f"ovb_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine("postgresql+psycopg://127.0.0.1:5432/test")
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {name}"))
    try:
        yield name, engine
    finally:
        dispose_all()
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE"))
        engine.dispose()


def _fn(tmp_path: Path) -> str:
    name = f"adv_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def fn(records):\n    return [r['n'] for r in records]\n")
    return f"{name}:fn"


def test_two_jobs_upserting_into_one_table_keep_each_others_rows(
    schema: tuple[str, sa.Engine], tmp_path: Path
) -> None:
    name, engine = schema
    with engine.begin() as conn:
        for part, ids in (("eu", (1, 2)), ("us", (3, 4))):
            conn.execute(sa.text(f"CREATE TABLE {name}.{part} (id int PRIMARY KEY, n int)"))
            conn.execute(
                sa.text(f"INSERT INTO {name}.{part} VALUES (:i, :i)"), [{"i": i} for i in ids]
            )
    fn = _fn(tmp_path)
    for part in ("eu", "us"):
        spec = {
            "name": f"triage_{part}",
            "source": {"url": PG, "table": f"{name}.{part}", "id": "id"},
            "model": {"backend": "python", "function": fn},
            "output": {"url": PG, "table": f"{name}.triage"},
        }
        job = overnight.Job(spec, base_dir=tmp_path, state=tmp_path / "ledger.db")
        assert job.run().exit_code == 0
        dispose_all()
    with engine.connect() as conn:
        got = dict(conn.execute(sa.text(f"SELECT id, output FROM {name}.triage")).all())
    assert got == {1: 1, 2: 2, 3: 3, 4: 4}


def test_two_workers_exporting_at_once_into_a_new_table_both_succeed(
    schema: tuple[str, sa.Engine], tmp_path: Path
) -> None:
    """Two workers leaving at once both export (job.py): the one that loses the race to
    create the results table (or add a column) uses the table the other made."""
    name, engine = schema
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": "r{i}", "n": {i}}}\n' for i in range(20)))
    fn = _fn(tmp_path)

    def job(table: str) -> overnight.Job:
        spec = {
            "name": "race",
            "source": {"path": "in.jsonl", "id": "id"},
            "model": {"backend": "python", "function": fn},
            "output": {"url": PG, "table": f"{name}.{table}"},
        }
        return overnight.Job(spec, base_dir=tmp_path, state=tmp_path / "ledger.db")

    assert job("first").run().exit_code == 0
    errors: list[BaseException] = []

    def export(table: str) -> None:
        try:
            job(table).export()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for k in range(8):
        threads = [threading.Thread(target=export, args=(f"t{k}",)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {name}.t7")).scalar() == 20


def test_two_workers_exporting_at_once_write_the_errors_table_once(
    schema: tuple[str, sa.Engine], tmp_path: Path
) -> None:
    name, engine = schema
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": "r{i}", "n": {i}}}\n' for i in range(20)))
    fn = f"bad_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{fn}.py").write_text(
        "def fn(records):\n"
        "    if any(r['n'] % 5 == 0 for r in records):\n"
        "        raise ValueError('every fifth')\n"
        "    return [r['n'] for r in records]\n"
    )

    def job(table: str) -> overnight.Job:
        spec = {
            "name": "race",
            "source": {"path": "in.jsonl", "id": "id"},
            "model": {"backend": "python", "function": f"{fn}:fn"},
            "run": {"batch_size": 1, "max_attempts": 1},
            "output": {"url": PG, "table": f"{name}.out", "errors_table": f"{name}.{table}"},
        }
        return overnight.Job(spec, base_dir=tmp_path, state=tmp_path / "ledger.db")

    assert job("first").run().exit_code == 3
    errors: list[BaseException] = []

    def export(table: str) -> None:
        try:
            job(table).export()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for k in range(8):
        threads = [threading.Thread(target=export, args=(f"e{k}",)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    with engine.connect() as conn:
        for k in range(8):
            assert conn.execute(sa.text(f"SELECT count(*) FROM {name}.e{k}")).scalar() == 4
