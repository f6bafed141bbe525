"""The fake's OpenAI files and batches (`/v1/files`, `/v1/batches`).

Shapes follow `shared/specs/provider-batch-apis.md`. A batch moves along its timeline at each
read (`batch_seconds` from its creation); its lines are answered by `fake_answers` as it runs
(the real-time fault knobs do not apply; `invalid_json_rate` does).

validating → failed (the input file's errors, one {code, line, message, param} per problem) |
in_progress (request_counts grow) → finalizing (the last fifth of `batch_seconds`) →
completed | expired (`expire_batches`: `expire_fraction` done, the rest `batch_expired` in
the error file) | cancelling → cancelled at the next read (`cancel_fraction` done, the rest
`batch_cancelled`). The output file holds the successes, shuffled (not in input order); the
error file the lines the endpoint refused (response.status_code 4xx, its error body) and the
ones that never ran (response null, error.code).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from overnight.testing.fake_answers import answer_chat, answer_embeddings, prompt_of
from overnight.testing.fake_state import (
    DAY,
    Owner,
    ProviderError,
    json_body,
    jsonl,
    limit_param,
    list_page,
    take_batch_failure,
)

FINISHED = ("completed", "failed", "expired", "cancelled")
ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_LINES = 50_000
MAX_UPLOAD = 512 << 20


@dataclass
class _File:
    obj: dict[str, Any]
    data: bytes


@dataclass
class _OpenAIBatch:
    obj: dict[str, Any]  # the public Batch object
    lines: list[dict[str, Any]]
    errors: list[dict[str, Any]]  # what validation found; reported at the first read
    started: float  # monotonic
    seconds: float
    expire: bool
    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # lines run so far

    @property
    def ends_at(self) -> float:
        return self.started + self.seconds


class OpenAIBatches:
    def __init__(self, owner: Owner) -> None:
        self.o = owner
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _OpenAIBatch] = {}

    # -- files ------------------------------------------------------------------------------

    def _new_file(self, name: str, purpose: str, data: bytes, ttl: int | None) -> dict[str, Any]:
        now = int(time.time())
        fid = self.o.ids.new("file-")
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": now,
            "filename": name,
            "purpose": purpose,
            "status": "processed",
            "expires_at": now + ttl if ttl else None,
            "status_details": None,
        }
        self.files[fid] = _File(obj, data)
        return obj

    def _file(self, fid: str) -> _File:
        f = self.files.get(fid)
        if f is None:
            raise ProviderError(404, f"No such File object: {fid}", param="id")
        return f

    async def upload(self, request: Request) -> Response:
        self.o.stats.bump("uploads_received")
        if self.o.knobs.upload_delay:
            await asyncio.sleep(self.o.knobs.upload_delay)
        form = await request.form(max_part_size=1 << 31)
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile) or not isinstance(purpose, str) or not purpose:
            raise ProviderError(
                400, "Missing required parameter: 'file' and 'purpose'.", param="file"
            )
        if purpose not in UPLOAD_PURPOSES:
            raise ProviderError(400, f"Invalid value for 'purpose': {purpose!r}.", param="purpose")
        ttl: int | None = 30 * DAY if purpose == "batch" else None
        if "expires_after[seconds]" in form:
            try:
                ttl = int(str(form["expires_after[seconds]"]))
            except ValueError:
                ttl = 0
            if not 3600 <= ttl <= 30 * DAY or form.get("expires_after[anchor]") != "created_at":
                raise ProviderError(
                    400, "expires_after: anchor created_at, 3600 to 2592000 seconds"
                )
        data = await upload.read()
        limit = min(self.o.knobs.max_batch_bytes or MAX_UPLOAD, MAX_UPLOAD)
        if len(data) > limit:
            raise ProviderError(
                413, f"File is {len(data)} bytes, over the {limit} allowed.", code="file_too_large"
            )
        name = str(upload.filename or "file")
        if purpose == "batch" and not name.endswith(".jsonl"):
            raise ProviderError(400, "Invalid file format for Batch API. Must be .jsonl")
        with self.o.lock:
            obj = self._new_file(name, purpose, data, ttl)
        self.o.stats.bump("files_uploaded")
        self.o.stats.bump("bytes_uploaded", n=len(data))
        return JSONResponse(obj)

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(self._file(request.path_params["id"]).obj)

    async def delete_file(self, request: Request) -> Response:
        fid = request.path_params["id"]
        with self.o.lock:
            self._file(fid)
            del self.files[fid]
        return JSONResponse({"id": fid, "object": "file", "deleted": True})

    async def file_content(self, request: Request) -> Response:
        return Response(self._file(request.path_params["id"]).data, media_type="application/jsonl")

    async def list_files(self, request: Request) -> Response:
        q = request.query_params
        limit = limit_param(request, 10_000, 10_000)
        with self.o.lock:
            items = [f.obj for f in self.files.values()]
        if q.get("purpose"):
            items = [f for f in items if f["purpose"] == q["purpose"]]
        newest_first = q.get("order", "desc") != "asc"
        items.sort(key=lambda f: f["id"], reverse=newest_first)
        if q.get("after"):
            after = q["after"]
            items = [f for f in items if (f["id"] < after if newest_first else f["id"] > after)]
        return list_page(items[:limit], len(items) > limit, openai=True)

    # -- batches ----------------------------------------------------------------------------

    async def create_batch(self, request: Request) -> Response:
        self.o.stats.bump("creates_received")
        body = await json_body(request)
        # Shielded: a client that goes away during create_delay does not stop the batch.
        return await asyncio.shield(asyncio.ensure_future(self._create_batch(body)))

    async def _create_batch(self, body: dict[str, Any]) -> Response:
        if self.o.knobs.create_delay:
            await asyncio.sleep(self.o.knobs.create_delay)
        for key in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(key):
                raise ProviderError(
                    400,
                    f"Missing required parameter: '{key}'.",
                    param=key,
                    code="missing_required_parameter",
                )
        if body["endpoint"] not in ENDPOINTS:
            raise ProviderError(
                400, f"Invalid value for 'endpoint': {body['endpoint']!r}.", param="endpoint"
            )
        if body["completion_window"] != "24h":
            raise ProviderError(
                400, "Invalid value for 'completion_window': only '24h'.", param="completion_window"
            )
        meta = body.get("metadata")
        if meta is not None and not _metadata_ok(meta):
            raise ProviderError(
                400,
                "metadata: at most 16 pairs; keys up to 64 characters, values up to 512",
                param="metadata",
            )
        knobs = self.o.knobs
        with self.o.lock:
            f = self._file(body["input_file_id"])
            if f.obj["purpose"] != "batch":
                raise ProviderError(
                    400, "The input file must have purpose 'batch'.", param="input_file_id"
                )
            lines, errors = validate_input(f.data, body["endpoint"])
            if knobs.max_batch_requests is not None and len(lines) > knobs.max_batch_requests:
                raise ProviderError(
                    400,
                    f"The batch has {len(lines)} requests, over the limit of "
                    f"{knobs.max_batch_requests}.",
                    code="too_many_requests",
                )
            if knobs.fail_validation:  # one shot
                knobs.fail_validation = False
                errors = errors or [_line_error("invalid_request", 1, "request is invalid", "body")]
            now = int(time.time())
            bid = self.o.ids.new("batch_")
            obj: dict[str, Any] = {
                "id": bid,
                "object": "batch",
                "endpoint": body["endpoint"],
                "errors": None,
                "input_file_id": f.obj["id"],
                "completion_window": "24h",
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": now,
                "in_progress_at": None,
                "expires_at": now + DAY,
                "finalizing_at": None,
                "completed_at": None,
                "failed_at": None,
                "expired_at": None,
                "cancelling_at": None,
                "cancelled_at": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "metadata": meta,
                "model": next((str(ln["body"].get("model")) for ln in lines), None),
                "usage": None,
            }
            self.batches[bid] = _OpenAIBatch(
                obj, lines, errors, time.monotonic(), knobs.batch_seconds, knobs.expire_batches
            )
        self.o.stats.batch_created(
            [str(ln.get("custom_id")) for ln in lines], [prompt_of(ln.get("body")) for ln in lines]
        )
        return JSONResponse(obj)

    def _batch(self, bid: str) -> _OpenAIBatch:
        b = self.batches.get(bid)
        if b is None:
            raise ProviderError(404, f"No batch found with id '{bid}'.")
        self._advance(b)
        return b

    def _advance(self, b: _OpenAIBatch) -> None:
        """Move a batch along its timeline (called under the lock, at every read)."""
        obj = b.obj
        if obj["status"] in FINISHED:
            return
        now, total = int(time.time()), len(b.lines)
        if obj["status"] == "validating":
            if b.errors:
                errors = {"object": "list", "data": b.errors}
                obj.update(status="failed", failed_at=now, errors=errors)
                return
            obj.update(status="in_progress", in_progress_at=now)
        if obj["status"] == "cancelling":
            self._finish(b, "cancelled", int(total * self.o.knobs.cancel_fraction))
        elif time.monotonic() >= b.ends_at:
            if b.expire:
                self._finish(b, "expired", int(total * self.o.knobs.expire_fraction))
            else:
                self._finish(b, "completed", total)
        else:  # lines run steadily over the first 80%; then the files are being written
            progress = (time.monotonic() - b.started) / max(b.seconds, 1e-9)
            target = total * (self.o.knobs.expire_fraction if b.expire else 1.0)
            self._run(b, int(target * min(1.0, progress / 0.8)))
            ok = sum(1 for st, _ in b.answers if st == 200)
            obj["request_counts"].update(completed=ok, failed=len(b.answers) - ok)
            if progress >= 0.8 and not b.expire:
                obj.update(status="finalizing", finalizing_at=obj["finalizing_at"] or now)

    def _run(self, b: _OpenAIBatch, done: int) -> None:
        """Answer the lines up to `done` that have not been answered yet."""
        for line in b.lines[len(b.answers) : done]:
            b.answers.append(self._answer(b.obj["endpoint"], line["body"]))
            if b.answers[-1][0] == 200:
                self.o.stats.bump("billed", prompt_of(line["body"]))

    def _finish(self, b: _OpenAIBatch, status: str, done: int) -> None:
        """End the batch: its first `done` lines run, the rest never will; write the files."""
        self._run(b, done)
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(status)
        outputs: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        tin = tout = 0
        for i, line in enumerate(b.lines):
            rec: dict[str, Any] = {
                "id": self.o.ids.new("batch_req_"),
                "custom_id": line["custom_id"],
            }
            if i >= len(b.answers):
                message = f"This request could not be executed before the batch was {status}."
                errors.append(
                    {**rec, "response": None, "error": {"code": code, "message": message}}
                )
                continue
            st, body = b.answers[i]
            rid = self.o.ids.new("req_")
            rec.update(response={"status_code": st, "request_id": rid, "body": body}, error=None)
            if st != 200:
                errors.append(rec)
                continue
            outputs.append(rec)
            usage = body.get("usage") or {}
            tin += usage.get("prompt_tokens", 0)
            tout += usage.get("completion_tokens", 0)
        random.Random(b.obj["id"]).shuffle(outputs)  # the output file is not in input order
        now = int(time.time())
        bid = b.obj["id"]
        out_id = err_id = None
        if outputs:
            data = jsonl(outputs, self.o)
            out_id = self._new_file(f"{bid}_output.jsonl", "batch_output", data, 30 * DAY)
        if errors:
            err_id = self._new_file(f"{bid}_error.jsonl", "batch_output", jsonl(errors), 30 * DAY)
        stamp = {"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}
        b.obj.update(
            {
                "status": status,
                "output_file_id": out_id and out_id["id"],
                "error_file_id": err_id and err_id["id"],
                "finalizing_at": b.obj["finalizing_at"] or now,
                stamp[status]: now,
                "request_counts": {
                    "total": len(b.lines),
                    "completed": len(outputs),
                    "failed": len(errors),
                },
                "usage": {
                    "input_tokens": tin,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": tout,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": tin + tout,
                },
            }
        )

    def _answer(self, endpoint: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        failure = take_batch_failure(self.o)
        if failure is not None:
            kind = {429: "rate_limit_exceeded"}.get(failure, "server_error")
            return failure, ProviderError(failure, "injected", type=kind).body("openai")
        if endpoint == "/v1/chat/completions":
            return answer_chat(body, invalid_rate=self.o.knobs.invalid_json_rate, ids=self.o.ids)
        if endpoint == "/v1/embeddings":
            return answer_embeddings(body)
        return 400, ProviderError(400, f"The fake does not serve {endpoint}.").body("openai")

    async def get_batch(self, request: Request) -> Response:
        with self.o.lock:
            return JSONResponse(self._batch(request.path_params["id"]).obj)

    async def cancel_batch(self, request: Request) -> Response:
        with self.o.lock:
            b = self._batch(request.path_params["id"])
            if b.obj["status"] in ("validating", "in_progress"):
                b.obj.update(status="cancelling", cancelling_at=int(time.time()))
            return JSONResponse(b.obj)

    async def list_batches(self, request: Request) -> Response:
        limit = limit_param(request, 20, 100)
        after = request.query_params.get("after")
        with self.o.lock:
            items = sorted(self.batches, reverse=True)  # ids sort by creation: newest first
            if after:
                items = [bid for bid in items if bid < after]
            page = [self._batch(bid).obj for bid in items[:limit]]
            return list_page(page, len(items) > limit, openai=True)

    def complete_all(self) -> None:
        """End every live batch now (called under the lock)."""
        for b in self.batches.values():
            b.seconds = 0.0
            self._advance(b)


def _metadata_ok(meta: Any) -> bool:
    return (
        isinstance(meta, dict)
        and len(meta) <= 16
        and all(isinstance(k, str) and len(k) <= 64 for k in meta)
        and all(isinstance(v, str) and len(v) <= 512 for v in meta.values())
    )


def _line_error(code: str, line: int | None, message: str, param: str | None) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def validate_input(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict]]:
    """The request lines of a batch input file, and the errors that fail the batch: one
    {code, line, message, param} per problem, lines numbered from 1."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    first_model: str | None = None
    for n, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            line = None
        if not isinstance(line, dict):
            errors.append(_line_error("invalid_json_line", n, f"Line {n} is not valid JSON.", None))
            continue
        cid, body = line.get("custom_id"), line.get("body")
        if not isinstance(cid, str) or not cid:
            errors.append(
                _line_error("missing_custom_id", n, "custom_id is required.", "custom_id")
            )
        elif cid in seen:
            msg = f"The custom_id {cid!r} is used more than once."
            errors.append(_line_error("duplicate_custom_id", n, msg, "custom_id"))
        seen.add(str(cid))
        if line.get("method") != "POST":
            errors.append(_line_error("invalid_method", n, "method must be POST.", "method"))
        if line.get("url") != endpoint:
            msg = f"The url {line.get('url')!r} does not match the batch endpoint {endpoint!r}."
            errors.append(_line_error("url_mismatch", n, msg, "url"))
        if not isinstance(body, dict):
            errors.append(_line_error("invalid_body", n, "body must be a JSON object.", "body"))
            body = {}
        model = str(body.get("model"))
        if first_model is None:
            first_model = model
        elif model != first_model:
            msg = f"All requests must use one model: {first_model!r}, then {model!r}."
            errors.append(_line_error("model_mismatch", n, msg, "body.model"))
        lines.append({**line, "body": body})
    if not lines and not errors:
        errors.append(_line_error("empty_file", None, "The input file is empty.", None))
    if len(lines) > MAX_LINES:
        msg = f"The batch has {len(lines)} requests; at most {MAX_LINES}."
        errors.append(_line_error("too_many_tasks", None, msg, None))
    return lines, errors
