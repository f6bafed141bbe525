"""OpenAI batches over overnight's backends: validation, the job behind each batch, and the
output and error files.

A batch moves validating -> in_progress -> finalizing -> completed, or to failed (its file
did not validate), or cancelling -> cancelled, or -- not ended by its `expires_at`
([batches] completion_window_hours after it was created) -- finalizing -> expired: what it
finished is kept, the lines not run are reported `batch_expired` and its job's open items are
cancelled, so no more work is spent. Its lines run as one ledger job named after
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .. import results
from ..claim import JobBusy, live_workers
from ..errors import EndpointDown, OvernightError, UsageError
from ..job import Job
from ..report import Report
from ..store import Counts, open_ledger
from . import anthropic
from .catalogue import Catalogue
from .config import ServeConfig
from .files import FileStore

log = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
MAX_REQUESTS = 50_000  # OpenAI's limit per batch
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
EXPIRABLE = ("validating", "in_progress")  # a batch finalizing or cancelling ends by itself
WATCH_SECONDS = 60.0  # the longest the expiry watch sleeps (a create wakes it sooner)
STALE_SECONDS = 3600.0  # a temporary file this old was left by a kill (not a live writer)


class TooManyActive(Exception):
    """The tenant's quota of batches that have not ended is used up (answered 429)."""

    def __init__(self, active: int) -> None:
        super().__init__(
            f"This key already has {active} batches that have not ended, its limit"
            " ([batches] max_active_per_tenant); wait for one to end or cancel one."
        )
        self.active = active


ENDED = ("completed", "failed", "cancelled", "expired")
# A provider that cannot be reached pauses a batch's job: it runs again after this many
# seconds, doubling up to PAUSE_MAX.
PAUSE_FIRST, PAUSE_MAX = 1.0, 60.0


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
        "expires_at": None,  # set by Batches.create: [batches] completion_window_hours
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
        "api": "openai",
        "parts": None,  # the ledger jobs that run it, once validated
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
            served = config.models[model]
            backend = served.backend
            if served.passes_through and endpoint not in served.endpoints():
                error(
                    "unsupported_endpoint",
                    n,
                    f"Line {n}: model {model!r} (backend {backend!r}) serves"
                    f" {' and '.join(served.endpoints())} only.",
                    "url",
                )
            elif backend == "local" and endpoint != "/v1/embeddings":
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


# -- the jobs behind a batch ---------------------------------------------------------------
#
# A batch runs as one ledger job per model its lines name (`parts`): an OpenAI batch has one
# model, named like the batch, over `input.jsonl`; an Anthropic batch may mix models, its job
# `<batch id>.<n>` over `part<n>.jsonl`. `input.jsonl` always holds every line, as OpenAI's
# lines (`custom_id`, `method`, `url`, `body`): what a python function gets.


def job_for(batch: dict[str, Any], part: dict[str, str], config: ServeConfig, workdir: Path) -> Job:
    """The ledger job that runs one model's lines of a batch. A python function gets the
    lines as records; the local model embeds each line's `body.input`; a provider model gets
    each line as it is (`passthrough`, its body.model already the provider's id: see
    `provider_lines`), in real time or through the provider's batch API, the answers cached
    per tenant (an identical line of a later batch costs nothing)."""
    model = config.models[part["model"]]
    run = config.spec.run.model_dump(exclude_unset=True)
    model_table = model.job_model()
    if model.backend == "python":
        task: dict[str, Any] = {"kind": "map"}
    elif model.backend == "transformers":
        task = {"kind": "passthrough"}
    elif model.is_provider:
        task = {"kind": "passthrough"}
        model_table["name"] = model.provider_model(part["model"])
        for key in ("isolation", "timeout"):  # a worker's settings; [model] timeout is its own
            run.pop(key, None)
        if "cache" not in run and part.get("cache"):
            run["cache"] = str(config.folder / part["cache"])
    else:
        task = {"kind": "embed", "text": "{{ body.input }}"}
    spec = {
        "name": part["job"],
        "source": {"path": str(workdir / part["input"]), "id": "custom_id", "format": "jsonl"},
        "task": task,
        "model": model_table,
        "run": run,
        "output": {
            "path": str(workdir / f"{part['job']}.results.jsonl"),
            "errors": str(workdir / f"{part['job']}.errors.jsonl"),
        },
    }
    return Job(
        spec,
        base_dir=config.base_dir,
        state=config.ledger_url,
        name=part["job"],
        origin=f"{config.origin}: batch {batch['id']}",
    )


def stable_id(prefix: str, *parts: str) -> str:
    return prefix + hashlib.blake2b("\0".join(parts).encode(), digest_size=12).hexdigest()


def cache_name(tenant: str) -> str:
    """A tenant's response cache, relative to the service's folder: tenants never share
    answers (nor learn what another sent)."""
    return f"cache/{stable_id('tenant-', tenant)}.db"


def provider_lines(lines: Iterator[bytes], model: str, provider_model: str) -> Iterator[bytes]:
    """A provider model's lines with body.model the provider's id (serve.toml's `name`) in
    place of the served name."""
    for raw in lines:
        if not raw.strip():
            continue
        line = orjson.loads(raw)
        if line["body"].get("model") == model:
            line["body"]["model"] = provider_model
        yield orjson.dumps(line)


def response_body(
    batch: dict[str, Any], custom_id: str, model: str, output: Any, raw: bool = False
) -> dict[str, Any]:
    """The body OpenAI's endpoint would have answered with: an embeddings list, or a
    chat.completion whose message content is the function's return value; `raw`: the
    provider's own answer body, as it is."""
    if raw:  # a provider's answer, as it gave it
        return output
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
    return {
        "id": stable_id("chatcmpl-", batch["id"], custom_id),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": as_text(output), "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def as_text(output: Any) -> str:
    """A function's answer as a message's text: a string as is, anything else as JSON."""
    return output if isinstance(output, str) else orjson.dumps(output).decode()


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
            "id": stable_id("batch_req_", batch["id"], custom_id),
            "custom_id": custom_id,
            "response": response,
            "error": error,
        },
        option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY,
    )


def _request_id(batch: dict[str, Any], custom_id: str) -> str:
    return stable_id("req_", batch["id"], custom_id, "request")


@dataclass(frozen=True)
class Outcome:
    """What became of one line: `succeeded` (with the model's output), `failed` (the call
    failed: `message`, `error_class`), `rejected` (never run: its request was not valid),
    `cancelled` (never run: the batch was cancelled), `expired` (never run: the batch's
    completion window ended first). `raw`: the output is a provider's answer body, passed on
    as it is."""

    custom_id: str
    kind: str
    model: str | None = None
    output: Any = None
    message: str = ""
    error_class: str = ""
    raw: bool = False

    @property
    def status(self) -> int:
        """The HTTP status of a failed line: the provider's (`http_<status>`), 400 for a
        request that was not valid, else 500."""
        if self.kind == "rejected" or self.error_class == "input_error":
            return 400
        if self.error_class.startswith("http_") and self.error_class[5:].isdigit():
            return int(self.error_class[5:])
        return 500


def openai_line(batch: dict[str, Any], o: Outcome) -> bytes:
    """The output-file line (succeeded) or error-file line of an outcome."""
    if o.kind == "succeeded":
        response = {
            "status_code": 200,
            "request_id": _request_id(batch, o.custom_id),
            "body": response_body(batch, o.custom_id, o.model or "", o.output, o.raw),
        }
        return _line(batch, o.custom_id, response, None)
    if o.kind == "cancelled":
        error = {"code": "batch_cancelled", "message": "The batch was cancelled."}
        return _line(batch, o.custom_id, None, error)
    if o.kind == "expired":
        error = {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
        return _line(batch, o.custom_id, None, error)
    status = o.status
    error = {
        "message": o.message,
        "type": "invalid_request_error" if status < 500 else "server_error",
        "param": None,
        "code": o.error_class or None,
    }
    response = {
        "status_code": status,
        "request_id": _request_id(batch, o.custom_id),
        "body": {"error": error},
    }
    return _line(batch, o.custom_id, response, None)


def openai_view(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as OpenAI's API shows it (without the service's own bookkeeping)."""
    return {k: v for k, v in batch.items() if k not in INTERNAL}


INTERNAL = ("api", "parts", "outcome", "expiring")


# -- running batches -----------------------------------------------------------------------


class Batches:
    """The batches of one server: created, run in a bounded pool of threads, resumed when the
    server starts, cancelled."""

    def __init__(
        self,
        config: ServeConfig,
        catalogue: Catalogue,
        files: FileStore,
        give_way: Callable[[str, threading.Event], None] | None = None,
    ) -> None:
        self.config = config
        # Called by a batch's job between its commits with the model's name: returns once
        # real-time requests for that model are served (realtime.Realtime.wait_idle).
        self.give_way = give_way or (lambda model, stop: None)
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
        self.window = round(config.spec.batches.completion_window_hours * 3600)
        self._wake = threading.Event()  # a batch was created: the expiry watch looks again
        self._watch: threading.Thread | None = None
        self._queued: set[str] = set()  # batches submitted to the pool and not done with

    def workdir(self, batch_id: str) -> Path:
        return self.work / batch_id

    def resume(self) -> list[str]:
        """Queues every batch that had not ended when the server stopped (those whose window
        ended meanwhile are queued to be finalised as expired), and starts the expiry watch."""
        self.expire_due()
        ids = self.adopt()
        self._watch = threading.Thread(target=self._watch_expiry, name="batch-expiry", daemon=True)
        self._watch.start()
        return ids

    def adopt(self) -> list[str]:
        """Queues every batch that has not ended and is not queued here already: at start,
        those the server had not finished; later, those another server on the same
        catalogue left (stopped or killed). A batch another server still runs is joined:
        its job's items are shared out by the ledger, and the last run to finish finalises."""
        ids = []
        for batch_id in self.catalogue.batches_in(ACTIVE):
            with self._lock:
                if batch_id in self._queued:
                    continue
                self._queued.add(batch_id)
            log.info("resuming batch %s", batch_id)
            self._pool.submit(self._process, batch_id)
            ids.append(batch_id)
        return ids

    def create(self, tenant: str, batch: dict[str, Any]) -> dict[str, Any]:
        """Records the batch and queues it. Raises TooManyActive when the tenant already has
        `[batches] max_active_per_tenant` batches that have not ended."""
        batch["expires_at"] = batch["created_at"] + self.window
        limit = self.config.spec.batches.max_active_per_tenant
        over = self.catalogue.add_batch(tenant, batch, ACTIVE, limit)
        if over is not None:
            shutil.rmtree(self.workdir(batch["id"]), ignore_errors=True)  # Anthropic's lines
            raise TooManyActive(over)
        with self._lock:
            self._queued.add(batch["id"])
        self._pool.submit(self._process, batch["id"])
        self._wake.set()
        return batch

    # -- the completion window ------------------------------------------------------------

    def expire_due(self) -> float | None:
        """Moves every batch not ended by its `expires_at` to finalizing, to be finalised as
        expired by its thread (a running job is cancelled: its records in flight are kept,
        its other items are not run). Returns the next `expires_at` of an open batch."""
        due, upcoming = self.catalogue.expiring(EXPIRABLE, time.time())
        for batch_id in due:
            batch = self.catalogue.update_batch(
                batch_id,
                {"status": "finalizing", "finalizing_at": int(time.time()), "expiring": True},
                when=EXPIRABLE,
            )
            if batch is None:  # cancelled or finished meanwhile
                continue
            log.warning("batch %s expired: its completion window ended", batch_id)
            self._cancel_run(batch)
        return upcoming

    def _watch_expiry(self) -> None:
        """The server's watch: expires batches at their `expires_at` (it sleeps until the
        next one, or a create), and every WATCH_SECONDS adopts those another server left."""
        adopted = time.monotonic()
        while not self.stop.is_set():
            try:
                upcoming = self.expire_due()
                if time.monotonic() - adopted >= WATCH_SECONDS:
                    adopted = time.monotonic()
                    self.adopt()
            except Exception:  # the catalogue failed: look again later
                log.exception("the batch watch failed")
                upcoming = None
            wait = WATCH_SECONDS if upcoming is None else upcoming - time.time()
            self._wake.wait(min(WATCH_SECONDS, max(0.05, wait)))
            self._wake.clear()

    def write_input(self, batch_id: str, lines: list[dict[str, Any]]) -> None:
        """The lines of a batch created with its requests (Anthropic's), before `create`."""
        workdir = self.workdir(batch_id)
        workdir.mkdir(parents=True, exist_ok=True)
        _write_all(workdir / "input.jsonl", [orjson.dumps(line) for line in lines])

    def shutdown(self) -> None:
        self.stop.set()
        self._wake.set()
        if self._watch is not None:
            self._watch.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def retrieve(self, tenant: str, batch_id: str) -> dict[str, Any] | None:
        batch = self.catalogue.get_batch(batch_id, tenant)
        if batch is not None and batch["status"] in ("in_progress", "cancelling"):
            self._live_counts(batch)
        return batch

    def cancel(self, tenant: str, batch_id: str) -> dict[str, Any] | None:
        """The batch in `cancelling` (its run stops after the records in flight, then it is
        finalised as `cancelled`), or None if it had already ended or is being finalised."""
        batch = self.catalogue.update_batch(
            batch_id,
            {"status": "cancelling", "cancelling_at": int(time.time())},
            when=("validating", "in_progress"),
        )
        if batch is None:
            return None
        self._cancel_run(batch)
        return batch

    def _cancel_run(self, batch: dict[str, Any]) -> None:
        """Stops the batch's job after its records in flight, wherever it runs: in this
        server, or in another on the same ledger and catalogue (the ledger's cancel flag,
        which a run watches)."""
        with self._lock:
            job = self._running.get(batch["id"])
        workdir = self.workdir(batch["id"])
        jobs = (
            [job]
            if job is not None
            else [job_for(batch, part, self.config, workdir) for part in batch.get("parts") or []]
        )
        for job in jobs:
            try:
                job.cancel()
            except OvernightError as exc:  # not in the ledger yet: the thread sees the status
                log.debug("cancel of %s: %s", batch["id"], exc)

    def _live_counts(self, batch: dict[str, Any]) -> None:
        """request_counts of a running batch, from the ledger."""
        done = failed = 0
        ledger = open_ledger(self.config.ledger_url)
        try:
            for part in batch.get("parts") or []:
                job = ledger.get_job(part["job"])
                if job is not None:
                    counts = ledger.counts(job.id)
                    done += counts["succeeded"]
                    failed += counts.failed + counts["invalid"]
        finally:
            ledger.close()
        batch["request_counts"]["completed"] = done
        batch["request_counts"]["failed"] = failed

    # -- the batch's thread -----------------------------------------------------------------

    def _process(self, batch_id: str) -> None:
        try:
            self._advance(batch_id)
        except JobBusy as exc:  # another server in this process runs it (tests): it is theirs
            log.info("batch %s: %s", batch_id, exc)
        except Exception as exc:  # the batch fails with the reason; the server goes on
            log.exception("batch %s failed", batch_id)
            self._fail(batch_id, exc)
        finally:
            with self._lock:
                self._queued.discard(batch_id)

    def _fail(self, batch_id: str, exc: Exception) -> None:
        """The batch ends `failed` with the reason. What its jobs finished before (paid
        for, when a provider answered) is kept: the output and error files are written from
        the ledger, the lines not run in the error file."""
        changes: dict[str, Any] = {}
        batch = self.catalogue.get_batch(batch_id)
        if batch is not None and batch.get("parts") and batch["status"] in ACTIVE:
            try:
                if batch["api"] == "anthropic":
                    changes, _ = self._finalize_anthropic(batch, self.workdir(batch_id), "failed")
                else:
                    changes, _ = self._finalize_openai(batch, self.workdir(batch_id), "failed")
            except Exception:
                log.exception("batch %s: its results could not be written", batch_id)
        error = {
            "code": "server_error",
            "message": f"{type(exc).__name__}: {exc}",
            "param": None,
            "line": None,
        }
        changes.update(
            status="failed",
            failed_at=int(time.time()),
            errors={"object": "list", "data": [error]},
        )
        self.catalogue.update_batch(batch_id, changes, when=ACTIVE)

    def _advance(self, batch_id: str) -> None:
        batch = self.catalogue.get_batch(batch_id)
        if batch is None or self.stop.is_set():
            return
        workdir = self.workdir(batch_id)
        if batch["status"] == "validating":
            batch = self._validate(batch, workdir)
            if batch is None or batch["status"] == "failed":
                return
        if batch["status"] == "in_progress":
            for part in batch["parts"]:
                if self.catalogue.get_batch(batch_id)["status"] != "in_progress":  # type: ignore[index]
                    break  # cancelled
                job = job_for(batch, part, self.config, workdir)
                with self._lock:
                    self._running[batch_id] = job
                if self.catalogue.get_batch(batch_id)["status"] != "in_progress":  # type: ignore[index]
                    with self._lock:  # cancelled or expired before a cancel could reach it
                        self._running.pop(batch_id, None)
                    break
                try:
                    report = self._run_job(batch_id, job, part["model"])
                finally:
                    with self._lock:
                        self._running.pop(batch_id, None)
                if report is None or report.interrupted or self.stop.is_set():
                    return  # the server is stopping: resumed at the next start
                if report.counts.open and self._runs_elsewhere(part["job"]):
                    return  # another server's run still holds items: the last to end finalises
            batch = self.catalogue.update_batch(
                batch_id,
                {"status": "finalizing", "finalizing_at": int(time.time())},
                when=("in_progress",),
            ) or self.catalogue.get_batch(batch_id)
            assert batch is not None
        if batch["status"] == "finalizing" and not batch.get("expiring"):
            self._finalize(batch, workdir, "completed")
        elif batch["status"] in ("finalizing", "cancelling"):  # cancelled, or expired
            for part in batch.get("parts") or []:
                job = job_for(batch, part, self.config, workdir)
                with contextlib.suppress(OvernightError):  # not in the ledger: nothing open
                    job.cancel()  # a run killed with the server may have left items open
                if not self._drain(batch_id, job):
                    return  # the server is stopping: finalised at the next start
            ending = "cancelled" if batch["status"] == "cancelling" else "expired"
            self._finalize(batch, workdir, ending)

    def _runs_elsewhere(self, job_name: str) -> bool:
        """Whether another run (another server on this ledger) still works on the job."""
        ledger = open_ledger(self.config.ledger_url)
        try:
            return bool(live_workers(ledger, job_name))
        finally:
            ledger.close()

    def _run_job(self, batch_id: str, job: Job, model: str) -> Report | None:
        """Runs (or resumes) a part's job. A provider that cannot be reached pauses it, items
        as they were (EndpointDown: its API unreachable or failing every request), and it
        runs again after a wait, doubling up to PAUSE_MAX, until the provider is back or the
        batch is cancelled; None if the server stopped meanwhile."""
        wait = PAUSE_FIRST
        while True:
            try:
                report = job.run(
                    stop=self.stop, on_progress=lambda _: self.give_way(model, self.stop)
                )
            except EndpointDown as exc:  # the batch API's calls
                reason = str(exc)
            except UsageError as exc:  # the provider refused the key
                if not self._remote_live(job):
                    raise  # nothing at the provider: the batch fails with the reason
                # Its remote batches run on at the provider, paid for: failing the batch now
                # would leave their answers uncollected for good. It waits (a restart with
                # the right key resumes it) or ends at its window.
                reason = f"{exc}; its provider batches are live: waiting, not failing"
            else:
                # Stopped with a reason: the provider was down (run again), or the [run]
                # max_cost budget is spent (runs would stop at once: the batch ends).
                if not report.stop_reason or report.stop_reason.startswith("max_cost"):
                    return report
                reason = report.stop_reason
            log.warning("batch %s: %s; trying again in %g s", batch_id, reason, wait)
            if self.stop.wait(wait):
                return None
            current = self.catalogue.get_batch(batch_id)
            if current is None:
                return None
            if current["status"] != "in_progress":  # cancelled while paused: it ends
                return Report(job=job.name, counts=Counts())
            wait = min(wait * 2, PAUSE_MAX)

    def _remote_live(self, job: Job) -> bool:
        """Whether the job has provider batches created, or being created, and not ended."""
        ledger = open_ledger(self.config.ledger_url)
        try:
            info = ledger.get_job(job.name)
            return info is not None and bool(ledger.chunks(info.id, ("creating", "live")))
        finally:
            ledger.close()

    def _drain(self, batch_id: str, job: Job) -> bool:
        """A cancelled or expired part's provider batches to their end before the batch is
        finalised: the remote batches were cancelled, and what they ran anyway was paid
        for, so it is collected into the ledger (and the output file). A provider that
        cannot be reached pauses this as it pauses a run; False if the server stopped."""
        wait = PAUSE_FIRST
        while True:
            try:
                return job.drain_cancelled(self.stop)
            except EndpointDown as exc:
                log.warning("batch %s: %s; collecting again in %g s", batch_id, exc, wait)
            if self.stop.wait(wait):
                return False
            wait = min(wait * 2, PAUSE_MAX)

    def _validate(self, batch: dict[str, Any], workdir: Path) -> dict[str, Any] | None:
        workdir.mkdir(parents=True, exist_ok=True)
        if batch["api"] == "anthropic":
            tenant = self.catalogue.tenant_of_batch(batch["id"]) or ""
            changes = _plan_anthropic(batch, workdir, self.config, tenant)
        else:
            changes = self._validate_openai(batch, workdir)
        now = int(time.time())
        if changes.get("errors"):
            return self.catalogue.update_batch(
                batch["id"],
                {**changes, "status": "failed", "failed_at": now},
                when=("validating",),
            ) or self.catalogue.get_batch(batch["id"])
        updated = self.catalogue.update_batch(
            batch["id"],
            {**changes, "status": "in_progress", "in_progress_at": now},
            when=("validating",),
        )
        # Cancelled while it was validated: it keeps `cancelling`, with what was learnt.
        return updated or self.catalogue.update_batch(batch["id"], changes)

    def _validate_openai(self, batch: dict[str, Any], workdir: Path) -> dict[str, Any]:
        tenant = self.catalogue.tenant_of_batch(batch["id"])
        source = self.files.path(batch["input_file_id"])
        if tenant is None or self.files.get(tenant, batch["input_file_id"]) is None:
            error = {
                "code": "file_not_found",
                "line": None,
                "message": f"The input file {batch['input_file_id']} was deleted.",
                "param": "input_file_id",
            }
            return {"errors": {"object": "list", "data": [error]}}
        checked = validate(source, batch["endpoint"], self.config)
        counts = {"total": checked.total, "completed": 0, "failed": 0}
        if checked.errors:
            return {"errors": {"object": "list", "data": checked.errors}, "request_counts": counts}
        # The job reads its own copy: deleting the uploaded file never breaks a resume.
        _copy(source, workdir / "input.jsonl")
        part = {"model": checked.model, "job": batch["id"], "input": "input.jsonl"}
        served = self.config.models[checked.model or ""]
        if served.is_provider:
            with open(workdir / "input.jsonl", "rb") as f:
                lines = provider_lines(f, part["model"], served.provider_model(part["model"]))
                _write_all(workdir / "provider.jsonl", lines)
            part.update(input="provider.jsonl", cache=cache_name(tenant))
        return {"model": checked.model, "parts": [part], "request_counts": counts}

    def _outcomes(self, batch: dict[str, Any], workdir: Path, ending: str) -> Iterator[Outcome]:
        """Every line's outcome, once: from the ledger, then the lines never run (`cancelled`
        or `expired` as the batch `ending`)."""
        seen: set[str] = set()
        ledger = open_ledger(self.config.ledger_url)
        try:
            for part in batch.get("parts") or []:
                job = ledger.get_job(part["job"])
                if job is None:
                    continue
                served = self.config.models.get(part["model"])
                raw = served is not None and served.passes_through
                for custom_id, result, _, vector in ledger.iter_results(job.id):
                    seen.add(custom_id)
                    output = results.decode(result, vector).get("output")
                    yield Outcome(custom_id, "succeeded", part["model"], output, raw=raw)
                for f in ledger.iter_failures(job.id):
                    if f.custom_id is not None and f.custom_id not in seen:
                        seen.add(f.custom_id)
                        yield Outcome(
                            f.custom_id, "failed", part["model"], None, f.message, f.error_class
                        )
        finally:
            ledger.close()
        rejected = workdir / "rejected.jsonl"
        if rejected.exists():
            for raw in rejected.read_bytes().splitlines():
                line = orjson.loads(raw)
                if line["custom_id"] not in seen:
                    seen.add(line["custom_id"])
                    yield Outcome(line["custom_id"], "rejected", message=line["message"])
        source = workdir / "input.jsonl"
        if not source.exists() and batch["api"] == "openai" and ending == "expired":
            # Expired before it was validated (it waited for a place): its uploaded lines.
            source = self.files.path(batch["input_file_id"])
        if source.exists():
            with open(source, "rb") as f:
                for raw in f:
                    custom_id = _custom_id(raw)
                    if custom_id is None or custom_id in seen:
                        continue
                    seen.add(custom_id)
                    if ending in ("cancelled", "expired"):
                        yield Outcome(custom_id, ending)
                    else:  # not expected: every line of a finished job has a final state
                        yield Outcome(custom_id, "failed", message="the request was not run")

    def _tokens(self, batch: dict[str, Any]) -> tuple[int, int]:
        tokens_in = tokens_out = 0
        ledger = open_ledger(self.config.ledger_url)
        try:
            for part in batch.get("parts") or []:
                job = ledger.get_job(part["job"])
                if job is not None:
                    counts = ledger.counts(job.id)
                    tokens_in += counts.input_tokens
                    tokens_out += counts.output_tokens
        finally:
            ledger.close()
        return tokens_in, tokens_out

    def _finalize(self, batch: dict[str, Any], workdir: Path, ending: str) -> None:
        """Writes the results from the ledger and ends the batch `completed`, `cancelled` or
        `expired`. Idempotent: the files' ids come from the batch's, so a finalisation cut
        short by a kill and done again replaces them."""
        workdir.mkdir(parents=True, exist_ok=True)
        if batch["api"] == "anthropic":
            changes, unrun = self._finalize_anthropic(batch, workdir, ending)
        else:
            changes, unrun = self._finalize_openai(batch, workdir, ending)
        if ending == "expired" and not unrun and batch.get("parts"):
            ending = "completed"  # its last lines finished as the window ended: none expired
        changes.update(status=ending, **{f"{ending}_at": int(time.time())})
        self.catalogue.update_batch(
            batch["id"], changes, when=("cancelling",) if ending == "cancelled" else ("finalizing",)
        )
        for tmp in workdir.glob("*.part"):  # left by a finalisation cut short by a kill
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime < time.time() - STALE_SECONDS:
                    tmp.unlink()

    def _finalize_openai(
        self, batch: dict[str, Any], workdir: Path, ending: str
    ) -> tuple[dict[str, Any], int]:
        """The output and error files; also how many lines were never run."""
        tenant = self.catalogue.tenant_of_batch(batch["id"])
        assert tenant is not None
        succeeded = failed = unrun = 0
        # Names of its own: two servers on one catalogue may finalise a batch at once.
        tag = secrets.token_hex(4)
        out_path, err_path = workdir / f"output.{tag}.part", workdir / f"errors.{tag}.part"
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                for o in self._outcomes(batch, workdir, ending):
                    if o.kind == "succeeded":
                        out.write(openai_line(batch, o))
                        succeeded += 1
                    else:
                        err.write(openai_line(batch, o))
                        failed += 1
                        unrun += o.kind == ending
            changes: dict[str, Any] = {
                "request_counts": {
                    # (a batch that expired before it was validated was never counted)
                    "total": batch["request_counts"]["total"] or succeeded + failed,
                    "completed": succeeded,
                    "failed": failed,
                },
                "usage": _usage(*self._tokens(batch)),
            }
            if succeeded or not failed:
                changes["output_file_id"] = self._result_file(tenant, batch, "output", out_path)
            if failed:
                changes["error_file_id"] = self._result_file(tenant, batch, "error", err_path)
        finally:
            out_path.unlink(missing_ok=True)
            err_path.unlink(missing_ok=True)
        return changes, unrun

    def _finalize_anthropic(
        self, batch: dict[str, Any], workdir: Path, ending: str
    ) -> tuple[dict[str, Any], int]:
        tally = {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        part = workdir / f"results.{secrets.token_hex(4)}.part"
        with open(part, "wb") as f:
            for o in self._outcomes(batch, workdir, ending):
                line = anthropic.result_line(batch, o)
                f.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
                tally[line["result"]["type"]] += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, workdir / "results.jsonl")
        return {"outcome": tally}, tally["canceled"] + tally["expired"]

    def _result_file(self, tenant: str, batch: dict[str, Any], kind: str, path: Path) -> str:
        file_id = stable_id("file-", batch["id"], kind)
        self.files.add(tenant, f"{batch['id']}_{kind}.jsonl", "batch_output", path, file_id=file_id)
        return file_id


def _custom_id(raw: bytes) -> str | None:
    """The custom_id of an input line (None for a blank line, or one of an uploaded file
    that was never validated without one)."""
    if not raw.strip():
        return None
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    custom_id = line.get("custom_id") if isinstance(line, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def _copy(source: Path, target: Path) -> None:
    """`source` to `target`, whole or not at all."""
    if target.exists():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _plan_anthropic(
    batch: dict[str, Any], workdir: Path, config: ServeConfig, tenant: str
) -> dict[str, Any]:
    """An Anthropic batch's lines (input.jsonl, written at create) split by model: one part
    per model that serves /v1/messages (a python function, an Anthropic provider model); the
    others are rejected (errored results), as Anthropic validates `params` after the create
    call."""
    by_model: dict[str, list[bytes]] = {}
    rejected: list[bytes] = []
    with open(workdir / "input.jsonl", "rb") as f:
        for raw in f:
            line = orjson.loads(raw)
            problem = anthropic.check_params(line["body"], config)
            if problem is not None:
                rejected.append(orjson.dumps({"custom_id": line["custom_id"], "message": problem}))
            else:
                by_model.setdefault(line["body"]["model"], []).append(raw.rstrip(b"\n"))
    parts = []
    for n, (model, lines) in enumerate(sorted(by_model.items())):
        name = f"part{n}.jsonl"
        part = {"model": model, "job": f"{batch['id']}.{n}", "input": name}
        served = config.models[model]
        if served.is_provider:
            _write_all(
                workdir / name, provider_lines(iter(lines), model, served.provider_model(model))
            )
            part["cache"] = cache_name(tenant)
        else:
            _write_all(workdir / name, lines)
        parts.append(part)
    _write_all(workdir / "rejected.jsonl", rejected)
    return {"parts": parts}


def _write_all(path: Path, lines: Iterable[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for line in lines:
            f.write(line + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
