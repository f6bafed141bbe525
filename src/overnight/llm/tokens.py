"""Token counts before sending: tiktoken where its encoding is on disk, else ~4 characters per
token. tiktoken downloads its encoding files on first use; offline (here, and on many users'
machines) that fails, so the failure is remembered and the approximation says so."""

from __future__ import annotations

import functools
import math
from typing import Any

import orjson

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # tokens per chat message beyond its text (OpenAI's documented figure)


@functools.cache
def _encoding(model: str) -> Any | None:
    try:
        import tiktoken

        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:
            return tiktoken.get_encoding("o200k_base")
    except Exception:  # no network, no cached file: fall back, once
        return None


def encoding_note(model: str) -> str:
    enc = _encoding(model)
    if enc is not None:
        return f"tiktoken {enc.name}"
    return "approximation: 1 token ≈ 4 characters (tiktoken's encoding files are not on disk)"


def count_tokens(text: str, model: str = "") -> int:
    enc = _encoding(model)
    if enc is not None:
        return len(enc.encode(text, disallowed_special=()))
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return orjson.dumps(content).decode()


def count_request_tokens(endpoint: str, body: dict[str, Any], model: str = "") -> int:
    """Input tokens of a request body: messages, system, tools or schema, or embedding input."""
    if endpoint.endswith("/embeddings"):
        inputs = body.get("input", "")
        texts = [inputs] if isinstance(inputs, str) else [_text_of(x) for x in inputs]
        return sum(count_tokens(t, model) for t in texts)
    total = 0
    for m in body.get("messages", []):
        total += MESSAGE_OVERHEAD + count_tokens(_text_of(m.get("content", "")), model)
    if body.get("system"):
        total += count_tokens(_text_of(body["system"]), model)
    for extra in ("tools", "response_format"):
        if body.get(extra):
            total += count_tokens(_text_of(body[extra]), model)
    return total + 3  # the assistant turn's priming
