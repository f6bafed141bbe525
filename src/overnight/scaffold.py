"""`overnight init`: a commented starter job file for a backend and task, with the small files it
names (sample records, a schema, a python function), so that `overnight check` passes on it as
written. Nothing is overwritten: if any of the files exists, nothing is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from .errors import UsageError
from .llm.providers import BACKENDS as LLM_BACKENDS
from .llm.providers import PROVIDERS

BACKENDS = ("local", "python", *LLM_BACKENDS)
DEFAULT_PROVIDER = "openai"  # --backend auto without --provider
EMBEDDING_MODEL = "text-embedding-3-small"
LABELS = ("billing", "bug", "feature request", "other")
SAMPLES = (
    "I was charged twice for my subscription this month.",
    "The export button crashes the app since the last update.",
    "Could you add a dark mode to the dashboard?",
)


@dataclass(frozen=True)
class Scaffold:
    job_file: Path
    files: dict[Path, str]  # every file to write, the job file first


def tasks_for(backend: str, provider: str = DEFAULT_PROVIDER) -> tuple[str, ...]:
    if backend == "local":
        return ("classify", "embed")
    if backend == "python":
        return ("map",)
    return PROVIDERS[LLM_BACKENDS[backend].provider or provider].kinds


def _toml(value: object) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these)."""
    return orjson.dumps(value).decode()


def _module_name(stem: str) -> str:
    name = re.sub(r"\W", "_", stem)
    return f"{name if name[:1].isalpha() else 'job_' + name}_fn"


def _records(task: str, backend: str, provider: str) -> list[dict[str, object]]:
    if task != "passthrough":
        return [{"id": str(i), "text": t} for i, t in enumerate(SAMPLES, 1)]
    api = PROVIDERS[provider]
    return [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": api.chat_endpoint,
            "body": {
                "model": api.starter_model,
                "messages": [{"role": "user", "content": t}],
                "max_tokens": 100,
            },
        }
        for i, t in enumerate(SAMPLES, 1)
    ]


def build(
    job_file: Path, backend: str, task: str | None = None, provider: str | None = None
) -> Scaffold:
    """The files `overnight init` would write; UsageError for a backend/task that cannot run."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if provider is not None and backend != "auto":
        raise UsageError("--provider applies to --backend auto only")
    provider = provider or DEFAULT_PROVIDER
    if provider not in PROVIDERS:
        raise UsageError(f"--provider: {provider!r} is not one of {', '.join(PROVIDERS)}")
    if backend in LLM_BACKENDS:  # anthropic, anthropic-batch: their own model, key, URL
        provider = LLM_BACKENDS[backend].provider or provider
    kinds = tasks_for(backend, provider)
    if task is None:
        task = kinds[0] if backend in ("local", "python") else "generate"
    if task not in kinds:
        raise UsageError(
            f"--task: backend {backend!r} runs {', '.join(kinds)}, not {task!r}"
            + (" (Anthropic has no embeddings endpoint)" if task == "embed" else "")
        )
    if job_file.suffix.lower() != ".toml":
        raise UsageError(f"{job_file}: a job file is TOML: name it *.toml")
    folder, stem = job_file.parent, job_file.stem
    data = folder / f"{stem}.input.jsonl"
    files: dict[Path, str] = {job_file: ""}
    files[data] = "".join(
        orjson.dumps(r).decode() + "\n" for r in _records(task, backend, provider)
    )

    head = [
        f"# Written by `overnight init --backend {backend} --task {task}`.",
        f"# Check it with `overnight check {job_file.name}`, run it with "
        f"`overnight run {job_file.name}`.",
        "# Commented lines are options (with their defaults where there is one); see README.md.",
        f"name = {_toml(stem)}",
        "",
        "[source]",
        f"path = {_toml(data.name)}    # .jsonl, .csv or .parquet; sample records for now",
    ]
    if task == "passthrough":
        head.append("# id: each line's custom_id identifies it")
    else:
        head.append('id = "id"    # the field naming each record; leave out to use content hashes')
    head += [
        '# format = "csv"    # when the suffix does not tell',
        '# delimiter = ";"    # CSV only',
    ]

    body = ["", "[task]", f"kind = {_toml(task)}"]
    if task in ("classify", "embed", "generate", "extract"):
        if backend == "local" or task == "embed":
            text = "{{ text }}"
        elif task == "generate":
            text = "Answer this customer in one friendly sentence:\n\n{{ text }}"
        elif task == "extract":
            text = "Triage this support ticket:\n\n{{ text }}"
        else:
            text = "Which team should handle this ticket?\n\n{{ text }}"
        body.append(f"text = {_toml(text)}    # Jinja2 over the record's fields")
    if task == "generate" or (task in ("extract", "classify") and backend != "local"):
        body.append('# system = "You are a helpful support agent."')
    if task == "classify":
        body.append(f"labels = {_toml(list(LABELS))}    # or a table: label = description")
        if backend == "local":
            body.append(
                '# examples = "labelled.csv"    # a few hundred labelled rows (+ `label`): '
                "a fitted head"
            )
    if task == "extract":
        schema = folder / f"{stem}.schema.json"
        files[schema] = (
            orjson.dumps(
                {
                    "type": "object",
                    "properties": {
                        "topic": {"type": "string", "enum": list(LABELS)},
                        "urgent": {"type": "boolean"},
                        "summary": {"type": "string"},
                    },
                    "required": ["topic", "urgent", "summary"],
                    "additionalProperties": False,
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
        body.append(f'schema = {_toml(schema.name)}    # or a pydantic model: "module:Model"')
    if task in ("extract", "classify") and backend != "local":
        body.append("# repair = true    # an invalid answer is asked again once, with the error")

    model = ["", "[model]", f"backend = {_toml(backend)}"]
    if backend == "local":
        model += [
            'name = "all-MiniLM-L6-v2"    # the embedded model: offline, no key',
            'device = "auto"    # cuda, mps or cpu',
        ]
    elif backend == "python":
        module = _module_name(stem)
        files[folder / f"{module}.py"] = (
            f'"""The function `{job_file.name}` runs: a batch of records in, one output per '
            'record out."""\n\n\n'
            "def process(records):\n"
            '    return [{"words": len(r["text"].split())} for r in records]\n'
        )
        model.append(f'function = "{module}:process"    # module:function, beside the job file')
    else:
        if backend == "auto":
            model.append(f"provider = {_toml(provider)}    # whose batch and real-time APIs")
        api = PROVIDERS[provider]
        name = EMBEDDING_MODEL if task == "embed" else api.starter_model
        if task == "passthrough":
            model.append(f"# name = {_toml(name)}    # for lines whose body names no model")
        else:
            model.append(f"name = {_toml(name)}")
        url = "http://127.0.0.1:8000" + api.base_url_path
        model.append(f'# base_url = "{url}"    # another server; leave out for the provider')
        key = api.key_env
        model.append(f'# api_key_env = "{key}"    # the variable holding the key (never the key)')
        if task in ("generate", "extract", "classify"):
            model.append("params = { temperature = 0, max_tokens = 300 }")
        if LLM_BACKENDS[backend].mode == "realtime":
            model += ["# rpm = 500", "# tpm = 200000", "concurrency = 8"]
        else:
            model.append("# poll_interval = 30    # seconds to the first poll; backs off")

    run = ["", "[run]", 'batch_size = "auto"' if backend in ("local", "python") else None]
    run.append("max_attempts = 3")
    if backend in LLM_BACKENDS:
        run.append("# max_cost = 20.0    # USD: stop sending new work past this")
    if backend == "auto":
        run += [
            "# deadline = 2030-01-01T06:00:00Z    # batches while there is time, then real time",
            "# deadline_margin = 3600",
        ]
    output = [
        "",
        "[output]",
        f"path = {_toml(f'{stem}.out.jsonl')}    # .jsonl, .csv or .parquet",
        f"errors = {_toml(f'{stem}.errors.jsonl')}",
    ]
    lines = [x for x in (*head, *body, *model, *run, *output) if x is not None]
    files[job_file] = "\n".join(lines) + "\n"
    return Scaffold(job_file, files)


def write(scaffold: Scaffold) -> list[Path]:
    """Write every file, or none: refuses when any of them exists."""
    existing = [p for p in scaffold.files if p.exists()]
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise UsageError(
            f"{names}: already exist{'s' if len(existing) == 1 else ''}; overnight init does not"
            " overwrite (remove it, or choose another job file name)"
        )
    written: list[Path] = []
    for path, text in scaffold.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:  # "x": never over a file made meanwhile
            f.write(text)
        written.append(path)
    return written
