"""The Python API: `Job.from_file(path)` or `Job(...)`, then `run()`, `status()`, `export()` …

A job is validated whole (file, input, examples, schema, function, model name) before the
ledger is touched, so a mistake costs nothing and ingests nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import orjson

from . import admin, llm_job, sinks, sources
from .backends.base import Predictor
from .batching import BatchSizer
from .claim import claimed
from .errors import EndpointDown, UsageError, option, redact
from .executors import RunContext, RunOutcome, executor_class, executor_for
from .inputs import Input, input_for
from .opening import Opening
from .outputs import Output, output_for
from .report import CancelResult, Report, RetryResult
from .retry import RetryPolicy
from .runner import Progress
from .spec import (
    SELF_HOSTED,
    JobSpec,
    SourceSpec,
    load_job_file,
    parse_spec,
    semantic_hash,
    source_format,
)
from .store import (
    DEFAULT_LEDGER,
    Counts,
    Failure,
    Ledger,
    is_postgres,
    ledger_location,
    open_ledger,
)
from .tasks import Task, make_task

log = logging.getLogger(__name__)


class Job:
    def __init__(
        self,
        spec: JobSpec | dict[str, Any] | None = None,
        *,
        base_dir: str | Path | None = None,
        state: str | Path | None = None,
        name: str | None = None,
        origin: str | None = None,
        **sections: Any,
    ) -> None:
        if spec is None:
            spec = dict(sections)
        if isinstance(spec, dict):
            spec = parse_spec(spec, origin="Job(...)")
        self.spec = spec
        self.base_dir = Path(base_dir or Path.cwd()).resolve()
        self.name = spec.name or name or "job"
        self.origin = origin or "Job(...)"  # named in every message about the job's settings
        # Where the ledger lives: `state` (--ledger, --state) > OVERNIGHT_LEDGER > [run] ledger
        # > .overnight/ledger.db beside the job. A PostgreSQL URL, or a SQLite file whose path
        # is `state_path` (None for PostgreSQL).
        self.ledger_url = self._ledger_url(state)
        self.state_path = None if is_postgres(self.ledger_url) else Path(self.ledger_url)
        self.job_file: Path | None = None  # the TOML file, when the job came from one

    @classmethod
    def from_file(cls, path: str | Path, state: str | Path | None = None) -> Job:
        path = Path(path)
        job = cls(
            load_job_file(path),
            base_dir=path.resolve().parent,
            state=state,
            name=path.stem,
            origin=str(path),
        )
        job.job_file = path
        return job

    def _usage(self, message: str) -> UsageError:
        return UsageError(f"{self.origin}: {message}")

    def _ledger_url(self, state: str | Path | None) -> str:
        if state:
            return ledger_location(str(state), Path.cwd(), "--ledger")
        if env := os.environ.get("OVERNIGHT_LEDGER"):
            return ledger_location(env, Path.cwd(), "OVERNIGHT_LEDGER")
        if self.spec.run.ledger:
            key = f"{self.origin}: [run] ledger"
            return ledger_location(self.spec.run.ledger, self.base_dir, key)
        return str(self.base_dir / DEFAULT_LEDGER)

    @property
    def ledger_name(self) -> str:
        """The ledger, for messages: its file, or its URL without a password."""
        if self.state_path is not None:
            return str(self.state_path)
        from .store.connector import safe_url

        return safe_url(self.ledger_url)

    @property
    def _ledger_dir(self) -> Path:
        """The folder beside the ledger (a SQLite file's; for PostgreSQL the job's
        .overnight/): the response cache, batch files, job files relative to it."""
        if self.state_path is not None:
            return self.state_path.parent
        return self.base_dir / DEFAULT_LEDGER.parent

    # -- paths --------------------------------------------------------------------------

    def _path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    @property
    def source_path(self) -> Path:
        return self._path(self.spec.source.path or "")

    @cached_property
    def input(self) -> Input:
        """The job's input: a file, or a database table or query (inputs.py)."""
        return input_for(self.spec, self.base_dir, self.origin, self.id_field)

    @property
    def input_name(self) -> str:
        """The input, for messages: the file, or the table or query and its database."""
        return self.input.describe()

    @cached_property
    def output(self) -> Output:
        """Where the results go: files, or a database table (outputs.py)."""
        return output_for(self.spec, self.base_dir, self.name, self.origin, self.id_name)

    @property
    def output_path(self) -> Path:
        return self.output.path

    @property
    def errors_path(self) -> Path:
        return self.output.errors_path

    @property
    def id_field(self) -> str | None:
        """The record field holding the id; an OpenAI batch file carries its own."""
        if self.spec.source.id is None and self.spec.task.kind == "passthrough":
            return "custom_id"
        return self.spec.source.id

    @property
    def id_name(self) -> str:
        return self.id_field or "custom_id"

    # -- validation before anything is touched ------------------------------------------

    def check(self, need_key: bool = True) -> None:
        """Everything that can be checked without the model: raises UsageError (exit 2)."""
        self.input.check()
        self._check_output()
        self.validator  # noqa: B018 - loads and checks the schema
        if self.spec.task.examples:
            self.examples  # noqa: B018 - reads and renders the labelled examples
        model = self.spec.model
        if model.backend == "python":
            from .backends.python import load_function

            try:
                load_function(model.function or "", self.base_dir)
            except UsageError as exc:
                raise self._usage(str(exc)) from None
        elif self.is_llm:
            try:
                if need_key:
                    llm_job.api_key(self.spec)
                self.task  # noqa: B018 - builds the LLM task: loads the schema
                self.prices  # noqa: B018 - loads the user's price file
            except UsageError as exc:
                raise self._usage(str(exc)) from None
        elif self.self_hosted:
            self._check_self_hosted()
        elif model.backend == "local":
            from .backends.local import KNOWN_MODELS, check_installed

            name = model.name or "all-MiniLM-L6-v2"
            if name not in KNOWN_MODELS:
                raise self._usage(
                    f"[model] name: unknown local model {name!r}; known: {', '.join(KNOWN_MODELS)}"
                )
            try:
                check_installed(name)
            except ValueError as exc:
                raise self._usage(f"[model] name: {exc}") from None

    def _check_output(self) -> None:
        """The output and errors files can be written, and replace nothing the job needs."""
        bad = [c for c in self.spec.output.include if c in sinks.RESERVED or c == self.id_name]
        if bad:
            raise self._usage(f"[output] include: {bad[0]!r} is a name the output row already uses")
        self.output.check(self._kept_files())

    def _kept_files(self) -> Iterator[tuple[str, Path]]:
        """The files a run reads or keeps its state in (what an output must never replace)."""
        spec = self.spec
        yield from self.input.kept_files()
        if self.job_file is not None:
            yield "the job file", self.job_file
        if spec.task.examples:
            yield "the labelled examples ([task] examples)", self._path(spec.task.examples)
        if spec.task.schema_:  # a file, or a pydantic model "module:Model" (no such path)
            yield "the schema ([task] schema)", self._path(spec.task.schema_)
        if isinstance(spec.output.schema_, str):
            yield "the schema ([output] schema)", self._path(spec.output.schema_)
        if spec.run.prices:
            yield "the price table ([run] prices)", self._path(spec.run.prices)
        if spec.run.cache:
            yield "the response cache ([run] cache)", self._path(spec.run.cache)
        for suffix in ("", "-wal", "-shm", "-journal") if self.state_path else ():
            yield "the ledger", self.state_path.with_name(self.state_path.name + suffix)

    @property
    def _counts_tokens(self) -> bool:
        return self.self_hosted and self.spec.task.kind != "embed"

    @property
    def self_hosted(self) -> bool:
        """backend = "transformers" or "vllm": a model in the process."""
        return self.spec.model.backend in SELF_HOSTED

    @cached_property
    def model_ref(self) -> Any:
        """A self-hosted model's files (backends/hf_files.py); exit 2 when they are not there."""
        from .backends.hf_files import resolve

        try:
            return resolve(self.spec.model.name or "", self.base_dir)
        except ValueError as exc:
            raise self._usage(f"[model] name: {exc}") from None

    @property
    def self_hosted_llm(self) -> bool:
        """A self-hosted causal LM: the LLM tasks' requests, answers and token counts."""
        return self.self_hosted and self.model_ref.kind == "causal"

    def _check_self_hosted(self) -> None:
        from .backends.hf_files import check_libraries

        model, kind = self.spec.model, self.spec.task.kind
        ref = self.model_ref
        try:
            if model.backend == "vllm":
                from .backends.vllm_offline import check_installed

                check_installed()
            else:
                check_libraries(ref)
        except ValueError as exc:
            raise self._usage(f"[model] backend: {exc}") from None
        what = {"causal": "a causal LM", "classifier": "a sequence classifier"}
        allowed = {
            "causal": ("generate", "extract", "classify", "passthrough"),
            "classifier": ("classify",),
            "encoder": ("embed",),
        }[ref.kind]
        if model.backend == "vllm" and kind == "embed":
            allowed = ("embed",)  # vLLM pools any model it can load as an embedder
        if kind not in allowed:
            raise self._usage(
                f"[model] name: {ref.name!r} is {what.get(ref.kind, 'an encoder')}: it runs"
                f" kind = {', '.join(repr(k) for k in allowed)}, not {kind!r}"
            )
        if ref.kind == "classifier":
            own, asked = ref.labels(), list(self.spec.task.label_descriptions())
            if sorted(own) != sorted(asked):
                raise self._usage(
                    f"[task] labels: {ref.name!r} is a sequence classifier with its own labels"
                    f" ({', '.join(own)}); the task's must be the same"
                )
        if self.self_hosted_llm:
            self.task  # noqa: B018 - builds the LLM task: loads the schema

    def _expected(self) -> int:
        """About how many records the input holds (a progress bar's total)."""
        return self.input.estimate_records()

    @property
    def is_llm(self) -> bool:
        return self.spec.model.provider_name is not None

    @cached_property
    def task(self) -> Task:
        t = self.spec.task
        if self.is_llm:
            return llm_job.build_task(self.spec, self.base_dir)  # type: ignore[return-value]
        if self.self_hosted_llm:
            return llm_job.build_self_hosted_task(self.spec, self.base_dir)  # type: ignore[return-value]
        return make_task(t.kind, t.text, list(t.label_descriptions()))

    @cached_property
    def prices(self) -> Any:
        """The shipped price table, with `[run] prices` over it."""
        return llm_job.price_table(self.spec, self.base_dir)

    def _cache(self) -> Any:
        return llm_job.response_cache(
            self.spec, self.base_dir, self._ledger_dir, self.name, self.ledger_url
        )

    def _realtime_window(self) -> int:
        # Enough requests per call to keep `concurrency` busy; the rate limiter and the
        # in-flight slots live in the predictor, across calls.
        return max(64, 4 * self.spec.model.concurrency)

    def _realtime_predictor(self) -> Predictor:
        from .llm.realtime import RealtimePredictor

        m, run = self.spec.model, self.spec.run
        return RealtimePredictor(  # type: ignore[return-value]
            llm_job.provider(self.spec).name,
            base_url=m.base_url,
            api_key=llm_job.api_key(self.spec),
            rpm=m.rpm,
            tpm=m.tpm,
            concurrency=m.concurrency,
            timeout=m.timeout,
            max_attempts=run.max_attempts,
            backoff_base=run.backoff_base,
            backoff_max=run.backoff_max,
            cache=self._cache(),
            task=self.task,
            repair=self.spec.task.repair,
        )

    @cached_property
    def validator(self) -> Callable[[Any], str | None] | None:
        schema = self.spec.output.schema_
        if schema is None:
            return None
        import jsonschema

        if isinstance(schema, str):
            path = self._path(schema)
            try:
                schema = orjson.loads(path.read_bytes())
            except FileNotFoundError:
                raise self._usage(f"[output] schema: file not found: {path}") from None
            except orjson.JSONDecodeError as exc:
                raise self._usage(f"[output] schema: {path}: not valid JSON ({exc})") from None
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise self._usage(f"[output] schema: not a valid JSON Schema: {exc.message}") from None
        validator = cls(schema)

        def validate(output: Any) -> str | None:
            err = jsonschema.exceptions.best_match(validator.iter_errors(output))
            if err is None:
                return None
            where = "/".join(str(p) for p in err.absolute_path) or "output"
            return f"schema: {where}: {err.message}"

        return validate

    @cached_property
    def examples(self) -> tuple[list[str], list[str]]:
        """Labelled examples rendered with the task's own template: (texts, labels)."""
        path = self._path(self.spec.task.examples or "")
        if not path.is_file():
            raise self._usage(f"[task] examples: file not found: {path}")
        fmt = source_format(SourceSpec(path=str(path)), path)
        try:
            records = sources.read_all(path, fmt)
        except ValueError as exc:
            raise self._usage(f"[task] examples: {exc}") from None
        labels = set(self.spec.task.label_descriptions())
        texts, ys = [], []
        for i, rec in enumerate(records, start=2 if fmt == "csv" else 1):
            label = rec.get("label")
            if label not in labels:
                raise self._usage(
                    f"[task] examples: {path.name} row {i}: label {label!r} is not one of the "
                    f"task's labels ({', '.join(sorted(labels))})"
                )
            try:
                texts.append(self.task.build(rec))  # type: ignore[arg-type]
            except Exception as exc:
                raise self._usage(f"[task] examples: {path.name} row {i}: {exc}") from None
            ys.append(label)
        if not texts:
            raise self._usage(f"[task] examples: {path.name} has no rows")
        return texts, ys

    def _spec_hash(self) -> str:
        extra = b""
        if self.spec.task.examples:
            extra = hashlib.blake2b(self._path(self.spec.task.examples).read_bytes()).digest()
        return semantic_hash(self.spec, extra)

    def _recipe(self) -> Any:
        """The predictor as plain data: a worker process builds it from this on its own."""
        from .worker import Recipe

        model, task = self.spec.model, self.spec.task
        labels = task.label_descriptions() if task.kind == "classify" else {}
        shape = (task.kind, task.text, list(labels))
        if model.backend == "python":
            kwargs = {"function": model.function or "", "base_dir": str(self.base_dir)}
            return Recipe("overnight.backends.python:build", kwargs, shape)
        if self.self_hosted:
            ref = self.model_ref
            llm_task = (
                llm_job.self_hosted_task_args(self.spec, self.base_dir)
                if self.self_hosted_llm
                else None
            )
            kwargs = {
                "name": ref.name,
                "path": str(ref.path),
                "gguf": ref.gguf,
                "device": model.device,
                "kind": task.kind,
                "task": llm_task,
                "repair": task.repair,
                "memory_limit_mb": self.spec.run.memory_limit_mb,
            }
            module = "vllm_offline" if model.backend == "vllm" else "hf"
            return Recipe(f"overnight.backends.{module}:build", kwargs, shape, llm_task=llm_task)
        texts, ys = self.examples if task.examples else (None, None)
        kwargs = {
            "name": model.name or "all-MiniLM-L6-v2",
            "device": model.device,
            "kind": task.kind,
            "labels": labels,
            "example_texts": texts,
            "example_labels": ys,
        }
        return Recipe(
            "overnight.backends.sentence:build", kwargs, shape, window_model=kwargs["name"]
        )

    def _predictor(self) -> Predictor:
        """The python function or the local model: in a supervised worker process (the
        default; see worker.py), or in this process with `[run] isolation = "none"`."""
        recipe = self._recipe()
        if self.spec.isolation == "none":
            return recipe.build()  # type: ignore[no-any-return]
        from .worker import DEFAULT_TIMEOUT, WorkerProcess

        timeout = self.spec.run.timeout or DEFAULT_TIMEOUT
        return WorkerProcess(recipe, self._predictor_class(), timeout)  # type: ignore[return-value]

    def _predictor_class(self) -> type:
        """The predictor's class, for its batching hints, without loading any model."""
        if self.spec.model.backend == "python":
            from .backends.python import PythonFunction

            return PythonFunction
        if self.spec.model.backend == "vllm":
            from .backends.vllm_offline import VLLMChat

            return VLLMChat
        if self.self_hosted:
            from .backends.hf import CausalLM, Encoder

            return CausalLM if self.self_hosted_llm else Encoder
        from .backends.sentence import LocalEmbed

        return LocalEmbed

    def _sizer(self) -> BatchSizer:
        run = self.spec.run
        if isinstance(run.batch_size, int):
            return BatchSizer.fixed(run.batch_size)
        cls = self._predictor_class()
        calls = 1 if cls.window > 1 else 2  # a windowed call already spans several batches
        return BatchSizer.automatic(cls.auto_start, cls.auto_max, run.memory_limit_mb, calls)

    # -- the ledger ---------------------------------------------------------------------

    @contextmanager
    def ledger(self) -> Iterator[Ledger]:
        ledger = open_ledger(self.ledger_url)
        try:
            yield ledger
        finally:
            ledger.close()

    # -- commands -----------------------------------------------------------------------

    def run(
        self,
        *,
        restart: bool = False,
        on_progress: Callable[[Progress], None] | None = None,
        stop: threading.Event | None = None,
        detach: bool = False,
    ) -> Report:
        """Ingest (once) and process; running again resumes. Exports when the run ends.

        `detach` (batch backends): submit every remote batch and return without waiting; a later
        `run` re-attaches, collects and exports."""
        if detach and not executor_class(self.spec.model.mode, self.spec.run.executor).detaches:
            raise self._usage(
                f"{option('detach')} applies to the batch backends (openai-batch, ...)"
            )
        self.check()
        with self._provider_errors():
            return self._run(restart, on_progress, stop, detach)

    @contextmanager
    def _provider_errors(self) -> Iterator[None]:
        """The batch API's SDK errors that stop a job, as a clear message (see
        llm_job.provider_failure), not an unexpected error."""
        try:
            yield
        except Exception as exc:
            failure = llm_job.provider_failure(self.spec, exc) if self.is_llm else None
            if failure is None:
                raise
            if isinstance(failure, UsageError):
                raise self._usage(str(failure)) from None
            raise failure from None

    def _run(
        self,
        restart: bool,
        on_progress: Callable[[Progress], None] | None,
        stop: threading.Event | None,
        detach: bool,
    ) -> Report:
        spec_hash = self._spec_hash()
        stop = stop or threading.Event()
        with (
            self.ledger() as ledger,
            claimed(ledger, self.name, self._connect, on_lost=stop.set, restart=restart) as run,
        ):
            notes: list[str] = []
            job = Opening(self, ledger, notes, on_progress, stop).join(spec_hash, restart, run)
            if job is None:  # stopped while reading a changed input: the old job is intact
                run.finish("interrupted", 0, 0.0, 0.0)
                return Report(job=self.name, counts=Counts(), interrupted=True, notes=tuple(notes))
            # Running a cancelled job resumes it; a cancel made while this run was starting
            # (it held the claim, `cancel` waited for its ledger entry) stands.
            ledger.reopen(job.id, before=run.since)
            before = ledger.counts(job.id)
            progress = Progress(
                succeeded=before["succeeded"],
                failed=before.failed,
                invalid=before["invalid"],
                ingested=before.total,
                ingest_done=job.ingest_done,
                expected=0 if job.ingest_done else self._expected(),
                cost=before.cost,
                list_cost=before.list_cost,
            )
            run.progress = progress
            if on_progress is not None:  # the known total and done count, before the model loads
                on_progress(progress)
            outcome = RunOutcome(detached=detach, notes=notes)
            ctx = RunContext(ledger, job, progress, on_progress, stop, run, outcome)
            try:
                outcome = executor_for(self).run(ctx)
            except KeyboardInterrupt:  # leases were released by the runner; resumable
                outcome.interrupted = True
            except EndpointDown as exc:  # items stay pending; a rerun resumes
                progress.stop_reason = redact(str(exc))
            interrupted = outcome.interrupted or stop.is_set()
            seconds = progress.elapsed - progress.setup_seconds
            if outcome.detached:  # nothing to export yet: the batches are running
                run.finish("detached", progress.processed, seconds, progress.setup_seconds)
                return Report(
                    job=self.name,
                    counts=ledger.counts(job.id),
                    detached=True,
                    remote_batches=tuple(admin.remote_batches(ledger, job.id)),
                    llm=True,
                    ingest_done=True,
                    notes=tuple(outcome.notes),
                )
            job = ledger.get_job(self.name)
            assert job is not None
            if interrupted:
                word = "interrupted"
            elif outcome.cancelled:
                word = "cancelled"
            else:
                word = "stopped" if progress.stop_reason else "finished"
            run.finish(word, progress.processed, seconds, progress.setup_seconds)
            exported = None
            # The last worker to leave writes the output (two leaving at once both do: each
            # export is whole, and they are the same).
            if not interrupted and run.leave(ledger):
                try:
                    exported = self.output.write(ledger, job.id)
                except BaseException:
                    run.outcome = "error"
                    raise
            elif not interrupted:
                outcome.notes.append(
                    "other workers are still at work on this job: the last to finish writes"
                    f" {self.output.describe()}"
                )
            return Report(
                job=self.name,
                counts=ledger.counts(job.id),
                processed=progress.processed,
                seconds=seconds,
                setup_seconds=progress.setup_seconds,
                output=exported.output if exported else None,
                errors=exported.errors if exported else None,
                interrupted=interrupted,
                cancelled=outcome.cancelled,
                ingest_done=job.ingest_done,
                batch_size=outcome.batch_size,
                batch_trials=outcome.batch_trials,
                stop_reason=progress.stop_reason,
                remote_batches=tuple(admin.remote_batches(ledger, job.id)),
                deadline=outcome.deadline,
                llm=self.is_llm,
                tokens=self._counts_tokens,
                notes=tuple(outcome.notes),
            )

    # -- the job's mark at the provider (its remote batches carry it) ----------------------

    @property
    def identity_key(self) -> str:
        """This job's mark at the provider, the same for every run of it in this ledger
        location (see llm/batch.py): how a run finds the batches of earlier runs."""
        from .llm.batch import identity_key

        where = str(self.state_path.resolve()) if self.state_path else self.ledger_name
        return identity_key(where, self.name)

    # -- what the executors use ---------------------------------------------------------

    def _reader(self, size: int) -> Callable[[sources.Cursor], Iterator[list[sources.Row]]]:
        """The input's reader, `size` records a read."""
        return self.input.reader(size)

    def _retry_policy(self) -> RetryPolicy:
        run = self.spec.run
        return RetryPolicy(run.max_attempts, run.backoff_base, run.backoff_max)

    def _connect(self) -> Ledger:
        """Another connection to this job's ledger (the claim's heartbeat thread)."""
        return open_ledger(self.ledger_url)

    # -- the commands that run nothing (admin.py) ------------------------------------------

    def estimate(self) -> Any:
        """Tokens and cost of the whole input, real time vs batch; sends nothing, needs no key.

        Every record is rendered into its request exactly as a run would, so the estimate
        counts the real prompts, schema and parameters."""
        return admin.estimate(self)

    def status(self) -> Report:
        """Counts, and whether the job is finished, who runs it, how fast, how long to go.
        The processing figures are the last run's own (those its report showed)."""
        return admin.status(self)

    def failures(self) -> list[Failure]:
        return admin.failures(self)

    def retry(self, invalid: bool = False) -> RetryResult:
        """Move failed (and invalid) items back to pending; `run` then processes them.

        Input lines that could not be read are not items and cannot be moved: fixing the
        line and running again is how they are retried (the run reads a changed input again)."""
        return admin.retry(self, invalid)

    def export(self) -> sinks.Exported:
        return admin.export(self)

    def cancel(self) -> CancelResult:
        """Open items become cancelled; a running run stops after its batch in flight; live
        provider batches are cancelled remotely and what they finished is kept (collected
        by the running run or the next `run`). `run` resumes the job."""
        return admin.cancel(self)

    def drain_cancelled(self, stop: threading.Event) -> bool:
        """After a cancel: its live provider batches, cancelled at the provider, are polled
        to their end and what they finished anyway (paid for) is collected; nothing is
        submitted, the job stays cancelled. False if `stop` came first."""
        with self._provider_errors():
            return admin.drain_cancelled(self, stop)
