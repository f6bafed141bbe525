"""The ledger contract. Written once against the `Ledger` interface (overnight.store.base), run
for every implementation: SQLite, and PostgreSQL in a schema of each test's own. No SQL here."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from overnight.records import Cursor, Fingerprint, Row
from overnight.store import ConcurrentIngest, Lease, Ledger, Outcome, SQLiteLedger, open_ledger

FP = Fingerprint(size=123, mtime_ns=456, digest="d" * 32)
NOW = 1_000_000.0


class Store:
    """Opens connections to one store; several connections model several processes."""

    def __init__(self, kind: str, tmp_path: Path, url: str | None = None) -> None:
        self.kind, self.tmp_path = kind, tmp_path
        self.url = url or str(tmp_path / "state" / "ledger.db")
        self.opened: list[Ledger] = []

    def open(self) -> Ledger:
        ledger = open_ledger(self.url)
        self.opened.append(ledger)
        return ledger

    def close(self) -> None:
        for ledger in self.opened:
            ledger.close()


def open_store(request, tmp_path) -> Store:
    if request.param == "postgresql":
        return Store("postgresql", tmp_path, request.getfixturevalue("pg_ledger_url"))
    return Store(request.param, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    s = open_store(request, tmp_path)
    yield s
    s.close()


@pytest.fixture
def ledger(store) -> Ledger:
    return store.open()


def row(line: int, cid: str | None, error: str | None = None, **record) -> Row:
    rec = {"id": cid, **record}
    payload = orjson.dumps(rec)
    if error is not None:
        return Row(line, None, payload, None, error)
    return Row(line, cid, payload, rec, None)


def rows_for(ids: list[str], first_line: int = 1) -> list[Row]:
    return [row(first_line + i, cid, n=i) for i, cid in enumerate(ids)]


def lease_at(owner: str = "owner-a", now: float = NOW, seconds: float = 60.0) -> Lease:
    return Lease(owner, now + seconds, now)


def new_job(ledger: Ledger, name: str = "job", ids: list[str] | None = None):
    job = ledger.create_job(name, "spec-hash", FP)
    if ids:
        ok = ledger.add_items(job.id, 0, rows_for(ids), Cursor(len(ids), len(ids) + 1, 0))
        assert ok == [True] * len(ids)
    return job


def result(value) -> bytes:
    return orjson.dumps({"output": value})


# -- jobs ------------------------------------------------------------------------------------


def test_create_get_delete_job(ledger):
    assert ledger.get_job("job") is None
    job = ledger.create_job("job", "spec-hash", FP)
    assert job.name == "job"
    assert job.spec_hash == "spec-hash"
    assert job.fingerprint == FP
    assert job.cursor == Cursor(0, 1, 0)
    assert job.ingest_done is False
    assert isinstance(job.created_at, float)
    assert ledger.get_job("job") == job

    other = ledger.create_job("other", "h2", FP)
    assert other.id != job.id
    ledger.add_items(other.id, 0, rows_for(["x"]), Cursor(1, 2, 0))
    ledger.add_items(job.id, 0, rows_for(["a", "b"]), Cursor(2, 3, 0))

    ledger.delete_job(job.id)
    assert ledger.get_job("job") is None
    kept = ledger.get_job("other")  # deleting one job leaves the others whole
    assert kept is not None and kept.id == other.id and kept.cursor == Cursor(1, 2, 0)
    assert ledger.counts(other.id).by_state == {"pending": 1}
    # the name can be used again, starting from nothing
    again = ledger.create_job("job", "spec-hash-2", FP)
    assert again.cursor == Cursor(0, 1, 0)
    assert ledger.counts(again.id).by_state == {}
    assert ledger.counts(again.id).rejected == 0


def test_set_fingerprint(ledger):
    job = new_job(ledger)
    fp2 = Fingerprint(1, 2, "e" * 32)
    ledger.set_fingerprint(job.id, fp2)
    assert ledger.get_job("job").fingerprint == fp2


def test_jobs_are_isolated(ledger):
    a = new_job(ledger, "a", ["1", "2"])
    b = new_job(ledger, "b", ["1", "2", "3"])  # the same ids in another job are fine
    assert ledger.counts(a.id).by_state == {"pending": 2}
    assert ledger.counts(b.id).by_state == {"pending": 3}
    items = ledger.lease(b.id, 10, lease_at())
    assert [it.custom_id for it in items] == ["1", "2", "3"]
    assert ledger.counts(a.id).by_state == {"pending": 2}
    ledger.cancel(b.id)
    assert not ledger.is_cancelled(a.id)
    assert ledger.counts(a.id).by_state == {"pending": 2}


# -- lease -----------------------------------------------------------------------------------


def test_lease_in_seq_order_and_marks_leased(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d", "e"])
    items = ledger.lease(job.id, 3, lease_at())
    assert [(it.seq, it.custom_id, it.line, it.attempts) for it in items] == [
        (0, "a", 1, 0),
        (1, "b", 2, 0),
        (2, "c", 3, 0),
    ]
    assert orjson.loads(items[1].payload) == {"id": "b", "n": 1}
    assert ledger.counts(job.id).by_state == {"leased": 3, "pending": 2}
    assert ledger.lease_owners(job.id) == ["owner-a"]


def test_second_lease_skips_leased_items(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d", "e"])
    first = ledger.lease(job.id, 3, lease_at("owner-a"))
    second = ledger.lease(job.id, 3, lease_at("owner-b"))
    third = ledger.lease(job.id, 3, lease_at("owner-c"))
    assert [it.seq for it in first] == [0, 1, 2]
    assert [it.seq for it in second] == [3, 4]
    assert third == []
    assert sorted(ledger.lease_owners(job.id)) == ["owner-a", "owner-b"]


def test_lease_from_a_second_connection_sees_the_same_queue(store, ledger):
    job = new_job(ledger, ids=["a", "b", "c"])
    other = store.open()
    got = other.lease(job.id, 2, lease_at("owner-b"))
    assert [it.seq for it in got] == [0, 1]
    assert [it.seq for it in ledger.lease(job.id, 5, lease_at("owner-a"))] == [2]


# -- complete --------------------------------------------------------------------------------


def test_complete_by_owner_commits_results(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d"])
    ledger.lease(job.id, 4, lease_at())
    n = ledger.complete(
        job.id,
        "owner-a",
        [
            Outcome(0, "succeeded", result("A")),
            Outcome(1, "failed", None, "ValueError", "bad b"),
            Outcome(2, "invalid", None, "schema_error", "schema: output: wrong"),
        ],
        NOW + 1,
    )
    assert n == 3
    assert ledger.counts(job.id).by_state == {
        "succeeded": 1,
        "failed": 1,
        "invalid": 1,
        "leased": 1,
    }
    assert list(ledger.iter_results(job.id)) == [("a", result("A"), None, None)]
    fails = list(ledger.iter_failures(job.id))
    assert [
        (f.custom_id, f.line, f.state, f.error_class, f.message, f.attempts) for f in fails
    ] == [
        ("b", 2, "failed", "ValueError", "bad b", 1),
        ("c", 3, "invalid", "schema_error", "schema: output: wrong", 1),
    ]


def test_complete_by_non_owner_changes_nothing(store, ledger):
    job = new_job(ledger, ids=["a", "b"])
    ledger.lease(job.id, 2, lease_at("owner-a"))
    intruder = store.open()
    n = intruder.complete(job.id, "owner-b", [Outcome(0, "succeeded", result(1))], NOW)
    assert n == 0
    assert ledger.counts(job.id).by_state == {"leased": 2}
    assert list(ledger.iter_results(job.id)) == []


def test_complete_twice_writes_once(ledger):
    job = new_job(ledger, ids=["a"])
    ledger.lease(job.id, 1, lease_at())
    assert ledger.complete(job.id, "owner-a", [Outcome(0, "succeeded", result(1))], NOW) == 1
    assert ledger.complete(job.id, "owner-a", [Outcome(0, "succeeded", result(2))], NOW) == 0
    assert list(ledger.iter_results(job.id)) == [("a", result(1), None, None)]


def test_complete_of_an_unleased_item_changes_nothing(ledger):
    job = new_job(ledger, ids=["a"])
    assert ledger.complete(job.id, "owner-a", [Outcome(0, "succeeded", result(1))], NOW) == 0
    assert ledger.counts(job.id).by_state == {"pending": 1}


def test_pending_outcome_waits_for_not_before(ledger):
    job = new_job(ledger, ids=["a", "b"])
    ledger.lease(job.id, 2, lease_at())
    n = ledger.complete(
        job.id,
        "owner-a",
        [
            Outcome(0, "pending", None, "TransientError", "try later", not_before=NOW + 100),
            Outcome(1, "succeeded", result("B")),
        ],
        NOW,
    )
    assert n == 2
    assert ledger.counts(job.id).by_state == {"pending": 1, "succeeded": 1}
    assert ledger.next_due(job.id) == NOW + 100
    assert ledger.lease(job.id, 10, lease_at(now=NOW + 50)) == []
    items = ledger.lease(job.id, 10, lease_at(now=NOW + 100.5))
    assert [(it.seq, it.attempts) for it in items] == [(0, 1)]
    assert ledger.next_due(job.id) is None


def test_next_due_of_fresh_items_is_not_in_the_future(ledger):
    job = new_job(ledger, ids=["a"])
    due = ledger.next_due(job.id)
    assert due is not None and due <= NOW
    ledger.lease(job.id, 1, lease_at())
    assert ledger.next_due(job.id) is None


# -- expiry, release, renew ------------------------------------------------------------------


def test_reclaim_expired(ledger):
    job = new_job(ledger, ids=["a", "b", "c"])
    ledger.lease(job.id, 2, lease_at("owner-a", NOW, seconds=60))
    assert ledger.reclaim_expired(job.id, NOW + 30) == 0
    assert ledger.counts(job.id).by_state == {"leased": 2, "pending": 1}
    assert ledger.reclaim_expired(job.id, NOW + 61) == 2
    assert ledger.counts(job.id).by_state == {"pending": 3}
    assert ledger.lease_owners(job.id) == []
    items = ledger.lease(job.id, 10, lease_at("owner-b", NOW + 62))
    assert [(it.seq, it.attempts) for it in items] == [(0, 0), (1, 0), (2, 0)]
    # the old owner can no longer commit
    assert ledger.complete(job.id, "owner-a", [Outcome(0, "succeeded", result(1))], NOW) == 0


def test_release_all_of_an_owner(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d"])
    ledger.lease(job.id, 2, lease_at("owner-a"))
    ledger.lease(job.id, 2, lease_at("owner-b"))
    assert ledger.release(job.id, "owner-a") == 2
    assert ledger.counts(job.id).by_state == {"pending": 2, "leased": 2}
    assert ledger.lease_owners(job.id) == ["owner-b"]
    assert ledger.release(job.id, "nobody") == 0
    again = ledger.lease(job.id, 10, lease_at("owner-c"))
    assert [(it.seq, it.attempts) for it in again] == [(0, 0), (1, 0)]


def test_release_some_seqs(ledger):
    job = new_job(ledger, ids=["a", "b", "c"])
    ledger.lease(job.id, 3, lease_at("owner-a"))
    assert ledger.release(job.id, "owner-b", [0]) == 0  # not the owner
    assert ledger.release(job.id, "owner-a", [0, 2]) == 2
    assert ledger.counts(job.id).by_state == {"pending": 2, "leased": 1}
    assert [it.seq for it in ledger.lease(job.id, 10, lease_at("owner-b"))] == [0, 2]


def test_renew(ledger):
    job = new_job(ledger, ids=["a", "b"])
    ledger.lease(job.id, 2, lease_at("owner-a", NOW, seconds=10))
    assert ledger.renew(job.id, "owner-b", NOW + 1000) == 0
    assert ledger.renew(job.id, "owner-a", NOW + 100) == 2
    assert ledger.reclaim_expired(job.id, NOW + 50) == 0
    assert ledger.counts(job.id).by_state == {"leased": 2}
    assert ledger.reclaim_expired(job.id, NOW + 101) == 2


# -- ingest ----------------------------------------------------------------------------------


def test_add_items_with_outcomes_inserts_final_states(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = rows_for(["a", "b", "c", "d"])
    outcomes = [
        Outcome(0, "succeeded", result("A")),
        Outcome(1, "failed", None, "ValueError", "bad"),
        Outcome(2, "invalid", None, "schema_error", "nope"),
        Outcome(3, "pending", None, "TransientError", "later", not_before=NOW + 10),
    ]
    assert ledger.add_items(job.id, 0, rows, Cursor(4, 5, 0), outcomes) == [True] * 4
    counts = ledger.counts(job.id)
    assert counts.by_state == {"succeeded": 1, "failed": 1, "invalid": 1, "pending": 1}
    assert list(ledger.iter_results(job.id, with_payload=True)) == [
        ("a", result("A"), rows[0].payload, None)
    ]
    fails = [
        (f.custom_id, f.state, f.error_class, f.message, f.attempts)
        for f in ledger.iter_failures(job.id)
    ]
    assert fails == [
        ("b", "failed", "ValueError", "bad", 1),
        ("c", "invalid", "schema_error", "nope", 1),
    ]
    assert ledger.next_due(job.id) == NOW + 10
    items = ledger.lease(job.id, 10, lease_at(now=NOW + 11))
    assert [(it.seq, it.custom_id, it.attempts) for it in items] == [(3, "d", 1)]


def test_add_items_all_succeeded(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = rows_for(["a", "b"])
    outcomes = [Outcome(0, "succeeded", result(1)), Outcome(1, "succeeded", result(2))]
    assert ledger.add_items(job.id, 0, rows, Cursor(2, 3, 0), outcomes) == [True, True]
    assert list(ledger.iter_results(job.id)) == [
        ("a", result(1), None, None),
        ("b", result(2), None, None),
    ]
    assert ledger.lease(job.id, 10, lease_at()) == []


def test_add_succeeded_inserts_results_moves_the_cursor_and_refuses_repeated_ids(store, ledger):
    job = ledger.create_job("job", "h", FP)
    rows = [row(1, "a"), row(2, "b"), row(3, "a", t="again")]
    results = [result(1), result(2), result(3)]
    assert ledger.add_succeeded(job.id, 0, rows, Cursor(3, 4, 30), results) == [True, True, False]
    assert ledger.get_job("job").cursor == Cursor(3, 4, 30)
    assert list(ledger.iter_results(job.id)) == [
        ("a", result(1), None, None),
        ("b", result(2), None, None),
    ]
    c = ledger.counts(job.id)
    assert c.by_state == {"succeeded": 2} and c.rejected == 1
    assert [(f.line, f.custom_id) for f in ledger.iter_failures(job.id)] == [(3, "a")]
    assert ledger.lease(job.id, 10, lease_at()) == []  # finished, nothing to lease
    assert ledger.finished_since(job.id, 0.0) == 2  # finished now, as add_items' outcomes
    with pytest.raises(ConcurrentIngest):  # another runner moved the cursor first
        store.open().add_succeeded(job.id, 0, [row(1, "x")], Cursor(1, 2, 10), [result(0)])
    assert ledger.get_job("job").cursor == Cursor(3, 4, 30)


def test_duplicates_are_rejected_first_wins(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = [row(1, "a", t="first"), row(2, "b"), row(3, "a", t="second")]
    assert ledger.add_items(job.id, 0, rows, Cursor(3, 4, 0)) == [True, True, False]
    # across calls too
    more = [row(4, "b", t="again"), row(5, "c")]
    assert ledger.add_items(job.id, 3, more, Cursor(5, 6, 0)) == [False, True]
    counts = ledger.counts(job.id)
    assert counts.by_state == {"pending": 3}
    assert counts.rejected == 2
    items = ledger.lease(job.id, 10, lease_at())
    assert [(it.seq, it.custom_id, it.line) for it in items] == [
        (0, "a", 1),
        (1, "b", 2),
        (4, "c", 5),
    ]
    assert orjson.loads(items[0].payload)["t"] == "first"
    fails = list(ledger.iter_failures(job.id))
    assert [(f.custom_id, f.line, f.state, f.error_class, f.attempts) for f in fails] == [
        ("a", 3, "failed", "input_error", 0),
        ("b", 4, "failed", "input_error", 0),
    ]
    assert "duplicate id" in fails[0].message
    assert "line 3" in fails[0].message and "line 1" in fails[0].message
    assert "line 4" in fails[1].message and "line 2" in fails[1].message


def test_duplicates_with_outcomes(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = [row(1, "a"), row(2, "a")]
    outcomes = [Outcome(0, "succeeded", result(1)), Outcome(1, "succeeded", result(2))]
    assert ledger.add_items(job.id, 0, rows, Cursor(2, 3, 0), outcomes) == [True, False]
    assert list(ledger.iter_results(job.id)) == [("a", result(1), None, None)]
    assert ledger.counts(job.id).rejected == 1
    assert [f.line for f in ledger.iter_failures(job.id)] == [2]


def test_rows_with_errors_become_input_errors(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = [row(1, "a"), row(2, None, "line 2: malformed JSON"), row(3, "c")]
    assert ledger.add_items(job.id, 0, rows, Cursor(3, 4, 0)) == [True, False, True]
    counts = ledger.counts(job.id)
    assert counts.by_state == {"pending": 2}
    assert counts.rejected == 1
    assert counts.total == 3
    assert counts.failed == 1
    fails = list(ledger.iter_failures(job.id))
    assert [
        (f.custom_id, f.line, f.state, f.error_class, f.message, f.attempts) for f in fails
    ] == [(None, 2, "failed", "input_error", "line 2: malformed JSON", 0)]
    # seq numbers still follow input positions
    assert [it.seq for it in ledger.lease(job.id, 10, lease_at())] == [0, 2]


def test_rows_with_errors_and_outcomes(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = [row(1, None, "line 1: not a JSON object"), row(2, "b")]
    outcomes = [Outcome(1, "succeeded", result("B"))]  # one per readable row
    assert ledger.add_items(job.id, 0, rows, Cursor(2, 3, 0), outcomes) == [False, True]
    assert list(ledger.iter_results(job.id)) == [("b", result("B"), None, None)]
    assert [(f.line, f.error_class) for f in ledger.iter_failures(job.id)] == [(1, "input_error")]


def test_add_items_with_wrong_first_seq_raises_and_changes_nothing(store, ledger):
    job = ledger.create_job("job", "h", FP)
    ledger.add_items(job.id, 0, rows_for(["a", "b"]), Cursor(2, 3, 20))
    with pytest.raises(ConcurrentIngest):
        ledger.add_items(job.id, 0, rows_for(["x", "y"], 1), Cursor(2, 3, 20))
    other = store.open()
    with pytest.raises(ConcurrentIngest):
        other.add_items(job.id, 5, rows_for(["z"], 6), Cursor(6, 7, 60))
    with pytest.raises(ConcurrentIngest):
        other.add_items(job.id, 1, [row(2, None, "line 2: bad")], Cursor(2, 3, 30), [])
    assert ledger.get_job("job").cursor == Cursor(2, 3, 20)
    counts = ledger.counts(job.id)
    assert counts.by_state == {"pending": 2}
    assert counts.rejected == 0
    assert [it.custom_id for it in ledger.lease(job.id, 10, lease_at())] == ["a", "b"]


def test_ingest_cursor_and_finish(store, ledger):
    job = ledger.create_job("job", "h", FP)
    ledger.add_items(job.id, 0, rows_for(["a", "b", "c"]), Cursor(3, 5, 42))
    assert ledger.get_job("job").cursor == Cursor(3, 5, 42)
    assert ledger.get_job("job").ingest_done is False
    ledger.add_items(job.id, 3, rows_for(["d"], 6), Cursor(4, 7, 50))
    ledger.finish_ingest(job.id)
    seen = store.open().get_job("job")  # durable: another connection sees it
    assert seen.cursor == Cursor(4, 7, 50)
    assert seen.ingest_done is True


def test_add_items_empty_chunk_moves_cursor(ledger):
    job = ledger.create_job("job", "h", FP)
    assert ledger.add_items(job.id, 0, [], Cursor(0, 4, 3)) == []
    assert ledger.get_job("job").cursor == Cursor(0, 4, 3)


# -- reading ---------------------------------------------------------------------------------


def test_counts_by_state_and_rejected(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = rows_for(["a", "b", "c", "d", "e", "f"]) + [row(7, None, "line 7: bad")]
    ledger.add_items(job.id, 0, rows, Cursor(7, 8, 0))
    ledger.lease(job.id, 4, lease_at())
    ledger.complete(
        job.id,
        "owner-a",
        [
            Outcome(0, "succeeded", result(0)),
            Outcome(1, "failed", None, "E", "m"),
            Outcome(2, "invalid", None, "schema_error", "m"),
        ],
        NOW,
    )
    c = ledger.counts(job.id)
    assert c.by_state == {"succeeded": 1, "failed": 1, "invalid": 1, "leased": 1, "pending": 2}
    assert c.rejected == 1
    assert c["succeeded"] == 1
    assert c["cancelled"] == 0
    assert c.total == 7
    assert c.failed == 2
    assert c.open == 3


def test_counts_add_up_usage_and_times_over_every_state(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d"])
    ledger.lease(job.id, 3, lease_at(now=NOW))
    paid = Outcome(0, "succeeded", result(0), input_tokens=10, output_tokens=5, cost=0.5)
    ledger.complete(job.id, "owner-a", [paid._replace(list_cost=1.0)], NOW + 1)
    failed = Outcome(1, "failed", None, "E", "m", input_tokens=3, output_tokens=1, cost=0.25)
    ledger.complete(job.id, "owner-a", [failed._replace(list_cost=0.5)], NOW + 2)
    c = ledger.counts(job.id)
    assert c.by_state == {"succeeded": 1, "failed": 1, "leased": 1, "pending": 1}
    assert (c.input_tokens, c.output_tokens) == (13, 6)
    assert c.cost == pytest.approx(0.75) and c.list_cost == pytest.approx(1.5)
    assert c.first_started == NOW and c.last_finished == NOW + 2
    empty = ledger.counts(ledger.create_job("empty", "h", FP).id)
    assert empty.by_state == {} and empty.first_started is None and empty.cost == 0.0


def test_iter_results_in_input_order(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d"])
    ledger.lease(job.id, 4, lease_at())
    # committed out of order; d fails
    ledger.complete(job.id, "owner-a", [Outcome(2, "succeeded", result("C"))], NOW)
    ledger.complete(job.id, "owner-a", [Outcome(3, "failed", None, "E", "x")], NOW)
    ledger.complete(
        job.id,
        "owner-a",
        [Outcome(1, "succeeded", result("B")), Outcome(0, "succeeded", result("A"))],
        NOW,
    )
    assert list(ledger.iter_results(job.id)) == [
        ("a", result("A"), None, None),
        ("b", result("B"), None, None),
        ("c", result("C"), None, None),
    ]
    with_payload = list(ledger.iter_results(job.id, with_payload=True))
    assert [(cid, orjson.loads(p)) for cid, _, p, _ in with_payload] == [
        ("a", {"id": "a", "n": 0}),
        ("b", {"id": "b", "n": 1}),
        ("c", {"id": "c", "n": 2}),
    ]


def test_iter_result_lines(ledger):
    job = ledger.create_job("job", "h", FP)
    ledger.add_items(
        job.id,
        0,
        rows_for(["a", 'q"x', "é\\\t\u2028☃"]),
        Cursor(3, 4, 0),
        [
            Outcome(0, "succeeded", result(1)),
            Outcome(1, "succeeded", result([1, 2])),
            Outcome(2, "succeeded", result("ü")),
        ],
    )
    lines = [line for batch in ledger.iter_result_lines(job.id, "ticket") for line in batch]
    assert [orjson.loads(x) for x in lines] == [
        {"ticket": "a", "output": 1},
        {"ticket": 'q"x', "output": [1, 2]},
        {"ticket": "é\\\t\u2028☃", "output": "ü"},
    ]
    assert all(x.endswith(b"\n") for x in lines)


def test_iter_failures_merges_items_and_rejects_in_input_order(ledger):
    job = ledger.create_job("job", "h", FP)
    rows = [
        row(1, "a"),
        row(2, None, "line 2: malformed JSON"),
        row(3, "b"),
        row(4, "a"),  # duplicate
        row(5, "c"),
    ]
    ledger.add_items(job.id, 0, rows, Cursor(5, 6, 0))
    ledger.lease(job.id, 10, lease_at())
    ledger.complete(
        job.id,
        "owner-a",
        [
            Outcome(0, "failed", None, "ValueError", "no a"),
            Outcome(2, "invalid", None, "schema_error", "b is wrong"),
            Outcome(4, "succeeded", result("C")),
        ],
        NOW,
    )
    fails = list(ledger.iter_failures(job.id))
    assert [(f.custom_id, f.line, f.state, f.error_class) for f in fails] == [
        ("a", 1, "failed", "ValueError"),
        (None, 2, "failed", "input_error"),
        ("b", 3, "invalid", "schema_error"),
        ("a", 4, "failed", "input_error"),
    ]
    assert [f.attempts for f in fails] == [1, 0, 1, 0]


# -- user actions ----------------------------------------------------------------------------


def _finish_mixed(ledger, job_id):
    ledger.lease(job_id, 10, lease_at())
    ledger.complete(
        job_id,
        "owner-a",
        [
            Outcome(0, "succeeded", result("A")),
            Outcome(1, "failed", None, "E", "x"),
            Outcome(2, "invalid", None, "schema_error", "y"),
            Outcome(3, "failed", None, "E", "z"),
        ],
        NOW,
    )


def test_retry_failed_only(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d"])
    _finish_mixed(ledger, job.id)
    assert ledger.retry(job.id, ("failed",)) == 2
    assert ledger.counts(job.id).by_state == {"succeeded": 1, "pending": 2, "invalid": 1}
    items = ledger.lease(job.id, 10, lease_at("owner-b", NOW + 1))
    assert [(it.seq, it.attempts) for it in items] == [(1, 0), (3, 0)]
    assert [f.custom_id for f in ledger.iter_failures(job.id)] == ["c"]


def test_retry_failed_and_invalid(ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d"])
    _finish_mixed(ledger, job.id)
    assert ledger.retry(job.id, ("failed", "invalid")) == 3
    assert ledger.counts(job.id).by_state == {"succeeded": 1, "pending": 3}
    assert list(ledger.iter_failures(job.id)) == []
    items = ledger.lease(job.id, 10, lease_at("owner-b", NOW + 1))
    assert [(it.seq, it.attempts) for it in items] == [(1, 0), (2, 0), (3, 0)]
    assert ledger.retry(job.id, ("failed", "invalid")) == 0


def test_retry_does_not_touch_rejects(ledger):
    job = ledger.create_job("job", "h", FP)
    ledger.add_items(job.id, 0, [row(1, None, "line 1: bad")], Cursor(1, 2, 0))
    assert ledger.retry(job.id, ("failed", "invalid")) == 0
    assert ledger.counts(job.id).rejected == 1


def test_retry_of_a_transient_backoff_resets_not_before(ledger):
    job = new_job(ledger, ids=["a"])
    ledger.lease(job.id, 1, lease_at())
    later = NOW + 1000  # a transient error: back to pending, not due before `later`
    ledger.complete(job.id, "owner-a", [Outcome(0, "pending", None, "E", "x", later)], NOW)
    assert ledger.lease(job.id, 1, lease_at(now=NOW + 1)) == []  # not due yet
    assert ledger.next_due(job.id) == later
    (item,) = ledger.lease(job.id, 1, lease_at(now=later + 1))  # due: leased, then it fails
    ledger.complete(job.id, "owner-a", [Outcome(0, "failed", None, "E", "gave up")], later + 1)
    assert ledger.retry(job.id, ("failed",)) == 1
    # due at once, not at `later`; attempts start over
    (again,) = ledger.lease(job.id, 1, lease_at(now=NOW))
    assert again.seq == 0 and again.attempts == 0


def test_cancel_and_reopen(store, ledger):
    job = new_job(ledger, ids=["a", "b", "c", "d"])
    ledger.lease(job.id, 2, lease_at("owner-a"))
    ledger.complete(job.id, "owner-a", [Outcome(0, "succeeded", result("A"))], NOW)
    assert not ledger.is_cancelled(job.id)

    other = store.open()  # `overnight cancel` runs in another process
    assert other.cancel(job.id) == 3  # b (leased), c, d (pending)
    assert ledger.is_cancelled(job.id)
    assert ledger.counts(job.id).by_state == {"succeeded": 1, "cancelled": 3}
    assert ledger.counts(job.id).open == 0
    assert ledger.lease(job.id, 10, lease_at()) == []
    assert ledger.lease_owners(job.id) == []
    # the runner that held b can no longer commit it
    assert ledger.complete(job.id, "owner-a", [Outcome(1, "succeeded", result("B"))], NOW) == 0

    assert ledger.reopen(job.id) == 3
    assert not other.is_cancelled(job.id)
    assert ledger.counts(job.id).by_state == {"succeeded": 1, "pending": 3}
    items = ledger.lease(job.id, 10, lease_at("owner-b", NOW + 1))
    assert [it.seq for it in items] == [1, 2, 3]
    assert list(ledger.iter_results(job.id)) == [("a", result("A"), None, None)]


def test_cancel_keeps_finished_items(ledger):
    job = new_job(ledger, ids=["a", "b"])
    _ = ledger.lease(job.id, 2, lease_at())
    ledger.complete(
        job.id,
        "owner-a",
        [Outcome(0, "succeeded", result(1)), Outcome(1, "failed", None, "E", "x")],
        NOW,
    )
    assert ledger.cancel(job.id) == 0
    assert ledger.is_cancelled(job.id)
    assert ledger.counts(job.id).by_state == {"succeeded": 1, "failed": 1}
    assert ledger.reopen(job.id) == 0
    assert ledger.counts(job.id).by_state == {"succeeded": 1, "failed": 1}


# -- claims: one run per job ----------------------------------------------------------------


def test_claims_one_owner_at_a_time(store, ledger):
    other = store.open()  # another process
    held = ledger.claim("job", "a", NOW, NOW + 60)
    assert (held.owner, held.since, held.expires) == ("a", NOW, NOW + 60)
    assert other.claim("job", "b", NOW + 1, NOW + 61).owner == "a"  # refused: a holds it
    assert other.claim("other-job", "b", NOW, NOW + 60).owner == "b"  # per job name
    assert ledger.claim("job", "a", NOW + 2, NOW + 62).owner == "a"  # a again: still a's
    assert ledger.renew_claim("job", "a", NOW + 90)
    assert not other.renew_claim("job", "b", NOW + 90)  # b never held it
    assert other.get_claim("job").expires == NOW + 90
    # taken over when it expired, or from a named (dead) owner
    assert other.claim("job", "b", NOW + 91, NOW + 151).owner == "b"
    assert ledger.claim("job", "c", NOW + 92, NOW + 152, take_from="x").owner == "b"
    assert ledger.claim("job", "c", NOW + 92, NOW + 152, take_from="b").owner == "c"
    other.release_claim("job", "b")  # b no longer holds it: nothing happens
    assert ledger.get_claim("job").owner == "c"
    ledger.release_claim("job", "c")
    assert ledger.get_claim("job") is None
    # a claim outlives the job's rows (--restart deletes and recreates them)
    job = new_job(ledger)
    ledger.claim("job", "d", NOW, NOW + 60)
    ledger.delete_job(job.id)
    assert ledger.get_claim("job").owner == "d"


def test_runs_record_what_each_run_did(ledger):
    assert ledger.last_run("job") is None
    first = ledger.start_run("job", "a", NOW)
    ledger.update_run(first, NOW + 5, 100, 4.0, 1.0)
    run = ledger.last_run("job")
    assert (run.owner, run.ended_at, run.outcome, run.processed) == ("a", None, None, 100)
    assert run.items_per_second == 25.0
    ledger.update_run(first, NOW + 10, 200, 8.0, 1.0, "finished")
    second = ledger.start_run("job", "b", NOW + 20)
    assert second != first
    assert ledger.last_run("job").owner == "b"
    assert ledger.last_run("other") is None
    ledger.update_run(second, NOW + 21, 0, 0.0, 0.0, "interrupted")
    run = ledger.last_run("job")
    assert (run.ended_at, run.outcome, run.items_per_second) == (NOW + 21, "interrupted", 0.0)


def test_open_runs_are_the_runs_not_ended_in_start_order(ledger):
    """A job's workers (claim.py): every run of it that has not ended, oldest first."""
    assert ledger.open_runs("job") == []
    a = ledger.start_run("job", "a", NOW)
    b = ledger.start_run("job", "b", NOW + 1)
    ledger.start_run("other", "c", NOW + 2)
    ledger.update_run(b, NOW + 3, 7, 1.0, 0.0)  # a heartbeat: still open
    assert [(r.owner, r.updated_at) for r in ledger.open_runs("job")] == [
        ("a", NOW),
        ("b", NOW + 3),
    ]
    ledger.update_run(a, NOW + 4, 0, 0.0, 0.0, "finished")
    assert [r.owner for r in ledger.open_runs("job")] == ["b"]
    assert [r.owner for r in ledger.open_runs("other")] == ["c"]


def test_finished_since_counts_recent_results(ledger):
    job = new_job(ledger, ids=["a", "b", "c"])
    ledger.lease(job.id, 3, lease_at())
    ledger.complete(job.id, "owner-a", [Outcome(0, "succeeded", result(0))], NOW)
    ledger.complete(job.id, "owner-a", [Outcome(1, "failed", None, "E", "x")], NOW + 10)
    assert ledger.finished_since(job.id, NOW) == 2
    assert ledger.finished_since(job.id, NOW + 5) == 1
    assert ledger.finished_since(job.id, NOW + 11) == 0


# -- incremental runs: a new generation replaces the job ------------------------------------


def test_a_new_generation_keeps_unchanged_results_and_replaces_the_job(ledger):
    old = ledger.create_job("job", "spec", FP)
    rows = [row(1, "a", n=1), row(2, "b", n=2), row(3, "c", n=3), row(4, "d", n=4)]
    outcomes = [
        Outcome(0, "succeeded", result("A"), vector=b"\x00\x00\x80?"),
        Outcome(1, "failed", None, "E", "bad b"),
        Outcome(2, "succeeded", result("C")),
        Outcome(3, "pending"),
    ]
    ledger.add_items(old.id, 0, rows, Cursor(4, 5, 0), outcomes)
    ledger.finish_ingest(old.id)
    chunk = ledger.plan_chunk(old.id, "openai", [3], NOW)
    ledger.finish_chunk(old.id, chunk, [Outcome(3, "succeeded", result("D"))], NOW)

    fp2 = Fingerprint(size=1, mtime_ns=2, digest="e" * 32)
    new = ledger.begin_generation(old, fp2)
    assert new.id != old.id and new.name != "job" and new.spec_hash == "spec"
    assert (new.token, new.created_at) == (old.token, old.created_at)  # the same job
    assert ledger.get_job("job").id == old.id  # the job is untouched until the swap
    # c changed, a moved after b, e is new, d is gone
    rows2 = [row(1, "b", n=2), row(2, "a", n=1), row(3, "c", n=30), row(4, "e", n=5)]
    ledger.add_items(new.id, 0, rows2, Cursor(4, 5, 0))
    ledger.finish_ingest(new.id)
    kept, gone = ledger.carry_results(old.id, new.id)
    assert (kept, gone) == (2, 1)  # a and b kept (b stays failed); d gone
    job = ledger.replace_generation(old, new)
    assert job.id == new.id and job.name == "job" and job.fingerprint == fp2
    assert ledger.get_job(new.name) is None
    assert ledger.counts(job.id).by_state == {"failed": 1, "succeeded": 1, "pending": 2}
    assert list(ledger.iter_results(job.id)) == [("a", result("A"), None, b"\x00\x00\x80?")]
    assert [f.custom_id for f in ledger.iter_failures(job.id)] == ["b"]
    assert [c.chunk for c in ledger.chunks(job.id)] == [chunk]  # the batch history moved
    assert ledger.counts(old.id).total == 0
    assert [it.custom_id for it in ledger.lease(job.id, 10, lease_at())] == ["c", "e"]


def test_a_stale_generation_is_dropped_when_a_new_one_begins(ledger):
    old = ledger.create_job("job", "spec", FP)
    first = ledger.begin_generation(old, FP)
    ledger.add_items(first.id, 0, rows_for(["x"]), Cursor(1, 2, 0))
    second = ledger.begin_generation(old, FP)  # the run that began `first` died
    assert ledger.counts(first.id).total == 0
    assert ledger.get_job(second.name).id == second.id
    assert ledger.counts(second.id).total == 0


def test_reject_lines_in_input_order(ledger):
    job = ledger.create_job("job", "spec", FP)
    rows = [row(1, "a"), row(2, None, error="line 2: bad"), row(5, None, error="line 5: bad")]
    ledger.add_items(job.id, 0, rows, Cursor(3, 6, 0))
    assert ledger.reject_lines(job.id, 10) == [2, 5]
    assert ledger.reject_lines(job.id, 1) == [2]


def test_vectors_round_trip_through_complete(ledger):
    job = new_job(ledger, ids=["a"])
    ledger.lease(job.id, 1, lease_at())
    vec = b"\x01\x02\x03\x04" * 3
    ledger.complete(job.id, "owner-a", [Outcome(0, "succeeded", result("A"), vector=vec)], NOW)
    assert list(ledger.iter_results(job.id)) == [("a", result("A"), None, vec)]
    ledger.retry(job.id, ("succeeded",))
    assert list(ledger.iter_results(job.id)) == []


# -- what the database underneath does wrong: LedgerError (exit 2), never its own errors ----


def test_a_deleted_ledger_file_is_refused_before_the_next_write(tmp_path):
    from overnight.store import LedgerError

    ledger = SQLiteLedger(tmp_path / "state" / "ledger.db")
    job = new_job(ledger, ids=["a"])
    for f in (tmp_path / "state").glob("ledger.db*"):
        f.unlink()
    with pytest.raises(LedgerError, match="deleted or replaced"):
        ledger.lease(job.id, 1, lease_at())


def test_a_file_that_is_not_a_ledger_is_a_ledger_error(tmp_path):
    from overnight.store import LedgerError

    path = tmp_path / "ledger.db"
    path.write_bytes(b"not sqlite at all" * 200)
    with pytest.raises(LedgerError, match="not an overnight ledger"):
        SQLiteLedger(path)


def test_fresh_outcomes_keep_their_attempts_and_vectors(ledger):
    """A cache hit is 0 requests, a retried answer several: each is stored as counted, and a
    row is never dropped silently whatever its outcome holds."""
    job = ledger.create_job("job", "spec", FP)
    outcomes = [
        Outcome(0, "succeeded", result("A"), attempts=0),  # from the cache: nothing sent
        Outcome(1, "succeeded", result("B"), attempts=3),
        Outcome(2, "succeeded", result("C"), vector=b"\x00" * 8),
        Outcome(3, "failed", None, "E", "x", attempts=2),
    ]
    assert ledger.add_items(job.id, 0, rows_for(["a", "b", "c", "d"]), Cursor(4, 5, 0), outcomes)
    assert ledger.counts(job.id).by_state == {"succeeded": 3, "failed": 1}
    assert [(f.custom_id, f.attempts) for f in ledger.iter_failures(job.id)] == [("d", 2)]
    assert [r[3] for r in ledger.iter_results(job.id)] == [None, None, b"\x00" * 8]


# -- several workers on one ledger ----------------------------------------------------------


def test_workers_leasing_at_once_never_get_the_same_item(store, ledger):
    """Four connections (four workers) lease from threads at once until the queue is empty:
    every item is leased exactly once (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the
    write lock)."""
    import threading

    ids = [f"r{i}" for i in range(400)]
    job = new_job(ledger, ids=ids)
    workers = [store.open() for _ in range(4)]
    got: list[list[str]] = [[] for _ in workers]
    start = threading.Barrier(len(workers))

    def work(i: int) -> None:
        start.wait()
        while items := workers[i].lease(job.id, 7, lease_at(f"owner-{i}")):
            got[i].extend(it.custom_id for it in items)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    leased = [cid for g in got for cid in g]
    assert sorted(leased) == sorted(ids)  # each once, none lost
    assert ledger.counts(job.id).by_state == {"leased": 400}


def test_ingest_and_completion_from_two_connections_commit_once(store, ledger):
    """Two workers complete the same leased items: only the lease holder's outcome lands."""
    job = new_job(ledger, ids=["a", "b", "c"])
    other = store.open()
    items = ledger.lease(job.id, 3, lease_at("owner-a"))
    ok = [Outcome(it.seq, "succeeded", result(it.custom_id)) for it in items]
    assert other.complete(job.id, "owner-b", ok, NOW) == 0
    assert ledger.complete(job.id, "owner-a", ok, NOW) == 3
    assert other.complete(job.id, "owner-a", ok, NOW) == 0
    assert other.counts(job.id).by_state == {"succeeded": 3}


# -- schema migrations ---------------------------------------------------------------------


def test_a_new_ledger_records_its_schema_version_and_reopening_keeps_it(store, ledger):
    version = ledger.schema_version
    assert version >= 1
    job = new_job(ledger, ids=["a"])
    again = store.open()
    assert again.schema_version == version
    assert again.get_job("job").token == job.token


def test_connections_creating_one_ledger_at_once_migrate_it_once(store):
    """Eight connections open a ledger that does not exist yet, from threads at once: each
    sees it at the latest version, and every later write works (no half-made schema)."""
    import threading

    opened: list[Ledger] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    lock = threading.Lock()

    def open_one() -> None:
        start.wait()
        try:
            ledger = store.open()
        except BaseException as exc:  # reported below
            errors.append(exc)
            return
        with lock:
            opened.append(ledger)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(opened) == 8
    assert {ledger.schema_version for ledger in opened} == {opened[0].schema_version}
    new_job(opened[3], ids=["a", "b"])
    assert opened[5].counts(opened[5].get_job("job").id).by_state == {"pending": 2}


def test_a_message_with_a_nul_character_is_stored(ledger):
    """A user function's error text may hold NUL (PostgreSQL's text cannot): the outcome is
    committed all the same, never a failed commit."""
    job = new_job(ledger, ids=["a"])
    (item,) = ledger.lease(job.id, 1, lease_at())
    boom = Outcome(item.seq, "failed", None, "ValueError", "bad\x00byte")
    assert ledger.complete(job.id, "owner-a", [boom], NOW) == 1
    (failure,) = ledger.iter_failures(job.id)
    assert failure.message.startswith("bad") and failure.message.endswith("byte")
