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


# -- a PostgreSQL ledger of its own per test ------------------------------------------------

PG_SERVER = "postgresql://127.0.0.1:5432/test"


@pytest.fixture
def pg_ledger_url() -> Iterator[str]:
    """A ledger URL on the test server whose tables go to a schema of this test's own
    (libpq `options`: search_path), dropped afterwards."""
    import uuid

    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_SERVER, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover - no server on this machine
        # A failure, not a skip: the PostgreSQL half of the suite must not vanish silently.
        pytest.fail(f"no PostgreSQL at {PG_SERVER} (the tests need it running): {exc}")
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            yield f"{PG_SERVER}?options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
