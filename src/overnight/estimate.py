"""`overnight estimate`: tokens and cost of a job before anything is sent."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .llm.prices import PriceTable
from .llm.tokens import count_request_tokens, encoding_note

ASSUMED_OUTPUT_TOKENS = 256  # per chat request, when max_tokens does not bound it


@dataclass(frozen=True)
class Estimate:
    model: str
    items: int
    input_tokens: int
    output_tokens: int  # an upper bound (max_tokens × items) or the stated assumption
    output_basis: str
    token_method: str
    cost_realtime: float | None
    cost_batch: float | None
    prices_checked: str | None

    @property
    def savings(self) -> float | None:
        if self.cost_realtime is None or self.cost_batch is None:
            return None
        return self.cost_realtime - self.cost_batch

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "savings": self.savings}

    def lines(self) -> list[str]:
        out = [
            f"model: {self.model}",
            f"items: {self.items:,}",
            f"input tokens: {self.input_tokens:,} ({self.token_method})",
            f"output tokens: {self.output_tokens:,} ({self.output_basis})",
        ]
        if self.cost_realtime is None:
            out.append(f"cost: unknown — no price for {self.model!r} (add it with [run] prices)")
        else:
            out += [
                f"cost in real time: ${self.cost_realtime:,.4f}",
                f"cost with the batch API: ${self.cost_batch:,.4f} (saves ${self.savings:,.4f})",
                f"prices checked {self.prices_checked or 'unknown'}; they change: override"
                " with [run] prices",
            ]
        return out


def estimate_requests(
    requests: Iterable[tuple[str, dict[str, Any]]],
    model: str,
    prices: PriceTable,
    *,
    max_tokens: int | None,
    expected_output_tokens: int | None = None,
) -> Estimate:
    items = tin = chats = 0
    for endpoint, body in requests:
        items += 1
        tin += count_request_tokens(endpoint, body, model)
        if not endpoint.endswith("/embeddings"):
            chats += 1
    if expected_output_tokens is not None:
        tout, basis = chats * expected_output_tokens, f"{expected_output_tokens} per request"
    elif max_tokens is not None:
        tout, basis = chats * max_tokens, f"upper bound: max_tokens {max_tokens} per request"
    else:
        tout = chats * ASSUMED_OUTPUT_TOKENS
        basis = f"assumed {ASSUMED_OUTPUT_TOKENS} per request: set max_tokens to bound it"
    return Estimate(
        model=model,
        items=items,
        input_tokens=tin,
        output_tokens=tout,
        output_basis=basis,
        token_method=encoding_note(model),
        cost_realtime=prices.cost(model, tin, tout, batch=False),
        cost_batch=prices.cost(model, tin, tout, batch=True),
        prices_checked=prices.checked,
    )
