"""backend = "vllm": vLLM's offline engine (`vllm.LLM`), where vLLM is installed (a GPU).

UNTESTED: no machine this was written on had a GPU or vLLM. It follows vLLM's documented
offline API: `LLM(model=...)`, `LLM.chat(conversations, sampling_params)` (the model's chat
template), `SamplingParams(max_tokens, temperature, top_p, seed, stop)`, structured outputs
(`StructuredOutputsParams(json=schema)` / `(choice=labels)`, vLLM >= 0.12; the older
`GuidedDecodingParams` as `guided_decoding=` before that) for extract and classify, and
`LLM.embed` for embeddings (a pooling model, `runner="pooling"`).

vLLM batches on its own (continuous batching, paged KV cache): a call hands it every request
of the window at once. Requests and answers are the OpenAI chat bodies of the LLM tasks (see
chat.py): the task validates the answers, as for the APIs.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidOutput
from ..llm.requests import Answer, LLMTask, Request, make_llm_task
from .chat import Sampling, answer, conversation, label_hint, schema_hint
from .hf_files import ModelRef, load_folder


def check_installed() -> None:
    """ValueError when vLLM is not importable here; imports nothing."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "backend = 'vllm' needs vLLM, not installed here (it runs on a GPU: pip install"
            " vllm); on a CPU use backend = 'transformers'"
        )


def _structured(**constraint: Any) -> dict[str, Any]:
    """SamplingParams keyword for a JSON schema or a label choice, in either vLLM API."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(**constraint)}
    except ImportError:  # vLLM < 0.12
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(**constraint)}


class VLLMChat:
    """generate / extract / classify through `LLM.chat`."""

    auto_start = auto_max = 256
    window = 1024  # vLLM schedules a call's requests itself: hand it many

    def __init__(self, ref: ModelRef, device: str, task: LLMTask, repair: bool = False) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        self.ref, self.task, self.repair = ref, task, repair
        folder, gguf_file = load_folder(ref) if ref.gguf else (ref.path, None)
        model = str(folder / gguf_file) if gguf_file else str(folder)
        self.llm = LLM(model=model, seed=0)
        self.constraint: dict[str, Any] = {}
        self.instruction: str | None = None
        if task.kind == "classify":
            self.constraint = _structured(choice=list(task.labels or []))
            self.instruction = label_hint(list(task.labels or []))
        elif task.kind == "extract" and task.schema is not None:
            self.constraint = _structured(json=task.schema)
            self.instruction = schema_hint(task.schema)

    def _params(self, body: dict[str, Any]) -> Any:
        from vllm import SamplingParams

        s = Sampling.of(body)
        return SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            **self.constraint,
        )

    def _answer(self, requests: list[Request]) -> list[Any]:
        conversations = [conversation(r.body, self.instruction) for r in requests]
        params = [self._params(r.body) for r in requests]
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        answers: list[Any] = []
        for out in outputs:
            gen = out.outputs[0]
            text = gen.text
            if self.task.kind == "classify":  # the choice, as the task's {"label": ...}
                text = json.dumps({"label": text.strip()})
            finish = "length" if gen.finish_reason == "length" else "stop"
            answers.append(
                answer(self.ref.name, text, finish, len(out.prompt_token_ids), len(gen.token_ids))
            )
        return answers

    def process(self, inputs: list[Request], batch_size: int = 0) -> list[Any]:
        answers = self._answer(inputs)
        if not (self.repair and self.task.kind == "extract"):
            return answers
        redo = []
        for i, a in enumerate(answers):
            try:
                self.task.parse(a)
            except InvalidOutput as exc:
                redo.append((i, self.task.repair(inputs[i], a, exc.reason)))
        if redo:
            for (i, _), b in zip(redo, self._answer([r for _, r in redo]), strict=True):
                a = answers[i]
                answers[i] = Answer(
                    b.body, a.input_tokens + b.input_tokens, a.output_tokens + b.output_tokens
                )
        return answers

    def close(self) -> None:
        pass


class VLLMEmbed:
    """embed through `LLM.embed` (a pooling model)."""

    auto_start = auto_max = 256
    window = 1024

    def __init__(self, ref: ModelRef, device: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        self.llm = LLM(model=str(ref.path), runner="pooling")

    def process(self, inputs: list[str], batch_size: int = 0) -> list[Any]:
        import numpy as np

        outputs = self.llm.embed(inputs, use_tqdm=False)
        return [np.asarray(o.outputs.embedding, dtype=np.float32) for o in outputs]

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
) -> VLLMChat | VLLMEmbed:
    """The predictor from plain data, as hf.build (the same recipe)."""
    check_installed()
    ref = ModelRef(name, Path(path), gguf)
    if kind == "embed":
        return VLLMEmbed(ref, device)
    return VLLMChat(ref, device, make_llm_task(**(task or {})), repair)
