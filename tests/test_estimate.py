"""The estimate: tokens, output assumptions, cost real time vs batch, and its words."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from overnight.estimate import ASSUMED_OUTPUT_TOKENS, Estimate, estimate_requests, usd
from overnight.llm.prices import PriceTable
from overnight.llm.tokens import count_request_tokens

CHAT, EMB, MSG = "/v1/chat/completions", "/v1/embeddings", "/v1/messages"


@pytest.fixture(scope="module")
def prices() -> PriceTable:
    return PriceTable.load()


def chat(text: str = "x" * 40, **extra: Any) -> tuple[str, dict[str, Any]]:
    return CHAT, {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def test_chat_without_max_tokens_assumes_and_says_so(prices: PriceTable) -> None:
    reqs = [chat() for _ in range(10)]
    est = estimate_requests(reqs, "gpt-4o-mini", prices, None, None)
    tin = 10 * count_request_tokens(*reqs[0], "gpt-4o-mini")
    assert (est.items, est.input_tokens) == (10, tin)
    assert est.output_tokens == est.output_tokens_assumed == 10 * ASSUMED_OUTPUT_TOKENS
    assert est.output_tokens_max is None  # nothing bounds it
    assert f"assumed {ASSUMED_OUTPUT_TOKENS}" in est.output_basis
    assert "max_tokens" in est.output_basis  # how to bound it
    real = prices.cost("gpt-4o-mini", tin, 10 * ASSUMED_OUTPUT_TOKENS, batch=False)
    assert est.cost_realtime == pytest.approx(real)
    assert est.cost_batch == pytest.approx(real / 2)
    assert est.savings == pytest.approx(real / 2)
    assert not est.unknown_price and est.unknown_models == []


def test_max_tokens_is_an_upper_bound(prices: PriceTable) -> None:
    est = estimate_requests([chat() for _ in range(4)], "gpt-4o-mini", prices, 100, None)
    assert est.output_tokens == est.output_tokens_max == 400
    assert est.output_tokens_assumed == 0
    assert "upper bound" in est.output_basis and "100" in est.output_basis


def test_a_requests_own_max_tokens_wins(prices: PriceTable) -> None:
    reqs = [chat(max_tokens=10), chat(max_completion_tokens=20), chat()]
    est = estimate_requests(reqs, "gpt-4o-mini", prices, None, None)
    assert est.output_tokens == 10 + 20 + ASSUMED_OUTPUT_TOKENS
    assert est.output_tokens_assumed == ASSUMED_OUTPUT_TOKENS and est.output_tokens_max is None
    assert "where the request sets it" in est.output_basis
    est = estimate_requests(reqs, "gpt-4o-mini", prices, 50, None)
    assert est.output_tokens == est.output_tokens_max == 10 + 20 + 50


def test_expected_output_for_short_answers(prices: PriceTable) -> None:
    """classify: a label is a few tokens, bounding it by max_tokens would overstate."""
    est = estimate_requests([chat() for _ in range(5)], "gpt-4o-mini", prices, 1000, 16)
    assert est.output_tokens == est.output_tokens_assumed == 80
    assert est.output_tokens_max == 5000
    assert "assumed 16" in est.output_basis
    est = estimate_requests([chat(max_tokens=4)], "gpt-4o-mini", prices, None, 16)
    assert est.output_tokens == 4  # never above the bound


def test_embeddings_have_no_output(prices: PriceTable) -> None:
    reqs = [(EMB, {"model": "text-embedding-3-small", "input": "y" * 400})] * 3
    est = estimate_requests(reqs, "text-embedding-3-small", prices, None, None)
    assert est.output_tokens == est.output_tokens_assumed == 0
    assert est.output_tokens_max == 0
    assert est.input_tokens > 0
    assert "no output" in est.output_basis
    assert est.cost_realtime == pytest.approx(est.input_tokens * 0.02 / 1e6)


def test_unknown_model_is_reported_not_a_crash(prices: PriceTable) -> None:
    est = estimate_requests([chat()], "who-knows", prices, 5, None)
    assert est.cost_realtime is None and est.cost_batch is None and est.savings is None
    assert est.unknown_price and est.unknown_models == ["who-knows"]
    assert est.input_tokens > 0 and est.output_tokens == 5  # tokens are still counted
    assert any("unknown" in line and "who-knows" in line for line in est.lines())
    data = est.to_dict()
    assert data["cost_realtime"] is None and data["unknown_price"] is True
    assert data["prices"] == {"who-knows": None}


def test_each_request_priced_by_its_own_model(prices: PriceTable) -> None:
    mixed = [
        (CHAT, {"model": "gpt-4o", "messages": [{"role": "user", "content": "a" * 40}]}),
        (EMB, {"model": "text-embedding-3-small", "input": "b" * 400}),
    ]
    est = estimate_requests(mixed, "", prices, None, None)
    assert est.model == "gpt-4o, text-embedding-3-small"
    expected = prices.cost(
        "gpt-4o", count_request_tokens(*mixed[0]), ASSUMED_OUTPUT_TOKENS, batch=False
    ) + prices.cost("text-embedding-3-small", count_request_tokens(*mixed[1]), 0, batch=False)
    assert est.cost_realtime == pytest.approx(expected)
    # one model without a price makes the total unknown, and names it
    mixed.append((CHAT, {"model": "mystery", "messages": []}))
    est = estimate_requests(mixed, "", prices, None, None)
    assert est.cost_realtime is None and est.unknown_models == ["mystery"]


def test_anthropic_bodies_carry_their_own_max_tokens(prices: PriceTable) -> None:
    body = {"model": "claude-3-5-haiku-20241022", "max_tokens": 1024, "messages": []}
    est = estimate_requests([(MSG, body)] * 2, "claude-3-5-haiku-20241022", prices, None, None)
    assert est.output_tokens == est.output_tokens_max == 2048
    assert est.cost_batch == pytest.approx(est.cost_realtime / 2)  # type: ignore[operator]


def test_nothing_to_estimate(prices: PriceTable) -> None:
    est = estimate_requests([], "gpt-4o-mini", prices, None, None)
    assert (est.items, est.input_tokens, est.output_tokens) == (0, 0, 0)
    assert est.lines()  # still says something


def test_lines_are_plain_words(prices: PriceTable) -> None:
    est = estimate_requests([chat() for _ in range(1000)], "gpt-4o-mini", prices, 200, None)
    lines = est.lines()
    text = "\n".join(lines)
    assert lines[0] == "model: gpt-4o-mini" and "items: 1,000" in text
    assert "input tokens: " in text and est.token_method in text
    assert "output tokens: 200,000" in text
    assert "price of gpt-4o-mini: $0.15 in / $0.60 out per million tokens" in text
    assert "(batch API: $0.075 / $0.30)" in text
    assert f"cost in real time: {usd(est.cost_realtime or 0)}" in text
    assert "cost with the batch API: " in text and "saves " in text
    assert f"prices checked {prices.checked}" in text
    assert all("\x1b" not in line and "\n" not in line for line in lines)  # no markup


def test_to_dict_is_json(prices: PriceTable) -> None:
    est = estimate_requests([chat()], "gpt-4o-mini", prices, None, None)
    data = orjson.loads(orjson.dumps(est.to_dict()))
    assert data["items"] == 1 and data["savings"] == pytest.approx(est.savings)
    assert data["prices"]["gpt-4o-mini"]["batch_input"] == pytest.approx(0.075)
    for key in ("output_tokens_max", "output_tokens_assumed", "token_method", "unknown_price"):
        assert key in data
    assert isinstance(est, Estimate)


def test_override_prices_reach_the_estimate(tmp_path: Path) -> None:
    user = tmp_path / "p.toml"
    user.write_text('[models."local-llm"]\ninput = 1.0\noutput = 1.0\nbatch_discount = 0.0\n')
    est = estimate_requests([chat(max_tokens=1)], "local-llm", PriceTable.load(user), None, None)
    assert est.cost_realtime == est.cost_batch and est.savings == 0


@pytest.mark.parametrize(
    ("amount", "text"),
    [(0, "$0.00"), (1234.5, "$1,234.50"), (0.01, "$0.01"), (0.00123456, "$0.00123")],
)
def test_usd(amount: float, text: str) -> None:
    assert usd(amount) == text
