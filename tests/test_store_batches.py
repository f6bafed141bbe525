"""The ledger contract for remote (provider) batches: the `# remote batches` block of the
`Ledger` interface. Same fixtures and rules as tests/test_store_contract.py: interface only,
no SQL, run for every implementation.

The guarantees the batch runner builds on:
- planning a chunk moves its items pending → submitted in the same transaction that records
  the chunk as `creating`: an item is never in two chunks, never leased while in one;
- collecting is idempotent: only items still `submitted` in that chunk are written;
- items without a result go back to pending (one attempt counted) or to cancelled."""

from __future__ import annotations

import re
import sqlite3

import orjson
import pytest
from test_store_contract import FP, NOW, lease_at, new_job, open_store, result

from overnight.store import Ledger, Outcome, SQLiteLedger


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    s = open_store(request, tmp_path)
    yield s
    s.close()


@pytest.fixture
def ledger(store) -> Ledger:
    return store.open()


IDS = ["a", "b", "c", "d", "e"]


def states(ledger: Ledger, job_id: int) -> dict[str, int]:
    return ledger.counts(job_id).by_state


# -- pending pages -----------------------------------------------------------------------


def test_pending_page_in_input_order_after_a_seq(ledger):
    job = new_job(ledger, ids=IDS)
    page = ledger.pending_page(job.id, -1, 3, NOW)
    assert [(it.seq, it.custom_id, it.line, it.attempts) for it in page] == [
        (0, "a", 1, 0),
        (1, "b", 2, 0),
        (2, "c", 3, 0),
    ]
    assert orjson.loads(page[0].payload) == {"id": "a", "n": 0}
    assert page[0].follow_up is None
    assert [it.seq for it in ledger.pending_page(job.id, 2, 10, NOW)] == [3, 4]
    assert ledger.pending_page(job.id, 4, 10, NOW) == []
    # reading a page changes nothing (unlike a lease)
    assert states(ledger, job.id) == {"pending": 5}


def test_pending_page_skips_leased_and_not_yet_due(ledger):
    job = new_job(ledger, ids=IDS)
    ledger.lease(job.id, 2, lease_at())  # a, b
    ledger.complete(
        job.id, "owner-a", [Outcome(0, "pending", None, "E", "later", not_before=NOW + 100)], NOW
    )
    assert [it.seq for it in ledger.pending_page(job.id, -1, 10, NOW)] == [2, 3, 4]
    assert [it.seq for it in ledger.pending_page(job.id, -1, 10, NOW + 100)] == [0, 2, 3, 4]


# -- planning a chunk --------------------------------------------------------------------


def test_plan_chunk_marks_items_submitted_and_records_a_creating_chunk(ledger):
    job = new_job(ledger, ids=IDS)
    first = ledger.plan_chunk(job.id, "openai", [0, 1, 2], NOW)
    second = ledger.plan_chunk(job.id, "openai", [3], NOW + 1)
    assert second > first
    assert states(ledger, job.id) == {"submitted": 4, "pending": 1}
    assert ledger.counts(job.id).open == 5  # submitted items are still open work
    chunks = ledger.chunks(job.id)
    assert [(c.chunk, c.status, c.remote_id, c.requests, c.planned_at) for c in chunks] == [
        (first, "creating", None, 3, NOW),
        (second, "creating", None, 1, NOW + 1),
    ]
    assert chunks[0].provider == "openai" and chunks[0].ended_at is None
    assert [it.seq for it in ledger.chunk_items(job.id, first)] == [0, 1, 2]
    assert [it.custom_id for it in ledger.chunk_items(job.id, second)] == ["d"]


def test_items_in_a_chunk_are_never_leased_paged_or_planned_again(store, ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0, 1, 2], NOW)
    other = store.open()  # another process
    assert [it.seq for it in other.lease(job.id, 10, lease_at("owner-b"))] == [3, 4]
    assert ledger.pending_page(job.id, -1, 10, NOW) == []
    assert other.reclaim_expired(job.id, NOW + 10_000) == 2  # the leases, not the chunk
    again = ledger.plan_chunk(job.id, "openai", [0, 1, 2, 3], NOW)
    assert [it.seq for it in ledger.chunk_items(job.id, again)] == [3]
    assert [it.seq for it in ledger.chunk_items(job.id, chunk)] == [0, 1, 2]


def test_chunks_are_per_job_and_deleted_with_it(ledger):
    one = new_job(ledger, "one", ids=IDS)
    two = new_job(ledger, "two", ids=IDS)
    c1 = ledger.plan_chunk(one.id, "openai", [0], NOW)
    c2 = ledger.plan_chunk(two.id, "anthropic", [0, 1], NOW)
    assert [c.chunk for c in ledger.chunks(one.id)] == [c1]
    assert [(c.chunk, c.provider) for c in ledger.chunks(two.id)] == [(c2, "anthropic")]
    assert [it.custom_id for it in ledger.chunk_items(two.id, c2)] == ["a", "b"]
    ledger.delete_job(one.id)
    assert ledger.chunks(one.id) == []
    assert len(ledger.chunks(two.id)) == 1


def test_plan_chunk_records_no_create_sent_and_tagged_ids(ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "anthropic", [0, 1], NOW)
    (c,) = ledger.chunks(job.id)
    assert (c.chunk, c.create_until, c.tagged) == (chunk, 0.0, True)


def test_set_create_until_is_recorded_before_each_create_and_seen_by_a_rerun(store, ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0, 1], NOW)
    ledger.set_create_until(job.id, chunk, NOW + 120)
    assert store.open().chunks(job.id)[0].create_until == NOW + 120  # another process
    ledger.set_create_until(job.id, chunk, NOW + 300)  # a second attempt
    assert ledger.chunks(job.id)[0].create_until == NOW + 300
    ledger.set_remote(job.id, chunk, "batch_1")
    ledger.set_create_until(job.id, chunk, NOW + 900)  # live: no longer creating, unchanged
    assert ledger.chunks(job.id)[0].create_until == NOW + 300


# -- the job's identity ----------------------------------------------------------------------


def test_every_job_has_its_own_random_token(store, ledger):
    one, two = new_job(ledger, "one"), new_job(ledger, "two")
    assert re.fullmatch(r"[a-z0-9]{10}", one.token) and one.token != two.token
    assert store.open().get_job("one").token == one.token  # kept
    assert one.discarded_before == 0.0
    ledger.delete_job(one.id)  # --restart: the new job is marked differently
    again = ledger.create_job("one", "spec-hash", FP, discarded_before=NOW)
    assert again.token not in (one.token, two.token) and again.discarded_before == NOW


def test_an_old_ledger_gains_tokens_and_keeps_its_chunks_untagged(tmp_path):
    """A ledger written before tokens: its jobs get one when it is opened; the chunks it
    already planned keep the ids they were sent with (untagged, create time unknown).
    SQLite only (a file in the old layout), so not through the `store` fixture."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            spec_hash TEXT NOT NULL, fp_size INTEGER NOT NULL, fp_mtime_ns INTEGER NOT NULL,
            fp_digest TEXT NOT NULL, ingest_records INTEGER NOT NULL DEFAULT 0,
            ingest_line INTEGER NOT NULL DEFAULT 1, ingest_offset INTEGER NOT NULL DEFAULT 0,
            ingest_done INTEGER NOT NULL DEFAULT 0, cancelled INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL);
        CREATE TABLE remote_batches (job_id INTEGER NOT NULL, chunk INTEGER NOT NULL,
            provider TEXT NOT NULL, status TEXT NOT NULL, remote_id TEXT,
            input_file_id TEXT, remote_status TEXT, requests INTEGER NOT NULL, counts TEXT,
            planned_at REAL NOT NULL, ended_at REAL, PRIMARY KEY (job_id, chunk));
        INSERT INTO jobs (name, spec_hash, fp_size, fp_mtime_ns, fp_digest, created_at)
            VALUES ('a', 'h', 1, 1, 'd', 5.0), ('b', 'h', 1, 1, 'd', 6.0);
        INSERT INTO remote_batches (job_id, chunk, provider, status, requests, planned_at)
            VALUES (1, 1, 'openai', 'creating', 3, 7.0);
        """
    )
    db.close()
    opened = [SQLiteLedger(path), SQLiteLedger(path)]  # twice: migrated once
    a, b = opened[1].get_job("a"), opened[0].get_job("b")
    assert re.fullmatch(r"[a-z0-9]{10}", a.token) and a.token != b.token
    assert opened[0].get_job("a").token == a.token
    (c,) = opened[1].chunks(a.id)
    assert (c.status, c.create_until, c.tagged) == ("creating", None, False)
    new = opened[1].plan_chunk(b.id, "openai", [], NOW)
    assert opened[1].chunks(b.id)[0].chunk == new and opened[1].chunks(b.id)[0].tagged
    for ledger in opened:
        ledger.close()


# -- the remote side -----------------------------------------------------------------------


def test_set_remote_makes_a_chunk_live_and_a_second_connection_sees_it(store, ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0, 1], NOW)
    ledger.set_remote(job.id, chunk, "batch_1", "file-1")
    (c,) = store.open().chunks(job.id, ("live",))
    assert (c.chunk, c.status, c.remote_id, c.input_file_id) == (chunk, "live", "batch_1", "file-1")
    assert ledger.chunks(job.id, ("creating",)) == []
    assert len(ledger.chunks(job.id, ("creating", "live"))) == 1


def test_update_chunk_records_the_providers_status_and_counts(ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "anthropic", [0, 1], NOW)
    ledger.set_remote(job.id, chunk, "msgbatch_1")
    ledger.update_chunk(job.id, chunk, "in_progress", {"processing": 2, "succeeded": 0})
    (c,) = ledger.chunks(job.id)
    assert c.status == "live" and c.remote_status == "in_progress"
    assert c.counts == {"processing": 2, "succeeded": 0}
    assert c.to_dict() == {
        "chunk": chunk,
        "provider": "anthropic",
        "remote_id": "msgbatch_1",
        "status": "in_progress",
        "requests": 2,
        "counts": {"processing": 2, "succeeded": 0},
    }


# -- collecting ----------------------------------------------------------------------------


def test_finish_chunk_writes_outcomes_and_returns_the_rest_to_pending(ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0, 1, 2, 3], NOW)
    ledger.set_remote(job.id, chunk, "batch_1")
    outcomes = [
        Outcome(0, "succeeded", result("A"), input_tokens=10, output_tokens=2, cost=0.5),
        Outcome(1, "failed", None, "invalid_request_error", "bad b"),
        Outcome(2, "pending", None, "batch_expired", "expired"),  # for a new batch
        # 3: no line at all → the leftover
    ]
    assert ledger.finish_chunk(job.id, chunk, outcomes, NOW + 5, remote_status="expired") == 3
    assert states(ledger, job.id) == {"succeeded": 1, "failed": 1, "pending": 3}
    (c,) = ledger.chunks(job.id)
    assert (c.status, c.remote_status, c.ended_at) == ("collected", "expired", NOW + 5)
    assert ledger.chunk_items(job.id, chunk) == []
    assert list(ledger.iter_results(job.id)) == [("a", result("A"), None, None)]
    counts = ledger.counts(job.id)
    assert (counts.input_tokens, counts.output_tokens, counts.cost) == (10, 2, 0.5)
    again = ledger.pending_page(job.id, -1, 10, NOW + 5)
    # every item that was in the batch counts one attempt; e never was
    assert [(it.seq, it.attempts) for it in again] == [(2, 1), (3, 1), (4, 0)]
    fails = list(ledger.iter_failures(job.id))
    assert [(f.custom_id, f.error_class, f.message) for f in fails] == [
        ("b", "invalid_request_error", "bad b")
    ]


def test_finish_chunk_twice_writes_nothing_twice(store, ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0, 1], NOW)
    ledger.set_remote(job.id, chunk, "batch_1")
    outcomes = [Outcome(0, "succeeded", result("A"), cost=1.0), Outcome(1, "pending")]
    assert ledger.finish_chunk(job.id, chunk, outcomes, NOW) == 2
    # a crash after the commit, then the rerun collects the same results again
    rerun = store.open()
    later = [Outcome(0, "succeeded", result("X"), cost=1.0), Outcome(1, "succeeded", result(1))]
    assert rerun.finish_chunk(job.id, chunk, later, NOW + 1) == 0
    assert list(ledger.iter_results(job.id)) == [("a", result("A"), None, None)]
    assert states(ledger, job.id) == {"succeeded": 1, "pending": 4}
    assert ledger.counts(job.id).cost == 1.0
    assert [(it.seq, it.attempts) for it in ledger.pending_page(job.id, -1, 1, NOW)] == [(1, 1)]


def test_finish_chunk_touches_only_its_own_items(ledger):
    job = new_job(ledger, ids=IDS)
    one = ledger.plan_chunk(job.id, "openai", [0, 1], NOW)
    two = ledger.plan_chunk(job.id, "openai", [2, 3], NOW)
    # a result naming an item of another chunk (or one not in any) changes nothing
    stray = [Outcome(2, "succeeded", result(2)), Outcome(4, "succeeded", result(4))]
    assert ledger.finish_chunk(job.id, one, stray, NOW) == 0
    assert states(ledger, job.id) == {"submitted": 2, "pending": 3}  # 0, 1 back to pending
    assert [it.seq for it in ledger.chunk_items(job.id, two)] == [2, 3]
    assert [c.status for c in ledger.chunks(job.id)] == ["collected", "creating"]


def test_finish_chunk_keeps_a_follow_up_for_the_next_batch(ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0], NOW)
    follow = orjson.dumps({"endpoint": "/v1/chat/completions", "body": {"model": "m"}})
    repair = Outcome(
        0, "pending", None, "repair", "not JSON", input_tokens=7, cost=0.25, follow_up=follow
    )
    ledger.finish_chunk(job.id, chunk, [repair], NOW)
    (it,) = ledger.pending_page(job.id, -1, 1, NOW)
    assert (it.seq, it.attempts, it.follow_up) == (0, 1, follow)
    assert ledger.counts(job.id).cost == 0.25  # the first answer was paid for
    # the follow-up travels with the item into its next chunk
    nxt = ledger.plan_chunk(job.id, "openai", [0], NOW + 1)
    assert ledger.chunk_items(job.id, nxt)[0].follow_up == follow
    ledger.finish_chunk(job.id, nxt, [Outcome(0, "succeeded", result("ok"), cost=0.25)], NOW + 2)
    assert list(ledger.iter_results(job.id)) == [("a", result("ok"), None, None)]
    assert ledger.counts(job.id).cost == 0.5


def test_finish_chunk_leftover_cancelled_and_uncounted_attempts(ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "anthropic", [0, 1, 2], NOW)
    ledger.set_remote(job.id, chunk, "msgbatch_1")
    done = [Outcome(0, "succeeded", result("A"))]
    ledger.finish_chunk(job.id, chunk, done, NOW, leftover="cancelled", remote_status="ended")
    assert states(ledger, job.id) == {"succeeded": 1, "cancelled": 2, "pending": 2}

    # a chunk closed without a remote batch (split after a 413): no attempt is counted
    split = ledger.plan_chunk(job.id, "anthropic", [3, 4], NOW)
    ledger.finish_chunk(job.id, split, [], NOW, remote_status="split", count_attempt=False)
    page = ledger.pending_page(job.id, -1, 10, NOW)
    assert [(it.seq, it.attempts) for it in page] == [(3, 0), (4, 0)]
    assert ledger.chunks(job.id)[-1].remote_status == "split"


# -- with the user's commands ----------------------------------------------------------------


def test_cancel_leaves_items_inside_a_live_batch_to_be_collected(store, ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0, 1], NOW)
    ledger.set_remote(job.id, chunk, "batch_1")
    assert store.open().cancel(job.id) == 3  # c, d, e: the batch's items are the provider's
    assert states(ledger, job.id) == {"submitted": 2, "cancelled": 3}
    done = [Outcome(0, "succeeded", result("A"))]  # what the cancelled batch finished is kept
    ledger.finish_chunk(job.id, chunk, done, NOW, leftover="cancelled")
    assert states(ledger, job.id) == {"succeeded": 1, "cancelled": 4}
    assert ledger.reopen(job.id) == 4
    assert [it.seq for it in ledger.pending_page(job.id, -1, 10, NOW)] == [1, 2, 3, 4]


def test_plan_chunk_after_a_cancel_takes_no_cancelled_item(store, ledger):
    job = new_job(ledger, ids=IDS)
    page = ledger.pending_page(job.id, -1, 10, NOW)
    store.open().cancel(job.id)  # between reading the page and planning the chunk
    chunk = ledger.plan_chunk(job.id, "openai", [it.seq for it in page], NOW)
    assert ledger.chunk_items(job.id, chunk) == []
    assert states(ledger, job.id) == {"cancelled": 5}


def test_retry_does_not_touch_items_in_a_batch(ledger):
    job = new_job(ledger, ids=IDS)
    chunk = ledger.plan_chunk(job.id, "openai", [0, 1], NOW)
    ledger.finish_chunk(job.id, chunk, [Outcome(0, "failed", None, "E", "x")], NOW)
    live = ledger.plan_chunk(job.id, "openai", [2], NOW)
    assert ledger.retry(job.id, ("failed", "invalid")) == 1
    assert [it.seq for it in ledger.chunk_items(job.id, live)] == [2]
    assert states(ledger, job.id) == {"pending": 4, "submitted": 1}


def test_planners_on_two_connections_at_once_get_distinct_chunks(store, ledger):
    """Two workers plan chunks of one job at the same moment: each chunk gets its own number
    and its own items (PostgreSQL: lock_job; SQLite: the write lock)."""
    import threading

    ids = [f"r{i}" for i in range(40)]
    job = new_job(ledger, ids=ids)
    planners = [store.open(), store.open()]
    start = threading.Barrier(2)
    planned: list[list[int]] = [[], []]

    def plan(i: int) -> None:
        start.wait()
        for k in range(10):
            seqs = [i * 20 + k * 2, i * 20 + k * 2 + 1]
            planned[i].append(planners[i].plan_chunk(job.id, "openai", seqs, NOW))

    threads = [threading.Thread(target=plan, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    numbers = planned[0] + planned[1]
    assert sorted(numbers) == list(range(1, 21))
    assert sum(len(ledger.chunk_items(job.id, c)) for c in numbers) == 40
    assert states(ledger, job.id) == {"submitted": 40}
