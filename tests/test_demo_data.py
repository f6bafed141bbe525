"""The demo data generator, its CSV files, and the weekly chart."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from overnight.demo.tickets import (
    CATEGORIES,
    generate_tickets,
    write_labelled_csv,
    write_tickets_csv,
    write_truth_csv,
)

TICKET_COLUMNS = ["ticket_id", "created_at", "customer", "product", "channel", "subject", "body"]


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_deterministic_for_a_seed() -> None:
    assert generate_tickets(300, seed=3) == generate_tickets(300, seed=3)
    assert generate_tickets(300, seed=3) != generate_tickets(300, seed=4)


def test_n_respected_and_ids_unique() -> None:
    assert generate_tickets(0) == []
    tickets = generate_tickets(250)
    assert len(tickets) == 250
    assert len({t.ticket_id for t in tickets}) == 250
    with pytest.raises(ValueError):
        generate_tickets(-1)


def test_categories_mix() -> None:
    counts = Counter(t.category for t in generate_tickets(2000))
    assert set(counts) == set(CATEGORIES)
    assert len(CATEGORIES) == 5
    # Uneven on purpose: bugs most common, "other" least.
    assert counts["bug"] > counts["billing"] > counts["account"] > counts["other"]


def test_fields_are_varied_and_realistic() -> None:
    tickets = generate_tickets(2000)
    assert {t.channel for t in tickets} == {"email", "chat", "web form", "phone transcript"}
    assert len({t.product for t in tickets}) >= 4
    lengths = sorted(len(t.body) for t in tickets)
    assert lengths[0] < 80 and lengths[-1] > 400  # one-liners to several paragraphs
    assert len({t.body for t in tickets}) > 1900  # not a handful of repeated templates
    assert all(t.subject and t.body and t.customer for t in tickets)


def test_dates_within_the_week() -> None:
    start = date(2026, 3, 2)
    tickets = generate_tickets(1000, start=start)
    begin = datetime.combine(start, datetime.min.time())
    days = Counter()
    for t in tickets:
        created = datetime.fromisoformat(t.created_at)
        assert begin <= created < begin + timedelta(days=7)
        days[created.date()] += 1
    assert len(days) == 7
    # Weekends are quieter than Mondays.
    assert days[start] > 2 * days[start + timedelta(days=6)]


def test_generation_is_linear_and_streams_in_order() -> None:
    """How fast is the benchmarks' business; what a test can hold without a clock is the
    shape of the work: ticket i depends on i alone, so n tickets cost n tickets' work and a
    bigger week starts with the smaller one."""
    small, big = generate_tickets(300, seed=9), generate_tickets(3000, seed=9)
    assert big[:300] == small
    assert [t.ticket_id for t in big] == sorted(t.ticket_id for t in big)


def test_csv_files(tmp_path: Path) -> None:
    tickets = generate_tickets(50, seed=5)
    write_tickets_csv(tickets, tmp_path / "tickets.csv")
    write_truth_csv(tickets, tmp_path / "truth.csv")
    write_labelled_csv(tickets, tmp_path / "examples.csv")

    columns, rows = _read(tmp_path / "tickets.csv")
    assert columns == TICKET_COLUMNS
    assert "category" not in columns and "label" not in columns
    assert len(rows) == 50
    # Multi-line bodies, quotes and emoji survive the round trip.
    assert [r["body"] for r in rows] == [t.body for t in tickets]
    assert rows[0]["ticket_id"] == tickets[0].ticket_id

    columns, rows = _read(tmp_path / "truth.csv")
    assert columns == ["ticket_id", "category"]
    assert [(r["ticket_id"], r["category"]) for r in rows] == [
        (t.ticket_id, t.category) for t in tickets
    ]

    columns, rows = _read(tmp_path / "examples.csv")
    assert columns == [*TICKET_COLUMNS, "label"]
    assert [r["label"] for r in rows] == [t.category for t in tickets]


def test_chart_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from overnight.demo.chart import write_chart

    rows = [(t.created_at, t.category) for t in generate_tickets(300)]
    png = write_chart(rows, tmp_path / "chart.png")
    assert png == tmp_path / "chart.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    svg = write_chart(rows, tmp_path / "out" / "chart.svg")
    assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")
    with pytest.raises(ValueError):
        write_chart([], tmp_path / "empty.png")


# -- `overnight demo` itself, end to end ---------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def demo(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("FORCE_COLOR", None)
    return subprocess.run(
        [sys.executable, "-m", "overnight", "demo", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_overnight_demo_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("sentence_transformers")
    proc = demo(tmp_path, "--tickets", "60", "--dir", "week")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "week"
    for name in (
        "tickets.csv",
        "truth.csv",
        "labelled.csv",
        "triage.toml",
        "triaged.jsonl",
        "triaged.errors.jsonl",
        "tickets-per-day.png",
    ):
        assert (out / name).is_file(), name
    rows = [orjson.loads(x) for x in (out / "triaged.jsonl").read_bytes().splitlines()]
    assert len(rows) == 60 and {r["output"] for r in rows} <= set(CATEGORIES)
    assert (out / "triaged.errors.jsonl").read_bytes() == b""
    report = " ".join(proc.stdout.split())
    assert "Weekly ticket report (60 tickets)" in report
    accuracy = float(re.search(r"accuracy against the generator's labels: ([\d.]+)%", report)[1])
    assert accuracy >= 60  # the fitted head; zero-shot would sit near 50
    assert "failures: 0" in report and f"job file: {out / 'triage.toml'}" in report

    # Progress off a terminal: plain lines, no bar, no escape codes, no warnings.
    assert not ANSI.search(proc.stderr) and "\r" not in proc.stderr and "━" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("demo: ") for ln in lines), lines
    assert lines[0].startswith("demo: 0/~60 done")  # before the model loads: the total

    # The job file it wrote is a real one: status reads the same job back.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    status = subprocess.run(
        [sys.executable, "-m", "overnight", "status", str(out / "triage.toml"), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert orjson.loads(status.stdout)["succeeded"] == 60

    # --json: the same report for scripts, and a rerun starts the week over.
    again = demo(tmp_path, "--tickets", "20", "--dir", "week", "--json")
    assert again.returncode == 0, again.stderr
    data = orjson.loads(again.stdout)
    assert data["tickets"] == 20 and sum(data["per_category"].values()) == 20
    assert data["report"]["succeeded"] == 20 and data["report"]["exit_code"] == 0
    assert data["chart"] == str(out / "tickets-per-day.png")
