"""The price table: shipped with the package (`prices.toml`), overridable by a user file."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UsageError


class _PriceModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: float = Field(ge=0)
    output: float = Field(ge=0)
    batch_discount: float = Field(0.5, ge=0, le=1)
    cached_input: float | None = Field(None, ge=0)


class _TableModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checked: str | None = None
    models: dict[str, _PriceModel] = {}


@dataclass(frozen=True)
class Price:
    input: float  # USD per million input tokens, real time
    output: float
    batch_discount: float = 0.5  # the batch APIs charge (1 - discount) of that
    cached_input: float | None = None

    def cost(self, input_tokens: int, output_tokens: int, *, batch: bool) -> float:
        usd = (input_tokens * self.input + output_tokens * self.output) / 1_000_000
        return usd * (1 - self.batch_discount) if batch else usd


def _load(text: str, origin: str) -> _TableModel:
    try:
        return _TableModel.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{origin}: not valid TOML: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UsageError(f"{origin}: {where}: {err['msg']}") from None


class PriceTable:
    def __init__(self, prices: dict[str, Price], checked: str | None = None) -> None:
        self.prices, self.checked = prices, checked

    @classmethod
    def load(cls, override: Path | None = None) -> PriceTable:
        shipped = _load(
            resources.files("overnight.llm").joinpath("prices.toml").read_text("utf-8"),
            "prices.toml (shipped)",
        )
        table = {k: Price(**v.model_dump()) for k, v in shipped.models.items()}
        checked = shipped.checked
        if override is not None:
            user = _load(Path(override).read_text("utf-8"), str(override))
            table.update({k: Price(**v.model_dump()) for k, v in user.models.items()})
            checked = user.checked or checked
        return cls(table, checked)

    def price(self, model: str) -> Price | None:
        """Exact id, else the longest known prefix ("gpt-4o-mini-2024-07-18" → gpt-4o-mini)."""
        if model in self.prices:
            return self.prices[model]
        best = max((k for k in self.prices if model.startswith(k)), key=len, default=None)
        return self.prices[best] if best else None

    def cost(
        self, model: str, input_tokens: int, output_tokens: int, *, batch: bool
    ) -> float | None:
        price = self.price(model)
        return None if price is None else price.cost(input_tokens, output_tokens, batch=batch)
