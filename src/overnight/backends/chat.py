"""Self-hosted LLMs speak the same requests as the APIs: an OpenAI chat-completions body in,
an OpenAI-shaped answer body out.

The LLM tasks (llm/requests.py) build the requests (messages, `[model] params`, the schema
or the labels as a `response_format`) and parse and validate the answers, repair included,
for `backend = "transformers"` and `"vllm"` exactly as for `openai`. What is left here is
what a model in the process needs besides: the sampling settings read from the body, the
instruction that tells the model the schema or the labels (an API constrains the output
with the `response_format`; a plain model has to be told), and the answer's body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..llm.requests import Answer

# max_new_tokens when `[model] params` has no max_tokens (spec.py checks the params' types).
DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class Sampling:
    """How to generate: greedy when temperature is 0, else sampled with the seed."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def of(cls, body: dict[str, Any]) -> Sampling:
        stop = body.get("stop") or ()
        return cls(
            max_tokens=int(body.get("max_tokens") or DEFAULT_MAX_TOKENS),
            temperature=float(body.get("temperature") or 0.0),
            top_p=float(body.get("top_p") or 1.0),
            seed=int(body.get("seed") or 0),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _type_hint(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "<any>"
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        kind = " or ".join(str(k) for k in kind)
    return f"<{kind}>"


def schema_hint(schema: dict[str, Any]) -> str:
    """The instruction for an extract: the object's keys and their types, then the schema.

    Small models copy a JSON Schema they are shown instead of filling it in; the form of the
    object first ({"name": <string>, ...}) gets them to answer with one (measured on
    SmolLM2-135M: 5 of 5 objects against 1 of 5 with the schema alone)."""
    props = schema.get("properties")
    if isinstance(props, dict) and props:
        form = ", ".join(f"{json.dumps(k)}: {_type_hint(v)}" for k, v in props.items())
        return f"Reply with only a JSON object of the form {{{form}}}."
    return f"Reply with only a JSON object that matches this JSON Schema: {json.dumps(schema)}"


def label_hint(labels: list[str]) -> str:
    return "Answer with one of these labels only: " + ", ".join(labels) + "."


def conversation(body: dict[str, Any], instruction: str | None = None) -> list[dict[str, Any]]:
    """The request's messages, with the task's instruction added to its system message (or
    as one): the text the chat template renders."""
    messages = [dict(m) for m in body.get("messages") or []]
    if instruction:
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0].get('content') or ''}\n\n{instruction}"
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    return messages


def first_json_object(text: str) -> tuple[int, int] | None:
    """Where the first complete JSON object in the text starts and ends, if there is one.

    A model without a grammar often wraps its object in a ``` fence or goes on talking after
    it; what a JSON grammar would have produced is that object alone. The standard library's
    decoder finds where it ends. Only the first brace counts: a later one may open an object
    nested in an unfinished one, which is not the answer."""
    start = text.find("{")
    if start == -1:
        return None
    try:
        _, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError:
        return None
    return start, end


def answer(
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    scores: dict[str, float] | None = None,
) -> Answer:
    """An OpenAI chat-completion body, as the tasks parse it; `scores` (classify) beside."""
    body: dict[str, Any] = {
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if scores is not None:
        body["scores"] = scores
    return Answer(body, prompt_tokens, completion_tokens)
