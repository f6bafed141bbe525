"""Evaluation: a classifier's labels scored against a gold set, and judged by an LLM.

    python run.py                 # offline: local model + the judge on overnight's fake OpenAI API
    python run.py --real          # the judge on OpenAI itself (OPENAI_API_KEY)
    python run.py --tickets 500   # more tickets (default 200)

1. data/: the demo's synthetic tickets (overnight.demo.tickets), their true category
   (the gold set, never shown to a model) and 200 other labelled tickets for the head.
2. classify.toml: the local model labels every ticket (out/labels.jsonl).
3. Against the gold set: accuracy, per-label precision and recall, and a confusion matrix
   (out/confusion.png).
4. judge.toml: an LLM judges each label (verdict correct / incorrect / unsure, score 1-5,
   a better label, a reason: out/verdicts.jsonl, valid against verdict.schema.json), and
   run.py measures the judge itself against the gold set: how often "correct" means correct.
5. out/report.md: all of it on one page.

Offline, the judge's verdicts come from the fake provider: valid against the schema, picked
by hash of the prompt, so its agreement with the gold set is chance. The classifier and the
accuracy figures are real.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path

from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

import overnight
from overnight.demo.tickets import (
    CATEGORIES,
    generate_tickets,
    write_labelled_csv,
    write_tickets_csv,
    write_truth_csv,
)

HERE = Path(__file__).resolve().parent
LABELS = list(CATEGORIES)


def write_data(n: int) -> None:
    data = HERE / "data"
    data.mkdir(exist_ok=True)
    tickets = generate_tickets(n)
    write_tickets_csv(tickets, data / "tickets.csv")
    write_truth_csv(tickets, data / "truth.csv")
    # Another seed: the head is never fitted on a ticket it is graded on.
    write_labelled_csv(generate_tickets(200, seed=1007), data / "labelled.csv")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_confusion_png(matrix: list[list[int]], path: Path) -> None:
    """Rows: the true label; columns: the predicted one; each cell its count."""
    # A bare Figure with the Agg canvas: no display, nothing left in pyplot's registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=30, ha="right")
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            colour = "white" if count > top / 2 else "black"
            ax.text(j, i, str(count), ha="center", va="center", color=colour)
    ax.set_title("Local model vs the gold set")
    fig.tight_layout()
    fig.savefig(path)


def run_judge(job_file: Path, real: bool) -> overnight.Report:
    """The judge as its file says (real), or pointed at the fake provider (offline).

    Offline runs keep a ledger (and response cache) of their own, .overnight/offline/: the
    ledger does not tell one base_url from another, so a --real run after an offline one
    would otherwise keep the fake's answers.
    """
    if real:
        return overnight.Job.from_file(job_file).run()
    job = overnight.Job.from_file(job_file, state=HERE / ".overnight" / "offline" / "ledger.db")
    from overnight.testing.fake_provider import FakeProvider

    os.environ.setdefault("OPENAI_API_KEY", "sk-fake")  # the fake takes any key
    with FakeProvider() as fake:
        model = job.spec.model.model_copy(update={"base_url": fake.openai_url})
        job.spec = job.spec.model_copy(update={"model": model})
        return job.run()


def check(report: overnight.Report, job_file: str) -> None:
    if report.exit_code != 0:
        print(
            f"{job_file} ended with exit code {report.exit_code}: `overnight failures {job_file}`"
        )
        sys.exit(report.exit_code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=200)
    parser.add_argument("--real", action="store_true", help="the judge on OpenAI, not the fake")
    args = parser.parse_args()
    os.chdir(HERE)
    write_data(args.tickets)
    (HERE / "out").mkdir(exist_ok=True)

    # 2-3. the classifier against the gold set
    report = overnight.Job.from_file(HERE / "classify.toml").run()
    check(report, "classify.toml")
    labels = read_jsonl(HERE / "out" / "labels.jsonl")
    with (HERE / "data" / "truth.csv").open(newline="", encoding="utf-8") as f:
        truth = {row["ticket_id"]: row["category"] for row in csv.DictReader(f)}
    y_true = [truth[r["ticket_id"]] for r in labels]
    y_pred = [r["output"] for r in labels]
    accuracy = accuracy_score(y_true, y_pred)
    matrix = confusion_matrix(y_true, y_pred, labels=LABELS).tolist()
    per_label = classification_report(y_true, y_pred, labels=LABELS, zero_division=0)
    write_confusion_png(matrix, HERE / "out" / "confusion.png")
    print(f"classifier: accuracy {accuracy:.3f} on {len(labels)} tickets; out/confusion.png")

    # 4. the judge over the classifier's answers, and the judge against the gold set
    with (HERE / "out" / "judge_input.jsonl").open("w", encoding="utf-8") as f:
        for r in labels:
            row = {
                "ticket_id": r["ticket_id"],
                "subject": r["subject"],
                "body": r["body"],
                "label": r["output"],
                "confidence": r["scores"][r["output"]],
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report = run_judge(HERE / "judge.toml", args.real)
    check(report, "judge.toml")
    verdicts = read_jsonl(HERE / "out" / "verdicts.jsonl")
    counts = Counter(v["output"]["verdict"] for v in verdicts)
    decided = [v for v in verdicts if v["output"]["verdict"] != "unsure"]
    agree = sum(
        (v["output"]["verdict"] == "correct") == (v["label"] == truth[v["ticket_id"]])
        for v in decided
    )
    agreement = agree / len(decided) if decided else 0.0
    mean_score = sum(v["output"]["score"] for v in verdicts) / len(verdicts)
    print(
        f"judge: {dict(counts)}, mean score {mean_score:.2f}; "
        f"agrees with the gold set on {agreement:.3f} of {len(decided)} decided verdicts"
    )

    # 5. one page
    rows = "\n".join(
        f"| {label} | " + " | ".join(str(c) for c in row) + " |"
        for label, row in zip(LABELS, matrix, strict=True)
    )
    page = f"""# Evaluation of the local model on {len(labels)} demo tickets

Accuracy against the gold set: **{accuracy:.3f}**

![confusion matrix](confusion.png)

| true \\ predicted | {" | ".join(LABELS)} |
|---|{"---|" * len(LABELS)}
{rows}

```
{per_label}```

## LLM-as-judge

Verdicts: {", ".join(f"{k} {v}" for k, v in counts.most_common())}; mean score {mean_score:.2f}.
The judge agrees with the gold set on {agreement:.3f} of its {len(decided)} decided verdicts
("correct" when the label is right, "incorrect" when it is wrong).
"""
    (HERE / "out" / "report.md").write_text(page, encoding="utf-8")
    print("wrote out/report.md")


if __name__ == "__main__":
    try:
        main()
    except overnight.UsageError as exc:  # a missing key, a wrong job file: exit 2, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
