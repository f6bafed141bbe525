"""Fresh work committed per range (migration 5): the runner's fast path (add_succeeded) stores a
batch of records that succeeded at once as one `ranges` row. Every reader must see the same
job as if each record were an item row: exports byte for byte, counts, retries, incremental
reruns, repeated ids (across ranges, across a resume), and a ledger written before ranges."""

from __future__ import annotations

import io
import sqlite3
import time

import orjson
import pytest
from test_ledger_reconnect import LosingConnector
from test_store_contract import FP, Store, lease_at, open_store, row

from overnight import sinks
from overnight.records import Cursor, Row
from overnight.store import Outcome, open_ledger
from overnight.store.ledger import SQLLedger


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    s = open_store(request, tmp_path)
    yield s
    s.close()


def rows_of(ids: list[str], first_line: int = 1) -> list[Row]:
    return [row(first_line + i, cid, n=first_line - 1 + i) for i, cid in enumerate(ids)]


def res(cid: str) -> bytes:
    return orjson.dumps({"output": cid.upper(), "ok": True})


def ranged(ledger, job_id: int) -> int:
    """How many ranges rows the job has (through the ledger's own connector)."""
    return len(ledger._conn.fetchall("ranges_page", (job_id, -1, 1 << 40, 1000)))


def add_ranged(ledger, job_id: int, first_seq: int, ids: list[str]) -> list[bool]:
    rows = rows_of(ids, first_line=first_seq + 1)
    cursor = Cursor(first_seq + len(ids), first_seq + len(ids) + 1, 0)
    return ledger.add_succeeded(job_id, first_seq, rows, cursor, [res(c) for c in ids])


def mixed_job(ledger, name: str, per_item: bool) -> int:
    """A job of 40 records: seqs 0-9, 20-29 and 30-39 succeed on the fast path (ranges, or
    item rows when `per_item`), 10-19 are ingested pending and then fail, succeed, or are
    retried. Ids include non-ASCII (ranged) and what JSON escapes (that batch, with two
    repeated ids too, goes item by item)."""
    job = ledger.create_job(name, "h", FP)
    first = [f"a{i}" for i in range(10)]
    middle = [f"m{i}" for i in range(10)]
    third = ["é☃", "z1", "\u2028", "z3", "日本", "z5", "z6", "z7", "z8", "z9"]
    last = ['q"x', "tab\tid", "back\\slash", "y3", "y4", "y5", "y6", "y7"]

    def fast(seq: int, ids: list[str]) -> list[bool]:
        if not per_item:
            return add_ranged(ledger, job.id, seq, ids)
        outcomes = [Outcome(seq + k, "succeeded", res(c), attempts=1) for k, c in enumerate(ids)]
        rows = rows_of(ids, seq + 1)
        return ledger.add_items(job.id, seq, rows, Cursor(seq + 10, seq + 11, 0), outcomes)

    assert fast(0, first) == [True] * 10
    ledger.add_items(job.id, 10, rows_of(middle, 11), Cursor(20, 21, 0))
    assert fast(20, third) == [True] * 10
    assert fast(30, first[:2] + last) == [False, False] + [True] * 8  # the first one wins
    items = ledger.lease(job.id, 10, lease_at())
    assert [it.seq for it in items] == list(range(10, 20))
    outcomes = [
        Outcome(it.seq, "succeeded", res(it.custom_id), attempts=1)
        if it.seq % 3
        else Outcome(it.seq, "failed", None, "E", "boom", attempts=1)
        for it in items
    ]
    ledger.complete(job.id, "owner-a", outcomes, time.time())
    ledger.retry(job.id, ("failed",))
    again = ledger.lease(job.id, 10, lease_at(owner="owner-b"))
    done = [Outcome(it.seq, "succeeded", res("again"), attempts=2) for it in again[:2]]
    ledger.complete(job.id, "owner-b", done, time.time())
    return job.id


def export(ledger, job_id: int) -> tuple[bytes, list, list]:
    lines = b"".join(b"".join(batch) for batch in ledger.iter_result_lines(job_id, "ticket"))
    results = list(ledger.iter_results(job_id, with_payload=True))
    failures = [
        (f.custom_id, f.line, f.state, f.error_class, f.message)
        for f in ledger.iter_failures(job_id)
    ]
    return lines, results, failures


def test_fast_path_batches_are_one_range_row_and_read_as_items(store):
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    assert add_ranged(ledger, job.id, 0, ["a", "b", "c"]) == [True] * 3
    assert add_ranged(ledger, job.id, 3, ["d", "e"]) == [True] * 2
    assert ranged(ledger, job.id) == 2
    assert [r[:2] for r in ledger.iter_results(job.id)] == [(c, res(c)) for c in "abcde"]
    counts = ledger.counts(job.id)
    assert counts.by_state == {"succeeded": 5} and counts.first_started <= counts.last_finished
    assert ledger.finished_since(job.id, 0.0) == 5
    assert sum(ledger.finished_per_interval(job.id, 0.0, 1e12).values()) == 5
    assert ledger.known_ids(job.id, ["b", "x", "e"]) == {"b", "e"}
    assert ranged(ledger, job.id) == 2  # none of these turned ranges into item rows
    page = ledger.items_page(job.id, 1, 10)
    assert [(p.seq, p.custom_id, p.state, p.result) for p in page] == [
        (i, c, "succeeded", res(c)) for i, c in enumerate("abcde") if i >= 1
    ]


def test_export_of_a_mixed_job_is_byte_for_byte_that_of_item_rows(store):
    ledger = store.open()
    ours = mixed_job(ledger, "ranged", per_item=False)
    before = mixed_job(ledger, "items", per_item=True)
    assert ranged(ledger, ours) == 2 and ranged(ledger, before) == 0
    got, want = export(ledger, ours), export(ledger, before)
    assert got == want
    assert ledger.counts(ours).by_state == {"succeeded": 37, "leased": 1}
    assert ledger.counts(before).by_state == {"succeeded": 37, "leased": 1}
    assert got[0].count(b"\n") == 37 and len(got[2]) == 2  # the repeated ids
    # and through the sink that writes the output file, plain and with input fields
    for include in ([], ["n"]):
        files = []
        for job_id in (ours, before):
            f = io.BytesIO()
            sinks._write_jsonl(f, ledger, job_id, "ticket", include, False)
            files.append(f.getvalue())
        assert files[0] == files[1] and files[0].count(b"\n") == 37
    assert ranged(ledger, ours) >= 1  # reading exploded nothing


def test_retry_of_succeeded_items_inside_a_range_runs_them_again(store):
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    add_ranged(ledger, job.id, 0, ["a", "b", "c", "d"])
    assert ledger.retry(job.id, ("failed",)) == 0
    assert ranged(ledger, job.id) == 1  # nothing failed: the range stays
    assert ledger.retry(job.id, ("succeeded",)) == 4
    assert ranged(ledger, job.id) == 0
    items = ledger.lease(job.id, 10, lease_at())
    assert [(it.seq, it.custom_id, it.line) for it in items] == [
        (0, "a", 1),
        (1, "b", 2),
        (2, "c", 3),
        (3, "d", 4),
    ]
    assert [orjson.loads(it.payload) for it in items] == [
        {"id": c, "n": i} for i, c in enumerate("abcd")
    ]
    ledger.complete(job.id, "owner-a", [Outcome(1, "succeeded", res("B"), attempts=1)], 0.0)
    assert [r[:2] for r in ledger.iter_results(job.id)] == [("b", res("B"))]


def test_incremental_rerun_with_one_record_changed_carries_the_others(store):
    ledger = store.open()
    ids = [f"r{i}" for i in range(1000)]
    job = ledger.create_job("job", "h", FP)
    for at in range(0, 1000, 250):
        assert add_ranged(ledger, job.id, at, ids[at : at + 250]) == [True] * 250
    new = ledger.begin_generation(job, FP)
    rows = rows_of(ids)
    rows[500] = row(501, "r500", n="changed")
    assert ledger.add_items(new.id, 0, rows, Cursor(1000, 1001, 0)) == [True] * 1000
    assert ledger.carry_results(job.id, new.id) == (999, 0)
    swapped = ledger.replace_generation(job, new)
    assert ledger.counts(swapped.id).by_state == {"succeeded": 999, "pending": 1}
    assert [it.custom_id for it in ledger.lease(swapped.id, 10, lease_at())] == ["r500"]
    kept = list(ledger.iter_results(swapped.id))
    assert len(kept) == 999 and kept[0][:2] == ("r0", res("r0"))


def test_a_repeated_id_across_two_ranges_and_across_a_resume_is_refused(store):
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    assert add_ranged(ledger, job.id, 0, ["a", "b", "c"]) == [True] * 3
    assert add_ranged(ledger, job.id, 3, ["d", "b", "e"]) == [True, False, True]
    # killed here; another process resumes the ingest with a fresh ledger connection
    other = store.open()
    assert add_ranged(other, job.id, 6, ["f", "c", "a"]) == [True, False, False]
    assert add_ranged(other, job.id, 9, ["g", "h"]) == [True, True]
    messages = [f.message for f in other.iter_failures(job.id)]
    assert messages == [
        "line 5: duplicate id 'b' (first seen on line 2)",
        "line 8: duplicate id 'c' (first seen on line 3)",
        "line 9: duplicate id 'a' (first seen on line 1)",
    ]
    # the first process ingests again after the other one: it reads the ids again
    assert add_ranged(ledger, job.id, 11, ["g", "i"]) == [False, True]
    assert ledger.counts(job.id).by_state == {"succeeded": 9}
    lines = b"".join(b"".join(b) for b in ledger.iter_result_lines(job.id, "id"))
    assert [orjson.loads(x)["id"] for x in lines.splitlines()] == list("abcdefghi")


def test_a_range_whose_commit_answer_was_lost_is_committed_once(pg_ledger_url):
    conn = LosingConnector(pg_ledger_url)
    ledger = SQLLedger(conn)
    try:
        job = ledger.create_job("j", "h", FP)
        conn.armed = True  # committed, then the connection is cut before the answer
        assert add_ranged(ledger, job.id, 0, ["a", "b"]) == [True, True]
        conn.armed = False  # cut before the commit: it runs again
        assert add_ranged(ledger, job.id, 2, ["c", "a"]) == [True, False]
        conn.armed = True
        assert add_ranged(ledger, job.id, 4, ["d", "b"]) == [True, False]
        assert ledger.counts(job.id).by_state == {"succeeded": 4}
        assert [r[0] for r in ledger.iter_results(job.id)] == ["a", "b", "c", "d"]
        assert ledger.counts(job.id).rejected == 2
    finally:
        ledger.close()


def test_a_version_4_ledger_with_items_is_upgraded_and_keeps_working(tmp_path):
    path = tmp_path / "ledger.db"
    ledger = open_ledger(str(path))
    job = ledger.create_job("job", "h", FP)
    outcomes = [Outcome(k, "succeeded", res(c), attempts=1) for k, c in enumerate("ab")]
    ledger.add_items(job.id, 0, rows_of(["a", "b"]), Cursor(2, 3, 0), outcomes)
    ledger.close()
    with sqlite3.connect(path) as db:  # as overnight before ranges left it
        db.execute("DROP TABLE ranges")
        db.execute("UPDATE schema_version SET version = 4")
    ledger = open_ledger(str(path))
    try:
        assert ledger.schema_version == 5
        assert add_ranged(ledger, job.id, 2, ["c", "a", "d"]) == [True, False, True]
        assert [r[0] for r in ledger.iter_results(job.id)] == ["a", "b", "c", "d"]
        assert ledger.counts(job.id).by_state == {"succeeded": 4}
    finally:
        ledger.close()


def test_deleting_a_job_deletes_its_ranges(store: Store):
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    add_ranged(ledger, job.id, 0, ["a", "b"])
    ledger.delete_job(job.id)
    again = ledger.create_job("job", "h", FP)
    assert ranged(ledger, job.id) == 0 and ranged(ledger, again.id) == 0
    assert add_ranged(ledger, again.id, 0, ["a", "b"]) == [True, True]
    assert ledger.counts(again.id).by_state == {"succeeded": 2}


def test_results_a_range_cannot_cut_apart_go_item_by_item(store):
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    odd = [b'{"a": 1}', b'{"a":\n 2}', b"[3]", b"{}"]  # a newline inside, not an object
    rows = rows_of(["w", "x", "y", "z"])
    assert ledger.add_succeeded(job.id, 0, rows, Cursor(4, 5, 0), odd) == [True] * 4
    assert ranged(ledger, job.id) == 0
    assert [r[1] for r in ledger.iter_results(job.id)] == odd
    assert add_ranged(ledger, job.id, 4, ["v"]) == [True]
    lines = b"".join(b"".join(b) for b in ledger.iter_result_lines(job.id, "id"))
    assert lines == (
        b'{"id":"w","a": 1}\n{"id":"x","a":\n 2}\n{"id":"y",3]\n{"id":"z",}\n'
        b'{"id":"v","output":"V","ok":true}\n'
    )


def test_a_failure_now_and_then_leaves_the_rest_of_a_batch_ranged(store):
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    before = ledger.create_job("items", "h", FP)
    ids = [f"r{i}" for i in range(700)]
    rows = rows_of(ids)
    rows[650] = Row(651, None, None, None, "line 651: malformed JSON")

    def outcome(k: int) -> Outcome:
        if k == 300:
            return Outcome(k, "failed", None, "E", "boom", attempts=1)
        if k == 600:  # paid for: usage is kept on an item row
            return Outcome(k, "succeeded", res(ids[k]), attempts=1, input_tokens=5)
        return Outcome(k, "succeeded", res(ids[k]), attempts=1)

    outcomes = [outcome(k) for k in range(700) if k != 650]
    accepted = ledger.add_items(job.id, 0, rows, Cursor(700, 701, 0), outcomes)
    assert accepted == [k != 650 for k in range(700)]
    # 0-299 and 301-599 are ranges; 601-649 and 651-699 are too short a run: items
    assert ranged(ledger, job.id) == 2
    for at in range(0, 700, 50):  # the same records 50 at a time: all item rows
        part = [o for o in outcomes if at <= o.seq < at + 50]
        ledger.add_items(before.id, at, rows[at : at + 50], Cursor(at + 50, at + 51, 0), part)
    assert ranged(ledger, before.id) == 0
    assert export(ledger, job.id) == export(ledger, before.id)
    assert ledger.counts(job.id).by_state == {"succeeded": 698, "failed": 1}
    assert ledger.counts(job.id).input_tokens == 5 and ledger.counts(job.id).rejected == 1
    # a repeated id in a fast-path batch: the runs around it are ranges still
    more = rows_of([f"s{i}" for i in range(300)] + ["r5"] + [f"t{i}" for i in range(600)], 701)
    more[600] = row(1301, 'q"x', n=1300)  # an id that JSON escapes: an item between two runs
    results = [res("x")] * len(more)
    got = ledger.add_succeeded(job.id, 700, more, Cursor(1601, 1602, 0), results)
    assert got == [True] * 300 + [False] + [True] * 600
    assert ranged(ledger, job.id) == 5
    assert ledger.known_ids(job.id, ['q"x', "t0", "t449"]) == {'q"x', "t0", "t449"}
    assert [f.message for f in ledger.iter_failures(job.id)][-1] == (
        "line 1001: duplicate id 'r5' (first seen on line 6)"
    )


def test_ranged_runs_whose_commit_answer_was_lost_are_committed_once(pg_ledger_url):
    conn = LosingConnector(pg_ledger_url)
    ledger = SQLLedger(conn)
    try:
        job = ledger.create_job("j", "h", FP)
        ids = [f"r{i}" for i in range(600)]
        outcomes = [
            Outcome(k, "failed", None, "E", "x", attempts=1)
            if k == 299
            else Outcome(k, "succeeded", res(c), attempts=1)
            for k, c in enumerate(ids)
        ]
        conn.armed = True
        rows = rows_of(ids)
        assert ledger.add_items(job.id, 0, rows, Cursor(600, 601, 0), outcomes) == [True] * 600
        assert ranged(ledger, job.id) == 2
        assert ledger.counts(job.id).by_state == {"succeeded": 599, "failed": 1}
    finally:
        ledger.close()


def test_the_ids_seen_are_hashes_in_sorted_arrays_about_8_bytes_each():
    from overnight.store.idset import IdHashes

    added = [f"r{i}" for i in range(100_000)]
    seen = IdHashes(added[:50_000])
    seen.update(added[50_000:])
    assert len(seen) == 100_000
    assert all(seen.maybe(added[::7]))
    others = [f"s{i}" for i in range(20_000)]
    assert sum(seen.maybe(others)) == 0  # a 64-bit hash: no false hit in 20,000
    assert seen.isdisjoint(others) and not seen.isdisjoint(["s1", "r99999"])
    held = sum(level.nbytes for level in seen._levels)
    assert held <= 8 * 100_000 and len(seen._levels) <= 6  # ~log2(100,000 / 4,096) levels


def test_an_id_whose_hash_is_seen_but_which_is_no_item_is_taken_not_refused(store):
    """Two ids that share a hash: the set of seen ids says "maybe"; the ledger asks its rows,
    so the second id is an item all the same, and a queue's message with it is new."""
    from overnight.store.idset import IdHashes

    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    assert add_ranged(ledger, job.id, 0, ["a", "b"]) == [True, True]
    # As if "c" and "x" hashed alike with "a": the set claims them, no item holds them.
    ledger._seen[job.id] = (2, IdHashes(["a", "b", "c", "x"]))
    assert ledger.known_ids(job.id, ["b", "c", "x", "new"]) == {"b"}
    assert add_ranged(ledger, job.id, 2, ["c", "d"]) == [True, True]
    rows = rows_of(["x", "b"], first_line=5)
    assert ledger.add_items(job.id, 4, rows, Cursor(6, 7, 0)) == [True, False]
    assert [f.message for f in ledger.iter_failures(job.id)] == [
        "line 6: duplicate id 'b' (first seen on line 2)"
    ]
    assert ledger.counts(job.id).by_state == {"succeeded": 4, "pending": 1}


def test_an_id_with_nul_and_its_stored_twin_are_one_id_or_two_the_same_in_every_process(store):
    """PostgreSQL's text stores NUL as U+FFFD (store/postgresql.py): there "x\\0" and "x\\uFFFD"
    are one id, and the second is a repeat, in the process that ingested the first as in a
    fresh one. Before, the ingesting process took both (the export held two records with id
    "x\\uFFFD") and a resume or an incremental rerun refused the second."""
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    nul, twin = "x\x00", "x\ufffd"
    rows = rows_of([nul, "a"])
    outcomes = [Outcome(k, "succeeded", res(r.custom_id), attempts=1) for k, r in enumerate(rows)]
    assert ledger.add_items(job.id, 0, rows, Cursor(2, 3, 0), outcomes) == [True, True]
    one = store.kind == "postgresql"  # SQLite keeps the id as it is: two ids
    assert add_ranged(ledger, job.id, 2, [twin, "b"]) == [not one, True]
    other = store.open()  # a resume: what a fresh process decides is the same
    assert add_ranged(other, job.id, 4, [twin, "c"]) == [False, True]
    assert ledger.known_ids(job.id, [nul, twin, "d"]) == {nul, twin}
    lines = b"".join(b"".join(b) for b in other.iter_result_lines(job.id, "id"))
    ids = [orjson.loads(x)["id"] for x in lines.splitlines()]
    assert len(ids) == len(set(ids)) == (4 if one else 5)  # each id once in the output
    messages = [f.message for f in other.iter_failures(job.id)]
    if one:
        assert messages == [
            f"line {n}: duplicate id {twin!r} (first seen on line 1)" for n in (3, 5)
        ]
    else:
        assert messages == [f"line 5: duplicate id {twin!r} (first seen on line 3)"]


def test_an_export_while_another_process_turns_ranges_into_rows_has_every_record_once(store):
    """An export reads item rows and ranges; another process (a queue's publisher reading
    items_page, an incremental rerun's carry_results) may turn ranges into item rows between
    its reads. Before, the export then lacked every record of the ranges it had not read yet
    (80 of 200 here), or held some twice: both are read in one snapshot now."""
    reader, writer = store.open(), store.open()
    ids = [f"r{i}" for i in range(200)]
    for read in ("lines", "results"):
        job = reader.create_job(read, "h", FP)
        for k in range(40):  # more ranges than one page of them (_RANGE_PAGE)
            assert add_ranged(reader, job.id, 5 * k, ids[5 * k : 5 * k + 5]) == [True] * 5
        if read == "lines":
            batches = reader.iter_result_lines(job.id, "id")
            got = [orjson.loads(x)["id"] for x in next(batches)]
        else:
            batches = iter(reader.iter_results(job.id))
            got = [next(batches)[0]]
        assert writer.items_page(job.id, 0, 10)  # the ranges become item rows
        assert ranged(writer, job.id) == 0
        if read == "lines":
            got += [orjson.loads(x)["id"] for batch in batches for x in batch]
        else:
            got += [r[0] for r in batches]
        assert got == ids, read
        assert writer.counts(job.id).by_state == {"succeeded": 200}
    assert reader.add_items(job.id, 200, rows_of(["after"], 201), Cursor(201, 202, 0)) == [True]


def test_counts_while_another_process_turns_ranges_into_rows_count_each_record_once(
    store, monkeypatch
):
    """counts reads item rows, then ranges: the other process's items_page turns every range
    into item rows between the two reads. Read in one snapshot, as exports are; before, the
    count was 0 of 200."""
    reader, writer = store.open(), store.open()
    job = reader.create_job("job", "h", FP)
    for k in range(40):
        assert add_ranged(reader, job.id, 5 * k, [f"r{i}" for i in range(5 * k, 5 * k + 5)])
    fetchall = reader._conn.fetchall

    def between(name, *args):
        rows = fetchall(name, *args)
        if name == "count_states":
            assert writer.items_page(job.id, 0, 10)
        return rows

    monkeypatch.setattr(reader._conn, "fetchall", between)
    assert reader.counts(job.id).by_state == {"succeeded": 200}
    assert ranged(writer, job.id) == 0  # the other process did turn them into rows
    monkeypatch.undo()
    assert reader.counts(job.id).by_state == {"succeeded": 200}


def test_an_input_read_twice_scans_the_ranges_once_a_batch_not_once_a_repeat(store):
    """Each repeated id is confirmed, and its first line found, in the ledger's rows. Per
    repeat, that was a scan of every range of the job: an input file concatenated with itself
    (100,000 lines) took 47 s instead of 0.5 s, and grew with the square of its size. Now
    one batch's repeats are looked up in one pass over the ranges' ids."""
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    ids = [f"r{i}" for i in range(3000)]
    for k in range(0, 3000, 1000):
        assert add_ranged(ledger, job.id, k, ids[k : k + 1000]) == [True] * 1000
    scans = []
    conn = ledger._conn
    fetchall, iterate = conn.fetchall, conn.iterate

    def counted(read, query: str, *params):
        if query.startswith("range"):  # ranges_with_id, range_ids, range_lines
            scans.append(query)
        return read(query, *params)

    conn.fetchall = lambda *a: counted(fetchall, *a)  # type: ignore[method-assign]
    conn.iterate = lambda *a: counted(iterate, *a)  # type: ignore[method-assign]
    for k in range(0, 3000, 1000):  # the file again, its batches on the fast path
        assert add_ranged(ledger, job.id, 3000 + k, ids[k : k + 1000]) == [False] * 1000
    assert len(scans) <= 3 * 2, scans[:5]
    messages = [f.message for f in ledger.iter_failures(job.id)]
    assert len(messages) == 3000
    assert messages[0] == "line 3001: duplicate id 'r0' (first seen on line 1)"
    assert messages[-1] == "line 6000: duplicate id 'r2999' (first seen on line 3000)"
    assert ledger.known_ids(job.id, ids[::2] + ["new"]) == set(ids[::2])
    assert len(scans) <= 3 * 2 + 2, scans[:5]
    assert ledger.counts(job.id).by_state == {"succeeded": 3000}


def test_an_id_longer_than_a_postgresql_index_holds_fails_its_record_alone(store):
    """PostgreSQL's unique index on the ids holds up to ~2,700 bytes an entry: a 9,000-byte
    id made the whole batch's commit fail ("index row requires 9024 bytes"), and every run
    after it again: one record sank the job. It is refused alone now, as an input error
    naming its line; a range (no index) refuses it too, or turning that range into rows
    later would fail. SQLite has no such limit and keeps it."""
    import random
    import string

    rng = random.Random(1)
    long = "".join(rng.choice(string.ascii_letters) for _ in range(9000))  # incompressible
    ledger = store.open()
    job = ledger.create_job("job", "h", FP)
    pg = store.kind == "postgresql"
    assert ledger.add_items(job.id, 0, rows_of(["a", long, "b"]), Cursor(3, 4, 0)) == [
        True,
        not pg,
        True,
    ]
    ids = ["c", long + "x", "d"]
    outcomes = [Outcome(3 + k, "succeeded", res(c), attempts=1) for k, c in enumerate(ids)]
    rows = rows_of(ids, first_line=4)
    assert ledger.add_items(job.id, 3, rows, Cursor(6, 7, 0), outcomes) == [True, not pg, True]
    assert add_ranged(ledger, job.id, 6, ["e", long + "y", "f"]) == [True, not pg, True]
    assert ledger.items_page(job.id, 0, 100)  # ranges into rows: nothing there to fail
    want = {"pending": 2 + (not pg), "succeeded": 4 + 2 * (not pg)}
    assert ledger.counts(job.id).by_state == want
    messages = [f.message for f in ledger.iter_failures(job.id)]
    if pg:
        assert messages == [
            f"line {n}: the id is 9,00{k} bytes long; a PostgreSQL ledger holds ids of"
            " up to 2,600 bytes"
            for n, k in ((2, 0), (5, 1), (8, 1))
        ]
    else:
        assert messages == []
