"""SQL in, SQL out (DESIGN.md "Data where it lives"): a table or query as the source, a table as
the output, incremental reruns, and a kill during the write — against the real PostgreSQL
(127.0.0.1:5432, db test, a schema per test) and MariaDB (127.0.0.1:3306, db test, a table
prefix per test), and SQLite and DuckDB files."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

import overnight
from overnight.errors import UsageError
from overnight.records import Cursor
from overnight.sql_source import SqlSource, read_digest
from overnight.sqldb import dispose_all, parse_url, reflect

PG = "postgresql://127.0.0.1:5432/test"
MARIA = "mysql+pymysql://root@127.0.0.1:3306/test"


@dataclass
class Db:
    url: str
    prefix: str  # "schema." (PostgreSQL) or "ov1234_" (MariaDB) or "" (files)
    engine: sa.Engine

    def name(self, table: str) -> str:
        return self.prefix + table

    def table(self, name: str) -> sa.Table:
        with self.engine.connect() as conn:
            table = reflect(conn, self.name(name), "table", sa.make_url(self.url))
        assert table is not None
        return table

    def rows(self, name: str, *cols: str) -> dict:
        table = self.table(name)
        with self.engine.connect() as conn:
            out = conn.execute(sa.select(table.c[cols[0]], *(table.c[c] for c in cols[1:])))
            return {r[0]: tuple(r[1:]) if len(cols) > 2 else r[1] for r in out}

    def execute(self, sql: str, params: list[dict] | dict | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text(sql), params or {})


def sa_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://")


@pytest.fixture
def pg() -> Iterator[Db]:
    schema = f"ov_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(sa_url(PG))
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield Db(PG, f"{schema}.", engine)
    finally:
        dispose_all()
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


@pytest.fixture
def maria() -> Iterator[Db]:
    prefix = f"ov{uuid.uuid4().hex[:8]}_"
    engine = sa.create_engine(MARIA)
    try:
        yield Db(MARIA, prefix, engine)
    finally:
        dispose_all()
        with engine.begin() as conn:
            names = conn.execute(
                sa.text(
                    "SELECT table_name FROM information_schema.tables"
                    " WHERE table_schema = 'test' AND table_name LIKE :p"
                ),
                {"p": prefix + "%"},
            ).scalars()
            for name in list(names):
                conn.execute(sa.text(f"DROP TABLE `{name}`"))
        engine.dispose()


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Db]:
    url = f"sqlite:///{tmp_path / 'data.db'}"
    engine = sa.create_engine(url)
    yield Db(url, "", engine)
    dispose_all()
    engine.dispose()


@pytest.fixture
def duck(tmp_path: Path) -> Iterator[Db]:
    pytest.importorskip("duckdb_engine")
    url = f"duckdb:///{tmp_path / 'data.duckdb'}"
    engine = sa.create_engine(url)
    yield Db(url, "", engine)
    dispose_all()
    engine.dispose()


@pytest.fixture(params=["pg", "maria", "sqlite", "duck"])
def db(request: pytest.FixtureRequest) -> Db:
    return request.getfixturevalue(request.param)


def make_source(db: Db, n: int, name: str = "src", updated: bool = False) -> None:
    cols = [
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("n", sa.Integer),
        sa.Column("name", sa.String(100)),
        sa.Column("price", sa.Numeric(10, 2)),
        sa.Column("created", sa.DateTime),
    ]
    if updated:
        cols.append(sa.Column("updated_at", sa.BigInteger))
    schema, _, bare = db.name(name).rpartition(".")
    table = sa.Table(bare, sa.MetaData(), *cols, schema=schema or None)
    table.create(db.engine)
    insert_rows(db, name, range(1, n + 1), updated)


def insert_rows(db: Db, name: str, ids: range, updated: bool = False) -> None:
    rows = [
        {
            "id": i,
            "n": i,
            "name": f"item {i}",
            "price": Decimal(i) / 4,
            "created": dt.datetime(2026, 1, 1, 12, 30) + dt.timedelta(days=i % 30),
            **({"updated_at": 1} if updated else {}),
        }
        for i in ids
    ]
    table = db.table(name)
    with db.engine.begin() as conn:
        conn.execute(table.insert(), rows)


def logging_function(tmp_path: Path, fail: int | None = None) -> tuple[str, Path]:
    """fn(records) doubles `n` and appends each record's id to calls.log (a record whose n is
    `fail` raises: that one record fails)."""
    name = f"fn_{uuid.uuid4().hex[:8]}"
    log = tmp_path / "calls.log"
    (tmp_path / f"{name}.py").write_text(
        f"""
def fn(records):
    with open({str(log)!r}, "a") as f:
        f.write("".join(str(r["id"]) + "\\n" for r in records))
    if any(r["n"] == {fail!r} for r in records):
        raise ValueError("bad n")
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


def job_for(db: Db, tmp_path: Path, function: str, **extra: dict) -> overnight.Job:
    spec: dict = {
        "name": "sqljob",
        "source": {"url": db.url, "table": db.name("src"), "id": "id"},
        "model": {"backend": "python", "function": function},
        "run": {"batch_size": 500},
        "output": {
            "url": db.url,
            "table": db.name("results"),
            "columns": {"doubled": "output", "name": "name", "price": "price"},
        },
    }
    for section, values in extra.items():
        spec.setdefault(section, {}).update(values)
    return overnight.Job(spec, base_dir=tmp_path, state=tmp_path / "ledger.db")


def test_round_trip_and_incremental_rerun(db: Db, tmp_path: Path) -> None:
    """Table in, table out; then 5 inserted, 2 updated, 1 deleted: exactly 7 computed, and
    the deleted id leaves the results table."""
    make_source(db, 50)
    fn, log = logging_function(tmp_path)
    job = job_for(db, tmp_path, fn)
    report = job.run()
    assert report.exit_code == 0, job.failures()
    assert len(calls(log)) == 50
    got = db.rows("results", "id", "doubled", "name", "price")
    assert got == {i: (2 * i, f"item {i}", pytest.approx(i / 4)) for i in range(1, 51)}

    insert_rows(db, "src", range(51, 56))
    src = db.name("src")
    db.execute(f"UPDATE {src} SET n = 1000 + id WHERE id IN (3, 4)")
    db.execute(f"DELETE FROM {src} WHERE id = 1")
    dispose_all()
    report = job.run()
    assert report.exit_code == 0
    assert sorted(map(int, calls(log))) == [3, 4, 51, 52, 53, 54, 55]
    want = {i: 2 * i for i in range(2, 56)} | {3: 2006, 4: 2008}
    assert db.rows("results", "id", "doubled") == want
    assert report.counts.total == 54

    dispose_all()
    assert job.run().exit_code == 0  # nothing changed: nothing computed
    assert calls(log) == []


def test_a_first_run_reads_the_table_once(db: Db, tmp_path: Path) -> None:
    """The fingerprint of a new job comes from its read: the table is not read a first time
    just to hash it. A rerun reads it once, to compare (and computes nothing)."""
    make_source(db, 1200)
    src = db.name("src")
    fn, log = logging_function(tmp_path)
    job = job_for(db, tmp_path, fn)
    pages: list[str] = []

    def seen(conn, cursor, statement, params, context, executemany) -> None:
        text = " ".join(statement.split())
        if (
            src.split(".")[-1].strip('"`') in text
            and " LIMIT " in text.upper()
            and "LIMIT 0" not in text.upper()
        ):
            pages.append(text)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", seen)
    try:
        assert job.run().exit_code == 0
        first = len(pages)
        assert len(calls(log)) == 1200
        pages.clear()
        dispose_all()
        assert job.run().exit_code == 0 and calls(log) == []
        rerun = len(pages)
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", seen)
    assert first == rerun > 0, (first, rerun)


def test_three_thousand_rows_then_1000_new_and_100_changed(pg: Db, tmp_path: Path) -> None:
    make_source(pg, 3000)
    fn, log = logging_function(tmp_path)
    job = job_for(pg, tmp_path, fn, run={"batch_size": 1000})
    assert job.run().exit_code == 0
    assert len(calls(log)) == 3000
    insert_rows(pg, "src", range(3001, 4001))
    pg.execute(f"UPDATE {pg.name('src')} SET n = -id WHERE id % 30 = 0")  # 100 rows
    report = job.run()
    assert report.exit_code == 0
    computed = calls(log)
    assert len(computed) == 1100 and len(set(computed)) == 1100
    want = {i: (-2 * i if i % 30 == 0 else 2 * i) for i in range(1, 4001)}
    assert pg.rows("results", "id", "doubled") == want


def test_changed_since_reads_only_rows_past_the_high_water_mark(pg: Db, tmp_path: Path) -> None:
    make_source(pg, 3000, updated=True)
    fn, log = logging_function(tmp_path)
    job = job_for(pg, tmp_path, fn, source={"changed_since": "updated_at"})
    report = job.run()
    assert report.exit_code == 0 and len(calls(log)) == 3000
    src = pg.name("src")
    insert_rows(pg, "src", range(3001, 3011))
    pg.execute(f"UPDATE {src} SET updated_at = 2 WHERE id > 3000")
    pg.execute(f"UPDATE {src} SET n = -id, updated_at = 2 WHERE id IN (7, 8, 9)")
    pg.execute(f"UPDATE {src} SET name = 'renamed', updated_at = 2 WHERE id = 10")
    pg.execute(f"DELETE FROM {src} WHERE id = 1")  # no row says it is gone: the ids do
    report = job.run()
    assert report.exit_code == 0
    assert sorted(map(int, calls(log))) == [7, 8, 9, 10, *range(3001, 3011)]
    notes = " ".join(report.notes)
    assert "read 14 rows changed since the last run" in notes, notes
    assert "1 deleted from the source" in notes, notes
    got = pg.rows("results", "id", "doubled", "name")
    assert len(got) == 3009 and 1 not in got  # the deleted row left the output
    assert got[7] == (-14, "item 7") and got[10] == (20, "renamed") and got[3005][0] == 6010
    assert report.counts.total == 3009

    report = job.run()  # nothing past the mark: nothing read, nothing computed
    assert report.exit_code == 0 and calls(log) == []
    assert not any("changed since" in n for n in report.notes), report.notes

    # Deletes alone (nothing past the mark), and a delete hidden by an insert (the count of
    # ids is the same as before): both leave the output, nothing is computed again.
    pg.execute(f"DELETE FROM {src} WHERE id IN (2, 3)")
    report = job.run()
    assert report.exit_code == 0 and calls(log) == []
    assert "2 deleted from the source" in " ".join(report.notes), report.notes
    pg.execute(f"DELETE FROM {src} WHERE id = 4")
    insert_rows(pg, "src", [5000])
    pg.execute(f"UPDATE {src} SET updated_at = 3 WHERE id = 5000")
    report = job.run()
    assert report.exit_code == 0 and calls(log) == ["5000"]
    got = pg.rows("results", "id", "doubled", "name")
    assert len(got) == 3007 and not {1, 2, 3, 4} & set(got) and got[5000][0] == 10000


def test_update_mode_writes_into_the_source_table_and_a_rerun_computes_nothing(
    db: Db, tmp_path: Path
) -> None:
    pg = db
    make_source(pg, 40)
    fn, log = logging_function(tmp_path, fail=13)
    output = {
        "table": pg.name("src"),
        "mode": "update",
        "columns": {"doubled": "output"},
        "errors_table": pg.name("errors"),
    }
    job = job_for(pg, tmp_path, fn, output=output)
    report = job.run()
    assert report.exit_code == 3  # n = 13 fails
    calls(log)
    got = pg.rows("src", "id", "doubled", "name")
    assert got[5] == (10, "item 5") and got[13] == (None, "item 13") and len(got) == 40
    assert pg.rows("errors", "id", "error_class") == {"13": "ValueError"}

    report = job.run()  # the columns it wrote are not part of the records: nothing changed
    assert calls(log) == []
    assert report.counts["succeeded"] == 39


def test_a_query_source_and_vectors_into_a_real_array(pg: Db, tmp_path: Path) -> None:
    make_source(pg, 30)
    name = f"vec_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def fn(records):\n    return [[r['n'] / 2, 1.0] for r in records]\n"
    )
    job = job_for(
        pg,
        tmp_path,
        f"{name}:fn",
        source={"table": None, "query": f"SELECT id, n FROM {pg.name('src')} WHERE n % 3 = 0;"},
        output={"columns": {"vec": "output", "n": "n"}},
    )
    assert job.run().exit_code == 0
    assert pg.table("results").c.vec.type.__class__.__name__ == "ARRAY"
    got = pg.rows("results", "id", "vec", "n")
    assert got == {i: ([i / 2, 1.0], i) for i in range(3, 31, 3)}


def test_keyset_resume_and_null_ids(sqlite: Db, tmp_path: Path) -> None:
    sqlite.execute("CREATE TABLE src (id TEXT, n INTEGER, at DATE, blob BLOB)")
    rows = [{"id": f"k{i:02d}", "n": i, "at": "2026-01-02", "blob": b"\x00\x01"} for i in range(25)]
    rows.insert(5, {"id": None, "n": 99, "at": None, "blob": None})
    sqlite.execute("INSERT INTO src VALUES (:id, :n, :at, :blob)", rows)
    source = SqlSource(parse_url(sqlite.url, tmp_path, "[source] url"), "id", "src")
    first = next(source.read(Cursor(), chunk=10))
    assert [r.custom_id for r in first] == [f"k{i:02d}" for i in range(10)]
    assert first[0].record == {"id": "k00", "n": 0, "at": "2026-01-02", "blob": "AAE="}
    resumed = [r for rows in source.read(Cursor(10, 11, 0, first[-1].key), 10) for r in rows]
    assert [r.custom_id for r in resumed] == [*(f"k{i:02d}" for i in range(10, 25)), None]
    assert resumed[-1].line == 26 and resumed[-1].error == "row 26: the id column 'id' is NULL"
    # The cursor carries the hash of what was read: a read cut and resumed ends where one
    # whole read does (sql_source.read_digest), and both are what `digest` says.
    whole = [r for rows in source.read(Cursor(), 7) for r in rows]
    assert read_digest(Cursor(26, 27, 0, whole[-1].key)) == source.digest()
    assert read_digest(Cursor(26, 27, 0, resumed[-1].key)) == source.digest()
    assert read_digest(Cursor(10, 11, 0, first[-1].key)) != source.digest()
    assert read_digest(Cursor(10, 11, 0, '{"after": "k09"}')) is None  # an older cursor

    fn, _ = logging_function(tmp_path)
    job = job_for(sqlite, tmp_path, fn, output={"columns": {"doubled": "output"}})
    report = job.run()
    assert report.exit_code == 3 and report.counts["succeeded"] == 25
    (failure,) = job.failures()
    assert failure.line == 26 and "is NULL" in failure.message


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"source": {"url": "nosuchdb://x/y"}}, "[source] url"),
        ({"source": {"url": "sqlite:///missing.db"}}, "[source] url: no such database file"),
        ({"source": {"url": "postgresql://bob:hunter2@127.0.0.1:1/test"}}, "[source] url"),
        ({"source": {"table": "no_such_table"}}, "[source] table"),
        ({"source": {"id": "no_such_column"}}, "[source] id"),
        ({"source": {"changed_since": "no_such_column"}}, "[source] changed_since"),
        ({"source": {"table": None, "query": "SELECT nonsense FROM"}}, "[source] query"),
        ({"output": {"url": "postgresql://bob:hunter2@127.0.0.1:1/test"}}, "[output] url"),
        ({"source": {"url": "postgresql://bob@127.0.0.1:1/test?password=hunter2"}}, "[source] url"),
        ({"output": {"url": "mysql://bob@127.0.0.1:1/test?password=hunter2"}}, "[output] url"),
        ({"output": {"mode": "update", "table": "no_such_table"}}, "[output] table"),
        ({"source": {"id": None}}, "`id` is required for a SQL source"),
        ({"output": {"mode": "update", "columns": None}}, 'mode = "update" needs `columns`'),
    ],
)
def test_bad_keys_are_exit_2_naming_the_key(
    sqlite: Db, tmp_path: Path, change: dict, key: str
) -> None:
    make_source(sqlite, 3)
    fn, _ = logging_function(tmp_path)
    with pytest.raises(UsageError) as err:
        spec: dict = {
            "source": {"url": sqlite.url, "table": "src", "id": "id"},
            "model": {"backend": "python", "function": fn},
            "output": {"url": sqlite.url, "table": "results", "columns": {"d": "output"}},
        }
        for section, values in change.items():
            spec[section].update(values)
            spec[section] = {k: v for k, v in spec[section].items() if v is not None}
        overnight.Job(spec, base_dir=tmp_path, state=tmp_path / "ledger.db").run()
    assert err.value.exit_code == 2
    assert key in str(err.value)
    assert "hunter2" not in str(err.value)


def test_the_cli_says_a_refused_database_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        '[source]\nurl = "postgresql://bob:hunter2@127.0.0.1:1/test"\ntable = "t"\nid = "id"\n'
        '[model]\nbackend = "python"\nfunction = "fn:fn"\n'
    )
    (tmp_path / "fn.py").write_text("def fn(records):\n    return records\n")
    done = subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(tmp_path / "job.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "[source] url: cannot connect to postgresql+psycopg://bob:***@127.0.0.1:1/test" in (
        done.stderr
    )
    assert "hunter2" not in done.stderr + done.stdout and "Traceback" not in done.stderr


def test_kill_during_the_sink_write_then_rerun(pg: Db, tmp_path: Path) -> None:
    """kill -9 while the results table is being written: every row in it is whole, and the
    next run finishes the table without computing anything again."""
    total = 40000
    make_source(pg, total)
    fn, log = logging_function(tmp_path)
    results = pg.name("results")
    (tmp_path / "job.toml").write_text(
        f'name = "killed"\n[source]\nurl = "{pg.url}"\ntable = "{pg.name("src")}"\nid = "id"\n'
        f'[model]\nbackend = "python"\nfunction = "{fn}"\n[run]\nbatch_size = 5000\n'
        f'[output]\nurl = "{pg.url}"\ntable = "{results}"\ncolumns = {{ doubled = "output" }}\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", str(tmp_path / "job.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen = 0
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen = _count(pg, results)
            except sa.exc.ProgrammingError:  # not created yet
                seen = 0
            if 0 < seen < total:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not seen:
            proc.kill()
        proc.wait()
    assert 0 < seen < total, f"the write was not caught in the middle ({seen} rows)"
    written = pg.rows("results", "id", "doubled")
    assert all(v == 2 * k for k, v in written.items())  # whole rows only
    assert len(written) % 1000 == 0  # whole transactions of 1,000 rows
    calls(log)

    done = subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(tmp_path / "job.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert calls(log) == []
    assert pg.rows("results", "id", "doubled") == {i: 2 * i for i in range(1, total + 1)}


def _count(db: Db, table: str) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar() or 0)


def test_a_file_in_and_a_table_out_and_the_reverse(sqlite: Db, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": "r{i}", "n": {i}}}\n' for i in range(5)))
    fn, _ = logging_function(tmp_path)
    job = job_for(
        sqlite,
        tmp_path,
        fn,
        source={"path": "in.jsonl", "url": None, "table": None},
        output={"columns": None},
    )
    assert job.run().exit_code == 0
    assert sqlite.rows("results", "id", "output") == {f"r{i}": 2 * i for i in range(5)}

    make_source(sqlite, 4)
    spec = {
        "name": "tofile",
        "source": {"url": sqlite.url, "table": "src", "id": "id"},
        "model": {"backend": "python", "function": fn},
        "output": {"path": "out.jsonl", "include": ["name"]},
    }
    job = overnight.Job(spec, base_dir=tmp_path, state=tmp_path / "ledger.db")
    assert job.run().exit_code == 0
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert lines[0] == '{"id":"1","output":2,"name":"item 1"}' and len(lines) == 4


def test_kill_during_ingest_resumes_after_the_last_committed_id(pg: Db, tmp_path: Path) -> None:
    """kill -9 while the table is read and computed: the rerun goes on from the ingest
    cursor's id (the rows already committed are not read or computed again)."""
    total = 20000
    make_source(pg, total)
    log = tmp_path / "calls.log"
    (tmp_path / "slow.py").write_text(
        "import time\n"
        "def fn(records):\n"
        f"    with open({str(log)!r}, 'a') as f:\n"
        "        f.write(''.join(str(r['id']) + '\\n' for r in records))\n"
        "    time.sleep(0.05)\n"
        "    return [r['n'] * 2 for r in records]\n"
    )
    (tmp_path / "job.toml").write_text(
        f'name = "resumed"\n[source]\nurl = "{pg.url}"\ntable = "{pg.name("src")}"\nid = "id"\n'
        '[model]\nbackend = "python"\nfunction = "slow:fn"\n[run]\nbatch_size = 500\n'
        f'[output]\nurl = "{pg.url}"\ntable = "{pg.name("results")}"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "overnight", "run", str(tmp_path / "job.toml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and len(log.read_text().split()) >= 6000:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    first = calls(log)
    assert 6000 <= len(first) < total
    done = subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(tmp_path / "job.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    second = calls(log)
    assert set(first) | set(second) == {str(i) for i in range(1, total + 1)}
    # Resumed after the last committed id (what was computed but not yet committed when it
    # was killed is computed again), not from the first row.
    resumed = min(map(int, second))
    assert 1 < resumed <= len(first) + 1
    assert sorted(map(int, second)) == list(range(resumed, total + 1))
    assert pg.rows("results", "id", "output") == {i: 2 * i for i in range(1, total + 1)}
    # The read that was cut and resumed hashed the whole table, as one read does: a run
    # now finds it unchanged (no new generation), and computes nothing.
    again = subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(tmp_path / "job.toml"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "changed since the last run" not in again.stdout + again.stderr
    assert calls(log) == []


@pytest.mark.parametrize(
    ("value", "stored"),
    [("a\x00b", "a\ufffdb"), ({"tags": ["x\x00"]}, {"tags": ["x\ufffd"]})],
)
def test_a_nul_in_a_result_does_not_sink_the_postgresql_export(
    pg: Db, tmp_path: Path, value: object, stored: object
) -> None:
    """PostgreSQL text and jsonb cannot hold NUL: a result holding one (a model's output, a
    SQLite input field) is written with U+FFFD, as the ledger stores it, instead of failing
    the whole export."""
    make_source(pg, 3)
    name = f"nul_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        f"def fn(records):\n    return [{value!r} for r in records]\n"
    )
    job = job_for(pg, tmp_path, f"{name}:fn", output={"columns": {"got": "output"}})
    assert job.run().exit_code == 0
    assert pg.rows("results", "id", "got") == {i: stored for i in (1, 2, 3)}


def test_a_nul_in_an_error_message_does_not_sink_the_postgresql_errors_table(
    pg: Db, tmp_path: Path
) -> None:
    make_source(pg, 2)
    name = f"nulerr_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def fn(records):\n    raise ValueError('bad\\x00byte')\n")
    output = {"columns": {"got": "output"}, "errors_table": pg.name("errors")}
    job = job_for(pg, tmp_path, f"{name}:fn", output=output, run={"max_attempts": 1})
    assert job.run().exit_code == 3
    assert {m for m in pg.rows("errors", "id", "message").values()} == {"bad\ufffdbyte"}


def test_a_results_column_holds_every_rows_value_not_only_the_first_rows_type(
    db: Db, tmp_path: Path
) -> None:
    """The column created for `output` fits the results, not the first one alone: a score
    that is 1 for the first row and 0.75 for the next is not written as 0 into a BIGINT."""
    make_source(db, 4)
    name = f"mixed_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def fn(records):\n    return [1 if r['n'] == 1 else r['n'] / 4 for r in records]\n"
    )
    job = job_for(db, tmp_path, f"{name}:fn", output={"columns": {"score": "output"}})
    assert job.run().exit_code == 0
    assert db.rows("results", "id", "score") == {1: 1, 2: 0.5, 3: 0.75, 4: 1}


def test_a_query_with_comments_colons_and_a_semicolon_is_read_as_written(
    pg: Db, tmp_path: Path
) -> None:
    """A query as a user writes it in a TOML multi-line string: a line comment last, a
    semicolon followed by a comment, a colon in a string and a `::` cast (not bind
    parameters: SQLAlchemy's text() would ask for a value of `:x`, with a traceback)."""
    make_source(pg, 3)
    query = (
        f"SELECT id, n, 'see :x' AS note, n::text AS n_text\nFROM {pg.name('src')}\n"
        "-- every row\n; -- done\n"
    )
    fn, log = logging_function(tmp_path)
    job = job_for(
        pg,
        tmp_path,
        fn,
        source={"table": None, "query": query},
        output={"columns": {"doubled": "output", "note": "note", "n_text": "n_text"}},
    )
    assert job.run().exit_code == 0
    assert pg.rows("results", "id", "doubled", "note", "n_text") == {
        i: (2 * i, "see :x", str(i)) for i in (1, 2, 3)
    }


@pytest.mark.parametrize("id_column", ["u", "t"])
def test_a_query_keyed_by_a_uuid_or_a_timestamp_resumes_and_reads_by_id(
    pg: Db, tmp_path: Path, id_column: str
) -> None:
    """A query's columns have no reflected types: the id kept in the ledger (JSON text) is
    compared as the column's own type, not as VARCHAR (`uuid > character varying`)."""
    src = pg.name("src")
    pg.execute(f"CREATE TABLE {src} (u uuid PRIMARY KEY, t timestamptz UNIQUE, n int)")
    pg.execute(
        f"INSERT INTO {src} SELECT gen_random_uuid(),"
        " '2026-01-01 12:00+00'::timestamptz + g * interval '1 hour', g"
        " FROM generate_series(1, 5) g"
    )
    source = SqlSource(
        parse_url(pg.url, tmp_path, "[source] url"), id_column, query=f"SELECT * FROM {src}"
    )
    first = next(source.read(Cursor(), chunk=2))
    rest = [r.custom_id for rows in source.read(Cursor(2, 3, 0, first[-1].key), 2) for r in rows]
    every = [r.custom_id for rows in source.read(Cursor(), 10) for r in rows]
    assert [r.custom_id for r in first] + rest == every and len(every) == 5
    assert [r.custom_id for r in source.read_ids(every[:2])] == every[:2]


def test_changed_since_on_a_querys_timestamp_column(pg: Db, tmp_path: Path) -> None:
    src = pg.name("src")
    pg.execute(f"CREATE TABLE {src} (id int PRIMARY KEY, n int, at timestamptz)")
    pg.execute(f"INSERT INTO {src} SELECT g, g, '2026-01-01 12:00+00' FROM generate_series(1, 5) g")
    fn, log = logging_function(tmp_path)
    source = {"table": None, "query": f"SELECT id, n, at FROM {src}", "changed_since": "at"}
    job = job_for(pg, tmp_path, fn, source=source, output={"columns": {"doubled": "output"}})
    assert job.run().exit_code == 0 and len(calls(log)) == 5
    pg.execute(f"UPDATE {src} SET n = 100, at = '2026-01-02 12:00+00' WHERE id = 2")
    dispose_all()
    assert job.run().exit_code == 0
    assert calls(log) == ["2"]
    assert pg.rows("results", "id", "doubled")[2] == 200


def test_ids_that_differ_only_in_case_are_two_rows_in_a_mariadb_results_table(
    maria: Db, tmp_path: Path
) -> None:
    """MariaDB compares text case-insensitively by default: the results table's id column is
    created with a binary collation, or id "aB" would overwrite id "Ab"."""
    (tmp_path / "in.jsonl").write_text('{"id": "aB", "n": 1}\n{"id": "Ab", "n": 2}\n')
    fn, _ = logging_function(tmp_path)
    job = job_for(
        maria,
        tmp_path,
        fn,
        source={"path": "in.jsonl", "url": None, "table": None},
        output={"columns": None},
    )
    assert job.run().exit_code == 0
    assert maria.rows("results", "id", "output") == {"aB": 2, "Ab": 4}
    dispose_all()
    assert job.run().exit_code == 0  # the rerun's upsert and delete keep both
    assert maria.rows("results", "id", "output") == {"aB": 2, "Ab": 4}


def test_integers_past_64_bits_are_read_as_text_not_a_traceback(pg: Db, tmp_path: Path) -> None:
    """NUMERIC(40) ids and values past 64 bits (JSON via orjson holds 64-bit integers):
    written as their digits, and the keyset goes on from them."""
    src = pg.name("src")
    pg.execute(f"CREATE TABLE {src} (id numeric(40) PRIMARY KEY, n int, big numeric(40))")
    pg.execute(
        f"INSERT INTO {src} SELECT 10::numeric ^ 30 + g, g, 10::numeric ^ 35 FROM"
        " generate_series(1, 3) g"
    )
    source = SqlSource(parse_url(pg.url, tmp_path, "[source] url"), "id", src)
    first = next(source.read(Cursor(), chunk=2))
    assert first[0].custom_id == str(10**30 + 1) and first[0].record["big"] == str(10**35)
    rest = [r.custom_id for rows in source.read(Cursor(2, 3, 0, first[-1].key), 2) for r in rows]
    assert rest == [str(10**30 + 3)]
    fn, _ = logging_function(tmp_path)
    job = job_for(pg, tmp_path, fn, output={"columns": {"doubled": "output"}})
    assert job.run().exit_code == 0
    assert len(pg.rows("results", "id", "doubled")) == 3


def test_one_row_the_table_refuses_does_not_keep_the_others_out(pg: Db, tmp_path: Path) -> None:
    """A results table made for numbers and one result that is text: every other row is
    written, and the error (exit 2) names the row it could not write."""
    make_source(pg, 1200)
    pg.execute(f"CREATE TABLE {pg.name('results')} (id bigint PRIMARY KEY, doubled bigint)")
    name = f"onebad_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def fn(records):\n    return ['oops' if r['n'] == 5 else r['n'] * 2 for r in records]\n"
    )
    job = job_for(pg, tmp_path, f"{name}:fn", output={"columns": {"doubled": "output"}})
    with pytest.raises(UsageError) as err:
        job.run()
    assert err.value.exit_code == 2
    assert "refused 1 row" in str(err.value) and "id 5" in str(err.value), str(err.value)
    want = {i: 2 * i for i in range(1, 1201) if i != 5}
    assert pg.rows("results", "id", "doubled") == want


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_update_mode_into_the_source_table_named_another_way_computes_nothing_again(
    request: pytest.FixtureRequest, tmp_path: Path, kind: str
) -> None:
    """The source table written back to under another name (`main.src` for `src`, the
    default port spelled out): still the same table, whose written columns are not part of
    the records, or the next run would compute every row again."""
    db: Db = request.getfixturevalue(kind)
    make_source(db, 10)
    fn, log = logging_function(tmp_path)
    if kind == "sqlite":
        output = {"table": "main.src", "mode": "update", "columns": {"doubled": "output"}}
    else:
        url = db.url.replace("127.0.0.1:5432", "127.0.0.1")
        output = {"url": url, "table": db.name("src"), "mode": "update"}
        output["columns"] = {"doubled": "output"}
    job = job_for(db, tmp_path, fn, output=output)
    assert job.run().exit_code == 0 and len(calls(log)) == 10
    dispose_all()
    assert job.run().exit_code == 0
    assert calls(log) == []


@pytest.mark.parametrize("kind", ["maria", "sqlite"])
def test_text_ids_equal_under_a_case_insensitive_collation_are_each_read_once(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """MariaDB's default collation (and SQLite's NOCASE) holds "B", "b " and "b" equal: a
    page that ended on "B" went on from `id > 'B'` and never read "b " nor "b" (lost without
    a word). The keyset orders a text id that the table does not keep unique by its exact
    characters."""
    db: Db = request.getfixturevalue(kind)
    collate = "" if kind == "maria" else " COLLATE NOCASE"
    db.execute(f"CREATE TABLE {db.name('src')} (id VARCHAR(20){collate}, n INTEGER)")
    db.execute(f"CREATE INDEX {db.name('src_id')} ON {db.name('src')} (id)")
    ids = ["a", "B", "b ", "b", "c", "C2", "é", "E", "e"]
    db.execute(
        f"INSERT INTO {db.name('src')} VALUES (:id, :n)",
        [{"id": i, "n": n} for n, i in enumerate(ids)],
    )
    source = SqlSource(parse_url(db.url, tmp_path, "[source] url"), "id", db.name("src"))
    for chunk in (1, 2, 3, 100):
        read = [r.custom_id for rows in source.read(Cursor(), chunk) for r in rows]
        assert sorted(read) == sorted(ids), chunk
    # A read cut after each page and resumed from its cursor reads each row once too.
    read, cursor = [], Cursor()
    while True:
        page = next(source.read(cursor, 2), [])
        if not page:
            break
        read += [r.custom_id for r in page]
        cursor = Cursor(len(read), len(read) + 1, 0, page[-1].key)
    assert sorted(read) == sorted(ids)


def test_a_duplicate_id_across_two_pages_fails_as_a_duplicate_not_vanishes(
    sqlite: Db, tmp_path: Path
) -> None:
    """A query whose id is not unique: the copy of id 2000 on the next page (a page is 2,000
    rows) was skipped by `id > 2000` without a word, where a copy within one page fails as a
    duplicate. Both copies are read, and the second fails alone with its row number."""
    sqlite.execute("CREATE TABLE src (id INTEGER, n INTEGER)")
    rows = [{"id": i, "n": i} for i in range(1, 2001)]
    rows += [{"id": 2000, "n": -1}, {"id": 2001, "n": 2001}]
    sqlite.execute("INSERT INTO src VALUES (:id, :n)", rows)
    source = SqlSource(
        parse_url(sqlite.url, tmp_path, "[source] url"), "id", None, "SELECT * FROM src"
    )
    for chunk in (1, 2, 2000):
        read = [r.custom_id for rows in source.read(Cursor(), chunk) for r in rows]
        assert read[-3:] == ["2000", "2000", "2001"] and len(read) == 2002, chunk
    # Cut after the first copy of 2000 and resumed: the second is read, the first not again.
    first = [r for rows in source.read(Cursor(), 2000) for r in rows][1999]
    resumed = [
        r.custom_id for rows in source.read(Cursor(2000, 2001, 0, first.key), 5) for r in rows
    ]
    assert resumed == ["2000", "2001"]

    fn, log = logging_function(tmp_path)
    job = job_for(
        sqlite,
        tmp_path,
        fn,
        source={"table": None, "query": "SELECT * FROM src"},
        output={"columns": {"doubled": "output"}},
    )
    report = job.run()
    assert report.exit_code == 3 and report.counts["succeeded"] == 2001
    (failure,) = job.failures()
    assert failure.line == 2001 and "duplicate id '2000'" in failure.message
    assert set(calls(log)) == {str(i) for i in range(1, 2002)}


def test_ids_that_differ_only_in_trailing_spaces_are_two_rows_in_a_mariadb_results_table(
    maria: Db, tmp_path: Path
) -> None:
    """utf8mb4_bin pads with spaces: "7" and "7 " were one key, and the table refused the
    second id's row (the run exit 2 over one record). The id column is NO PAD."""
    (tmp_path / "in.jsonl").write_text(
        '{"id": "7", "n": 1}\n{"id": "7 ", "n": 2}\n{"id": "x\\t", "n": 3}\n{"id": "x", "n": 4}\n'
    )
    fn, _ = logging_function(tmp_path)
    job = job_for(
        maria,
        tmp_path,
        fn,
        source={"path": "in.jsonl", "url": None, "table": None},
        output={"columns": None},
    )
    assert job.run().exit_code == 0
    assert maria.rows("results", "id", "output") == {"7": 2, "7 ": 4, "x\t": 6, "x": 8}
    dispose_all()
    assert job.run().exit_code == 0  # the rerun's upsert and delete keep them all
    assert maria.rows("results", "id", "output") == {"7": 2, "7 ": 4, "x\t": 6, "x": 8}


def test_a_long_id_or_a_long_message_does_not_empty_the_mariadb_errors_table(
    maria: Db, tmp_path: Path
) -> None:
    """The errors table's id was VARCHAR(255) and its message TEXT (64 KiB) on MariaDB: a
    failure with a 300-character id, or a 70,000-character message, was refused, and the one
    transaction left the table without any failure (and the run exited 2)."""
    long_id = "k" * 300
    (tmp_path / "in.jsonl").write_text(
        '{"id": "a", "n": 1}\n{"id": "b", "n": 2}\n'
        f'{{"id": "{long_id}", "n": 3}}\n{{"id": "c", "n": 4}}\n'
    )
    name = f"longerr_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def fn(records):\n"
        "    if records[0]['n'] == 2:\n"
        "        raise ValueError('x' * 70000)\n"
        "    if records[0]['n'] == 3:\n"
        "        raise ValueError('a long id')\n"
        "    return [r['n'] for r in records]\n"
    )
    job = job_for(
        maria,
        tmp_path,
        f"{name}:fn",
        source={"path": "in.jsonl", "url": None, "table": None},
        output={"columns": None, "errors_table": maria.name("errors")},
        run={"batch_size": 1},
    )
    assert job.run().exit_code == 3
    with maria.engine.connect() as conn:
        got = conn.execute(
            sa.text(f"SELECT id, CHAR_LENGTH(message) FROM {maria.name('errors')} ORDER BY id")
        ).all()
    assert [tuple(r) for r in got] == [("b", 70000), (long_id, len("a long id"))]
    assert maria.rows("results", "id", "output") == {"a": 1, "c": 4}


def test_an_output_past_64_kib_fits_the_mariadb_results_table_it_creates(
    maria: Db, tmp_path: Path
) -> None:
    """A text column the sink created was TEXT, 64 KiB on MariaDB: a 70,000-character output
    was refused at every export (the run exit 2, the row never written)."""
    (tmp_path / "in.jsonl").write_text('{"id": "a", "n": 1}\n{"id": "b", "n": 2}\n')
    name = f"bigout_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "def fn(records):\n    return ['x' * (70000 if r['n'] == 2 else 5) for r in records]\n"
    )
    job = job_for(
        maria,
        tmp_path,
        f"{name}:fn",
        source={"path": "in.jsonl", "url": None, "table": None},
        output={"columns": None},
    )
    assert job.run().exit_code == 0
    assert maria.rows("results", "id", "output") == {"a": "x" * 5, "b": "x" * 70000}


def test_changed_since_reads_new_rows_whose_column_is_null(sqlite: Db, tmp_path: Path) -> None:
    """An `updated_at` left NULL until a row is first updated: a row inserted after the first
    run with the column NULL is never past the mark, and was never read nor computed (the
    first run reads such rows). New rows with a NULL column are read; those the job already
    has are not computed again."""
    make_source(sqlite, 5, updated=True)
    fn, log = logging_function(tmp_path)
    job = job_for(sqlite, tmp_path, fn, source={"changed_since": "updated_at"})
    assert job.run().exit_code == 0 and len(calls(log)) == 5
    sqlite.execute("UPDATE src SET updated_at = NULL WHERE id = 5")  # the mark cannot tell
    insert_rows(sqlite, "src", range(6, 8))
    sqlite.execute("UPDATE src SET updated_at = NULL WHERE id > 5")
    report = job.run()
    assert report.exit_code == 0 and sorted(calls(log)) == ["6", "7"]
    assert sorted(sqlite.rows("results", "id", "doubled")) == [1, 2, 3, 4, 5, 6, 7]
    report = job.run()  # nothing new: nothing computed
    assert report.exit_code == 0 and calls(log) == []
    sqlite.execute("DELETE FROM src WHERE id = 6")
    assert job.run().exit_code == 0 and calls(log) == []
    assert sorted(sqlite.rows("results", "id", "doubled")) == [1, 2, 3, 4, 5, 7]


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_an_errors_table_naming_the_results_or_the_source_table_empties_neither(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The errors table's rows are replaced at each export (DELETE, then the failures): an
    `errors_table` naming the results table, or the source table, emptied it, exit 0."""
    db: Db = request.getfixturevalue(kind)
    make_source(db, 5)
    fn, _ = logging_function(tmp_path)
    assert job_for(db, tmp_path, fn).run().exit_code == 0
    for target in ("results", "src"):
        job = job_for(db, tmp_path, fn, output={"errors_table": db.name(target)})
        with pytest.raises(UsageError) as info:
            job.run()
        assert info.value.exit_code == 2 and "[output] errors_table" in str(info.value)
    assert len(db.rows("src", "id", "n")) == 5
    assert len(db.rows("results", "id", "doubled")) == 5
    # A new errors table, then the same one again: made, and its rows replaced.
    job = job_for(db, tmp_path, fn, output={"errors_table": db.name("errors")})
    assert job.run().exit_code == 0 and job.run().exit_code == 0


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
def test_upsert_into_the_source_table_is_exit_2_not_a_delete_of_its_rows(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """mode = "upsert" deletes the rows of ids without a good result: with the source table as
    the output, a record that failed (n = 99 here) had its source row deleted, and the
    columns it added made every record "changed" (computed again) on the next run."""
    db: Db = request.getfixturevalue(kind)
    make_source(db, 5)
    db.execute(f"UPDATE {db.name('src')} SET n = 99 WHERE id = 3")
    fn, log = logging_function(tmp_path, fail=99)
    job = job_for(
        db, tmp_path, fn, output={"table": db.name("src"), "columns": {"doubled": "output"}}
    )
    with pytest.raises(UsageError) as info:
        job.run()
    assert info.value.exit_code == 2 and "is the [source] table" in str(info.value)
    assert sorted(db.rows("src", "id", "n")) == [1, 2, 3, 4, 5] and calls(log) == []
