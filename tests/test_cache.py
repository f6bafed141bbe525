"""The response cache: real SQLite files, other processes, a kill right after a put."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from overnight.errors import UsageError
from overnight.llm.cache import ResponseCache, cache_key
from overnight.llm.requests import make_llm_task

BODY = {"id": "chatcmpl-1", "choices": [{"message": {"content": "ok"}}], "usage": {"n": 1}}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_put_get_roundtrip(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "c.db", "job:a") as cache:
        assert cache.get("k") is None
        cache.put("k", BODY, 12, 3)
        got = cache.get("k")
        assert got is not None
        assert (got.body, got.input_tokens, got.output_tokens, got.cached) == (BODY, 12, 3, True)
        cache.put("k", {"other": 1}, 1, 1)  # a repaired answer replaces the first
        assert cache.get("k").body == {"other": 1}  # type: ignore[union-attr]


def test_rows_carry_tokens_and_time(tmp_path: Path) -> None:
    before = time.time()
    with ResponseCache(tmp_path / "c.db", "job:a") as cache:
        cache.put("k", BODY, 12, 3)
    db = sqlite3.connect(tmp_path / "c.db")
    scope, key, tin, tout, created = db.execute(
        "SELECT scope, key, input_tokens, output_tokens, created_at FROM responses"
    ).fetchone()
    assert (scope, key, tin, tout) == ("job:a", "k", 12, 3) and created >= before
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_get_many_over_the_parameter_limit(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "c.db", "s") as cache:
        for i in range(0, 1200, 2):
            cache.put(f"k{i}", {"i": i}, i, 0)
        keys = [f"k{i}" for i in range(1200)] + ["k0", "k0"]  # duplicates asked once
        found = cache.get_many(keys)
        assert sorted(found) == sorted(f"k{i}" for i in range(0, 1200, 2))
        assert found["k600"].body == {"i": 600} and found["k600"].input_tokens == 600
        assert cache.get_many([]) == {}
        assert cache.get_many(iter(["k2", "k3"])).keys() == {"k2"}


def test_scopes_are_apart(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with ResponseCache(path, "job:a") as a, ResponseCache(path, "job:b") as b:
        a.put("k", {"from": "a"}, 1, 1)
        b.put("k", {"from": "b"}, 2, 2)
        assert a.get("k").body == {"from": "a"}  # type: ignore[union-attr]
        assert b.get("k").body == {"from": "b"}  # type: ignore[union-attr]
        assert a.clear_scope() == 1
        assert a.get("k") is None and b.get("k") is not None


def test_a_put_is_seen_by_another_connection_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    writer, reader = ResponseCache(path, "s"), ResponseCache(path, "s")
    try:
        assert reader.get("k") is None
        writer.put("k", BODY, 1, 2)
        assert reader.get("k") is not None  # no close, no explicit commit needed
    finally:
        writer.close()
        reader.close()


def test_a_put_from_another_process_is_visible(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    with ResponseCache(path, "s") as mine:  # open while the other process writes
        done = _python(
            "import sys; from overnight.llm.cache import ResponseCache\n"
            "c = ResponseCache(sys.argv[1], 's'); c.put('theirs', {'x': 1}, 5, 6); c.close()",
            str(path),
        )
        assert done.returncode == 0, done.stderr
        got = mine.get("theirs")
        assert got is not None and (got.body, got.input_tokens) == ({"x": 1}, 5)


def test_durable_the_moment_put_returns(tmp_path: Path) -> None:
    """A process killed right after a put (no close, no atexit) leaves the answer behind."""
    path = tmp_path / "c.db"
    killed = _python(
        "import os, sys; from overnight.llm.cache import ResponseCache\n"
        "c = ResponseCache(sys.argv[1], 'job:x')\n"
        "c.put('paid', {'answer': 42}, 100, 7)\n"
        "os._exit(9)",
        str(path),
    )
    assert killed.returncode == 9, killed.stderr
    with ResponseCache(path, "job:x") as cache:
        got = cache.get("paid")
        assert got is not None and got.body == {"answer": 42} and got.output_tokens == 7


def test_two_processes_writing_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    code = (
        "import sys; from overnight.llm.cache import ResponseCache\n"
        "c = ResponseCache(sys.argv[1], 's')\n"
        "for i in range(300): c.put(f'child{i}', {'i': i}, i, 0)\n"
        "c.close()"
    )
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env)
    with ResponseCache(path, "s") as mine:
        for i in range(300):
            mine.put(f"parent{i}", {"i": i}, i, 0)
        assert child.wait(timeout=60) == 0
        keys = [f"{who}{i}" for who in ("child", "parent") for i in range(300)]
        assert len(mine.get_many(keys)) == 600


def test_one_background_thread_and_the_main_thread(tmp_path: Path) -> None:
    """Opened on the main thread, written from the event-loop thread, read from both."""
    errors: list[BaseException] = []
    with ResponseCache(tmp_path / "c.db", "s") as cache:

        def work() -> None:
            try:
                for i in range(200):
                    cache.put(f"k{i}", {"i": i}, 1, 1)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        while thread.is_alive():
            cache.get_many([f"k{i}" for i in range(200)])
        thread.join()
        assert not errors and len(cache.get_many([f"k{i}" for i in range(200)])) == 200


def test_not_a_database_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    path.write_bytes(b"this is not sqlite, just some text that fills the header" * 20)
    with pytest.raises(UsageError, match="c.db"):
        ResponseCache(path, "s")


def test_creates_the_folder(tmp_path: Path) -> None:
    with ResponseCache(tmp_path / "state" / ".overnight" / "cache.db", "s") as cache:
        cache.put("k", BODY, 1, 1)
    assert (tmp_path / "state" / ".overnight" / "cache.db").is_file()


# -- the key: one test per ingredient ----------------------------------------------------

CHAT = "/v1/chat/completions"
BASE: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"}],
    "temperature": 0,
    "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {}}},
}
KEY = cache_key("openai", CHAT, BASE)


def test_key_is_stable_and_ignores_key_order() -> None:
    assert cache_key("openai", CHAT, BASE) == KEY
    assert cache_key("openai", CHAT, dict(reversed(BASE.items()))) == KEY
    assert len(KEY) >= 32 and int(KEY, 16) >= 0  # a hex digest


def test_key_changes_with_the_provider() -> None:
    assert cache_key("anthropic", CHAT, BASE) != KEY


def test_key_changes_with_the_endpoint() -> None:
    assert cache_key("openai", "/v1/responses", BASE) != KEY


def test_key_changes_with_the_model() -> None:
    assert cache_key("openai", CHAT, {**BASE, "model": "gpt-4o"}) != KEY


def test_key_changes_with_a_parameter() -> None:
    assert cache_key("openai", CHAT, {**BASE, "temperature": 0.5}) != KEY
    assert cache_key("openai", CHAT, {**BASE, "max_tokens": 10}) != KEY  # added


def test_key_changes_with_the_messages() -> None:
    user = {"role": "user", "content": "hello!"}
    assert cache_key("openai", CHAT, {**BASE, "messages": [BASE["messages"][0], user]}) != KEY
    system = {"role": "system", "content": "S2"}
    assert cache_key("openai", CHAT, {**BASE, "messages": [system, BASE["messages"][1]]}) != KEY


def test_key_changes_with_the_schema() -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}
    assert cache_key("openai", CHAT, {**BASE, "response_format": schema}) != KEY


def test_key_changes_with_a_template_variable() -> None:
    task = make_llm_task("generate", "openai", "gpt-4o-mini", text="{{ a }} and {{ b }}")
    one = task.build({"a": "x", "b": "y"}).key
    assert task.build({"a": "x", "b": "y"}).key == one
    assert task.build({"a": "x", "b": "z"}).key != one
    assert task.build({"a": "x", "b": "y", "unused": 1}).key == one  # not in the prompt
