"""Measure how well the local model classifies the demo tickets: zero-shot vs a fitted head.

Run from the repository root:

    HF_HUB_OFFLINE=1 python benchmarks/measure_classify_accuracy.py [--n 2000] [--examples 200]

Evaluation tickets (seed 7) and labelled examples (seed 11) are different tickets, so the
fitted head is scored on text it never saw.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from overnight.backends.classify_head import ClassifierHead  # noqa: E402
from overnight.backends.local import LocalModel  # noqa: E402
from overnight.demo.tickets import CATEGORIES, Ticket, generate_tickets  # noqa: E402


def ticket_text(t: Ticket) -> str:
    # Same rendering as the demo job's template: "{{ subject }}\n\n{{ body }}".
    return f"{t.subject}\n\n{t.body}"


def report(name: str, truth: list[str], predicted: list[str], labels: list[str]) -> float:
    accuracy = sum(a == b for a, b in zip(truth, predicted, strict=True)) / len(truth)
    print(f"\n{name}: accuracy {accuracy:.3f} ({len(truth)} tickets)")
    pairs = Counter(zip(truth, predicted, strict=True))
    width = max(len(label) for label in labels) + 2
    print("truth \\ predicted".ljust(width + 2) + "".join(label[:8].rjust(10) for label in labels))
    for t in labels:
        row = "".join(str(pairs[(t, p)]).rjust(10) for p in labels)
        support = sum(pairs[(t, p)] for p in labels)
        recall = pairs[(t, t)] / support if support else 0.0
        predicted_t = sum(pairs[(x, t)] for x in labels)
        precision = pairs[(t, t)] / predicted_t if predicted_t else 0.0
        print(f"  {t.ljust(width)}{row}   recall {recall:.2f}  precision {precision:.2f}")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    tickets = generate_tickets(args.n, seed=7)
    examples = generate_tickets(args.examples, seed=11)
    labels = list(CATEGORIES)

    t0 = time.perf_counter()
    model = LocalModel()
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = model.embed([ticket_text(t) for t in tickets], batch_size=args.batch_size)
    t_embed = time.perf_counter() - t0
    x_examples = model.embed([ticket_text(t) for t in examples], batch_size=args.batch_size)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"model load (incl. torch import) {t_load:.1f}s on {model.device}; "
        f"embedded {len(tickets)} tickets in {t_embed:.1f}s "
        f"({len(tickets) / t_embed:.0f}/s at batch {args.batch_size}); peak RSS {rss:.0f} MiB"
    )
    truth = [t.category for t in tickets]

    zero = ClassifierHead.zero_shot(model, CATEGORIES)
    report("zero-shot (label descriptions)", truth, [p for p, _ in zero.predict(x)], labels)

    fitted = ClassifierHead.fit(x_examples, [t.category for t in examples], label_set=labels)
    report(
        f"fitted head ({len(examples)} labelled examples, seed 11)",
        truth,
        [p for p, _ in fitted.predict(x)],
        labels,
    )


if __name__ == "__main__":
    main()
