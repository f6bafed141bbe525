"""The price table: shipped with the package (`prices.toml`), overridable by a user file.

A model that is not in the table has no price: its cost is `None` ("unknown") everywhere,
never a guess and never an error.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from datetime import date
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError

# What a dated or aliased id adds to its family's id: "-2024-07-18", "-20241022", "-latest".
# Only these: "o3-pro" or "claude-opus-4-5" extend "o3" / "claude-opus-4" too, at other prices.
_RELEASE_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|latest)")


class _PriceModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: float = Field(ge=0, allow_inf_nan=False)
    output: float = Field(ge=0, allow_inf_nan=False)
    batch_discount: float = Field(0.5, ge=0, le=1)
    cached_input: float | None = Field(None, ge=0, allow_inf_nan=False)
    context: int | None = Field(None, gt=0)


class _TableModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checked: date | None = None  # "YYYY-MM-DD" or a TOML date
    models: dict[str, _PriceModel] = {}


@dataclass(frozen=True)
class Price:
    input: float  # USD per million input tokens, real time
    output: float  # USD per million output tokens, real time
    batch_discount: float = 0.5  # the batch API charges (1 - discount) of the real-time price
    cached_input: float | None = None  # USD per million prompt-cache hits, where known
    context: int | None = None  # the most input tokens a request may carry, where known

    def cost(
        self, input_tokens: int, output_tokens: int, *, batch: bool, cached_tokens: int = 0
    ) -> float:
        """USD; `cached_tokens` (a part of `input_tokens`) are billed at `cached_input` when
        that is known. The batch discount applies to all of it (both providers stack them)."""
        cached = min(cached_tokens, input_tokens) if self.cached_input is not None else 0
        usd = (
            (input_tokens - cached) * self.input
            + cached * (self.cached_input or 0.0)
            + output_tokens * self.output
        ) / 1_000_000
        return usd * (1 - self.batch_discount) if batch else usd


def _parse(text: str, origin: str) -> _TableModel:
    try:
        return _TableModel.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{origin}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise UsageError(f"{origin}: {where}: {first['msg']}{more}") from None


def _read_override(path: Path) -> _TableModel:
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the price file: {exc}") from None
    return _parse(text, str(path))


def _prices(table: _TableModel) -> dict[str, Price]:
    return {name: Price(**entry.model_dump()) for name, entry in table.models.items()}


class PriceTable:
    def __init__(self, prices: dict[str, Price], checked: str | None = None) -> None:
        self.prices = prices
        self.checked = checked  # when the shipped (or the user's) prices were last compared

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        """The shipped table, with the user's file (same shape) merged over it: a model named
        there replaces the shipped entry whole. A bad file is a UsageError naming file and key."""
        shipped = _parse(
            resources.files("overnight.llm").joinpath("prices.toml").read_text("utf-8"),
            "prices.toml (shipped)",
        )
        prices, checked = _prices(shipped), shipped.checked
        if override is not None:
            user = _read_override(Path(override))
            prices.update(_prices(user))
            checked = user.checked or checked
        return cls(prices, checked.isoformat() if checked else None)

    def price(self, model: str) -> Price | None:
        """The exact id, else the longest entry that the id extends by a release date or
        "-latest" ("gpt-4o-mini-2024-07-18" → gpt-4o-mini); else None (unknown)."""
        if model in self.prices:
            return self.prices[model]
        best = max(
            (
                name
                for name in self.prices
                if model.startswith(name) and _RELEASE_SUFFIX.fullmatch(model[len(name) :])
            ),
            key=len,
            default=None,
        )
        return self.prices[best] if best is not None else None

    def context(self, model: str) -> int | None:
        """The most input tokens one request to `model` may carry; None when not known
        (then nothing is checked)."""
        price = self.price(model)
        return price.context if price is not None else None

    def cost(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        *,
        batch: bool,
        cached_tokens: int = 0,
    ) -> float | None:
        """USD, or None when the model has no price."""
        price = self.price(model)
        if price is None:
            return None
        return price.cost(input_tokens, output_tokens, batch=batch, cached_tokens=cached_tokens)
