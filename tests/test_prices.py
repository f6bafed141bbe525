"""The price table: shipped entries, id lookup, cost arithmetic, the user's override file."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from overnight.errors import UsageError
from overnight.llm.prices import Price, PriceTable

BRIEF_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "claude-3-5-haiku",
    "claude-3-5-sonnet",
    "claude-3-7-sonnet",
    "claude-sonnet-4",
    "claude-opus-4",
    "claude-haiku-4-5",
    "claude-sonnet-4-5",
]


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def test_shipped_table_covers_the_common_models(table: PriceTable) -> None:
    for model in BRIEF_MODELS:
        price = table.price(model)
        assert price is not None, model
        assert price.batch_discount == 0.5  # both batch APIs charge half
        assert price.input > 0 and price.output >= 0
    assert table.checked is not None and len(table.checked) == 10  # YYYY-MM-DD
    text = resources.files("overnight.llm").joinpath("prices.toml").read_text("utf-8")
    assert "override" in text.lower() and "change" in text.lower()  # says so to the reader
    assert tomllib.loads(text)["checked"] == table.checked


def test_a_few_list_prices(table: PriceTable) -> None:
    assert table.price("gpt-4o-mini") == Price(0.15, 0.60, 0.5, 0.075, context=128_000)
    assert table.price("claude-3-5-haiku") == Price(0.80, 4.00, 0.5, 0.08, context=200_000)
    assert table.price("text-embedding-3-small") == Price(0.02, 0.0, context=8192)


def test_every_shipped_model_has_its_context_window(table: PriceTable) -> None:
    assert all(p.context for p in table.prices.values()), [
        m for m, p in table.prices.items() if not p.context
    ]
    assert table.context("gpt-4.1-mini-2025-04-14") == 1_047_576  # dated ids: their family's
    assert table.context("gpt-5") == 272_000  # the input share of its 400K
    assert table.context("claude-haiku-4-5-20251001") == 200_000
    assert table.context("some-local-model") is None  # unknown: no check


def test_a_user_file_may_give_a_context_window(tmp_path) -> None:
    user = tmp_path / "p.toml"
    user.write_text('[models."my-model"]\ninput = 1.0\noutput = 2.0\ncontext = 4096\n')
    assert PriceTable.load(user).context("my-model") == 4096
    user.write_text('[models."my-model"]\ninput = 1.0\noutput = 2.0\ncontext = 0\n')
    with pytest.raises(UsageError, match="context"):
        PriceTable.load(user)


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),  # gpt-4o, not gpt-4o-mini
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ],
)
def test_dated_ids_find_their_family(table: PriceTable, model: str, family: str) -> None:
    assert table.price(model) is table.price(family)


def test_an_exact_entry_beats_its_family(table: PriceTable) -> None:
    old = table.price("gpt-4o-2024-05-13")
    assert old is not None and old != table.price("gpt-4o")


@pytest.mark.parametrize(
    "model",
    [
        "gpt-9000",
        "",
        "o3-pro",  # extends "o3", but is not a dated o3: another price
        "gpt-4o-mini-search-preview",
        "ft:gpt-4o-mini-2024-07-18:acme::abc",  # fine-tuned: another price
        "claude-opus-4-9",  # a release we do not know is not priced as claude-opus-4
        "gpt-4o-mini2024",
    ],
)
def test_unknown_models_have_no_price(table: PriceTable, model: str) -> None:
    assert table.price(model) is None
    assert table.cost(model, 1000, 1000, batch=False) is None
    assert table.cost(model, 1000, 1000, batch=True) is None


def test_cost_arithmetic(table: PriceTable) -> None:
    # gpt-4o: $2.50 in, $10 out per million; the batch API half of that
    assert table.cost("gpt-4o", 1_000_000, 0, batch=False) == pytest.approx(2.50)
    assert table.cost("gpt-4o", 2_000_000, 500_000, batch=False) == pytest.approx(10.0)
    assert table.cost("gpt-4o", 2_000_000, 500_000, batch=True) == pytest.approx(5.0)
    assert table.cost("gpt-4o-2024-08-06", 0, 1000, batch=False) == pytest.approx(0.01)
    assert table.cost("text-embedding-3-small", 1_000_000, 0, batch=True) == pytest.approx(0.01)
    assert table.cost("gpt-4o", 0, 0, batch=True) == 0.0


def test_cached_input_tokens() -> None:
    price = Price(input=2.0, output=8.0, cached_input=0.5)
    # 1M input of which 400k cached: 600k × $2 + 400k × $0.5 = $1.40
    assert price.cost(1_000_000, 0, batch=False, cached_tokens=400_000) == pytest.approx(1.4)
    assert price.cost(1_000_000, 0, batch=True, cached_tokens=400_000) == pytest.approx(0.7)
    # no cached price known: cached tokens cost the full input price
    assert Price(2.0, 8.0).cost(1_000_000, 0, batch=False, cached_tokens=400_000) == 2.0
    # never more cached than input
    assert price.cost(10, 0, batch=False, cached_tokens=99) == pytest.approx(10 * 0.5 / 1e6)


def test_override_merges_over_the_shipped_table(tmp_path: Path) -> None:
    user = tmp_path / "my-prices.toml"
    user.write_text(
        'checked = "2030-01-02"\n'
        '[models."my-model"]\ninput = 1.0\noutput = 2.0\nbatch_discount = 0.4\n'
        '[models."gpt-4o-mini"]\ninput = 9.0\noutput = 9.0\n'
    )
    table = PriceTable.load(user)
    assert table.cost("my-model", 1_000_000, 1_000_000, batch=False) == pytest.approx(3.0)
    assert table.cost("my-model", 1_000_000, 1_000_000, batch=True) == pytest.approx(1.8)
    assert table.price("my-model-20300101") == table.price("my-model")  # same lookup rules
    # a model named there replaces the shipped entry whole (no cached price inherited)
    assert table.price("gpt-4o-mini-2024-07-18") == Price(9.0, 9.0)
    assert table.price("gpt-4o") == PriceTable.load().price("gpt-4o")  # the rest is kept
    assert table.checked == "2030-01-02"


def test_override_without_a_date_keeps_the_shipped_one(tmp_path: Path) -> None:
    user = tmp_path / "p.toml"
    user.write_text('[models."x"]\ninput = 1\noutput = 1\n')
    assert PriceTable.load(user).checked == PriceTable.load().checked


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[models."x"]\ninput = "cheap"\noutput = 1\n', "models.x.input"),
        ('[models."x"]\ninput = 1\n', "models.x.output"),
        ('[models."x"]\ninput = -1\noutput = 1\n', "models.x.input"),
        ('[models."x"]\ninput = 1\noutput = 1\nbatch_discount = 2\n', "models.x.batch_discount"),
        ('[models."x"]\ninput = 1\noutput = 1\noutptu = 3\n', "models.x.outptu"),
        ('[models."x"]\ninput = nan\noutput = 1\n', "models.x.input"),
        ('[model."x"]\ninput = 1\noutput = 1\n', "model"),
        ('checked = "last week"\n', "checked"),
        ("[models\ninput = 1\n", "not valid TOML"),
    ],
)
def test_a_bad_override_names_file_and_key(tmp_path: Path, text: str, where: str) -> None:
    user = tmp_path / "bad-prices.toml"
    user.write_text(text)
    with pytest.raises(UsageError) as info:
        PriceTable.load(user)
    assert str(info.value).startswith(str(user))
    assert where in str(info.value)


def test_a_missing_override_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope.toml"):
        PriceTable.load(tmp_path / "nope.toml")
