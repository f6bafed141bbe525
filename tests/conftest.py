from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/llm_helpers.py

from llm_helpers import ANT_KEY, KEY  # noqa: E402

from overnight.testing.fake_provider import FakeProvider, Knobs  # noqa: E402


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider(Knobs(batch_seconds=0.2)) as provider:
        yield provider


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", ANT_KEY)
