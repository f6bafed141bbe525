"""Requests, answers, prices and token counts: pure functions, no HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import SCHEMA

from overnight.errors import InputError, InvalidOutput, UsageError
from overnight.estimate import estimate_requests
from overnight.llm.prices import PriceTable
from overnight.llm.requests import Answer, answer_from_body, cache_key, make_llm_task
from overnight.llm.tokens import count_request_tokens, count_tokens


def chat_answer(content: str, finish: str = "stop") -> Answer:
    body = {
        "choices": [{"message": {"content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4},
    }
    return answer_from_body("openai", "/v1/chat/completions", body)


def test_openai_structured_request_and_strict_mode() -> None:
    t = make_llm_task(
        "extract",
        "openai",
        "gpt-4o-mini",
        text="{{ t }}",
        system="S {{ t }}",
        params={"temperature": 0},
        schema=SCHEMA,
    )
    r = t.build({"t": "x"})
    assert r.endpoint == "/v1/chat/completions"
    assert r.body["messages"] == [
        {"role": "system", "content": "S x"},
        {"role": "user", "content": "x"},
    ]
    assert r.body["temperature"] == 0
    assert r.body["response_format"]["json_schema"]["strict"] is True
    loose = {"type": "object", "properties": {"a": {"type": "string"}}}
    t2 = make_llm_task("extract", "openai", "m", schema=loose)
    assert t2.build({"text": "x"}).body["response_format"]["json_schema"]["strict"] is False


def test_anthropic_tool_request_and_parse() -> None:
    t = make_llm_task("classify", "anthropic", "claude", labels=["a", "b"])
    body = t.build({"text": "hi"}).body
    assert body["max_tokens"] == 1024 and body["tool_choice"]["type"] == "tool"
    assert body["tools"][0]["input_schema"]["properties"]["label"]["enum"] == ["a", "b"]
    ok = Answer({"content": [{"type": "tool_use", "id": "t1", "input": {"label": "b"}}]}, 1, 1)
    assert t.parse(ok)["output"] == "b"
    with pytest.raises(InvalidOutput, match="label"):
        t.parse(
            Answer({"content": [{"type": "tool_use", "id": "t", "input": {"label": "z"}}]}, 1, 1)
        )
    repair = t.repair(t.build({"text": "hi"}), ok, "bad label")
    last = repair.body["messages"][-1]["content"][0]
    assert last["type"] == "tool_result" and last["is_error"] and "bad label" in last["content"]


def test_parse_failures_are_invalid_with_a_reason() -> None:
    t = make_llm_task("extract", "openai", "m", schema=SCHEMA)
    with pytest.raises(InvalidOutput, match="not JSON"):
        t.parse(chat_answer("{nope"))
    with pytest.raises(InvalidOutput, match="cut off at max_tokens"):
        t.parse(chat_answer('{"topic": "bi', "length"))
    with pytest.raises(InvalidOutput, match="schema: topic"):
        t.parse(chat_answer('{"topic": "weather", "urgent": true}'))
    out = t.parse(chat_answer('{"topic": "bug", "urgent": false}'))
    assert out == {
        "output": {"topic": "bug", "urgent": False},
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }


def test_template_field_missing_is_an_input_error() -> None:
    t = make_llm_task("generate", "openai", "m", text="{{ subject }}")
    with pytest.raises(InputError, match="subject"):
        t.build({"body": "x"})


def test_passthrough_validation() -> None:
    t = make_llm_task("passthrough", "openai", "")
    ok = t.build(
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "e", "input": "x"},
        }
    )
    assert ok.endpoint == "/v1/embeddings"
    for bad, msg in [
        ({"method": "GET", "url": "/v1/embeddings", "body": {}}, "POST"),
        ({"method": "POST", "url": "/v1/nope", "body": {}}, "not one of"),
        ({"method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}, "no body.model"),
        (
            {
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "stream": True},
            },
            "stream",
        ),
    ]:
        with pytest.raises(InputError, match=msg):
            t.build(bad)
    with pytest.raises(UsageError):
        make_llm_task("embed", "anthropic", "m")


def test_cache_key_covers_every_ingredient() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    base = cache_key("openai", "/v1/chat/completions", body)
    assert base == cache_key("openai", "/v1/chat/completions", dict(reversed(body.items())))
    for other in (
        ("anthropic", "/v1/chat/completions", body),
        ("openai", "/v1/embeddings", body),
        ("openai", "/v1/chat/completions", {**body, "model": "n"}),
        ("openai", "/v1/chat/completions", {**body, "temperature": 1}),
        (
            "openai",
            "/v1/chat/completions",
            {**body, "messages": [{"role": "user", "content": "y"}]},
        ),
        ("openai", "/v1/chat/completions", {**body, "response_format": {"type": "json_object"}}),
    ):
        assert cache_key(*other) != base
    t = make_llm_task("generate", "openai", "m", text="{{ a }} {{ b }}")
    assert t.build({"a": 1, "b": 2}).key != t.build({"a": 1, "b": 3}).key


def test_prices_prefix_override_and_bad_file(tmp_path: Path) -> None:
    table = PriceTable.load()
    assert table.price("gpt-4o-mini-2024-07-18") == table.price("gpt-4o-mini")
    assert table.price("gpt-4o-2024-08-06").input == 2.5  # not gpt-4o-mini's
    assert table.cost("gpt-4o-mini", 1_000_000, 0, batch=True) == pytest.approx(0.075)
    assert table.cost("unknown-model", 10, 10, batch=False) is None
    user = tmp_path / "p.toml"
    user.write_text('[models."my-model"]\ninput = 1.0\noutput = 2.0\nbatch_discount = 0.4\n')
    t2 = PriceTable.load(user)
    assert t2.cost("my-model", 1_000_000, 1_000_000, batch=True) == pytest.approx(1.8)
    user.write_text('[models."x"]\ninput = "cheap"\noutput = 1\n')
    with pytest.raises(UsageError, match=r"p.toml: models.x.input"):
        PriceTable.load(user)


def test_tokens_and_estimate() -> None:
    assert count_tokens("abcdefgh") in (2, 1, 3)  # tiktoken or ~4 chars per token
    body = {"messages": [{"role": "user", "content": "x" * 400}], "system": "y" * 40}
    assert 100 <= count_request_tokens("/v1/messages", body) <= 130
    reqs = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40}]})] * 10
    est = estimate_requests(reqs, "gpt-4o-mini", PriceTable.load(), max_tokens=None)
    assert est.items == 10 and est.output_tokens == 2560 and "assumed 256" in est.output_basis
    assert est.savings == pytest.approx(est.cost_realtime / 2)
    est = estimate_requests(reqs, "who-knows", PriceTable.load(), max_tokens=5)
    assert est.cost_realtime is None and any("no price" in x for x in est.lines())


def test_estimate_prices_each_request_by_its_own_model() -> None:
    chat = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "x" * 40}],
        "max_tokens": 10,
    }
    emb = {"model": "text-embedding-3-small", "input": "y" * 400}
    est = estimate_requests(
        [("/v1/chat/completions", chat), ("/v1/embeddings", emb)],
        "",
        PriceTable.load(),
        max_tokens=None,
    )
    assert est.output_tokens == 10 and est.model == "gpt-4o, text-embedding-3-small"
    table = PriceTable.load()
    tin_chat = count_request_tokens("/v1/chat/completions", chat)
    tin_emb = count_request_tokens("/v1/embeddings", emb)
    expected = table.cost("gpt-4o", tin_chat, 10, batch=False) + table.cost(
        "text-embedding-3-small", tin_emb, 0, batch=False
    )
    assert est.cost_realtime == pytest.approx(expected)
