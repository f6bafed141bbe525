"""`overnight estimate`: tokens and cost of a job before anything is sent."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .llm.prices import PriceTable
from .llm.tokens import count_request_tokens, encoding_note

ASSUMED_OUTPUT_TOKENS = 256  # per chat request, when max_tokens does not bound it


def usd(amount: float) -> str:
    """Dollars to the cent, or to four significant digits below a cent (a small test job
    should not read $0.00)."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    return "$" + f"{float(f'{amount:.3g}'):.10f}".rstrip("0")


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
                f"cost in real time: {usd(self.cost_realtime)}",
                f"cost with the batch API: {usd(self.cost_batch or 0.0)}"
                f" (saves {usd(self.savings or 0.0)})",
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
    """Counts every request; prices each by its own model when the job names none (an
    OpenAI batch file run as is may mix models)."""
    items = tin = tout = 0
    by_model: dict[str, list[int]] = {}
    for endpoint, body in requests:
        items += 1
        name = model or str(body.get("model", ""))
        n_in = count_request_tokens(endpoint, body, name)
        if endpoint.endswith("/embeddings"):
            n_out = 0
        elif expected_output_tokens is not None:
            n_out = expected_output_tokens
        else:
            own = body.get("max_tokens") or body.get("max_completion_tokens") or max_tokens
            n_out = int(own) if own else ASSUMED_OUTPUT_TOKENS
        tin += n_in
        tout += n_out
        acc = by_model.setdefault(name, [0, 0])
        acc[0] += n_in
        acc[1] += n_out
    if expected_output_tokens is not None:
        basis = f"{expected_output_tokens} per request"
    elif max_tokens is not None:
        basis = f"upper bound: max_tokens {max_tokens} per request"
    else:
        basis = (
            f"max_tokens where the request sets it, else assumed {ASSUMED_OUTPUT_TOKENS} per"
            " request: set max_tokens to bound it"
        )
    real = [prices.cost(m, a, b, batch=False) for m, (a, b) in by_model.items()]
    batch = [prices.cost(m, a, b, batch=True) for m, (a, b) in by_model.items()]
    known = None not in real and bool(real)
    names = sorted(by_model)
    return Estimate(
        model=model or ", ".join(names),
        items=items,
        input_tokens=tin,
        output_tokens=tout,
        output_basis=basis,
        token_method=encoding_note(model or (names[0] if names else "")),
        cost_realtime=sum(real) if known else None,  # type: ignore[arg-type]
        cost_batch=sum(batch) if known else None,  # type: ignore[arg-type]
        prices_checked=prices.checked,
    )
