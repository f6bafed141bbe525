"""What a job file's LLM settings turn into: the task, the key, the schema, prices, the cache,
the real-time predictor and the batch service. `job.py` calls these; nothing here runs work.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from .errors import EndpointDown, OvernightError, UsageError, redact
from .llm import providers
from .llm.providers import Provider
from .runner import Meter, Usage
from .spec import JobSpec

if TYPE_CHECKING:
    from .llm.cache import ResponseCache
    from .llm.prices import PriceTable
    from .llm.requests import Answer, LLMTask


def provider(spec: JobSpec) -> Provider:
    name = spec.model.provider_name
    assert name is not None, "not an LLM backend"
    return providers.provider(name)


def key_env(spec: JobSpec) -> str:
    """The environment variable that holds the key."""
    return spec.model.api_key_env or provider(spec).key_env


def api_key(spec: JobSpec) -> str:
    """The key from the environment: never from the job file, never stored anywhere.

    Whitespace around it goes (a key read from a file keeps its newline, which no HTTP header
    may hold); a key with whitespace, control or non-ASCII characters inside is refused,
    naming the variable, never the value."""
    env = key_env(spec)
    key = os.environ.get(env, "").strip()
    if not key:
        raise UsageError(
            f"[model] backend = {spec.model.backend!r} needs an API key in the environment "
            f"variable {env} (set it, or name another variable with [model] api_key_env)"
        )
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise UsageError(
            f"the API key in the environment variable {env} holds whitespace, control or "
            "non-ASCII characters (no HTTP header may carry them): set it to the key alone"
        )
    return key


def provider_failure(spec: JobSpec, exc: BaseException) -> OvernightError | None:
    """An error of a provider's SDK that stops a batch job (the batch API is called outside
    the real-time predictor, which handles these itself), as the error users get: the key
    refused (401/403) is exit 2 naming its variable; the API unreachable, timing out or
    failing (5xx) pauses the job, exit 3, items as they were: a rerun resumes. None for
    anything else."""
    api = provider(spec)
    failure = providers.sdk_failure(exc)
    if failure is None:
        return None
    status = failure.status
    where = spec.model.base_url or f"the {api.name} API"
    detail = redact(failure.said or failure.message or str(exc))
    if failure.kind in ("key_refused", "forbidden"):
        return UsageError(
            f"[model] {where} refused the API key in {key_env(spec)} (HTTP {status}: {detail});"
            " nothing more was sent: set the right key and run again"
        )
    if status is None or status >= 500:  # no answer (unreachable, timed out), or a 5xx
        what = f"HTTP {status}: {detail}" if status is not None else detail
        return EndpointDown(
            f"cannot reach the batch API at {where} ({what}); the job is paused, items stay"
            " as they were: run it again to resume"
        )
    return None


def load_schema(ref: str, base_dir: Path) -> dict[str, Any]:
    """A JSON Schema file, or a pydantic model given as "module:Model" (its JSON Schema)."""
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.suffix.lower() == ".json" or path.is_file():
        try:
            schema = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise UsageError(f"[task] schema: file not found: {path}") from None
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"[task] schema: {path}: not valid JSON ({exc})") from None
    elif ":" in ref:
        module_name, _, attr = ref.partition(":")
        if str(base_dir) not in sys.path:
            sys.path.insert(0, str(base_dir))
        try:
            model = getattr(importlib.import_module(module_name), attr)
            schema = model.model_json_schema()
        except Exception as exc:
            raise UsageError(
                f"[task] schema: cannot load pydantic model {ref!r} ({type(exc).__name__}: {exc})"
            ) from None
    else:
        raise UsageError(f'[task] schema: file not found: {path} (or give "module:Model")')
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        raise UsageError(
            f'[task] schema: {ref}: structured output needs an object schema ("type": "object")'
        )
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UsageError(f"[task] schema: {ref}: not a valid JSON Schema: {exc.message}") from None
    return schema


def build_task(spec: JobSpec, base_dir: Path) -> LLMTask:
    from .llm.requests import make_llm_task

    t, m = spec.task, spec.model
    schema = load_schema(t.schema_, base_dir) if t.schema_ else None
    labels = list(t.label_descriptions()) if t.kind == "classify" else None
    try:
        return make_llm_task(
            t.kind,
            provider(spec).name,
            m.name or "",
            text=t.text,
            system=t.system,
            params=dict(m.params),
            schema=schema,
            labels=labels,
            structured=m.structured_output,
            context=price_table(spec, base_dir).context,  # refuses requests over the window
        )
    except UsageError as exc:
        raise UsageError(f"[task] {exc}") from None


def self_hosted_task_args(spec: JobSpec, base_dir: Path) -> dict[str, Any]:
    """make_llm_task's arguments for a self-hosted LLM (plain data: a worker process builds
    the same task from them). Its requests are OpenAI chat bodies, as for `openai`; the
    model's own context window is checked where the model is (backends/hf.py)."""
    t, m = spec.task, spec.model
    return {
        "kind": t.kind,
        "provider": providers.OPENAI.name,
        "model": m.name or "",
        "text": t.text,
        "system": t.system,
        "params": dict(m.params),
        "schema": load_schema(t.schema_, base_dir) if t.schema_ else None,
        "labels": list(t.label_descriptions()) if t.kind == "classify" else None,
    }


def build_self_hosted_task(spec: JobSpec, base_dir: Path) -> LLMTask:
    from .llm.requests import make_llm_task

    args = self_hosted_task_args(spec, base_dir)
    try:
        return make_llm_task(**args)
    except UsageError as exc:
        raise UsageError(f"[task] {exc}") from None


def token_meter() -> Meter:
    """A self-hosted LLM's answer -> its tokens; no price, so it costs nothing. An answer
    comes as an Answer (in this process) or as the output row a worker process made."""
    from .llm.requests import Answer

    def measure(answer: Any) -> Usage:
        if isinstance(answer, Answer):
            return Usage(answer.input_tokens, answer.output_tokens, 0.0, 0.0)
        row = answer[0] if isinstance(answer, tuple) else answer
        usage = orjson.loads(row).get("usage") or {}
        tin, tout = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
        return Usage(tin, tout, 0.0, 0.0)

    return measure


def price_table(spec: JobSpec, base_dir: Path) -> PriceTable:
    from .llm.prices import PriceTable

    override = None
    if spec.run.prices:
        override = Path(spec.run.prices).expanduser()
        override = override if override.is_absolute() else base_dir / override
        if not override.is_file():
            raise UsageError(f"[run] prices: file not found: {override}")
    return PriceTable.load(override)


def meter(spec: JobSpec, prices: PriceTable, *, batch: bool) -> Meter:
    """Answer -> usage, cost and the requests it took (its attempts). A cached answer costs
    nothing now; its list cost still counts, so the report shows what the cache saved."""
    default_model = spec.model.name or ""

    def measure(answer: Answer) -> Usage:
        model = default_model or str(answer.body.get("model", ""))
        tin, tout = answer.input_tokens, answer.output_tokens
        list_cost = prices.cost(model, tin, tout, batch=False)
        if answer.cached:
            return Usage(tin, tout, 0.0, list_cost, answer.attempts)
        cost = prices.cost(model, tin, tout, batch=batch)
        return Usage(tin, tout, cost, list_cost, answer.attempts)

    return measure


def response_cache(
    spec: JobSpec, base_dir: Path, state_dir: Path, job_name: str, ledger_url: str | None = None
) -> ResponseCache:
    """Per job by default: in a PostgreSQL ledger itself (every worker shares it), else
    cache.db beside the SQLite ledger (off its write lock); `[run] cache = path` shares one
    file across jobs.

    A shared cache is keyed by the endpoint too (`[model] base_url`, when set): a job pointed
    at the real provider is never served answers that another job got from a fake, a proxy or
    a self-hosted server under the same model name. A job's own cache follows the job, as
    its results in the ledger do: moving its base_url keeps what it paid for."""
    from .llm.cache import LedgerResponseCache, ResponseCache
    from .store import is_postgres

    if spec.run.cache:
        path = Path(spec.run.cache).expanduser()
        path = path if path.is_absolute() else base_dir / path
        endpoint = (spec.model.base_url or "").strip().rstrip("/")
        return ResponseCache(path, scope=f"shared@{endpoint}" if endpoint else "shared")
    if ledger_url is not None and is_postgres(ledger_url):
        return LedgerResponseCache(ledger_url, scope=f"job:{job_name}")
    return ResponseCache(state_dir / "cache.db", scope=f"job:{job_name}")


def base_url(spec: JobSpec) -> str | None:
    return spec.model.base_url


def batch_limits(spec: JobSpec) -> tuple[int, int]:
    api = provider(spec)
    return (
        spec.model.max_requests_per_batch or api.max_requests,
        spec.model.max_bytes_per_batch or api.max_bytes,
    )
