"""The demo data generator, its CSV files, and the weekly chart."""

from __future__ import annotations

import csv
import time
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path

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


def test_generation_is_fast() -> None:
    t0 = time.perf_counter()
    generate_tickets(2000)
    assert time.perf_counter() - t0 < 1.0


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
