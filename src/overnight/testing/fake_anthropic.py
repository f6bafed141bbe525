"""The fake's Anthropic message batches (`/v1/messages/batches`).

Shapes follow `shared/specs/provider-batch-apis.md`. in_progress → ended after
`batch_seconds` (or `expire_batches`: `expire_fraction` succeeded, the rest expired), or
canceling → ended at the next read (`cancel_fraction` succeeded, the rest canceled).
request_counts show only `processing` until the end; results are JSONL in any order, at the
relative results_url.

Anthropic batches carry no metadata, and the fake adds nothing: a client recognises its own
batch (one whose create answer was lost) by listing the batches created after it sent the
create (newest first, by `created_at`) and matching the request count, or the custom_ids in
the results.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from overnight.testing.fake_answers import answer_message, prompt_of
from overnight.testing.fake_state import (
    DAY,
    Owner,
    ProviderError,
    json_body,
    jsonl,
    limit_param,
    list_page,
    rfc3339,
    take_batch_failure,
)

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS = 100_000
MAX_BYTES = 256 << 20


@dataclass
class _AnthropicBatch:
    obj: dict[str, Any]  # the public MessageBatch object
    requests: list[dict[str, Any]]
    started: float  # monotonic
    seconds: float
    expire: bool
    results: bytes | None = field(default=None, repr=False)


class AnthropicBatches:
    def __init__(self, owner: Owner) -> None:
        self.o = owner
        self.batches: dict[str, _AnthropicBatch] = {}

    async def create(self, request: Request) -> Response:
        self.o.stats.bump("creates_received")
        raw = await request.body()
        limit = min(self.o.knobs.max_batch_bytes or MAX_BYTES, MAX_BYTES)
        if len(raw) > limit:
            raise ProviderError(413, f"Request is {len(raw)} bytes, over the {limit} allowed.")
        body = await json_body(request)
        reqs = body.get("requests")
        most = min(self.o.knobs.max_batch_requests or MAX_REQUESTS, MAX_REQUESTS)
        if not isinstance(reqs, list) or not reqs:
            raise ProviderError(400, "requests: Field required (1 or more items)")
        if len(reqs) > most:
            raise ProviderError(400, f"requests: {len(reqs)} items, at most {most}")
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
                raise ProviderError(
                    400,
                    f"requests.{i}.custom_id: String should match pattern '{CUSTOM_ID.pattern}'",
                )
            if cid in seen:
                raise ProviderError(400, f"requests.{i}.custom_id: duplicate custom_id {cid!r}")
            if not isinstance(r.get("params"), dict):
                raise ProviderError(400, f"requests.{i}.params: Field required")
            seen.add(cid)
        # Shielded: a client that goes away during create_delay does not stop the batch.
        return await asyncio.shield(asyncio.ensure_future(self._create(reqs)))

    async def _create(self, reqs: list[dict[str, Any]]) -> Response:
        if self.o.knobs.create_delay:
            await asyncio.sleep(self.o.knobs.create_delay)
        now = time.time()
        with self.o.lock:
            bid = self.o.ids.new("msgbatch_")
            obj: dict[str, Any] = {
                "id": bid,
                "type": "message_batch",
                "processing_status": "in_progress",
                "request_counts": _counts(processing=len(reqs)),
                "ended_at": None,
                "created_at": rfc3339(now),
                "expires_at": rfc3339(now + DAY),
                "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": None,
            }
            self.batches[bid] = _AnthropicBatch(
                obj,
                reqs,
                time.monotonic(),
                self.o.knobs.batch_seconds,
                self.o.knobs.expire_batches,
            )
        self.o.stats.batch_created(
            [r["custom_id"] for r in reqs], [prompt_of(r["params"]) for r in reqs]
        )
        return JSONResponse(obj)

    def _batch(self, bid: str) -> _AnthropicBatch:
        b = self.batches.get(bid)
        if b is None:
            raise ProviderError(404, f"No message batch found with id {bid}")
        self._advance(b)
        return b

    def _advance(self, b: _AnthropicBatch) -> None:
        status, n = b.obj["processing_status"], len(b.requests)
        if status == "canceling":
            self._finish(b, "canceled", int(n * self.o.knobs.cancel_fraction))
        elif status == "in_progress" and time.monotonic() >= b.started + b.seconds:
            if b.expire:
                self._finish(b, "expired", int(n * self.o.knobs.expire_fraction))
            else:
                self._finish(b, None, n)

    def _finish(self, b: _AnthropicBatch, rest: str | None, done: int) -> None:
        """End the batch: the first `done` requests answered, the others `rest`."""
        counts = _counts()
        lines: list[dict[str, Any]] = []
        for i, r in enumerate(b.requests):
            result: dict[str, Any]
            if i >= done and rest is not None:
                result = {"type": rest}
            else:
                st, body = answer_message(
                    r["params"], invalid_rate=self.o.knobs.invalid_json_rate, ids=self.o.ids
                )
                failure = take_batch_failure(self.o)
                if failure is not None:
                    st, body = failure, ProviderError(failure, "injected").body("anthropic")
                ok = st == 200
                if ok:
                    self.o.stats.bump("billed", prompt_of(r["params"]))
                result = (
                    {"type": "succeeded", "message": body}
                    if ok
                    else {"type": "errored", "error": body}
                )
            counts[result["type"]] += 1
            lines.append({"custom_id": r["custom_id"], "result": result})
        random.Random(b.obj["id"]).shuffle(lines)
        b.results = jsonl(lines, self.o)
        b.obj.update(
            processing_status="ended",
            request_counts=counts,
            ended_at=rfc3339(time.time()),
            results_url=f"/v1/messages/batches/{b.obj['id']}/results",
        )

    async def get(self, request: Request) -> Response:
        with self.o.lock:
            return JSONResponse(self._batch(request.path_params["id"]).obj)

    async def results(self, request: Request) -> Response:
        with self.o.lock:
            b = self._batch(request.path_params["id"])
            if b.results is None:
                raise ProviderError(400, f"Message batch {b.obj['id']} has not ended yet.")
            return Response(b.results, media_type="application/binary")

    async def cancel(self, request: Request) -> Response:
        with self.o.lock:
            b = self._batch(request.path_params["id"])
            if b.obj["processing_status"] == "in_progress":
                b.obj.update(
                    processing_status="canceling", cancel_initiated_at=rfc3339(time.time())
                )
            return JSONResponse(b.obj)

    async def delete(self, request: Request) -> Response:
        with self.o.lock:
            b = self._batch(request.path_params["id"])
            if b.obj["processing_status"] != "ended":
                raise ProviderError(
                    400, "A batch can be deleted only once it has ended: cancel it first."
                )
            del self.batches[b.obj["id"]]
        return JSONResponse({"id": b.obj["id"], "type": "message_batch_deleted"})

    async def list(self, request: Request) -> Response:
        """Newest first. after_id: the page of older batches just after that id; before_id:
        the page of newer ones just before it."""
        q = request.query_params
        limit = limit_param(request, 20, 1000)
        with self.o.lock:
            ids = sorted(self.batches, reverse=True)
            if q.get("before_id"):
                newer = [bid for bid in ids if bid > q["before_id"]]
                chosen, more = newer[-limit:], len(newer) > limit
            else:
                if q.get("after_id"):
                    ids = [bid for bid in ids if bid < q["after_id"]]
                chosen, more = ids[:limit], len(ids) > limit
            return list_page([self._batch(bid).obj for bid in chosen], more, openai=False)

    def complete_all(self) -> None:
        """End every live batch now (called under the lock)."""
        for b in self.batches.values():
            b.seconds = 0.0
            self._advance(b)


def _counts(processing: int = 0) -> dict[str, int]:
    return {"processing": processing, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
