"""`overnight estimate`: tokens and cost of a job before anything is sent.

The CLI renders the job's records into requests and hands them here; this module counts and
prices them, and words the result (`Estimate.lines()`); the CLI prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .llm.prices import Price, PriceTable
from .llm.tokens import count_request_tokens, encoding_note

ASSUMED_OUTPUT_TOKENS = 256  # per chat request, when no max_tokens bounds it
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_NO_OUTPUT = ("/embeddings", "/moderations")  # billed for input only


def usd(amount: float) -> str:
    """Dollars to the cent, or to three significant digits below a cent (a small test job
    should not read $0.00)."""
    if amount == 0 or abs(amount) >= 0.01:
        return f"${amount:,.2f}"
    return "$" + f"{float(f'{amount:.3g}'):.10f}".rstrip("0")


def _rate(amount: float) -> str:
    """A per-million price: as many digits as it has ($0.075, $2.50)."""
    return f"${amount:,.2f}" if amount == round(amount, 2) else f"${amount:,.4g}"


@dataclass(frozen=True)
class Estimate:
    model: str  # the job's model, or the requests' own models joined (passthrough files)
    items: int
    input_tokens: int
    output_tokens: int  # what the cost assumes: bounded by max_tokens, or assumed (see basis)
    output_basis: str  # how output_tokens was reached, in words
    token_method: str  # how input tokens were counted (tiktoken or the approximation)
    cost_realtime: float | None  # None: some model has no price
    cost_batch: float | None
    prices_checked: str | None
    output_tokens_max: int | None = None  # the max_tokens bound summed; None: some unbounded
    output_tokens_assumed: int = 0  # the part of output_tokens that is an assumption
    prices: dict[str, Price | None] = field(default_factory=dict)  # per model; None: unknown

    @property
    def savings(self) -> float | None:
        if self.cost_realtime is None or self.cost_batch is None:
            return None
        return self.cost_realtime - self.cost_batch

    @property
    def unknown_models(self) -> list[str]:
        return sorted(m for m, p in self.prices.items() if p is None)

    @property
    def unknown_price(self) -> bool:
        return self.cost_realtime is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "items": self.items,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "output_tokens_max": self.output_tokens_max,
            "output_tokens_assumed": self.output_tokens_assumed,
            "output_basis": self.output_basis,
            "token_method": self.token_method,
            "prices": {m: _price_dict(p) for m, p in self.prices.items()},
            "prices_checked": self.prices_checked,
            "cost_realtime": self.cost_realtime,
            "cost_batch": self.cost_batch,
            "savings": self.savings,
            "unknown_price": self.unknown_price,
            "unknown_models": self.unknown_models,
        }

    def lines(self) -> list[str]:
        out = [
            f"model: {self.model}",
            f"items: {self.items:,}",
            f"input tokens: {self.input_tokens:,} ({self.token_method})",
            f"output tokens: {self.output_tokens:,} ({self.output_basis})",
        ]
        for model, price in sorted(self.prices.items()):
            if price is not None:
                out.append(f"price of {model}: {_price_words(price)}")
        if self.cost_realtime is None or self.cost_batch is None:
            names = ", ".join(repr(m) for m in self.unknown_models) or repr(self.model)
            out.append(f"cost: unknown — no price for {names} (add it with [run] prices)")
            return out
        return [
            *out,
            f"cost in real time: {usd(self.cost_realtime)}",
            f"cost with the batch API: {usd(self.cost_batch)} (saves {usd(self.savings or 0.0)})",
            f"prices checked {self.prices_checked or 'unknown'}; they change: override"
            " with [run] prices",
        ]


def _price_dict(price: Price | None) -> dict[str, float | None] | None:
    if price is None:
        return None
    keep = 1 - price.batch_discount
    return {
        "input": price.input,
        "output": price.output,
        "cached_input": price.cached_input,
        "batch_input": price.input * keep,
        "batch_output": price.output * keep,
    }


def _price_words(price: Price) -> str:
    keep = 1 - price.batch_discount
    return (
        f"{_rate(price.input)} in / {_rate(price.output)} out per million tokens"
        f" (batch API: {_rate(price.input * keep)} / {_rate(price.output * keep)})"
    )


def _bound(body: dict[str, Any], default: int | None) -> int | None:
    """The request's own output bound, else the job's."""
    for key in _MAX_TOKEN_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def estimate_requests(
    requests: Iterable[tuple[str, dict[str, Any]]],
    model: str,
    prices: PriceTable,
    max_tokens: int | None = None,
    expected_output_tokens: int | None = None,
) -> Estimate:
    """Counts every (endpoint, body) request and prices it by `model`, or by the request's
    own model when `model` is empty (an OpenAI batch file run as is may mix models).

    Output tokens: none for embeddings; `expected_output_tokens` per request when the caller
    knows the answer is short (a label); else the request's max_tokens, or the job's, as an
    upper bound; else an assumed ASSUMED_OUTPUT_TOKENS, said so in `output_basis`."""
    items = tin = tout = assumed = bound_total = 0
    chat = bounded = 0
    by_model: dict[str, list[int]] = {}
    for endpoint, body in requests:
        items += 1
        name = model or str(body.get("model", ""))
        n_in = count_request_tokens(endpoint, body, name)
        if endpoint.endswith(_NO_OUTPUT):
            n_out = 0
        else:
            chat += 1
            bound = _bound(body, max_tokens)
            if bound is not None:
                bounded += 1
                bound_total += bound
            if expected_output_tokens is not None:
                n_out = (
                    expected_output_tokens if bound is None else min(expected_output_tokens, bound)
                )
                assumed += n_out
            elif bound is not None:
                n_out = bound
            else:
                n_out = ASSUMED_OUTPUT_TOKENS
                assumed += n_out
        tin += n_in
        tout += n_out
        acc = by_model.setdefault(name, [0, 0])
        acc[0] += n_in
        acc[1] += n_out

    table = {m: prices.price(m) for m in by_model}
    known = bool(by_model) and None not in table.values()
    real = sum(prices.cost(m, a, b, batch=False) or 0.0 for m, (a, b) in by_model.items())
    batch = sum(prices.cost(m, a, b, batch=True) or 0.0 for m, (a, b) in by_model.items())
    names = sorted(by_model)
    methods = dict.fromkeys(encoding_note(m) for m in (names or [model]))
    return Estimate(
        model=model or ", ".join(names),
        items=items,
        input_tokens=tin,
        output_tokens=tout,
        output_basis=_basis(chat, bounded, max_tokens, expected_output_tokens),
        token_method="; ".join(methods),
        cost_realtime=real if known else None,
        cost_batch=batch if known else None,
        prices_checked=prices.checked,
        output_tokens_max=bound_total if bounded == chat else None,
        output_tokens_assumed=assumed,
        prices=table,
    )


def _basis(chat: int, bounded: int, max_tokens: int | None, expected: int | None) -> str:
    if chat == 0:
        return "embeddings: no output tokens"
    if expected is not None:
        return f"assumed {expected} per request, the expected answer length"
    if bounded == chat:
        if max_tokens is not None:
            return f"upper bound: max_tokens {max_tokens} per request"
        return "upper bound: each request's max_tokens"
    if bounded == 0:
        return (
            f"assumed {ASSUMED_OUTPUT_TOKENS} per request: no max_tokens; set it to bound the cost"
        )
    return (
        f"max_tokens where the request sets it, else assumed {ASSUMED_OUTPUT_TOKENS} per"
        " request: set max_tokens to bound it"
    )
