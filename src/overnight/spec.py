"""The job file: pydantic models, TOML loading, and one clear message per mistake."""

from __future__ import annotations

import difflib
import hashlib
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import jinja2
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import JobFileError
from .llm.providers import BACKENDS, PROVIDERS, Mode

FORMATS = ("jsonl", "csv", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class _Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent coercion. No inf or
    # nan: `timeout = inf` would overflow where it is used, `backoff_max = inf` never retry.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# [source] keys of a queue (intake/): not part of how a file or a table is read, so not of
# their fingerprints (inputs.py), which must stay what older versions stored.
QUEUE_KEYS = frozenset({"queue", "queue_name", "stream", "group", "prefetch"})


class SourceSpec(_Section):
    path: str | None = Field(None, min_length=1)
    id: str | None = Field(None, min_length=1)  # "" would fail every record alone
    format: Literal["jsonl", "csv", "parquet"] | None = None
    delimiter: str | None = None  # CSV only: "," unless set (";" and "\t" are common)
    # A database instead of a file (sql_source.py): any SQLAlchemy URL, a table or a query.
    url: str | None = Field(None, min_length=1)
    table: str | None = Field(None, min_length=1)
    query: str | None = Field(None, min_length=1)
    changed_since: str | None = Field(None, min_length=1)  # a column: read only newer rows
    # A message queue instead (`overnight consume`, intake/): amqp://, redis://, sqs://.
    queue: str | None = Field(None, min_length=1)
    queue_name: str | None = Field(None, min_length=1)  # RabbitMQ, SQS
    stream: str | None = Field(None, min_length=1)  # Redis Streams
    group: str = Field("overnight", min_length=1)  # Redis Streams: the consumer group
    prefetch: int = Field(100, gt=0)  # the most messages held unacknowledged at once

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        given = [k for k in ("path", "url", "queue") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "set `path` (a file), `url` (a database, with `table` or `query`) or `queue`"
                " (a message queue)"
                + (f", not both `{given[0]}` and `{given[1]}`" if given else "")
            )
        if self.queue is not None:
            from .intake.urls import check_queue_keys

            check_queue_keys(self.queue, self.queue_name, self.stream, "source")
            if self.id is None:
                raise ValueError(
                    "`id` is required for a queue source: the field of each message's record"
                    " that identifies it (a redelivered id is not processed again)"
                )
            for key in ("table", "query", "changed_since", "format", "delimiter"):
                if getattr(self, key) is not None:
                    raise ValueError(f"`{key}` does not apply to a queue source (`queue`)")
            if self.stream is None and "group" in self.model_fields_set:
                raise ValueError("`group` applies to a Redis stream (`stream`)")
            return self
        for key in ("queue_name", "stream", "group", "prefetch"):
            if key in self.model_fields_set:
                raise ValueError(f"`{key}` applies to a queue source: set `queue` too")
        if self.url is not None:
            if (self.table is None) == (self.query is None):
                raise ValueError(
                    "`url` needs `table` (a table name) or `query` (a SELECT)"
                    + (", not both" if self.table else "")
                )
            if self.id is None:
                raise ValueError(
                    "`id` is required for a SQL source (`url`): the column that identifies"
                    " a row (its primary key)"
                )
            if self.format is not None or self.delimiter is not None:
                key = "format" if self.format is not None else "delimiter"
                raise ValueError(f"`{key}` applies to a file (`path`), not to `url`")
            return self
        for key in ("table", "query", "changed_since"):
            if getattr(self, key) is not None:
                raise ValueError(f"`{key}` applies to a SQL source (`url`), not to `path`")
        if self.delimiter is None:
            return self
        if len(self.delimiter) != 1 or self.delimiter in ('"', "\n", "\r"):
            raise ValueError(
                f'`delimiter` must be one character other than a quote or a newline, such as ";"'
                f' or "\\t" (got {self.delimiter!r})'
            )
        fmt = self.format or _SUFFIXES.get(Path(self.path or "").suffix.lower())
        if fmt != "csv":
            raise ValueError("`delimiter` applies to CSV input only")
        return self


TaskKind = Literal["map", "embed", "classify", "generate", "extract", "passthrough"]


class TaskSpec(_Section):
    kind: TaskKind = "map"
    text: str = "{{ text }}"
    system: str | None = None
    labels: list[str] | dict[str, str] | None = None
    examples: str | None = None
    # extract: a JSON Schema file, or a pydantic model as "module:Model"
    schema_: str | None = Field(None, alias="schema")
    repair: bool = False  # extract/classify with an LLM: re-ask once with the validation error

    @model_validator(mode="after")
    def _check(self) -> TaskSpec:
        if self.kind == "classify" and not self.labels:
            raise ValueError(
                "kind = 'classify' needs `labels` (a list, or a table label = description)"
            )
        if self.kind != "classify" and (self.labels or self.examples):
            raise ValueError("`labels` and `examples` only apply to kind = 'classify'")
        if self.kind == "extract" and not self.schema_:
            raise ValueError(
                "kind = 'extract' needs `schema` (a JSON Schema file, or \"module:Model\")"
            )
        if self.kind != "extract" and self.schema_:
            raise ValueError("`schema` only applies to kind = 'extract'")
        if self.repair and self.kind not in ("extract", "classify"):
            raise ValueError("`repair` only applies to kind = 'extract' or 'classify'")
        for name, template in (("text", self.text), ("system", self.system)):
            try:
                jinja2.Environment().parse(template or "")
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(
                    f"`{name}` is not a valid Jinja2 template: {exc.message}"
                ) from None
        return self

    def label_descriptions(self) -> dict[str, str]:
        """Labels with the text zero-shot classification compares against."""
        if isinstance(self.labels, dict):
            return dict(self.labels)
        return {label: label for label in self.labels or []}


# Literal, for pydantic's message naming every choice; the LLM ones are llm.providers.BACKENDS
# (tests/test_providers.py holds the two together).
Backend = Literal[
    "local",
    "python",
    "transformers",
    "vllm",
    "openai",
    "anthropic",
    "openai-batch",
    "anthropic-batch",
    "auto",
]
LLM_BACKENDS = tuple(BACKENDS)
# Models in the process (the worker process by default): a Hugging Face model, or vLLM's engine.
SELF_HOSTED = ("transformers", "vllm")
SELF_HOSTED_KINDS = ("generate", "extract", "classify", "embed")
# Backends whose work runs in a supervised worker process ([run] isolation, [run] timeout).
WORKER_BACKENDS = ("python", "local", *SELF_HOSTED)


def _check_self_hosted_params(params: dict[str, Any]) -> None:
    """`[model] params` of a self-hosted model: the generation settings it understands."""
    for key, value in params.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key == "max_tokens":
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            want = "a positive whole number"
        elif key == "temperature":
            ok, want = number and value >= 0, "a number >= 0 (0: greedy)"
        elif key == "top_p":
            ok, want = number and 0 < value <= 1, "a number in (0, 1]"
        elif key == "seed":
            ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif key == "stop":
            ok = isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            )
            want = "a string or a list of strings"
        else:
            raise ValueError(
                f"`params` key {key!r} is not understood by a self-hosted model; it takes"
                " max_tokens, temperature, top_p, seed and stop"
            )
        if not ok:
            raise ValueError(f"`params` {key} must be {want} (got {value!r})")


_REALTIME_KEYS = ("rpm", "tpm", "concurrency")
_BATCH_KEYS = ("max_requests_per_batch", "max_bytes_per_batch", "poll_interval")
# Tasks each provider can run (Anthropic has no embeddings endpoint).
PROVIDER_KINDS = {name: p.kinds for name, p in PROVIDERS.items()}


class ModelSpec(_Section):
    backend: Backend
    name: str | None = None
    function: str | None = None
    device: str = "auto"
    # LLM backends
    provider: Literal["openai", "anthropic"] | None = None  # as PROVIDERS, for the message
    base_url: str | None = None
    api_key_env: str | None = None
    params: dict[str, Any] = {}
    # How an OpenAI-compatible server takes a schema: "json_schema" (OpenAI, vLLM) or
    # "json_object" with the schema beside it (llama.cpp's server).
    structured_output: Literal["json_schema", "json_object"] = "json_schema"
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    concurrency: int = Field(16, gt=0)
    timeout: float = Field(60.0, gt=0)
    max_requests_per_batch: int | None = Field(None, gt=0)
    max_bytes_per_batch: int | None = Field(None, gt=0)
    poll_interval: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.backend == "python" and not self.function:
            raise ValueError("backend = 'python' needs `function = \"module:function\"`")
        if self.function and ":" not in self.function:
            raise ValueError(f"`function` must look like module:function, got {self.function!r}")
        if self.backend != "python" and self.function:
            raise ValueError("`function` only applies to backend = 'python'")
        llm = self.backend in LLM_BACKENDS
        if self.backend == "auto" and self.provider is None:
            first, *others = PROVIDERS
            choices = "".join(f' or `"{name}"`' for name in others)
            raise ValueError(
                f"backend = 'auto' needs `provider = \"{first}\"`{choices} (whose batch"
                " and real-time APIs it uses)"
            )
        if self.backend != "auto" and self.provider is not None:
            raise ValueError("`provider` only applies to backend = 'auto'")
        set_keys = self.model_fields_set
        if self.backend in SELF_HOSTED:
            _check_self_hosted_params(self.params)
        if not llm:
            extra = [
                k
                for k in (
                    "base_url",
                    "api_key_env",
                    *(() if self.backend in SELF_HOSTED else ("params",)),
                    "structured_output",
                    *_REALTIME_KEYS,
                    *_BATCH_KEYS,
                )
                if k in set_keys
            ]
            if extra:
                raise ValueError(f"`{extra[0]}` only applies to the LLM backends")
        elif self.mode == "batch":
            extra = [k for k in _REALTIME_KEYS if k in set_keys]
            if extra:
                raise ValueError(f"`{extra[0]}` applies to real-time backends, not {self.backend}")
        elif self.mode == "realtime":
            extra = [k for k in _BATCH_KEYS if k in set_keys]
            if extra:
                raise ValueError(f"`{extra[0]}` applies to batch backends, not {self.backend}")
        return self

    @property
    def provider_name(self) -> str | None:
        """The provider of an LLM backend (llm.providers.PROVIDERS), else None."""
        backend = BACKENDS.get(self.backend)
        if backend is None:
            return None
        return self.provider if backend.provider is None else backend.provider

    @property
    def mode(self) -> Mode | None:
        """How an LLM backend sends: "realtime", "batch" or "auto" (both); else None."""
        backend = BACKENDS.get(self.backend)
        return backend.mode if backend is not None else None


class RunSpec(_Section):
    batch_size: int | Literal["auto"] = "auto"
    max_cost: float | None = Field(None, gt=0)  # USD
    # backend = "auto": finish by then (TOML datetime, or an ISO 8601 string with a zone)
    deadline: datetime | str | None = None
    deadline_margin: float = Field(3600.0, ge=0)  # seconds kept for the real-time finish
    # Where the ledger lives: a PostgreSQL URL, or a SQLite file path (relative: beside the
    # job file); default .overnight/ledger.db. --ledger and OVERNIGHT_LEDGER override it.
    ledger: str | None = None
    cache: str | None = None  # share LLM responses across jobs (default: per job)
    prices: str | None = None  # a TOML price table over the shipped one
    max_attempts: int = Field(3, ge=1)
    lease_seconds: float = Field(300.0, gt=0)
    backoff_base: float = Field(0.5, ge=0)
    backoff_max: float = Field(60.0, ge=0)
    memory_limit_mb: int = Field(2048, gt=0)
    # backend = "python", "local", "transformers", "vllm": run the function or the model in a
    # supervised worker process ("process", their default) or in the runner's own ("none");
    # and how long one call to it may take, in seconds (default: worker.DEFAULT_TIMEOUT).
    isolation: Literal["process", "none"] | None = None
    timeout: float | None = Field(None, gt=0)
    # Where the model runs: in this machine's runner ("local"), or in Ray actors, one per
    # worker (executors/ray.py); `ray_address` (default: a local Ray instance) and `workers`
    # (default: one per GPU of the cluster, else one per CPU) apply to "ray".
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, min_length=1)
    workers: int | None = Field(None, gt=0)
    # A queue source (`overnight consume`): process the records collected once this many wait,
    # or the oldest has waited this many seconds; with `window`, only inside it (local time).
    flush_size: int = Field(100, gt=0)
    flush_wait: float = Field(5.0, ge=0)
    window: str | None = None  # "01:00-06:00"

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value is not None:
            from .intake.window import Window

            Window.parse(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if isinstance(self.batch_size, int) and self.batch_size < 1:
            raise ValueError('`batch_size` must be a positive number or "auto"')
        if self.executor != "ray":
            for key in ("ray_address", "workers"):
                if key in self.model_fields_set:
                    raise ValueError(f'`{key}` applies to executor = "ray"')
        self.deadline_at  # noqa: B018 - validates the deadline
        return self

    @property
    def deadline_at(self) -> datetime | None:
        """The deadline as an aware datetime (a deadline without a zone is ambiguous)."""
        value = self.deadline
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(
                    f"`deadline` is not an ISO 8601 date-time: {self.deadline!r}"
                ) from None
        if value.tzinfo is None:
            raise ValueError("`deadline` needs a time zone (e.g. 2026-11-29T06:00:00Z or +01:00)")
        return value


class OutputSpec(_Section):
    path: str | None = None
    errors: str | None = None
    include: list[str] = []
    schema_: str | dict[str, Any] | None = Field(None, alias="schema")
    # A database table instead of a file (sql_sink.py).
    url: str | None = Field(None, min_length=1)
    table: str | None = Field(None, min_length=1)
    mode: Literal["upsert", "update"] = "upsert"
    columns: dict[str, str] | None = None  # target column = result field or input field
    errors_table: str | None = Field(None, min_length=1)
    # A results queue (intake/): amqp://, redis:// (with `stream`), sqs:// with `queue_name`.
    queue: str | None = Field(None, min_length=1)
    queue_name: str | None = Field(None, min_length=1)
    stream: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> OutputSpec:
        if self.queue is not None:
            from .intake.urls import check_queue_keys

            check_queue_keys(self.queue, self.queue_name, self.stream, "output")
            for key in ("path", "url", "include"):
                if key in self.model_fields_set:
                    raise ValueError(f"set `queue` (a results queue) or `{key}`, not both")
            return self
        for key in ("queue_name", "stream"):
            if key in self.model_fields_set:
                raise ValueError(f"`{key}` applies to a results queue: set `queue` too")
        if self.url is None:
            sql = [
                k
                for k in ("table", "mode", "columns", "errors_table")
                if k in self.model_fields_set
            ]
            if sql:
                raise ValueError(f"`{sql[0]}` applies to a database output: set `url` too")
            return self
        if self.table is None:
            raise ValueError("`url` needs `table`: the table the results go to")
        if self.path is not None:
            raise ValueError("set `path` (a file) or `url` (a database table), not both")
        if self.errors is not None and self.errors_table is not None:
            raise ValueError("set `errors` (a file) or `errors_table`, not both")
        if self.mode == "update" and not self.columns:
            raise ValueError(
                'mode = "update" needs `columns`: which columns of the existing rows to set,'
                ' e.g. columns = { category = "output" }'
            )
        if self.columns is not None and self.include:
            raise ValueError("with `columns`, name the input fields there instead of `include`")
        for target, source in (self.columns or {}).items():
            if not target or not source:
                raise ValueError("`columns` maps a column name to a field name; neither is empty")
        return self


class JobSpec(_Section):
    name: str | None = None
    source: SourceSpec
    task: TaskSpec = TaskSpec()
    model: ModelSpec
    run: RunSpec = RunSpec()
    output: OutputSpec = OutputSpec()

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        kind, backend = self.task.kind, self.model.backend
        if backend == "python" and kind != "map":
            raise ValueError(f"backend = 'python' runs kind = 'map', not {kind!r}")
        if backend == "local" and kind not in ("embed", "classify"):
            raise ValueError(f"backend = 'local' runs kind = 'embed' or 'classify', not {kind!r}")
        if backend in SELF_HOSTED:
            # transformers also takes OpenAI chat lines as they are (what `overnight serve`
            # sends it: a batch's /v1/chat/completions lines)
            kinds = SELF_HOSTED_KINDS + (("passthrough",) if backend == "transformers" else ())
            if kind not in kinds:
                raise ValueError(
                    f"backend = {backend!r} runs kind = "
                    f"{', '.join(repr(k) for k in kinds)}, not {kind!r}"
                )
            if not self.model.name:
                raise ValueError(
                    f"backend = {backend!r} needs [model] name: a model folder, a .gguf file,"
                    ' or "smollm2"'
                )
            if self.task.examples:
                raise ValueError("[task] examples apply to backend = 'local' only")
        provider = self.model.provider_name
        if provider is not None:
            if kind not in PROVIDER_KINDS[provider]:
                raise ValueError(
                    f"backend = {backend!r} runs kind = "
                    f"{', '.join(repr(k) for k in PROVIDER_KINDS[provider])}, not {kind!r}"
                )
            if not self.model.name and kind != "passthrough":
                raise ValueError(f"backend = {backend!r} needs [model] name (the model id)")
            if self.task.examples:
                raise ValueError("[task] examples apply to backend = 'local' only")
        src, out = self.source, self.output
        if (
            src.queue is not None
            and out.queue is not None
            and src.queue.rstrip("/") == out.queue.rstrip("/")
            and (src.queue_name or src.stream) == (out.queue_name or out.stream)
        ):
            # The consumer would take each result back as a message whose id it has (a
            # redelivery), acknowledge it and drop it: results lost on RabbitMQ and SQS.
            raise ValueError(
                f"[output] queue: {out.queue_name or out.stream!r} is the job's [source] queue;"
                " results go to another queue"
            )
        if self.source.queue is None:
            for key in ("flush_size", "flush_wait", "window"):
                if key in self.run.model_fields_set:
                    raise ValueError(f"[run] {key} applies to a queue source ([source] queue)")
        if self.run.deadline is not None and backend != "auto":
            raise ValueError("[run] deadline needs [model] backend = 'auto'")
        if self.run.executor == "ray":
            if backend not in WORKER_BACKENDS:
                raise ValueError(
                    "[run] executor = 'ray' runs backend = 'python', 'local', 'transformers'"
                    f" and 'vllm' (models and functions, in Ray actors), not {backend!r}"
                )
            for key in ("isolation", "timeout"):
                if key in self.run.model_fields_set:
                    raise ValueError(
                        f"[run] {key} applies to executor = 'local' (with 'ray', each worker"
                        " is a Ray actor, a process of its own)"
                    )
        if backend not in WORKER_BACKENDS:
            if self.run.isolation is not None or self.run.timeout is not None:
                key = "isolation" if self.run.isolation is not None else "timeout"
                raise ValueError(
                    f"[run] {key} applies to backend = 'python', 'local', 'transformers' and"
                    " 'vllm' (an LLM request's time limit is [model] timeout)"
                )
        elif self.run.isolation == "none" and self.run.timeout is not None:
            raise ValueError(
                "[run] timeout needs isolation = 'process' (a call in the runner's own process"
                " cannot be stopped)"
            )
        return self

    @property
    def isolation(self) -> str:
        """[run] isolation with its default: a worker process for user code and local models."""
        if self.run.isolation is not None:
            return self.run.isolation
        return "process" if self.model.backend in WORKER_BACKENDS else "none"


# Parts of a pydantic error location that name a union branch or a validator, not a key.
_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none"}


def _is_key(part: object) -> bool:
    if isinstance(part, int):
        return True
    text = str(part)
    return not (
        text in _TYPE_TAGS
        or "[" in text
        or text.startswith(("function-", "literal", "json-or-python", "lax-or-strict"))
    )


def _where(loc: tuple[Any, ...]) -> str:
    """`('task', 'labels', 0)` -> `[task] labels[0]`; top-level keys stay bare."""
    parts = [str(p) for p in loc if _is_key(p)]
    if not parts:
        return "(top level)"
    head, rest = parts[0], parts[1:]
    sections = {"source", "task", "model", "run", "output"}
    if head in sections and rest:
        key = rest[0] + "".join(f"[{p}]" for p in rest[1:])
        return f"[{head}] {key}"
    if head in sections:
        return f"[{head}]"
    return ".".join(parts)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed where an unknown key was found: its section's, or the top level's."""
    model: type[BaseModel] = JobSpec
    if len(loc) == 2 and loc[0] in JobSpec.model_fields:
        annotation = JobSpec.model_fields[str(loc[0])].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    elif len(loc) != 1:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _unknown_key(loc: tuple[Any, ...]) -> str:
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1, cutoff=0.6)
    return f"unknown key (did you mean `{close[0]}`?)" if close else "unknown key"


def format_validation_error(origin: str, exc: ValidationError) -> str:
    """One line per key: the branches of a union ("a number or 'auto'") are joined."""
    problems: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for err in exc.errors():
        where = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(tuple(err["loc"]))
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if not err["type"].startswith("value_error"):
                got[where] = f" (got {err['input']!r})"
        if msg not in problems.setdefault(where, []):
            problems[where].append(msg)
    return "\n".join(
        f"{origin}: {where}: {'; or '.join(msgs)}{got.get(where, '')}"
        for where, msgs in problems.items()
    )


def parse_spec(data: dict[str, Any], origin: str = "job") -> JobSpec:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(format_validation_error(origin, exc)) from None


def load_job_file(path: str | Path) -> JobSpec:
    path = Path(path)
    if path.is_dir():
        raise JobFileError(f"{path}: is a folder; give the job file (TOML) inside it")
    try:
        text = path.read_bytes().decode("utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise JobFileError(f"{path}: job file not found") from None
    except OSError as exc:  # permissions, a device, ...
        raise JobFileError(f"{path}: cannot read the job file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise JobFileError(
            f"{path}: not UTF-8 text (line {line}); save the job file as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{path}: not valid TOML: {exc}") from None
    return parse_spec(data, str(path))


def source_format(source: SourceSpec, path: Path) -> str:
    if source.format:
        return source.format
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise JobFileError(
            f"[source] path: cannot tell the format of {path.name!r} from its suffix; "
            f"set [source] format to one of {', '.join(FORMATS)}"
        )
    return fmt


_NOT_SEMANTIC = {
    "device",
    "base_url",
    "api_key_env",
    *_REALTIME_KEYS,
    "timeout",
    *_BATCH_KEYS,
}


def semantic_hash(spec: JobSpec, extra: bytes = b"") -> str:
    """Hash of what decides an item's result (task + model); run/output settings may change."""
    payload = orjson.dumps(
        {
            "task": spec.task.model_dump(),
            # How fast and where from may change between runs; what is asked may not.
            "model": spec.model.model_dump(exclude=_NOT_SEMANTIC),
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.blake2b(payload + extra, digest_size=16).hexdigest()
