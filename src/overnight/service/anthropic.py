"""Anthropic's Message Batches API: its shapes over the service's batches (batches.py).

An Anthropic batch is a batch like an OpenAI one inside the service (statuses, ledger jobs,
resume), shown the Anthropic way: `processing_status` in_progress | canceling | ended,
request_counts {processing, succeeded, errored, canceled, expired}, RFC 3339 times, and
results as JSONL lines `{"custom_id", "result": {"type": ...}}`.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .config import ServeConfig

if TYPE_CHECKING:
    from .batches import Outcome

ENDPOINT = "/v1/messages"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS = 100_000


def rfc3339(ts: int | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def check_requests(requests: Any) -> str | None:
    """What is wrong with a create call's `requests`, or None (Anthropic refuses these at
    once; the `params` are checked later, request by request)."""
    if not isinstance(requests, list) or not 1 <= len(requests) <= MAX_REQUESTS:
        return f"requests: a list of 1 to {MAX_REQUESTS} requests"
    seen: set[str] = set()
    for i, request in enumerate(requests):
        if not isinstance(request, dict) or not isinstance(request.get("params"), dict):
            return f"requests.{i}: an object with `custom_id` and `params` (an object)"
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            return f"requests.{i}.custom_id: 1 to 64 characters of a-z, A-Z, 0-9, _ and -"
        if custom_id in seen:
            return f"requests.{i}.custom_id: {custom_id!r} is not unique in the batch"
        seen.add(custom_id)
    return None


def check_params(params: dict[str, Any], config: ServeConfig) -> str | None:
    """Why one request cannot run here (an `errored` result), or None."""
    model = params.get("model")
    if not isinstance(model, str) or model not in config.models:
        known = ", ".join(repr(m) for m in config.models)
        return f"model: {model!r} is not served here (models: {known})"
    if ENDPOINT not in config.models[model].endpoints():
        return f"model: {model!r} does not serve {ENDPOINT}"
    max_tokens = params.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: a whole number of at least 1"
    if params.get("stream"):
        return "stream: not allowed in a batch"
    if not isinstance(params.get("messages"), list):
        return "messages: a list of messages"
    return None


def new_batch(total: int) -> dict[str, Any]:
    from .batches import new_batch as new_openai_batch

    batch = new_openai_batch("", ENDPOINT, "24h", None)
    batch.update(
        id="msgbatch_" + secrets.token_hex(12),
        input_file_id=None,
        api="anthropic",
        request_counts={"total": total, "completed": 0, "failed": 0},
    )
    return batch


def view(batch: dict[str, Any]) -> dict[str, Any]:
    """The MessageBatch object."""
    status = batch["status"]
    ended = status in ("completed", "failed", "cancelled", "expired")
    total = batch["request_counts"]["total"]
    counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    if not ended:
        counts["processing"] = total
    elif batch.get("outcome"):
        counts.update(batch["outcome"])
    else:  # the batch failed as a whole
        counts["errored"] = total
    ended_at = (
        batch["completed_at"]
        or batch["cancelled_at"]
        or batch["failed_at"]
        or batch.get("expired_at")
    )
    return {
        "id": batch["id"],
        "type": "message_batch",
        "processing_status": (
            "ended" if ended else "canceling" if status == "cancelling" else "in_progress"
        ),
        "request_counts": counts,
        "ended_at": rfc3339(ended_at) if ended else None,
        "created_at": rfc3339(batch["created_at"]),
        "expires_at": rfc3339(batch["expires_at"]),
        "archived_at": None,
        "cancel_initiated_at": rfc3339(batch["cancelling_at"]),
        "results_url": f"/v1/messages/batches/{batch['id']}/results" if ended else None,
    }


def result_line(batch: dict[str, Any], o: Outcome) -> dict[str, Any]:
    from .batches import as_text, stable_id

    if o.kind == "succeeded" and o.raw:  # a provider's message, as it gave it
        return {"custom_id": o.custom_id, "result": {"type": "succeeded", "message": o.output}}
    if o.kind == "succeeded":
        message = {
            "id": stable_id("msg_", batch["id"], o.custom_id),
            "type": "message",
            "role": "assistant",
            "model": o.model,
            "content": [{"type": "text", "text": as_text(o.output)}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return {"custom_id": o.custom_id, "result": {"type": "succeeded", "message": message}}
    if o.kind == "cancelled":
        return {"custom_id": o.custom_id, "result": {"type": "canceled"}}
    if o.kind == "expired":
        return {"custom_id": o.custom_id, "result": {"type": "expired"}}
    kind = "invalid_request_error" if o.status < 500 else "api_error"
    error = {"type": "error", "error": {"type": kind, "message": o.message}}
    return {"custom_id": o.custom_id, "result": {"type": "errored", "error": error}}
