"""The batch loop for provider batch APIs: adopt, submit, poll, collect — until nothing is open.

1. Adopt: a chunk recorded as `creating` has no remote id (the process died between planning
   it and recording the id). Look for its batch on the provider; found → record it; not
   found → create it now. Its items were marked `submitted` when it was planned, so they can
   never be in two chunks: an item is never submitted again while a batch holding it lives.
2. Submit: pending items, in input order, become chunks of at most `max_requests` lines and
   `max_bytes` bytes, one endpoint (and, on OpenAI, one model) per chunk; a 413 splits a
   chunk in two. Stops at `max_cost`, Ctrl-C, a deadline or a cancel.
3. Poll every live chunk, backing off from `poll_interval` to `poll_max`.
4. Collect an ended chunk: every result line → parse, validate, cost at the batch price →
   one transaction. Expired, cancelled and transiently errored lines go back to pending for a
   new batch (up to `max_attempts`); finished results of an expired batch are kept. An OpenAI
   batch that fails validation as a whole fails the lines it names, the rest go back.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from . import results
from .errors import InvalidOutput, redact
from .estimate import ASSUMED_OUTPUT_TOKENS
from .llm.batch import TRANSIENT_ERRORS, BatchService, Line, Result, TooLarge, _crash, _retryable
from .llm.requests import Answer, LLMTask, answer_from_body
from .llm.tokens import count_request_tokens
from .runner import Meter, Progress, Usage, Validator
from .store import Item, JobInfo, Ledger, Outcome


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
    ) -> None:
        self.repair = repair
        self.ledger, self.job, self.task, self.service = ledger, job, task, service
        self.max_attempts, self.meter, self.validate = max_attempts, meter, validate
        self.progress = progress or Progress()
        self.on_progress = on_progress or (lambda p: None)
        self.stop = stop or threading.Event()
        self.max_cost = max_cost
        self.poll_interval, self.poll_max = poll_interval, poll_max
        # Identifies this job's batches on the provider (a --restart makes a new job).
        self.tag = f"{job.name}@{job.created_at:.6f}"
        self.created = 0  # remote batches this runner created
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
        self._adopt()
        if detach:
            self._poll(leftover="pending")  # collect what already ended
            if not self.ledger.is_cancelled(self.job.id):
                self._submit()
            return
        delay = self.poll_interval
        cutting = False
        while True:
            cancelled = self.ledger.is_cancelled(self.job.id)
            if cancelled and not self.cancel_sent:
                # `overnight cancel` cancels the batches live when it ran; one recorded after
                # (its upload was under way) is cancelled here.
                self.cancel_sent = True
                self._cancel_live()
            if until is not None and time.time() >= until and not cutting:
                cutting = True
                self._cancel_live()
            if not (cancelled or cutting or self._stopping()) and self._submit():
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
        for c in self.ledger.chunks(self.job.id):
            if c.remote_id and hasattr(self.service, "claimed"):
                self.service.claimed.add(c.remote_id)  # type: ignore[attr-defined]
            if c.status == "live" and self.max_cost is not None:
                items = self.ledger.chunk_items(self.job.id, c.chunk)
                lines = [self._line(it) for it in items]
                self.live_estimate[c.chunk] = self._estimate(lines)
        for c in self.ledger.chunks(self.job.id, ("creating",)):
            remote = self.service.find_orphan(self.tag, c.chunk, c.requests, c.planned_at)
            if remote is not None:
                self.ledger.set_remote(self.job.id, c.chunk, remote)
                if hasattr(self.service, "claimed"):  # never adopted for a second chunk
                    self.service.claimed.add(remote)  # type: ignore[attr-defined]
                continue
            items = self.ledger.chunk_items(self.job.id, c.chunk)
            self._create(c.chunk, [self._line(it) for it in items])

    def _line(self, it: Item) -> Line:
        if it.follow_up is not None:  # a repair: the conversation so far + the error
            req = orjson.loads(it.follow_up)
            return Line(
                it.seq, self.service.remote_id(it.seq, it.custom_id), req["endpoint"], req["body"]
            )
        req = self.task.build(orjson.loads(it.payload))
        return Line(it.seq, self.service.remote_id(it.seq, it.custom_id), req.endpoint, req.body)

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
        size, key, skipped, after = 0, None, 0, -1
        try:
            while True:
                page = self.ledger.pending_page(self.job.id, after, 1000, time.time())
                if not page:
                    return lines
                for it in page:
                    after = it.seq
                    try:
                        line = self._line(it)
                    except Exception as exc:
                        bad.append((it.seq, exc))
                        continue
                    model = line.body.get("model") if svc.provider == "openai" else None
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
                    size += n
                    if len(lines) >= svc.max_requests:
                        return lines
        finally:
            if bad:
                self._fail_inputs(bad)

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
            chunk = self.ledger.plan_chunk(
                self.job.id, self.service.provider, [ln.seq for ln in lines], time.time()
            )
            if self.ledger.is_cancelled(self.job.id):
                # Cancelled from another process since the page was read: some of these
                # items are cancelled, not in the chunk; create nothing.
                self.ledger.finish_chunk(
                    self.job.id,
                    chunk,
                    [],
                    time.time(),
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

    def _create(self, chunk: int, lines: list[Line]) -> None:
        try:
            remote, file_id = self.service.submit(lines, self.tag, chunk)
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            if isinstance(exc, TooLarge) or status is None or status in (408, 409, 429):
                self._split_or_raise(chunk, lines, exc)
                return
            if status >= 500:
                raise  # the provider is unwell: a rerun adopts or creates this chunk
            # Refused as a whole (a 4xx): every line fails with the provider's message,
            # rather than the next run sending the same refused batch again.
            message = redact(f"the provider refused the batch: HTTP {status}: {exc}")
            self.ledger.finish_chunk(
                self.job.id,
                chunk,
                [Outcome(ln.seq, "failed", None, f"batch_http_{status}", message) for ln in lines],
                time.time(),
                remote_status="refused",
            )
            return
        self._created(chunk, remote, file_id)

    def _split_or_raise(self, chunk: int, lines: list[Line], exc: Exception) -> None:
        if not isinstance(exc, TooLarge):
            raise exc  # connection trouble, throttling: a rerun adopts or creates the chunk
        if len(lines) == 1:
            message = "the provider refused this single request as too large (413)"
            self.ledger.finish_chunk(
                self.job.id,
                chunk,
                [Outcome(lines[0].seq, "failed", None, "request_too_large", message)],
                time.time(),
                remote_status="refused",
            )
            return
        # Split: this chunk is closed ("split") and each half becomes a chunk of its own.
        half = len(lines) // 2
        self.ledger.finish_chunk(
            self.job.id, chunk, [], time.time(), remote_status="split", count_attempt=False
        )
        for part in (lines[:half], lines[half:]):
            sub = self.ledger.plan_chunk(
                self.job.id, self.service.provider, [ln.seq for ln in part], time.time()
            )
            self._create(sub, part)

    def _created(self, chunk: int, remote: str, file_id: str | None) -> None:
        self.created += 1
        if os.environ.get("OVERNIGHT_TEST_CRASH_AT") == "after_create":
            _crash()
        self.ledger.set_remote(self.job.id, chunk, remote, file_id)
        if hasattr(self.service, "claimed"):
            self.service.claimed.add(remote)  # type: ignore[attr-defined]

    def _fail_inputs(self, bad: list[tuple[int, Exception]]) -> None:
        """Records that cannot become a request: failed, through one local chunk."""
        now = time.time()
        chunk = self.ledger.plan_chunk(self.job.id, self.service.provider, [s for s, _ in bad], now)
        self.ledger.finish_chunk(
            self.job.id,
            chunk,
            [
                Outcome(seq, "failed", None, _input_error_class(exc), redact(str(exc)))
                for seq, exc in bad
            ],
            now,
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
                if _retryable(exc):
                    continue  # (the SDK retried already) try again at the next poll
                raise
            self.ledger.update_chunk(self.job.id, c.chunk, poll.status, poll.counts)
            if os.environ.get("OVERNIGHT_TEST_CRASH_AT") == "while_polling":
                _crash()
            if poll.ended:
                self._collect(c.chunk, c.remote_id, poll, leftover)
                collected += 1
        return collected

    def _collect(self, chunk: int, remote_id: str, poll: Any, leftover: str) -> None:
        items = self.ledger.chunk_items(self.job.id, chunk)
        by_remote = {self.service.remote_id(it.seq, it.custom_id): it for it in items}
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
            for result in self.service.results(remote_id):
                it = by_remote.get(result.remote_id)
                if it is not None:
                    o = self._outcome(it, result)
                    if o.state == "pending" and leftover == "cancelled":
                        o = o._replace(state="cancelled")  # type: ignore[arg-type]
                    outcomes.append(o)
        failed_at = leftover == "pending"
        # A whole-batch failure naming no line (empty_file, too_many_tasks…): say what it was.
        why = "".join(f": {e.get('message')}" for e in poll.errors[:1])
        answered = {o.seq for o in outcomes}
        for it in items:  # no line at all for it: back to pending, counted as an attempt
            if it.seq not in answered and failed_at and it.attempts + 1 >= self.max_attempts:
                outcomes.append(
                    Outcome(
                        it.seq,
                        "failed",
                        None,
                        "no_result",
                        f"no result after {it.attempts + 1} batches ({poll.status}{why})",
                    )
                )
        self.ledger.finish_chunk(
            self.job.id,
            chunk,
            outcomes,
            time.time(),
            leftover=leftover,
            remote_status=poll.status,
        )
        self._count(outcomes)

    def _outcome(self, it: Item, result: Result) -> Outcome:
        seq, attempts = it.seq, it.attempts
        if result.kind == "succeeded":
            answer = answer_from_body(self.service.provider, "", result.body or {})
            usage = self.meter(answer)
            try:
                fields = self.task.parse(answer)
            except InvalidOutput as exc:
                if self.repair and it.follow_up is None:  # ask again, once, in the next batch
                    ask = self.task.build(orjson.loads(it.payload))
                    follow = self.task.repair(ask, answer, exc.reason)
                    body = orjson.dumps({"endpoint": follow.endpoint, "body": follow.body})
                    return Outcome(seq, "pending", body, "repair", redact(exc.reason), 0.0, *usage)
                return Outcome(
                    seq, "invalid", None, exc.error_class, redact(exc.reason), 0.0, *usage
                )
            result_json, vector = results.encode(fields, self.task.kind == "embed")
            if self.validate is not None:
                reason = self.validate(fields["output"])
                if reason is not None:
                    return Outcome(seq, "invalid", None, "schema_error", reason, 0.0, *usage)
            return Outcome(seq, "succeeded", result_json, None, None, 0.0, *usage, vector)
        message = redact(result.message or result.kind)
        cls = result.error_type or result.kind
        transient = result.kind in ("expired", "cancelled") or cls in TRANSIENT_ERRORS
        if transient and attempts + 1 < self.max_attempts:
            return Outcome(seq, "pending", None, cls, message, 0.0, *Usage())
        if transient:
            message = f"{message} (gave up after {attempts + 1} batches)"
        return Outcome(seq, "failed", None, cls, message)

    def _cancel_live(self) -> None:
        for c in self.ledger.chunks(self.job.id, ("live",)):
            assert c.remote_id is not None
            try:
                self.service.cancel(c.remote_id)
            except Exception as exc:
                # Already cancelling or ended (a 4xx): the poll sees it end either way.
                status = getattr(exc, "status_code", None)
                if status is None or status >= 500 or status in (408, 429):
                    raise

    def cancel_remote(self) -> int:
        """`overnight cancel`: cancel every live remote batch; their finished part is kept
        when they are collected (by a running runner, or the next `run`)."""
        live = self.ledger.chunks(self.job.id, ("live",))
        for c in live:
            assert c.remote_id is not None
            self.service.cancel(c.remote_id)
        return len(live)

    def _count(self, outcomes: list[Outcome]) -> None:
        self.progress.count(outcomes)
        self.on_progress(self.progress)
