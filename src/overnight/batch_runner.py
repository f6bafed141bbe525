"""The batch loop for provider batch APIs: adopt, submit, poll, collect — until nothing is open.

1. Adopt: a chunk recorded as `creating` has no remote id (the process died between planning
   it and recording the id). No create was ever sent for it → create it now. Otherwise look
   for its batch on the provider; found → record it; not found → wait until the last create
   sent for it can no longer land (recorded before the call), look again, and only then
   create it. Its items were marked `submitted` when it was planned, so they can never be in
   two chunks: an item is never submitted again while a batch holding it lives.
2. Submit: pending items, in input order, become chunks of at most `max_requests` lines and
   `max_bytes` bytes, one endpoint (and, on OpenAI, one model) per chunk; a 413 splits a
   chunk in two. Stops at `max_cost`, Ctrl-C, a deadline or a cancel.
3. Poll every live chunk, backing off from `poll_interval` to `poll_max`.
4. Collect an ended chunk: every result line → parse, validate, cost at the batch price →
   one transaction. Expired, cancelled and transiently errored lines go back to pending for a
   new batch (up to `max_attempts`); finished results of an expired batch are kept. An OpenAI
   batch that fails validation as a whole fails the lines it names, the rest go back. A line
   whose custom_id is not one this job sent in that batch is never written (a warning, and
   counted); a batch with no line of ours (taken for the chunk by mistake) sends the chunk's
   items back to pending without counting an attempt.

The response cache (as in real time): a pending item whose request has an answer in the cache
is settled from it, sending nothing; one line goes out per distinct request, and items whose
request is already in a live chunk wait for its answer, which goes into the cache when the
chunk is collected. So identical records, a `--restart` and a batch job after a real-time one
pay once.

Several workers on one job (claim.py): only the one that holds the job's claim (`may_submit`)
adopts, plans and creates chunks, so a chunk another live worker is creating is never created
again; if that worker dies, the next to take the claim adopts its `creating` chunks as above.
Every worker polls and collects live chunks; a chunk collected twice writes nothing twice
(`finish_chunk` settles only the items the chunk still holds).

Before any of this, `earlier_batches` looks at the provider for batches of earlier runs of
the job that the ledger does not know (the ledger was deleted or replaced): the job module
refuses to run over them, and `--restart` cancels them (`cancel_earlier`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from . import results
from .errors import InvalidOutput, redact
from .estimate import ASSUMED_OUTPUT_TOKENS
from .llm.batch import (
    LOOKBACK,
    BatchService,
    JobTag,
    Line,
    Result,
    Tagged,
    TooLarge,
    request_key,
    result_fault,
)
from .llm.cache import ResponseCache
from .llm.providers import sdk_failure
from .llm.requests import Answer, LLMTask, answer_from_body
from .llm.tokens import count_request_tokens
from .retry import Fault, RetryPolicy
from .runner import Meter, Progress, Validator, outcome
from .store import Item, JobInfo, Ledger, Outcome, RemoteBatch

log = logging.getLogger(__name__)


def _input_error_class(exc: Exception) -> str:
    """input_error, or the finer class an input error names (context_exceeded)."""
    return getattr(exc, "error_class", None) or "input_error"


class BatchRunner:
    def __init__(
        self,
        ledger: Ledger,
        job: JobInfo,
        task: LLMTask,
        service: BatchService,
        *,
        tag: JobTag,
        max_attempts: int,
        meter: Meter,
        validate: Validator | None = None,
        progress: Progress | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
        max_cost: float | None = None,
        poll_interval: float = 30.0,
        poll_max: float = 600.0,
        repair: bool = False,
        cache: ResponseCache | None = None,
        may_submit: Callable[[], bool] | None = None,
    ) -> None:
        self.may_submit = may_submit or (lambda: True)
        self.repair = repair
        self.cache = cache
        # Cache keys of the requests in this job's creating and live chunks (key -> chunk),
        # and each such chunk's keys: an item whose request is among them is not sent again.
        self.inflight: dict[str, int] = {}
        self.chunk_keys: dict[int, list[str]] = {}
        self.cache_hits = 0
        self.ledger, self.job, self.task, self.service = ledger, job, task, service
        self.max_attempts, self.meter, self.validate = max_attempts, meter, validate
        self.policy = RetryPolicy(max_attempts, base=0.0)  # the next batch is the backoff
        self.progress = progress or Progress()
        self.on_progress = on_progress or (lambda p: None)
        self.stop = stop or threading.Event()
        self.max_cost = max_cost
        self.poll_interval, self.poll_max = poll_interval, poll_max
        self.tag = tag  # this job's mark on every request and batch
        self.created = 0  # remote batches this runner created
        self.foreign_lines = 0  # result lines refused: not requests of this job's chunk
        self.notes: list[str] = []  # for the run's report
        # A batch's cost is known only when it ends, so max_cost is held against what is
        # spent plus an upper estimate of the live batches (prompt tokens + max_tokens).
        self.live_estimate: dict[int, float] = {}
        self.budget_stop = False
        self.cancel_sent = False

    # -- the loop -----------------------------------------------------------------------

    def run(self, until: float | None = None, detach: bool = False) -> None:
        """Until every item is finished, or `until` (epoch seconds) passes: then cancel the
        live batches, collect what they finished, and leave the rest pending. `detach`:
        submit everything and return; the batches run on, recorded in the ledger."""
        submitter = self.may_submit()
        if submitter:
            self._adopt()
        if detach:
            self._poll(leftover="pending")  # collect what already ended
            if submitter and not self.ledger.is_cancelled(self.job.id):
                self._submit()
            return
        delay = self.poll_interval
        cutting = False
        while True:
            if not submitter and self.may_submit():  # the submitting worker is gone
                submitter = True
                self._adopt()
            cancelled = self.ledger.is_cancelled(self.job.id)
            if cancelled and not self.cancel_sent:
                # `overnight cancel` cancels the batches live when it ran; one recorded after
                # (its upload was under way) is cancelled here.
                self.cancel_sent = True
                self._cancel_live()
            if until is not None and time.time() >= until and not cutting:
                cutting = True
                self._cancel_live()
            if submitter and not (cancelled or cutting or self._stopping()) and self._submit():
                delay = self.poll_interval
            if self.stop.is_set():
                return  # Ctrl-C: live batches stay live and recorded; a rerun re-attaches
            collected = self._poll(leftover="cancelled" if cancelled else "pending")
            live = self.ledger.chunks(self.job.id, ("creating", "live"))
            self.progress.live_batches = len(live)
            self.progress.in_batches = sum(c.requests for c in live)
            self.on_progress(self.progress)
            if not live:
                if cutting or cancelled or self._stopping() or not self._has_pending():
                    return
                if not submitter:  # the submitting worker plans them: wait for its chunks
                    self.stop.wait(min(self.poll_interval, 1.0))
                    continue
                due = self.ledger.next_due(self.job.id) or 0.0
                if due > time.time():  # pending, but not yet due: wait rather than spin
                    self.stop.wait(min(self.poll_max, due - time.time()))
                continue
            if collected:
                delay = self.poll_interval
            self.stop.wait(delay)
            delay = min(self.poll_max, delay * 1.5)

    def _stopping(self) -> bool:
        if self.budget_stop:
            return True
        if self.progress.budget_reached(self.max_cost, "batch"):
            return True
        return self.stop.is_set()

    def _has_pending(self) -> bool:
        return bool(self.ledger.pending_page(self.job.id, -1, 1, float("inf")))

    # -- adopt and submit ---------------------------------------------------------------

    def _estimate(self, lines: list[Line]) -> float:
        total = 0.0
        for ln in lines:
            tin = count_request_tokens(ln.endpoint, ln.body, str(ln.body.get("model", "")))
            tout = int(ln.body.get("max_tokens") or ln.body.get("max_completion_tokens") or 0)
            if not tout and not ln.endpoint.endswith("/embeddings"):
                tout = ASSUMED_OUTPUT_TOKENS
            total += self.meter(Answer({"model": ln.body.get("model")}, tin, tout)).cost or 0.0
        return total

    def _over_budget(self, lines: list[Line]) -> bool:
        if self.max_cost is None:
            return False
        committed = self.progress.cost + sum(self.live_estimate.values())
        if committed + self._estimate(lines) <= self.max_cost:
            return False
        if self.progress.stop_reason is None:
            self.progress.stop_reason = (
                f"max_cost: ${self.progress.cost:.4f} spent and up to ${committed:.4f} committed"
                f" in live batches; the next batch could pass ${self.max_cost:g}, so it was not"
                " submitted (raise [run] max_cost and run again to go on)"
            )
        return True

    def _adopt(self) -> None:
        chunks = self.ledger.chunks(self.job.id)
        for c in chunks:
            if c.remote_id:
                self._claim(c.remote_id)
            if self.cache is not None and c.status in ("creating", "live"):
                self._hold(c.chunk, self._chunk_lines(c))
            if c.status == "live" and self.max_cost is not None:
                items = self.ledger.chunk_items(self.job.id, c.chunk)
                lines = [self._line(it, c.tagged) for it in items]
                self.live_estimate[c.chunk] = self._estimate(lines)
        waiting: list[RemoteBatch] = []
        for c in chunks:
            if c.status != "creating":
                continue
            if c.create_until == 0:  # no create was ever sent for it: nothing to look for
                self._create(c.chunk, self._chunk_lines(c))
            elif not self._found(c):
                waiting.append(c)
        if not waiting:
            return
        until = max(c.create_until or 0.0 for c in waiting)
        if until > time.time():
            log.info(
                "chunks %s: a create sent by an earlier run may still land for %.0fs; waiting"
                " before looking again",
                [c.chunk for c in waiting],
                until - time.time(),
            )
            if self.stop.wait(until - time.time()):
                return  # Ctrl-C: the chunks stay `creating`, a rerun goes on
        for c in waiting:
            if not self._found(c):
                self._create(c.chunk, self._chunk_lines(c))

    def _claim(self, remote_id: str) -> None:
        if hasattr(self.service, "claimed"):  # never adopted for a second chunk
            self.service.claimed.add(remote_id)  # type: ignore[attr-defined]

    def _chunk_lines(self, c: RemoteBatch) -> list[Line]:
        return [self._line(it, c.tagged) for it in self.ledger.chunk_items(self.job.id, c.chunk)]

    def _orphan(self, c: RemoteBatch) -> str | None:
        """The provider batch a `creating` chunk's lost create made, if it can be seen
        (create_until None: a chunk from before it was recorded, no upper bound)."""
        ids = {request_key(ln.remote_id) for ln in self._chunk_lines(c)}
        return self.service.find_orphan(self.tag, c.chunk, ids, c.planned_at, c.create_until)

    def _found(self, c: RemoteBatch) -> bool:
        remote = self._orphan(c)
        if remote is None:
            return False
        self.ledger.set_remote(self.job.id, c.chunk, remote)
        self._claim(remote)
        return True

    def _remote_id(self, it: Item, tagged: bool = True) -> str:
        if tagged:
            return self.tag.custom_id(it.seq)
        return self.service.legacy_remote_id(it.seq, it.custom_id)

    def _line(self, it: Item, tagged: bool = True) -> Line:
        if it.follow_up is not None:  # a repair: the conversation so far + the error
            req = orjson.loads(it.follow_up)
            return Line(it.seq, self._remote_id(it, tagged), req["endpoint"], req["body"])
        req = self.task.build(orjson.loads(it.payload))
        return Line(it.seq, self._remote_id(it, tagged), req.endpoint, req.body, req.key)

    # -- the response cache -------------------------------------------------------------

    def _hold(self, chunk: int, lines: list[Line]) -> None:
        """The chunk's requests are out: the same requests wait for their answers."""
        if self.cache is None or chunk in self.chunk_keys:
            return
        keys = [ln.key for ln in lines if ln.key is not None]
        self.chunk_keys[chunk] = keys
        for key in keys:
            self.inflight.setdefault(key, chunk)

    def _finish_chunk(self, chunk: int, outcomes: list[Outcome], **kwargs: Any) -> int:
        """ledger.finish_chunk, and the chunk's requests are no longer out. Returns the
        outcomes written (0: another worker collected the chunk first)."""
        written = self.ledger.finish_chunk(self.job.id, chunk, outcomes, time.time(), **kwargs)
        for key in self.chunk_keys.pop(chunk, ()):
            if self.inflight.get(key) == chunk:
                del self.inflight[key]
        return written

    def _remember(self, it: Item, answer: Answer, o: Outcome) -> None:
        """A collected answer goes into the cache under its request's key, as real time puts
        an answer there on arrival; a repaired one that is valid, under the first request's
        key (the answer to it), as real time does."""
        if self.cache is None:
            return
        if it.follow_up is None or o.state == "succeeded":
            key = self.task.build(orjson.loads(it.payload)).key
            self.cache.put(key, answer.body, answer.input_tokens, answer.output_tokens)

    def _from_cache(self, hits: list[tuple[Item, Answer]]) -> None:
        """Items answered by the cache: settled through one local chunk, nothing sent, no
        attempt counted, at no cost (their list cost still shows what the cache saved)."""
        self.cache_hits += len(hits)
        chunk = self.ledger.plan_chunk(
            self.job.id, self.service.provider, [it.seq for it, _ in hits], time.time()
        )
        outcomes = [self._answered(it, replace(a, cached=True, attempts=0)) for it, a in hits]
        self._finish_chunk(chunk, outcomes, remote_status="cache", count_attempt=False)
        self._count(outcomes)

    # Items of another endpoint or (OpenAI) model than a chunk's first wait for a later
    # chunk; after this many of them the chunk is closed, so a mixed input is not rescanned
    # in full for every chunk.
    LOOKAHEAD = 10_000

    def _next_chunk(self) -> list[Line]:
        """The next chunk's lines: pending items in input order that share the first one's
        endpoint and, on OpenAI (one model per file), its model; up to max_requests lines
        and max_bytes bytes. Records that cannot become a request fail here."""
        svc = self.service
        lines: list[Line] = []
        bad: list[tuple[int, Exception]] = []
        hits: list[tuple[Item, Answer]] = []
        sending: set[str] = set()  # cache keys of this chunk's lines
        size, key, skipped, after = 0, None, 0, -1
        try:
            while True:
                page = self.ledger.pending_page(self.job.id, after, 1000, time.time())
                if not page:
                    return lines
                built: list[tuple[Item, Line]] = []
                for it in page:
                    try:
                        built.append((it, self._line(it)))
                    except Exception as exc:
                        bad.append((it.seq, exc))
                cached = self._cached([ln.key for _, ln in built])
                for it, line in built:
                    after = it.seq
                    if line.key is not None and line.key in cached:
                        hits.append((it, cached[line.key]))
                        continue
                    if line.key is not None and (line.key in self.inflight or line.key in sending):
                        continue  # the same request is out: this item waits for its answer
                    model = line.body.get("model") if svc.one_model_per_batch else None
                    if key is not None and (line.endpoint, model) != key:
                        skipped += 1
                        if skipped >= self.LOOKAHEAD:
                            return lines
                        continue
                    n = svc.line_bytes(line)
                    if lines and size + n > svc.max_bytes:
                        return lines
                    key = (line.endpoint, model)
                    lines.append(line)
                    if line.key is not None and self.cache is not None:
                        sending.add(line.key)
                    size += n
                    if len(lines) >= svc.max_requests:
                        return lines
                after = page[-1].seq
        finally:
            if bad:
                self._fail_inputs(bad)
            if hits:
                self._from_cache(hits)

    def _cached(self, keys: list[str | None]) -> dict[str, Answer]:
        if self.cache is None:
            return {}
        return self.cache.get_many(k for k in keys if k is not None)

    def _submit(self) -> bool:
        """Plan and create chunks from the pending items; True if any was created."""
        made = False
        while not self._stopping():
            lines = self._next_chunk()
            if not lines:
                break
            if self._over_budget(lines):
                self.budget_stop = True
                break
            chunk, lines = self._plan(lines)
            if not lines:
                continue
            if self.ledger.is_cancelled(self.job.id):
                # Cancelled from another process since the page was read: some of these
                # items are cancelled, not in the chunk; create nothing.
                self._finish_chunk(
                    chunk,
                    [],
                    leftover="cancelled",
                    remote_status="cancelled",
                    count_attempt=False,
                )
                break
            if self.max_cost is not None:
                self.live_estimate[chunk] = self._estimate(lines)
            self._create(chunk, lines)
            made = True
        return made

    def _plan(self, lines: list[Line]) -> tuple[int, list[Line]]:
        """A chunk of these lines' items, and the lines it holds: only items still pending
        are planned (one planned by another worker a moment before is not sent again)."""
        chunk = self.ledger.plan_chunk(
            self.job.id, self.service.provider, [ln.seq for ln in lines], time.time()
        )
        held = {it.seq for it in self.ledger.chunk_items(self.job.id, chunk)}
        if len(held) < len(lines):
            lines = [ln for ln in lines if ln.seq in held]
            if not lines:
                self._finish_chunk(chunk, [], remote_status="taken", count_attempt=False)
        return chunk, lines

    def _create(self, chunk: int, lines: list[Line]) -> None:
        def before(until: float) -> None:  # committed before the call is sent
            self.ledger.set_create_until(self.job.id, chunk, until)

        self._hold(chunk, lines)

        try:
            remote, file_id = self.service.submit(lines, self.tag, chunk, before)
        except Exception as exc:
            if isinstance(exc, TooLarge):
                self._split(chunk, lines)
                return
            failure = sdk_failure(exc)
            if failure is None or failure.kind != "client_error":
                # Connection trouble, throttling, the provider unwell, or the key refused (no
                # fault of these lines): the run stops (llm_job.provider_failure); a rerun
                # adopts or creates this chunk.
                raise
            # Refused as a whole (a 4xx): every line fails with the provider's message,
            # rather than the next run sending the same refused batch again.
            status = failure.status
            message = redact(f"the provider refused the batch: HTTP {status}: {exc}")
            self._finish_chunk(
                chunk,
                [Outcome(ln.seq, "failed", None, f"batch_http_{status}", message) for ln in lines],
                remote_status="refused",
            )
            return
        self._created(chunk, remote, file_id)

    def _split(self, chunk: int, lines: list[Line]) -> None:
        """The provider refused the chunk as too large."""
        if len(lines) == 1:
            message = "the provider refused this single request as too large (413)"
            self._finish_chunk(
                chunk,
                [Outcome(lines[0].seq, "failed", None, "request_too_large", message)],
                remote_status="refused",
            )
            return
        # Split: this chunk is closed ("split") and each half becomes a chunk of its own.
        half = len(lines) // 2
        self._finish_chunk(chunk, [], remote_status="split", count_attempt=False)
        for part in (lines[:half], lines[half:]):
            sub, held = self._plan(part)
            if held:
                self._create(sub, held)

    def _created(self, chunk: int, remote: str, file_id: str | None) -> None:
        self.created += 1
        self.ledger.set_remote(self.job.id, chunk, remote, file_id)
        self._claim(remote)

    def _fail_inputs(self, bad: list[tuple[int, Exception]]) -> None:
        """Records that cannot become a request: failed, through one local chunk."""
        now = time.time()
        chunk = self.ledger.plan_chunk(self.job.id, self.service.provider, [s for s, _ in bad], now)
        self._finish_chunk(
            chunk,
            [
                Outcome(seq, "failed", None, _input_error_class(exc), redact(str(exc)))
                for seq, exc in bad
            ],
            remote_status="input_error",
        )
        self.progress.failed += len(bad)
        self.progress.processed += len(bad)

    # -- poll and collect ---------------------------------------------------------------

    def _poll(self, leftover: str) -> int:
        collected = 0
        for c in self.ledger.chunks(self.job.id, ("live",)):
            assert c.remote_id is not None
            try:
                poll = self.service.poll(c.remote_id)
            except Exception as exc:
                failure = sdk_failure(exc)
                if failure is not None and failure.retryable:
                    continue  # (the SDK retried already) try again at the next poll
                raise
            self.ledger.update_chunk(self.job.id, c.chunk, poll.status, poll.counts)
            if poll.ended:
                self._collect(c, poll, leftover)
                collected += 1
        return collected

    def _collect(self, c: RemoteBatch, poll: Any, leftover: str) -> None:
        chunk, remote_id = c.chunk, c.remote_id
        assert remote_id is not None
        items = self.ledger.chunk_items(self.job.id, chunk)
        by_remote = {request_key(self._remote_id(it, c.tagged)): it for it in items}
        outcomes: list[Outcome] = []
        if poll.errors:  # the whole batch failed validation: name each line it names
            for err in poll.errors:
                line = err.get("line")
                if isinstance(line, int) and 1 <= line <= len(items):
                    it = items[line - 1]
                    outcomes.append(
                        Outcome(
                            it.seq,
                            "failed",
                            None,
                            f"batch_{err.get('code') or 'invalid'}",
                            f"line {line} of the batch file: {err.get('message')}",
                        )
                    )
        else:
            refused: list[str] = []
            for result in self.service.results(remote_id):
                # Only this job's requests of this chunk, each once (see request_key).
                it = by_remote.pop(request_key(result.remote_id), None)
                if it is None:
                    refused.append(result.remote_id)
                    continue
                o = self._outcome(it, result)
                if o.state == "pending" and leftover == "cancelled":
                    o = o._replace(state="cancelled")  # type: ignore[arg-type]
                outcomes.append(o)
            if refused and self._refuse(c, refused, outcomes, leftover):
                return
        failed_at = leftover == "pending"
        # A whole-batch failure naming no line (empty_file, too_many_tasks…): say what it was.
        why = "".join(f": {e.get('message')}" for e in poll.errors[:1])
        answered = {o.seq for o in outcomes}
        for it in items:  # no line at all for it: back to pending, counted as an attempt
            retry = self.policy.decide(it.attempts + 1, Fault("transient"), time.time()).retry
            if it.seq not in answered and failed_at and not retry:
                outcomes.append(
                    Outcome(
                        it.seq,
                        "failed",
                        None,
                        "no_result",
                        f"no result after {it.attempts + 1} batches ({poll.status}{why})",
                    )
                )
        if self._finish_chunk(chunk, outcomes, leftover=leftover, remote_status=poll.status):
            self._count(outcomes)  # (not when another worker collected it first)

    def _refuse(
        self, c: RemoteBatch, refused: list[str], outcomes: list[Outcome], leftover: str
    ) -> bool:
        """Result lines that are not requests of this chunk: never written. With no line of
        ours at all, the batch is not this chunk's (taken for it by mistake): its items go
        back to pending (or cancelled), no attempt counted; True then."""
        self.foreign_lines += len(refused)
        log.warning(
            "batch %s (chunk %d): %d result lines are not requests of this job's chunk"
            " (first: %r); they are not written",
            c.remote_id,
            c.chunk,
            len(refused),
            refused[0],
        )
        self.notes.append(
            f"refused {len(refused)} result lines of provider batch {c.remote_id} that were"
            " not this job's requests"
        )
        if outcomes:
            return False
        self._finish_chunk(
            c.chunk,
            [],
            leftover="cancelled" if leftover == "cancelled" else "pending",
            remote_status="not_ours",
            count_attempt=False,
        )
        return True

    def _outcome(self, it: Item, result: Result) -> Outcome:
        seq, attempts = it.seq, it.attempts
        if result.kind == "succeeded":
            try:
                answer = answer_from_body(self.service.provider, "", result.body or {})
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                return _unreadable(seq, exc)
            o = self._answered(it, answer)
            self._remember(it, answer, o)
            return o
        message = redact(result.message or result.kind)
        cls = result.error_type or result.kind
        decision = self.policy.decide(attempts + 1, result_fault(result), time.time())
        if decision.retry:
            return outcome(seq, "pending", None, cls, message)
        if decision.reason == "exhausted":
            message = f"{message} (gave up after {attempts + 1} batches)"
        return Outcome(seq, "failed", None, cls, message)

    def _answered(self, it: Item, answer: Answer) -> Outcome:
        """An answer (collected, or from the cache) → the item's outcome: parsed, validated,
        costed; invalid → a repair in the next batch when asked for."""
        seq = it.seq
        try:
            usage = self.meter(answer)
            fields = self.task.parse(answer)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return _unreadable(seq, exc)
        except InvalidOutput as exc:
            if self.repair and it.follow_up is None:  # ask again, once, in the next batch
                ask = self.task.build(orjson.loads(it.payload))
                follow = self.task.repair(ask, answer, exc.reason)
                body = orjson.dumps({"endpoint": follow.endpoint, "body": follow.body})
                return outcome(
                    seq, "pending", None, "repair", redact(exc.reason), usage=usage, follow_up=body
                )
            return outcome(seq, "invalid", None, exc.error_class, redact(exc.reason), usage=usage)
        result_json, vector = results.encode(fields, self.task.kind == "embed")
        if self.validate is not None:
            reason = self.validate(fields["output"])
            if reason is not None:
                return outcome(seq, "invalid", None, "schema_error", reason, usage=usage)
        return outcome(seq, "succeeded", result_json, usage=usage, vector=vector)

    def _cancel_live(self) -> None:
        for c in self.ledger.chunks(self.job.id, ("live",)):
            assert c.remote_id is not None
            try:
                self.service.cancel(c.remote_id)
            except Exception as exc:
                if not _ended_already(exc):  # else the poll sees it end either way
                    raise

    def drain(self) -> bool:
        """A cancelled job's remote batches to their end, nothing submitted: what they ran
        before the cancel reached them was paid for, so it is collected (the rest is
        cancelled). A `creating` chunk whose create may have landed is looked for once that
        create can no longer land (found: cancelled and collected like a live one), else its
        items are cancelled; live chunks are cancelled at the provider and polled until they
        end. False if `stop` came first (the chunks stay as they are, for a later drain)."""
        for c in self.ledger.chunks(self.job.id, ("creating",)):
            if c.create_until != 0:  # a create was sent: it may have made a batch
                if self._found(c):
                    continue
                wait = (c.create_until or 0.0) - time.time()
                if wait > 0 and self.stop.wait(wait):
                    return False
                if wait > 0 and self._found(c):
                    continue
            self._finish_chunk(
                c.chunk, [], leftover="cancelled", remote_status="cancelled", count_attempt=False
            )
        delay = self.poll_interval
        while not self.stop.is_set():
            self._cancel_live()
            self._poll(leftover="cancelled")
            if not self.ledger.chunks(self.job.id, ("creating", "live")):
                return True
            self.stop.wait(delay)
            delay = min(self.poll_max, delay * 1.5)
        return False

    def cancel_remote(self) -> int:
        """`overnight cancel`: cancel every live remote batch; their finished part is kept
        when they are collected (by a running runner, or the next `run`)."""
        live = self.ledger.chunks(self.job.id, ("live",))
        for c in live:
            assert c.remote_id is not None
            self.service.cancel(c.remote_id)
        return len(live)

    def live_remote_ids(self) -> set[str]:
        """The provider batches this job may have running: the live chunks, and the batch
        of each `creating` chunk whose create was sent (after waiting until that create can
        no longer land, so that it is not missed)."""
        ids = {c.remote_id for c in self.ledger.chunks(self.job.id, ("live",)) if c.remote_id}
        creating = [
            c for c in self.ledger.chunks(self.job.id, ("creating",)) if c.create_until != 0
        ]
        until = max((c.create_until or 0.0 for c in creating), default=0.0)
        if until > time.time():
            log.info("waiting %.0fs for a create that may still land", until - time.time())
            self.stop.wait(until - time.time())
        for c in creating:
            remote = self._orphan(c)
            if remote is not None:
                ids.add(remote)
        return ids

    def _count(self, outcomes: list[Outcome]) -> None:
        self.progress.count(outcomes)
        self.on_progress(self.progress)


def _unreadable(seq: int, exc: Exception) -> Outcome:
    """An answer of a shape the API does not document: this item's failure, not the run's."""
    why = redact(f"the provider's answer cannot be read: {type(exc).__name__}: {exc}")
    return Outcome(seq, "invalid", None, "unreadable_answer", why)


# -- batches of earlier runs of the job, as the provider sees them ---------------------------


def earlier_batches(service: BatchService, key: str, job: JobInfo | None) -> list[Tagged]:
    """Batches carrying the job's identity key that the ledger cannot know: made with another
    token (an earlier run of the job whose ledger entry is gone) after the job's
    `discarded_before`. OpenAI: by metadata, live or ended; Anthropic: ended ones only."""
    found = service.tagged(key, time.time() - LOOKBACK)
    token = job.token if job is not None else None
    cutoff = job.discarded_before if job is not None else 0.0
    return [t for t in found if t.token != token and t.created_at >= cutoff]


def cancel_earlier(service: BatchService, key: str, known: set[str]) -> int:
    """`--restart`: cancel `known` (the job's live batches, from its ledger entry) and every
    live batch the provider shows with the job's key. Returns how many were cancelled."""
    ids = set(known)
    ids.update(t.remote_id for t in service.tagged(key, time.time() - LOOKBACK) if t.live)
    cancelled = 0
    for remote_id in sorted(ids):
        try:
            cancelled += service.cancel(remote_id)
        except Exception as exc:
            if not _ended_already(exc):  # else nothing to stop
                raise
    return cancelled


def _ended_already(exc: Exception) -> bool:
    """A cancel refused with a 4xx (not 408 or 429): the batch ended or is already being
    cancelled."""
    failure = sdk_failure(exc)
    status = failure.status if failure is not None else None
    return status is not None and status < 500 and status not in (408, 429)
