"""Token counts before anything is sent: tiktoken where its encoding file is already on disk,
else about 4 characters per token.

tiktoken downloads its BPE files on first use, with no timeout. Offline (CI, air-gapped
machines) that fails, or hangs on a network that drops packets; so it is only asked for an
encoding whose file is already in its cache (`TIKTOKEN_CACHE_DIR`, as tiktoken reads it) and
checks out. Whatever the answer, it is settled once per encoding for the process.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import orjson

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # tokens per chat message beyond its text (role, separators: OpenAI's figure)
REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>
IMAGE_TOKENS = 1_000  # an image block, roughly (the real figure depends on its size and detail)
DEFAULT_ENCODING = "o200k_base"  # for models tiktoken does not know (Claude, local models)

# Where tiktoken fetches each file, and the file's sha256 (as tiktoken_ext.openai_public has
# them): the cache file is named by the sha1 of the URL.
_BPE_FILES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

_lock = threading.Lock()
_encodings: dict[str, Any | None] = {}  # encoding name → tiktoken Encoding, or None: unavailable


def _tiktoken_cache_dir() -> Path | None:
    """tiktoken's own rule (tiktoken/load.py); None when its cache is switched off."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _file_on_disk(name: str) -> bool:
    """The encoding's file is in tiktoken's cache and intact, so loading it needs no network
    (a file that fails tiktoken's hash check would be downloaded again)."""
    cache, known = _tiktoken_cache_dir(), _BPE_FILES.get(name)
    if cache is None or known is None:
        return False
    url, sha256 = known
    path = cache / hashlib.sha1(url.encode()).hexdigest()
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


@functools.lru_cache(maxsize=256)
def _encoding_name(model: str) -> str:
    try:
        from tiktoken.model import encoding_name_for_model

        return encoding_name_for_model(model)
    except Exception:  # not an OpenAI model, or no tiktoken
        return DEFAULT_ENCODING


def _encoding(model: str) -> Any | None:
    name = _encoding_name(model)
    with _lock:
        if name not in _encodings:
            enc = None
            if _file_on_disk(name):
                try:
                    import tiktoken

                    enc = tiktoken.get_encoding(name)
                except Exception:  # a broken install: the approximation will do
                    enc = None
            _encodings[name] = enc
        return _encodings[name]


def encoding_note(model: str) -> str:
    """How `count_tokens` counts for this model, in words for the estimate's report."""
    enc = _encoding(model)
    if enc is None:
        return (
            "approximation: 1 token ≈ 4 characters; tiktoken's "
            f"{_encoding_name(model)} file is not in its cache, see TIKTOKEN_CACHE_DIR"
        )
    note = f"tiktoken {enc.name}"
    if model.startswith("claude"):
        note += ", an approximation for Claude (its own tokenizer differs)"
    return note


def count_tokens(text: str, model: str = "") -> int:
    enc = _encoding(model)
    if enc is not None:
        return len(enc.encode(text, disallowed_special=()))
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _text_tokens(content: Any, model: str) -> int:
    """A message's content: a string, or a list of blocks (text, image, tool call/result)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return count_tokens(content, model)
    if isinstance(content, list):
        return sum(_block_tokens(block, model) for block in content)
    return count_tokens(orjson.dumps(content).decode(), model)


def _block_tokens(block: Any, model: str) -> int:
    if isinstance(block, dict):
        kind = str(block.get("type", ""))
        if isinstance(block.get("text"), str):
            return count_tokens(block["text"], model)
        if "image" in kind:  # its base64 data would count as megatokens of text
            return IMAGE_TOKENS
        if kind == "tool_result":
            return _text_tokens(block.get("content"), model)
    return _text_tokens(block if isinstance(block, str) else orjson.dumps(block).decode(), model)


def _input_tokens(value: Any, model: str) -> int:
    """An embeddings/moderations `input` or a completions `prompt`: a string, a list of
    strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(value, str):
        return count_tokens(value, model)
    if isinstance(value, list):
        if all(isinstance(x, int) for x in value):
            return len(value)
        return sum(_input_tokens(x, model) for x in value)
    return _text_tokens(value, model)


def _json_tokens(value: Any, model: str) -> int:
    return count_tokens(orjson.dumps(value).decode(), model) if value else 0


def count_request_tokens(endpoint: str, body: dict[str, Any], model: str = "") -> int:
    """Input tokens of a request body: chat messages (OpenAI chat, Anthropic messages,
    Responses input) with system/instructions, tools and the output schema; or the input of
    an embeddings, moderations or completions request."""
    if endpoint.endswith(("/embeddings", "/moderations")):
        return _input_tokens(body.get("input", ""), model)
    if endpoint.endswith("/completions") and not endpoint.endswith("/chat/completions"):
        return _input_tokens(body.get("prompt", ""), model)
    messages = body.get("messages") or []
    if endpoint.endswith("/responses"):
        given = body.get("input") or []
        messages = [{"content": given}] if isinstance(given, str) else given
    total = REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            total += MESSAGE_OVERHEAD + _text_tokens(message, model)
            continue
        total += MESSAGE_OVERHEAD + _text_tokens(message.get("content"), model)
        total += _json_tokens(message.get("tool_calls"), model)
    total += _text_tokens(body.get("system"), model)  # Anthropic: a string or text blocks
    total += _text_tokens(body.get("instructions"), model)  # Responses
    schemas = ("tools", "functions", "response_format")  # the model reads these too
    if endpoint.endswith("/responses"):
        schemas += ("text",)  # {"format": {"type": "json_schema", ...}}
    return total + sum(_json_tokens(body.get(key), model) for key in schemas)
