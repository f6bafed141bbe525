"""The demo's weekly report chart: tickets per category per day, as stacked bars."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from pathlib import Path

# Fixed colours per known demo label, so the chart reads the same from run to run; other
# labels take the remaining palette colours in order.
_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
_KNOWN_ORDER = ["bug", "billing", "account", "feature request", "other"]


def write_chart(rows: Iterable[tuple[str, str]], path: Path) -> Path:
    """Write a stacked bar chart of (created_at ISO string, category) rows; PNG, or SVG by suffix.

    Every day from the first to the last is shown, including days without tickets, so a
    quiet weekend shows as short bars rather than a missing day.
    """
    # A bare Figure renders with the Agg canvas and leaves pyplot's global backend and
    # figure registry alone (no display needed, nothing to leak in a long-running process).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    counts: Counter[tuple[date, str]] = Counter()
    for created_at, category in rows:
        counts[(datetime.fromisoformat(created_at).date(), category)] += 1
    if not counts:
        raise ValueError("no rows to chart")

    present = {c for _, c in counts}
    categories = [c for c in _KNOWN_ORDER if c in present] + sorted(present - set(_KNOWN_ORDER))
    first = min(d for d, _ in counts)
    last = max(d for d, _ in counts)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]

    fig = Figure(figsize=(10, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bottom = [0] * len(days)
    x = range(len(days))
    for i, category in enumerate(categories):
        heights = [counts[(d, category)] for d in days]
        ax.bar(
            x,
            heights,
            bottom=bottom,
            label=category,
            color=_PALETTE[i % len(_PALETTE)],
            width=0.7,
        )
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for xi, total in zip(x, bottom, strict=True):
        ax.annotate(
            str(total),
            (xi, total),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(list(x), [d.strftime("%a\n%d %b") for d in days])
    ax.set_xlabel("Day created")
    ax.set_ylabel("Tickets")
    total = sum(bottom)
    ax.set_title(
        f"Support tickets per day by predicted category "
        f"({first:%d %b} - {last:%d %b %Y}, {total:,} tickets)"
    )
    ax.margins(y=0.1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    # Reversed, the legend lists categories in the order they are stacked, top to bottom.
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(
        handles[::-1],
        labels[::-1],
        title="Category",
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg" if path.suffix.lower() == ".svg" else "png")
    return path
