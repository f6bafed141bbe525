"""serve.toml: the ledger, the API keys, the models the lines may name, and limits."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import JobFileError, UsageError
from ..llm import providers
from ..spec import ModelSpec, RunSpec, format_validation_error
from ..store import DEFAULT_LEDGER, is_postgres, ledger_location

# A provider's API, in real time or through its batch API (for its discount): a batch's
# lines are sent as they are (a `passthrough` job), the served name swapped for the
# provider's model id.
PROVIDER_BACKENDS = ("openai", "openai-batch", "anthropic", "anthropic-batch")
# The backends a batch line may be sent to: also a causal LM of Hugging Face's in the worker
# process (self-hosted: the lines' chat bodies as they are).
SERVED_BACKENDS = ("local", "python", *PROVIDER_BACKENDS, "transformers")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AuthSpec(_Section):
    keys_env: str = Field(min_length=1)  # "key1:tenant-a,key2:tenant-b"


class FilesSpec(_Section):
    # The folder of uploaded and result files and of the service's catalogue (catalogue.py);
    # relative to serve.toml's folder. Default: `serve/` beside a SQLite ledger, else
    # .overnight/serve beside serve.toml.
    folder: str | None = Field(None, min_length=1)
    max_upload_bytes: int = Field(200 * 1024 * 1024, gt=0)  # OpenAI's limit for a batch file


class BatchesSpec(_Section):
    concurrency: int = Field(2, gt=0)  # batches run at once; the others wait in `validating`
    max_errors: int = Field(100, gt=0)  # validation errors listed in a failed batch
    # Batches of one tenant that may be open (not ended) at once; one more is refused with
    # 429. None: no limit.
    max_active_per_tenant: int | None = Field(None, gt=0)
    # A batch not ended this long after its creation (its `expires_at`) ends `expired`: what
    # it finished is kept, the rest is not run. OpenAI's and Anthropic's window is 24 hours.
    completion_window_hours: float = Field(24, gt=0)


class MetricsSpec(_Section):
    # /metrics asks for an API key of [auth] (Prometheus: `authorization` in the scrape
    # config). Off by default, as for most exporters: the exposition then is open to whoever
    # reaches the server, and it names every tenant's batches and their counts.
    require_key: bool = False
    # With require_key: only the keys of these tenants may scrape (default: any key).
    tenants: list[str] | None = Field(None, min_length=1)


class IntakeSpec(_Section):
    """The real-time endpoints' micro-batching (realtime.py, microbatch.py), per model."""

    max_batch_size: int = Field(64, gt=0)  # inputs in one model call at most
    max_wait_ms: float = Field(20, ge=0)  # how long the first input of a call waits for more
    max_queue: int = Field(1024, gt=0)  # inputs waiting at most; beyond it: 429 + Retry-After


class ServedModel(ModelSpec):
    # A local model given labels also classifies: /v1/chat/completions and /v1/messages
    # answer with the label nearest the last user message (zero-shot, as [task] labels).
    labels: list[str] | dict[str, str] | None = Field(None, min_length=2)

    @model_validator(mode="after")
    def _labels_local(self) -> ServedModel:
        if self.labels is not None and self.backend != "local":
            raise ValueError("`labels` applies to backend = 'local' (it classifies)")
        return self

    def label_descriptions(self) -> dict[str, str]:
        if isinstance(self.labels, dict):
            return {label: text or label for label, text in self.labels.items()}
        return {label: label for label in self.labels or []}

    def job_model(self) -> dict[str, Any]:
        """The [model] table of a batch's job: what a job file takes."""
        return self.model_dump(exclude_unset=True, exclude={"labels"})

    @property
    def is_provider(self) -> bool:
        return self.backend in PROVIDER_BACKENDS

    @property
    def passes_through(self) -> bool:
        """A batch's lines go to it as they are, and its answer bodies come back as they are
        (a provider's, or a self-hosted LLM's chat.completion)."""
        return self.is_provider or self.backend == "transformers"

    def endpoints(self) -> tuple[str, ...]:
        """What a batch line to this model may post to: a provider's own endpoints (OpenAI:
        chat completions and embeddings; Anthropic: messages), else the service's."""
        if self.is_provider:
            ours = ("/v1/chat/completions", "/v1/embeddings", "/v1/messages")
            api = providers.provider(self.provider_name or "")
            return tuple(e for e in api.endpoints if e in ours)
        if self.backend == "local":
            return ("/v1/embeddings",)
        if self.backend == "transformers":
            return ("/v1/chat/completions",)
        return ("/v1/chat/completions", "/v1/embeddings", "/v1/messages")

    def provider_model(self, served: str) -> str:
        """The provider's id of a served model: `name`, else its name in serve.toml."""
        return self.name or served

    def key_env(self) -> str:
        """The environment variable of a provider model's key."""
        return self.api_key_env or providers.provider(self.provider_name or "").key_env


class ServeSpec(_Section):
    ledger: str | None = None
    auth: AuthSpec | None = None
    files: FilesSpec = FilesSpec()
    batches: BatchesSpec = BatchesSpec()
    intake: IntakeSpec = IntakeSpec()
    metrics: MetricsSpec = MetricsSpec()
    run: RunSpec = RunSpec()  # settings of every batch's job (batch_size, max_attempts, ...)
    models: dict[str, ServedModel] = Field(min_length=1)


class ServeConfig:
    """serve.toml, validated, with its paths resolved against its folder."""

    def __init__(self, spec: ServeSpec, base_dir: Path, origin: str) -> None:
        self.spec = spec
        self.base_dir = base_dir
        self.origin = origin
        key = f"{origin}: ledger"
        self.ledger_url = (
            ledger_location(spec.ledger, base_dir, key)
            if spec.ledger
            else str(base_dir / DEFAULT_LEDGER)
        )
        if spec.files.folder:
            folder = Path(spec.files.folder).expanduser()
            self.folder = folder if folder.is_absolute() else base_dir / folder
        elif is_postgres(self.ledger_url):
            self.folder = base_dir / DEFAULT_LEDGER.parent / "serve"
        else:
            self.folder = Path(self.ledger_url).parent / "serve"

    @property
    def models(self) -> dict[str, ServedModel]:
        return self.spec.models


def parse_config(data: dict[str, Any], base_dir: Path, origin: str) -> ServeConfig:
    try:
        spec = ServeSpec.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(_messages(origin, exc)) from None
    for name, model in spec.models.items():
        if model.backend not in SERVED_BACKENDS:
            raise JobFileError(
                f'{origin}: [models."{name}"] backend: the service runs'
                f" {', '.join(repr(b) for b in SERVED_BACKENDS)} models, not"
                f" {model.backend!r}"
            )
    if spec.metrics.require_key and spec.auth is None:
        raise JobFileError(
            f"{origin}: [metrics] require_key: there are no keys to ask for; add [auth] keys_env"
        )
    if spec.metrics.tenants is not None and not spec.metrics.require_key:
        raise JobFileError(f"{origin}: [metrics] tenants: applies with require_key = true")
    if spec.run.ledger is not None:
        raise JobFileError(f"{origin}: [run] ledger: set the ledger at the top level (`ledger`)")
    return ServeConfig(spec, base_dir, origin)


def check_models(config: ServeConfig) -> None:
    """What a batch would find wrong with a model, found at start-up instead: a python
    function that cannot be imported (serve.toml's folder is importable), a local model that
    is not installed, a provider model without its key in the environment."""
    for name, model in config.models.items():
        where = f'{config.origin}: [models."{name}"]'
        if model.is_provider:
            env = model.key_env()
            key = os.environ.get(env, "").strip()
            if not key:
                raise JobFileError(
                    f"{where} backend = {model.backend!r} needs an API key in the environment"
                    f" variable {env} (set it, or name another variable with api_key_env)"
                )
            if not (key.isascii() and key.isprintable()) or " " in key:
                raise JobFileError(
                    f"{where} the API key in the environment variable {env} holds whitespace,"
                    " control or non-ASCII characters: set it to the key alone"
                )
        elif model.backend == "transformers":
            _check_transformers(where, model, config.base_dir)
        elif model.backend == "python":
            from ..backends.python import load_function

            try:
                load_function(model.function or "", config.base_dir)
            except UsageError as exc:
                raise JobFileError(f"{where} {str(exc).removeprefix('[model] ')}") from None
        elif model.backend == "local":
            from ..backends.local import KNOWN_MODELS, check_installed

            local = model.name or "all-MiniLM-L6-v2"
            if local not in KNOWN_MODELS:
                raise JobFileError(
                    f"{where} name: unknown local model {local!r}; known: {', '.join(KNOWN_MODELS)}"
                )
            try:
                check_installed(local)
            except ValueError as exc:
                raise JobFileError(f"{where} name: {exc}") from None


def _check_transformers(where: str, model: ServedModel, base_dir: Path) -> None:
    """A self-hosted model's files and libraries are there, and it is a causal LM (it
    answers chat lines)."""
    from ..backends.hf_files import check_libraries, resolve

    if not model.name:
        raise JobFileError(f'{where} name: a model folder, a .gguf file, or "smollm2"')
    try:
        ref = resolve(model.name, base_dir)
        check_libraries(ref)
    except ValueError as exc:
        raise JobFileError(f"{where} name: {exc}") from None
    if ref.kind != "causal":
        raise JobFileError(
            f"{where} name: {model.name!r} is not a causal LM: backend = 'transformers' serves"
            " /v1/chat/completions lines here"
        )


def _messages(origin: str, exc: ValidationError) -> str:
    """pydantic's errors with serve.toml's keys: `[models."m"] function`, `[auth] keys_env`."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
        if loc[:1] == ["models"] and len(loc) >= 2:
            where = f'[models."{loc[1]}"]' + (f" {'.'.join(loc[2:])}" if len(loc) > 2 else "")
        elif len(loc) >= 2:
            where = f"[{loc[0]}] {'.'.join(loc[1:])}"
        else:
            where = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{origin}: {where}: {msg}")
    return "\n".join(dict.fromkeys(lines)) or format_validation_error(origin, exc)


def load_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise JobFileError(f"{path}: serve config not found") from None
    except IsADirectoryError:
        raise JobFileError(f"{path}: is a folder; give the serve config (TOML)") from None
    except OSError as exc:
        raise JobFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise JobFileError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobFileError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path.resolve().parent, str(path))
