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


def test_generate_and_embed_bodies() -> None:
    oa = make_llm_task("generate", "openai", "m", system="S", params={"temperature": 0.2})
    assert oa.build({"text": "hi"}).body == {
        "model": "m",
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
        "temperature": 0.2,
    }
    an = make_llm_task("generate", "anthropic", "c", system="S")
    body = an.build({"text": "hi"}).body
    assert body == {
        "model": "c",
        "messages": [{"role": "user", "content": "hi"}],
        "system": "S",
        "max_tokens": 1024,  # Anthropic requires it
    }
    assert (
        make_llm_task("generate", "anthropic", "c", params={"max_tokens": 9})
        .build({"text": "x"})
        .body["max_tokens"]
        == 9
    )
    text = Answer({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, 1, 2)
    assert an.parse(text) == {"output": "ab", "usage": {"input_tokens": 1, "output_tokens": 2}}
    emb = make_llm_task("embed", "openai", "e", params={"dimensions": 4})
    r = emb.build({"text": "x"})
    assert r.endpoint == "/v1/embeddings" and r.body == {
        "model": "e",
        "input": "x",
        "dimensions": 4,
    }
    vec = answer_from_body(
        "openai",
        "/v1/embeddings",
        {"data": [{"embedding": [0.1, 0.2]}], "usage": {"prompt_tokens": 3, "total_tokens": 3}},
    )
    assert emb.parse(vec)["output"] == [0.1, 0.2] and vec.input_tokens == 3
    with pytest.raises(InvalidOutput, match="embedding"):
        emb.parse(Answer({"data": []}, 0, 0))


def test_usage_from_bodies() -> None:
    body = {
        "usage": {
            "input_tokens": 10,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 5,
            "output_tokens": 7,
        }
    }
    a = answer_from_body("anthropic", "/v1/messages", body)
    assert (a.input_tokens, a.output_tokens, a.cached) == (115, 7, False)
    a = answer_from_body("openai", "/v1/chat/completions", {"usage": None})
    assert (a.input_tokens, a.output_tokens) == (0, 0)


def test_refusals_and_truncation_are_named() -> None:
    oa = make_llm_task("extract", "openai", "m", schema=SCHEMA)
    refused = {"choices": [{"message": {"content": None, "refusal": "I can't"}}]}
    with pytest.raises(InvalidOutput, match="refused: I can't"):
        oa.parse(Answer(refused, 1, 1))
    with pytest.raises(InvalidOutput, match=r"schema: .*cut off at max_tokens"):
        oa.parse(chat_answer('{"topic": "bug"}', "length"))
    an = make_llm_task("extract", "anthropic", "c", schema=SCHEMA)
    partial = {
        "content": [{"type": "tool_use", "id": "t", "input": {"topic": "bug"}}],
        "stop_reason": "max_tokens",
    }
    with pytest.raises(InvalidOutput, match=r"urgent.*cut off at max_tokens"):
        an.parse(Answer(partial, 1, 1))
    with pytest.raises(InvalidOutput, match="refused"):
        an.parse(Answer({"content": [], "stop_reason": "refusal"}, 1, 1))
    with pytest.raises(InvalidOutput, match="no tool_use block"):
        an.parse(Answer({"content": [{"type": "text", "text": "hm"}]}, 1, 1))


def test_openai_classify_and_repair_conversation() -> None:
    t = make_llm_task("classify", "openai", "m", labels=["a", "b"])
    r = t.build({"text": "hi"})
    fmt = r.body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert t.parse(chat_answer('{"label": "a"}'))["output"] == "a"
    bad = chat_answer('{"label": "c"}')
    with pytest.raises(InvalidOutput, match="label") as info:
        t.parse(bad)
    fixed = t.repair(r, bad, info.value.reason)
    assert fixed.body["messages"][:-2] == r.body["messages"]
    assert fixed.body["messages"][-2] == {"role": "assistant", "content": '{"label": "c"}'}
    assert fixed.body["messages"][-1]["role"] == "user"
    assert info.value.reason in fixed.body["messages"][-1]["content"]
    assert fixed.key != r.key and fixed.endpoint == r.endpoint
    with pytest.raises(UsageError, match="labels"):
        make_llm_task("classify", "openai", "m")
    with pytest.raises(UsageError, match="schema"):
        make_llm_task("extract", "openai", "m")
    with pytest.raises(UsageError, match="does not run"):
        make_llm_task("summarize", "openai", "m")


def test_anthropic_passthrough() -> None:
    t = make_llm_task("passthrough", "anthropic", "claude-x")
    line = {"custom_id": "a", "method": "POST", "url": "/v1/messages", "body": {"max_tokens": 5}}
    r = t.build(line)
    assert r.endpoint == "/v1/messages" and r.body == {"max_tokens": 5, "model": "claude-x"}
    assert line["body"] == {"max_tokens": 5}  # the record is not changed
    with pytest.raises(InputError, match="/v1/messages"):
        t.build({**line, "url": "/v1/chat/completions"})
    with pytest.raises(InputError, match="JSON object"):
        t.build({**line, "body": "nope"})
    assert t.parse(Answer({"id": "msg"}, 1, 1))["output"] == {"id": "msg"}


# -- the context-window check -----------------------------------------------------------------


def windows(table: dict[str, int]):
    return table.get


def test_over_the_window_is_a_context_exceeded_input_error() -> None:
    from overnight.llm.requests import ContextExceeded

    t = make_llm_task("generate", "openai", "m", context=windows({"m": 100}))
    t.build({"text": "short"})
    with pytest.raises(ContextExceeded) as info:
        t.build({"text": "word " * 500})
    assert isinstance(info.value, InputError) and info.value.error_class == "context_exceeded"
    assert "over the 100 of m's context window" in str(info.value)
    assert "not sent" in str(info.value)


def test_the_window_of_the_model_each_passthrough_line_names() -> None:
    t = make_llm_task("passthrough", "openai", "big", context=windows({"big": 10_000, "tiny": 50}))
    line = {"method": "POST", "url": "/v1/chat/completions"}
    messages = [{"role": "user", "content": "word " * 200}]
    t.build({**line, "body": {"messages": messages}})  # [model] name "big": fits
    with pytest.raises(InputError, match="tiny's context window"):
        t.build({**line, "body": {"model": "tiny", "messages": messages}})


def test_unknown_models_and_no_table_are_not_checked() -> None:
    for context in (None, windows({})):
        make_llm_task("generate", "openai", "m", context=context).build({"text": "w " * 10_000})


def test_short_requests_are_not_even_counted(monkeypatch) -> None:
    import overnight.llm.requests as requests

    def boom(*args, **kwargs):
        raise AssertionError("counted")

    monkeypatch.setattr(requests, "count_request_tokens", boom)
    t = make_llm_task("generate", "openai", "m", context=windows({"m": 1000}))
    t.build({"text": "x" * 500})  # under 1,000 bytes of JSON: fewer than 1,000 tokens
    with pytest.raises(AssertionError, match="counted"):
        t.build({"text": "x" * 2000})


def test_an_image_is_counted_whatever_its_json_length() -> None:
    t = make_llm_task(
        "passthrough", "openai", "m", context=windows({"m": 600})
    )  # an image block counts 1,000 tokens, in a body of ~150 bytes
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ]
    }
    with pytest.raises(InputError, match="context window"):
        t.build({"method": "POST", "url": "/v1/chat/completions", "body": body})
