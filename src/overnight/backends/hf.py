"""backend = "transformers": a Hugging Face model in the process (the worker process, by
default: a crash or an out-of-memory kill costs one call).

A causal LM generates (`generate`), answers with a JSON object (`extract`) or picks a label
by scoring each label's tokens after the prompt (`classify`: the label the model finds most
likely, never free text to match); an encoder embeds (`embed`: pooled as the model's
sentence-transformers config says, mean by default, L2-normalised); a sequence-classification
model classifies with its own labels. Requests and answers are the OpenAI chat bodies the LLM
tasks build and parse (see chat.py), so validation and repair are theirs.

Batching. A call hands the model a window of prompts; they are sorted by length (longest
first) and cut into batches of similar length, so little of a batch is padding. A batch holds
at most `batch_size` prompts (the runner's: "auto" measures throughput) and at most
`MemoryBudget.tokens` tokens, counting each prompt as long as the batch's longest plus the new
tokens. That budget comes from measured memory: the peak a batch adds over what was resident
before it, per token (a CPU: the process's peak RSS, reset before each batch; a GPU: torch's
peak allocation), against the room under the limit (`[run] memory_limit_mb` on a CPU, 90% of
the card on a GPU).

Results do not depend on batch-mates. Generation pads on the left, so every prompt ends in the
batch's last column and new tokens follow it; the attention mask hides the pads and generate
derives each prompt's positions from the mask, so greedy output for a prompt is the same alone
or in any batch (tests/test_transformers.py checks it). Seeded sampling draws each prompt's
noise from its own generator, seeded by the seed and the prompt (Gumbel-max: the argmax of
logits / T plus Gumbel noise is a sample of softmax(logits / T)), so a seeded sample does not
depend on the batch either. Label scoring pads on the left too and passes the positions.

torch and transformers are imported when a model is built, not with this module: a job file
is checked, and the batching hints read, without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, InvalidOutput
from ..llm.providers import CHAT
from ..llm.requests import Answer, ContextExceeded, LLMTask, Request, make_llm_task
from .chat import Sampling, answer, conversation, first_json_object, label_hint, schema_hint
from .hf_files import ModelRef, load_folder, read_gguf

log = logging.getLogger(__name__)


def plan_batches(lengths: list[int], extra: int, rows: int, tokens: int) -> list[list[int]]:
    """Indexes into `lengths` in batches: longest first, at most `rows` a batch, and at most
    `tokens` tokens, counting every prompt as long as the batch's first (longest) plus
    `extra` (the new tokens). A prompt over the budget alone still gets a batch of one."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur and len(cur) < rows and (len(cur) + 1) * (lengths[cur[0]] + extra) <= tokens:
            cur.append(i)
        else:
            batches.append([i])
    return batches


# -- memory ----------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


class MemoryBudget:
    """Tokens one batch may hold, from the memory batches were measured to take.

    Until a batch has been measured, a prior from the model's shape stands in: twice its KV
    cache per token. A measurement counts from batches of `MIN_MEASURED` tokens on: in a
    smaller one, costs per row and one-off allocations swamp what the tokens take."""

    SAFETY = 0.8  # of the room left: allocator slack, a longer answer than measured
    MIN_MEASURED = 512

    def __init__(self, torch: Any, device: str, limit_mb: int, prior_per_token: float) -> None:
        self.torch, self.device = torch, device
        self.gpu = device.startswith("cuda")
        if self.gpu:
            props = torch.cuda.get_device_properties(torch.device(device))
            self.limit = int(props.total_memory * 0.9)
        else:
            self.limit = limit_mb * 2**20
        self.base = self._current()  # the model, loaded
        self.per_token = 0.0  # bytes a token of a batch took at most, measured
        self.tokens = self._fit(prior_per_token)

    def _fit(self, per_token: float) -> int:
        room = max(0, self.limit - self.base)
        return max(1, int(room * self.SAFETY / max(per_token, 1.0)))

    def _current(self) -> int:
        if self.gpu:
            return int(self.torch.cuda.memory_allocated(self.device))
        kb = _status_kb("VmRSS")
        return (kb or 0) * 1024

    def _reset_peak(self) -> bool:
        if self.gpu:
            self.torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:  # Linux: writing 5 resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def _peak(self) -> int:
        if self.gpu:
            return int(self.torch.cuda.max_memory_allocated(self.device))
        return (_status_kb("VmHWM") or 0) * 1024

    @contextmanager
    def measure(self, tokens: int) -> Iterator[None]:
        """Measure one batch of `tokens` tokens and update the budget."""
        if tokens < self.MIN_MEASURED:
            yield
            return
        before = self._current()
        measurable = self._reset_peak()
        yield
        if not measurable:
            return
        grew = max(0, self._peak() - before)
        self.per_token = max(self.per_token, grew / tokens)
        if self.per_token > 0:
            self.tokens = self._fit(self.per_token)


def _kv_bytes_per_token(config: Any, dtype_bytes: int) -> float:
    """Keys and values of one token over all layers: the KV cache's size per token."""
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
    return float(2 * layers * kv_heads * head_dim * dtype_bytes) or 65536.0


# -- the model -------------------------------------------------------------------------------


def _load(ref: ModelRef, device: str, cls_name: str) -> tuple[Any, Any, Any]:
    """(torch, tokenizer, model) on the device, in eval mode; nothing from a hub."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from .local import resolve_device

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" on stderr: nothing below the CLI prints
    try:
        folder, gguf_file = load_folder(ref)
        model_cls = getattr(transformers, cls_name)
        if gguf_file:  # the cache could not be written: read the GGUF itself
            tokenizer, model = read_gguf(folder / gguf_file, transformers.AutoTokenizer, model_cls)
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            model = model_cls.from_pretrained(folder)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.to(resolve_device(device)).eval()
    return torch, tokenizer, model


@dataclass
class HFStats:
    batches: int = 0
    prompts: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    padded_tokens: int = 0  # pad positions computed: the cost of unequal lengths
    repairs: int = 0


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    sampling: Sampling


class _SeededSampler:
    """A logits processor: temperature, top-p, then Gumbel noise from each row's own
    generator; greedy decoding over its output samples (see the module's docstring)."""

    def __init__(self, torch: Any, seeds: list[int], sampling: Sampling) -> None:
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        self.torch = torch
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g) for g in self.generators])
        u = u.clamp(min=1e-20, max=1.0 - 1e-7).to(scores.device, scores.dtype)
        return scores - torch.log(-torch.log(u))


class _JsonObjectEnd:
    """A stopping criterion: a row is done once its new text holds a complete JSON object
    (what a JSON grammar would end on). Only rows whose last token holds a "}" are decoded."""

    def __init__(self, torch: Any, tokenizer: Any, start: int) -> None:
        self.torch, self.tokenizer, self.start = torch, tokenizer, start
        self._closes: dict[int, bool] = {}

    def _closing(self, token: int) -> bool:
        if token not in self._closes:
            self._closes[token] = "}" in self.tokenizer.decode([token])
        return self._closes[token]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        done = self.torch.zeros(input_ids.shape[0], dtype=self.torch.bool, device=input_ids.device)
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self._closing(token):
                text = self.tokenizer.decode(input_ids[i, self.start :], skip_special_tokens=True)
                done[i] = first_json_object(text) is not None
        return done


def _row_seed(seed: int, ids: list[int]) -> int:
    blob = seed.to_bytes(8, "little", signed=True) + b"".join(i.to_bytes(4, "little") for i in ids)
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little") >> 1


class CausalLM:
    """generate / extract / classify with a causal LM. `process` takes the LLM task's
    requests and returns per request an Answer, or the exception of that request alone."""

    # On 2 CPU cores (SmolLM2, ~90-token prompts, 32 new tokens): 8 a batch 20 tokens/s, 16
    # 30, 32 37; one prompt a call ~7. "auto" starts at 16.
    auto_start = 16
    auto_max = 128
    # Prompts a call at least: enough to sort into batches of similar length (128 in batches
    # of 16 padded 45% less than 64), few enough that "auto" can compare batch sizes on a job
    # of a few hundred prompts.
    window = 128

    def __init__(
        self,
        ref: ModelRef,
        device: str,
        task: LLMTask,
        repair: bool = False,
        memory_limit_mb: int = 2048,
    ) -> None:
        self.ref, self.task, self.repair = ref, task, repair
        torch, self.tokenizer, self.model = _load(ref, device, "AutoModelForCausalLM")
        self.torch = torch
        self.device = str(self.model.device)
        config = self.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else []
        eos = [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise ValueError(f"the model {ref.name!r} names no end-of-sequence token")
        self.eos = eos
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else eos[0]
        self.ends = {*eos, self.pad}  # generate fills a finished row with the pad token
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))
        if not self.templated:
            log.warning("%s has no chat template: messages are joined as plain text", ref.name)
        self.instruction: str | None = None
        if task.kind == "classify":
            self.labels = list(task.labels or [])
            self.instruction = label_hint(self.labels)
            self.label_ids = [
                self.tokenizer(label, add_special_tokens=False).input_ids + [eos[0]]
                for label in self.labels
            ]
        elif task.kind == "extract" and task.schema is not None:
            self.instruction = schema_hint(task.schema)
        self.stats = HFStats()
        kv = _kv_bytes_per_token(self.model.config, self.model.dtype.itemsize)
        self.budget = MemoryBudget(torch, self.device, memory_limit_mb, prior_per_token=2 * kv)
        self._generate([_Prompt(self._ids([{"role": "user", "content": "Hi"}]), Sampling(1))])

    # -- the predictor ----------------------------------------------------------------------

    def process(self, inputs: list[Request], batch_size: int) -> list[Any]:
        answers = self._answer(inputs, batch_size)
        if not (self.repair and self.task.schema is not None and self.task.kind == "extract"):
            return answers
        redo: list[tuple[int, Request]] = []
        for i, a in enumerate(answers):
            if isinstance(a, Answer):
                try:
                    self.task.parse(a)
                except InvalidOutput as exc:
                    redo.append((i, self.task.repair(inputs[i], a, exc.reason)))
        if redo:
            self.stats.repairs += len(redo)
            second = self._answer([r for _, r in redo], batch_size)
            for (i, _), b in zip(redo, second, strict=True):
                a = answers[i]
                if isinstance(b, Answer):  # else the first answer stands, recorded invalid
                    answers[i] = Answer(
                        b.body, a.input_tokens + b.input_tokens, a.output_tokens + b.output_tokens
                    )
        return answers

    def close(self) -> None:
        pass

    # -- requests -> prompts ----------------------------------------------------------------

    def _ids(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.templated:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            text = "\n\n".join(str(m.get("content") or "") for m in messages) + "\n\n"
        return list(self.tokenizer(text, add_special_tokens=not self.templated).input_ids)

    def _prompt(self, request: Request) -> _Prompt:
        if request.endpoint != CHAT or not isinstance(request.body.get("messages"), list):
            raise InputError(  # a passthrough line the model cannot answer
                f"{self.ref.name} answers {CHAT} lines with `messages`, not {request.endpoint}"
            )
        sampling = Sampling.of(request.body)
        ids = self._ids(conversation(request.body, self.instruction))
        extra = sampling.max_tokens
        if self.task.kind == "classify":
            extra = max(map(len, self.label_ids))
        if self.context and len(ids) + extra > self.context:
            raise ContextExceeded(
                f"the prompt has {len(ids):,} tokens; with {extra:,} more it is over the"
                f" {self.context:,} of {self.ref.name}'s context window"
            )
        return _Prompt(ids, sampling)

    def _answer(self, requests: list[Request], batch_size: int) -> list[Any]:
        out: list[Any] = [None] * len(requests)
        prompts: dict[int, _Prompt] = {}
        for i, r in enumerate(requests):
            try:
                prompts[i] = self._prompt(r)
            except InputError as exc:  # too long for the context, or not a chat request
                out[i] = exc
        if self.task.kind == "classify":
            for i, a in self._classify(prompts, batch_size):
                out[i] = a
            return out
        # Requests of one job share their parameters; a repair asks with the same ones.
        groups: dict[Sampling, list[int]] = {}
        for i, p in prompts.items():
            groups.setdefault(p.sampling, []).append(i)
        for sampling, idx in groups.items():
            lengths = [len(prompts[i].ids) for i in idx]
            for batch in plan_batches(lengths, sampling.max_tokens, batch_size, self.budget.tokens):
                rows = [idx[k] for k in batch]
                for i, a in zip(rows, self._generate([prompts[i] for i in rows]), strict=True):
                    out[i] = a
        return out

    # -- generation -------------------------------------------------------------------------

    def _left_padded(self, seqs: list[list[int]]) -> tuple[Any, Any, int]:
        torch = self.torch
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        self.stats.padded_tokens += sum(width - len(s) for s in seqs)
        return ids.to(self.device), mask.to(self.device), width

    def _generate(self, batch: list[_Prompt]) -> list[Answer]:
        from transformers import GenerationConfig

        torch, sampling = self.torch, batch[0].sampling
        ids, mask, width = self._left_padded([p.ids for p in batch])
        config = GenerationConfig(
            max_new_tokens=sampling.max_tokens,
            do_sample=False,  # sampling is the seeded processor's: see the module docstring
            num_beams=1,
            pad_token_id=self.pad,
            eos_token_id=self.eos,
            use_cache=True,
            stop_strings=list(sampling.stop) or None,
        )
        processors = []
        if not sampling.greedy:
            seeds = [_row_seed(sampling.seed, p.ids) for p in batch]
            processors.append(_SeededSampler(torch, seeds, sampling))
        criteria = []
        json_object = self.task.kind == "extract"
        if json_object:
            criteria.append(_JsonObjectEnd(torch, self.tokenizer, width))
        kwargs = {"tokenizer": self.tokenizer} if sampling.stop else {}
        tokens = len(batch) * (width + sampling.max_tokens)
        with self.budget.measure(tokens), torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=criteria,
                **kwargs,
            )
        self.stats.batches += 1
        self.stats.prompts += len(batch)
        answers = []
        for p, row in zip(batch, out[:, width:].tolist(), strict=True):
            n = next((k for k, t in enumerate(row) if t in self.ends), len(row))
            finish = "stop" if n < len(row) else "length"
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            cut = [text.find(s) for s in sampling.stop if s in text]
            if cut:
                text, finish = text[: min(cut)], "stop"
            if json_object:
                span = first_json_object(text)
                if span is not None:
                    text, finish = text[span[0] : span[1]], "stop"
            self.stats.prompt_tokens += len(p.ids)
            self.stats.new_tokens += n
            answers.append(answer(self.ref.name, text, finish, len(p.ids), n))
        return answers

    # -- classify: score each label -----------------------------------------------------------

    def _classify(
        self, prompts: dict[int, _Prompt], batch_size: int
    ) -> Iterator[tuple[int, Answer]]:
        """P(label, then the end of the turn | prompt) for every label; the most likely wins.

        Every (prompt, label) pair is a row; rows are batched like prompts. A row's label
        tokens are its last ones (left padding), so only their logits are computed."""
        torch = self.torch
        n = len(self.labels)
        idx = list(prompts)
        rows = [(i, j) for i in idx for j in range(n)]
        seqs = [prompts[i].ids + self.label_ids[j] for i, j in rows]
        logp = [0.0] * len(rows)
        for batch in plan_batches([len(s) for s in seqs], 0, batch_size * n, self.budget.tokens):
            ids, mask, width = self._left_padded([seqs[r] for r in batch])
            keep = max(len(self.label_ids[rows[r][1]]) for r in batch) + 1
            # Each row counts its positions from its first real token. (A rotary model such as
            # SmolLM2 only sees distances, so it would not notice; a model with absolute
            # positions would score a padded row wrongly without them.)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with self.budget.measure(len(batch) * width), torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
                ).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1)
            self.stats.batches += 1
            for b, r in enumerate(batch):
                label = self.label_ids[rows[r][1]]
                first = keep - 1 - len(label)  # the logits that predict the label's first token
                picks = logprobs[b, first : first + len(label)].gather(
                    1, torch.tensor(label, device=logprobs.device).unsqueeze(1)
                )
                logp[r] = float(picks.sum())
        for k, i in enumerate(idx):
            scores = torch.softmax(torch.tensor(logp[k * n : (k + 1) * n]), dim=0).tolist()
            best = max(range(n), key=lambda j: scores[j])
            p = prompts[i]
            self.stats.prompts += 1
            self.stats.prompt_tokens += len(p.ids)
            yield (
                i,
                answer(
                    self.ref.name,
                    json.dumps({"label": self.labels[best]}),
                    "stop",
                    len(p.ids),
                    len(self.label_ids[best]),
                    scores={
                        label: round(s, 6) for label, s in zip(self.labels, scores, strict=True)
                    },
                ),
            )


class Encoder:
    """embed with an encoder (pooled, L2-normalised), or classify with a sequence-
    classification model's own labels. `process` takes texts."""

    auto_start = 8
    auto_max = 256
    window = 1024  # texts a call: sorted by length into batches, as sentence-transformers does

    def __init__(self, ref: ModelRef, device: str, kind: str, memory_limit_mb: int = 2048) -> None:
        self.ref, self.kind = ref, kind
        cls = "AutoModelForSequenceClassification" if kind == "classify" else "AutoModel"
        torch, self.tokenizer, self.model = _load(ref, device, cls)
        self.torch, self.device = torch, str(self.model.device)
        folder = ref.path
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 512)
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            limit = int(json.loads(st_config.read_text()).get("max_seq_length") or limit)
        self.max_length = min(limit, int(self.tokenizer.model_max_length or limit))
        self.pooling = "mean"
        pooling = folder / "1_Pooling" / "config.json"
        if pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_cls_token"):
            self.pooling = "cls"
        self.labels = ref.labels() if kind == "classify" else []
        self.stats = HFStats()
        # An encoder keeps no cache: a token's activations, a few times its hidden state.
        hidden = int(getattr(self.model.config, "hidden_size", 0) or 1024)
        prior = 16.0 * hidden * self.model.dtype.itemsize
        self.budget = MemoryBudget(torch, self.device, memory_limit_mb, prior_per_token=prior)
        self.process(["warm up"], 1)

    def process(self, inputs: list[str], batch_size: int) -> list[Any]:
        torch = self.torch
        encoded = self.tokenizer(list(inputs), truncation=True, max_length=self.max_length)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        out: list[Any] = [None] * len(inputs)
        for batch in plan_batches(lengths, 0, batch_size, self.budget.tokens):
            rows = {key: [encoded[key][i] for i in batch] for key in encoded}
            enc = self.tokenizer.pad(rows, return_tensors="pt").to(self.device)
            with self.budget.measure(int(enc["input_ids"].numel())), torch.inference_mode():
                result = self.model(**enc)
            self.stats.batches += 1
            self.stats.prompts += len(batch)
            if self.kind == "classify":
                probs = torch.softmax(result.logits.float(), dim=-1).tolist()
                for i, p in zip(batch, probs, strict=True):
                    best = max(range(len(p)), key=lambda j: p[j])
                    out[i] = (self.labels[best], dict(zip(self.labels, p, strict=True)))
                continue
            hidden = result.last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
            for i, v in zip(batch, vectors, strict=True):
                out[i] = v
        return out

    def close(self) -> None:
        pass


def build(
    name: str,
    path: str,
    gguf: bool,
    device: str,
    kind: str,
    task: dict[str, Any] | None = None,
    repair: bool = False,
    memory_limit_mb: int = 2048,
) -> CausalLM | Encoder:
    """The predictor from plain data (what a worker process is handed to build it itself).
    `task`: the LLM task's arguments (make_llm_task) for a causal LM."""
    ref = ModelRef(name, Path(path), gguf)
    if ref.kind == "causal":
        return CausalLM(ref, device, make_llm_task(**(task or {})), repair, memory_limit_mb)
    return Encoder(ref, device, kind, memory_limit_mb)
