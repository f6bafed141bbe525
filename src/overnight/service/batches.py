"""OpenAI batches over overnight's backends: validation, the job behind each batch, and the
output and error files.

A batch moves validating -> in_progress -> finalizing -> completed, or to failed (its file
did not validate), or cancelling -> cancelled. Its lines run as one ledger job named after
the batch, over a copy of the uploaded file (`custom_id` is the item id): the ledger decides
what is done, so a server killed mid-batch and started again resumes the job, and the output
file, written from the ledger at the end, has every custom_id once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from .. import results
from ..errors import OvernightError
from ..job import Job
from ..store import open_ledger
from .catalogue import Catalogue
from .config import ServeConfig
from .files import FileStore

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
WINDOW = 24 * 3600
MAX_REQUESTS = 50_000  # OpenAI's limit per batch
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "cancelled", "expired")


def new_batch(
    input_file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": "batch_" + secrets.token_hex(12),
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + WINDOW,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
        "model": None,
        "usage": _usage(0, 0),
    }


def _usage(tokens_in: int, tokens_out: int) -> dict[str, Any]:
    return {
        "input_tokens": tokens_in,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": tokens_out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": tokens_in + tokens_out,
    }


# -- validation ----------------------------------------------------------------------------


@dataclass
class Validated:
    model: str | None = None
    total: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


def validate(path: Path, endpoint: str, config: ServeConfig) -> Validated:
    """Every line of the input file, as OpenAI checks them: JSON, `custom_id` unique, `method`
    POST, `url` the batch's endpoint, one `model`, known to serve.toml and able to serve the
    endpoint. Errors name their line (1-based); at most [batches] max_errors of them."""
    out = Validated()
    seen: set[str] = set()
    limit = config.spec.batches.max_errors

    def error(code: str, line: int, message: str, param: str | None = None) -> None:
        if len(out.errors) < limit:
            out.errors.append({"code": code, "line": line, "message": message, "param": param})

    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            out.total += 1
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                error("invalid_json_line", n, f"Line {n} is not valid JSON.")
                continue
            if not isinstance(line, dict):
                error("invalid_json_line", n, f"Line {n} is not a JSON object.")
                continue
            cid = line.get("custom_id")
            if not isinstance(cid, str) or not cid:
                error("missing_custom_id", n, f"Line {n} has no custom_id string.", "custom_id")
            elif cid in seen:
                error(
                    "duplicate_custom_id",
                    n,
                    f"The custom_id {cid!r} on line {n} is not unique in the file.",
                    "custom_id",
                )
            else:
                seen.add(cid)
            if line.get("method") != "POST":
                error("invalid_method", n, f"Line {n}: method must be 'POST'.", "method")
            if line.get("url") != endpoint:
                error(
                    "url_mismatch",
                    n,
                    f"Line {n}: url {line.get('url')!r} does not match the batch's endpoint"
                    f" {endpoint!r}.",
                    "url",
                )
            body = line.get("body")
            if not isinstance(body, dict):
                error("invalid_body", n, f"Line {n}: body must be a JSON object.", "body")
                continue
            model = body.get("model")
            if not isinstance(model, str) or model not in config.models:
                known = ", ".join(repr(m) for m in config.models)
                error(
                    "model_not_found",
                    n,
                    f"Line {n}: model {model!r} is not served here (models: {known}).",
                    "body.model",
                )
                continue
            if out.model is None:
                out.model = model
            elif model != out.model:
                error(
                    "model_mismatch",
                    n,
                    f"Line {n}: model {model!r} differs from {out.model!r}; a batch file"
                    " uses one model.",
                    "body.model",
                )
                continue
            backend = config.models[model].backend
            if backend == "local" and endpoint != "/v1/embeddings":
                error(
                    "unsupported_endpoint",
                    n,
                    f"Line {n}: model {model!r} (the local embedding model) serves"
                    " /v1/embeddings only.",
                    "url",
                )
            elif backend == "local" and not isinstance(body.get("input"), str):
                error(
                    "invalid_input",
                    n,
                    f"Line {n}: model {model!r} embeds one string per line: `input` must be"
                    " a string.",
                    "body.input",
                )
    if out.total == 0:
        error("empty_file", 1, "The input file has no requests.")
    elif out.total > MAX_REQUESTS:
        error("too_many_tasks", 1, f"The file has {out.total} requests; at most {MAX_REQUESTS}.")
    return out


# -- the job behind a batch ----------------------------------------------------------------


def job_for(batch: dict[str, Any], config: ServeConfig, workdir: Path) -> Job:
    """The ledger job that runs a batch's lines on the model they name. A python function
    gets the lines as records (`custom_id`, `method`, `url`, `body`); the local model embeds
    each line's `body.input`."""
    model = config.models[batch["model"]]
    task = (
        {"kind": "map"}
        if model.backend == "python"
        else {
            "kind": "embed",
            "text": "{{ body.input }}",
        }
    )
    spec = {
        "name": batch["id"],
        "source": {"path": str(workdir / "input.jsonl"), "id": "custom_id", "format": "jsonl"},
        "task": task,
        "model": model.model_dump(exclude_unset=True),
        "run": config.spec.run.model_dump(exclude_unset=True),
        "output": {
            "path": str(workdir / "results.jsonl"),
            "errors": str(workdir / "errors.jsonl"),
        },
    }
    return Job(
        spec,
        base_dir=config.base_dir,
        state=config.ledger_url,
        name=batch["id"],
        origin=f"{config.origin}: batch {batch['id']}",
    )


def _stable_id(prefix: str, *parts: str) -> str:
    return prefix + hashlib.blake2b("\0".join(parts).encode(), digest_size=12).hexdigest()


def response_body(batch: dict[str, Any], custom_id: str, output: Any) -> dict[str, Any]:
    """The body OpenAI's endpoint would have answered with: an embeddings list, or a
    chat.completion whose message content is the function's return value."""
    model = batch["model"]
    if batch["endpoint"] == "/v1/embeddings":
        vectors = output if _is_matrix(output) else [output]
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": [float(x) for x in v]}
                for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }
    content = output if isinstance(output, str) else orjson.dumps(output).decode()
    return {
        "id": _stable_id("chatcmpl-", batch["id"], custom_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _is_matrix(output: Any) -> bool:
    return (
        isinstance(output, list)
        and len(output) > 0
        and all(isinstance(v, list | tuple) for v in output)
    )


def _line(
    batch: dict[str, Any],
    custom_id: str,
    response: dict[str, Any] | None,
    error: dict[str, Any] | None,
) -> bytes:
    return orjson.dumps(
        {
            "id": _stable_id("batch_req_", batch["id"], custom_id),
            "custom_id": custom_id,
            "response": response,
            "error": error,
        },
        option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY,
    )


def _request_id(batch: dict[str, Any], custom_id: str) -> str:
    return _stable_id("req_", batch["id"], custom_id, "request")


# -- running batches -----------------------------------------------------------------------


class Batches:
    """The batches of one server: created, run in a bounded pool of threads, resumed when the
    server starts, cancelled."""

    def __init__(self, config: ServeConfig, catalogue: Catalogue, files: FileStore) -> None:
        self.config = config
        self.catalogue = catalogue
        self.files = files
        self.work = config.folder / "batches"
        self.work.mkdir(parents=True, exist_ok=True)
        self.stop = threading.Event()  # the server is shutting down: runs stop, resumable
        self._pool = ThreadPoolExecutor(
            max_workers=config.spec.batches.concurrency, thread_name_prefix="batch"
        )
        self._running: dict[str, Job] = {}
        self._lock = threading.Lock()

    def resume(self) -> list[str]:
        """Queues every batch that had not ended when the server stopped."""
        ids = self.catalogue.batches_in(ACTIVE)
        for batch_id in ids:
            log.info("resuming batch %s", batch_id)
            self._pool.submit(self._process, batch_id)
        return ids

    def create(self, tenant: str, batch: dict[str, Any]) -> dict[str, Any]:
        self.catalogue.add_batch(tenant, batch)
        self._pool.submit(self._process, batch["id"])
        return batch

    def shutdown(self) -> None:
        self.stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def retrieve(self, tenant: str, batch_id: str) -> dict[str, Any] | None:
        batch = self.catalogue.get_batch(batch_id, tenant)
        if batch is not None and batch["status"] in ("in_progress", "cancelling"):
            self._live_counts(batch)
        return batch

    def cancel(self, tenant: str, batch_id: str) -> dict[str, Any] | None:
        """The batch in `cancelling` (its run stops after the records in flight, then it is
        finalised as `cancelled`), or None if it had already ended or is being finalised."""
        now = int(time.time())
        batch = self.catalogue.update_batch(
            batch_id,
            {"status": "cancelling", "cancelling_at": now},
            when=("validating", "in_progress"),
        )
        if batch is None:
            return None
        with self._lock:
            job = self._running.get(batch_id)
        if job is not None:
            try:
                job.cancel()
            except OvernightError as exc:  # not in the ledger yet: the thread sees the status
                log.debug("cancel of %s: %s", batch_id, exc)
        return batch

    def _live_counts(self, batch: dict[str, Any]) -> None:
        """request_counts of a running batch, from the ledger."""
        ledger = open_ledger(self.config.ledger_url)
        try:
            job = ledger.get_job(batch["id"])
            if job is None:
                return
            counts = ledger.counts(job.id)
        finally:
            ledger.close()
        batch["request_counts"]["completed"] = counts["succeeded"]
        batch["request_counts"]["failed"] = counts.failed + counts["invalid"]

    # -- the batch's thread -----------------------------------------------------------------

    def _process(self, batch_id: str) -> None:
        try:
            self._advance(batch_id)
        except Exception as exc:  # the batch fails with the reason; the server goes on
            log.exception("batch %s failed", batch_id)
            self.catalogue.update_batch(
                batch_id,
                {
                    "status": "failed",
                    "failed_at": int(time.time()),
                    "errors": {
                        "object": "list",
                        "data": [
                            {
                                "code": "server_error",
                                "message": f"{type(exc).__name__}: {exc}",
                                "param": None,
                                "line": None,
                            }
                        ],
                    },
                },
                when=ACTIVE,
            )

    def _advance(self, batch_id: str) -> None:
        batch = self.catalogue.get_batch(batch_id)
        if batch is None or self.stop.is_set():
            return
        workdir = self.work / batch_id
        if batch["status"] == "validating":
            batch = self._validate(batch, workdir)
            if batch is None or batch["status"] == "failed":
                return
        if batch["status"] == "in_progress":
            job = job_for(batch, self.config, workdir)
            with self._lock:
                self._running[batch_id] = job
            try:
                if self.catalogue.get_batch(batch_id)["status"] == "in_progress":  # type: ignore[index]
                    report = job.run(stop=self.stop)
                    if report.interrupted or self.stop.is_set():
                        return  # the server is stopping: resumed at the next start
            finally:
                with self._lock:
                    self._running.pop(batch_id, None)
            batch = self.catalogue.update_batch(
                batch_id,
                {"status": "finalizing", "finalizing_at": int(time.time())},
                when=("in_progress",),
            ) or self.catalogue.get_batch(batch_id)
            assert batch is not None
        if batch["status"] == "finalizing":
            self._finalize(batch, workdir, cancelled=False)
        elif batch["status"] == "cancelling":
            if batch["model"] is not None and (workdir / "input.jsonl").exists():
                job = job_for(batch, self.config, workdir)
                with contextlib.suppress(OvernightError):  # not in the ledger: nothing open
                    job.cancel()  # a run killed with the server may have left items open
            self._finalize(batch, workdir, cancelled=True)

    def _validate(self, batch: dict[str, Any], workdir: Path) -> dict[str, Any] | None:
        tenant = self.catalogue.tenant_of_batch(batch["id"])
        source = self.files.path(batch["input_file_id"])
        if tenant is None or self.files.get(tenant, batch["input_file_id"]) is None:
            checked = Validated(
                errors=[
                    {
                        "code": "file_not_found",
                        "line": None,
                        "message": f"The input file {batch['input_file_id']} was deleted.",
                        "param": "input_file_id",
                    }
                ]
            )
        else:
            checked = validate(source, batch["endpoint"], self.config)
        now = int(time.time())
        if checked.errors:
            return self.catalogue.update_batch(
                batch["id"],
                {
                    "status": "failed",
                    "failed_at": now,
                    "errors": {"object": "list", "data": checked.errors},
                    "request_counts": {"total": checked.total, "completed": 0, "failed": 0},
                },
                when=("validating",),
            ) or self.catalogue.get_batch(batch["id"])
        # The job reads its own copy: deleting the uploaded file never breaks a resume.
        workdir.mkdir(parents=True, exist_ok=True)
        copy = workdir / "input.jsonl"
        if not copy.exists():
            tmp = workdir / "input.jsonl.tmp"
            shutil.copyfile(source, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, copy)
        changes = {
            "model": checked.model,
            "request_counts": {"total": checked.total, "completed": 0, "failed": 0},
        }
        updated = self.catalogue.update_batch(
            batch["id"],
            {**changes, "status": "in_progress", "in_progress_at": now},
            when=("validating",),
        )
        # Cancelled while it was validated: it keeps `cancelling`, with what was learnt.
        return updated or self.catalogue.update_batch(batch["id"], changes)

    def _finalize(self, batch: dict[str, Any], workdir: Path, cancelled: bool) -> None:
        """Writes the output and error files from the ledger and ends the batch. Idempotent:
        the files' ids come from the batch's, so a finalisation cut short by a kill and done
        again replaces them."""
        tenant = self.catalogue.tenant_of_batch(batch["id"])
        assert tenant is not None
        succeeded = failed = tokens_in = tokens_out = 0
        out_path, err_path = workdir / "output.jsonl.part", workdir / "errors.jsonl.part"
        workdir.mkdir(parents=True, exist_ok=True)
        seen: set[str] = set()
        ledger = open_ledger(self.config.ledger_url)
        try:
            job = ledger.get_job(batch["id"]) if batch["model"] is not None else None
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                if job is not None:
                    for custom_id, result, _, vector in ledger.iter_results(job.id):
                        row = results.decode(result, vector)
                        body = response_body(batch, custom_id, row.get("output"))
                        response = {
                            "status_code": 200,
                            "request_id": _request_id(batch, custom_id),
                            "body": body,
                        }
                        out.write(_line(batch, custom_id, response, None))
                        seen.add(custom_id)
                        succeeded += 1
                    for f in ledger.iter_failures(job.id):
                        if f.custom_id is None or f.custom_id in seen:
                            continue
                        error = {
                            "message": f.message,
                            "type": "server_error" if f.state == "failed" else "invalid_output",
                            "param": None,
                            "code": f.error_class,
                        }
                        response = {
                            "status_code": 500,
                            "request_id": _request_id(batch, f.custom_id),
                            "body": {"error": error},
                        }
                        err.write(_line(batch, f.custom_id, response, None))
                        seen.add(f.custom_id)
                        failed += 1
                    counts = ledger.counts(job.id)
                    tokens_in, tokens_out = counts.input_tokens, counts.output_tokens
                if cancelled:
                    failed += _write_cancelled(batch, workdir / "input.jsonl", seen, err)
        finally:
            ledger.close()
        changes: dict[str, Any] = {
            "request_counts": {
                "total": batch["request_counts"]["total"],
                "completed": succeeded,
                "failed": failed,
            },
            "usage": _usage(tokens_in, tokens_out),
        }
        if succeeded or not failed:
            changes["output_file_id"] = self._result_file(tenant, batch, "output", out_path)
        if failed:
            changes["error_file_id"] = self._result_file(tenant, batch, "error", err_path)
        now = int(time.time())
        if cancelled:
            changes.update(status="cancelled", cancelled_at=now)
        else:
            changes.update(status="completed", completed_at=now)
        self.catalogue.update_batch(
            batch["id"], changes, when=("cancelling",) if cancelled else ("finalizing",)
        )
        out_path.unlink(missing_ok=True)
        err_path.unlink(missing_ok=True)

    def _result_file(self, tenant: str, batch: dict[str, Any], kind: str, path: Path) -> str:
        file_id = _stable_id("file-", batch["id"], kind)
        self.files.add(tenant, f"{batch['id']}_{kind}.jsonl", "batch_output", path, file_id=file_id)
        return file_id


def _write_cancelled(
    batch: dict[str, Any], input_path: Path, seen: set[str], err: IO[bytes]
) -> int:
    """Error lines for the requests a cancel kept from running."""
    if not input_path.exists():
        return 0
    n = 0
    with open(input_path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            custom_id = orjson.loads(raw)["custom_id"]
            if custom_id in seen:
                continue
            error = {"code": "batch_cancelled", "message": "The batch was cancelled."}
            err.write(_line(batch, custom_id, None, error))
            seen.add(custom_id)
            n += 1
    return n
