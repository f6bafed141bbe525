"""`overnight serve` with `[auth] keys_env`: API keys mapped to tenants."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import openai
import orjson
import pytest
from serve_helpers import chat_line, client, serving, upload, wait_for, write_config

from overnight.errors import JobFileError, UsageError
from overnight.service.auth import parse_keys, tenant_of
from overnight.service.config import parse_config

AUTH = '[auth]\nkeys_env = "SERVE_TEST_KEYS"'


def test_keys_map_to_tenants_and_surrounding_whitespace_is_ignored() -> None:
    keys = parse_keys(" key1:tenant-a ,\nkey2:tenant-b\n", "$K")
    assert keys == {"key1": "tenant-a", "key2": "tenant-b"}
    assert tenant_of(keys, "Bearer key2") == "tenant-b"
    assert tenant_of(keys, "bearer key1 ") == "tenant-a"
    for header in (None, "", "Bearer", "Bearer key3", "Basic key1", "key1"):
        assert tenant_of(keys, header) is None
    for bad in ("", " , ", "key1", ":tenant", "key1:", "k:a,k:b"):
        with pytest.raises(UsageError):
            parse_keys(bad, "$K")


def _get(url: str, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_requests_need_a_key_and_tenants_see_only_their_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:tenant-a,key-b:tenant-b\n")
    with serving(write_config(tmp_path, extra=AUTH)) as url:
        status, body = _get(f"{url}/files", {})
        assert status == 401
        assert body["error"]["type"] == "invalid_request_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, "key-c").files.list()
        assert err.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            client(url, "key-a:tenant-a").batches.list()

        a, b = client(url, "key-a"), client(url, "key-b")
        file_a = upload(a, [chat_line("x", "hello")])
        batch_a = a.batches.create(
            input_file_id=file_a, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_for(a, batch_a.id, ("completed",))
        file_b = upload(b, [chat_line("y", "hi")])

        # Another tenant's file or batch does not exist for b: 404, and never listed.
        for call in (
            lambda: b.files.retrieve(file_a),
            lambda: b.files.content(file_a),
            lambda: b.files.delete(file_a),
            lambda: b.files.content(done.output_file_id),  # type: ignore[arg-type]
            lambda: b.batches.retrieve(batch_a.id),
            lambda: b.batches.cancel(batch_a.id),
            lambda: b.batches.create(
                input_file_id=file_a, endpoint="/v1/chat/completions", completion_window="24h"
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        assert [f.id for f in b.files.list()] == [file_b]
        assert list(b.batches.list()) == []
        assert [x.id for x in b.batches.list(after=batch_a.id)] == []
        assert {f.id for f in a.files.list()} == {file_a, done.output_file_id}
        assert [x.id for x in a.batches.list()] == [batch_a.id]
        assert a.files.content(done.output_file_id).content  # type: ignore[arg-type]


def test_keys_env_not_set_or_malformed_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra=AUTH)
    for value, message in ((None, "is not set"), ("key-a", "entry 1 is not KEY:TENANT")):
        env = {k: v for k, v in os.environ.items() if k != "SERVE_TEST_KEYS"}
        if value is not None:
            env["SERVE_TEST_KEYS"] = value
        done = subprocess.run(
            [sys.executable, "-m", "overnight", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "[auth] keys_env: $SERVE_TEST_KEYS" in done.stderr and message in done.stderr
        assert "key-a" not in done.stderr.replace("SERVE_TEST_KEYS", "")  # no key echoed


def test_a_tenant_over_its_quota_of_open_batches_gets_429_and_others_do_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[batches] max_active_per_tenant = 2: a third batch while two are open is 429 (and not
    recorded); another tenant is not held back; once one ends, the tenant may create again."""
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:tenant-a,key-b:tenant-b")
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.5")
    extra = AUTH + "\n[batches]\nconcurrency = 4\nmax_active_per_tenant = 2\n"
    with serving(write_config(tmp_path, extra=extra)) as url:
        a, b = client(url, "key-a"), client(url, "key-b")
        slow = upload(a, [chat_line(f"s{i}", "sleep") for i in range(4)])
        open_ids = [
            a.batches.create(
                input_file_id=slow, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
            for _ in range(2)
        ]
        with pytest.raises(openai.RateLimitError) as refused:
            a.batches.create(
                input_file_id=slow, endpoint="/v1/chat/completions", completion_window="24h"
            )
        assert "max_active_per_tenant" in refused.value.body["message"]  # type: ignore[index]
        assert sorted(x.id for x in a.batches.list()) == sorted(open_ids)  # not recorded
        file_b = upload(b, [chat_line("y", "hi")])
        other = b.batches.create(
            input_file_id=file_b, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert wait_for(b, other.id, ("completed",)).status == "completed"
        wait_for(a, open_ids[0], ("completed",))
        again = a.batches.create(
            input_file_id=slow, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert wait_for(a, again.id, ("completed",)).status == "completed"


def test_creates_at_once_over_a_quota_of_one_yield_one_batch_and_429s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight creates at the same moment from one tenant with max_active_per_tenant = 1,
    four through the openai SDK and four through the anthropic SDK (one quota for both
    APIs): exactly one batch is created, the seven others are 429 and recorded nowhere."""
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:tenant-a")
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.5")
    extra = AUTH + "\n[batches]\nconcurrency = 8\nmax_active_per_tenant = 1\n"
    with serving(write_config(tmp_path, extra=extra)) as url:
        oai = client(url, "key-a")
        ant = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="key-a", max_retries=0)
        file_id = upload(oai, [chat_line(f"s{i}", "sleep") for i in range(4)])
        request = {
            "custom_id": "m",
            "params": {
                "model": "rev",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "sleep"}],
            },
        }
        start = threading.Barrier(8)

        def create(n: int) -> str:
            start.wait()
            try:
                if n % 2:
                    return ant.messages.batches.create(requests=[request]).id  # type: ignore[list-item]
                return oai.batches.create(
                    input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
                ).id
            except (openai.RateLimitError, anthropic.RateLimitError):
                return "429"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(create, range(8)))
        created = [o for o in outcomes if o != "429"]
        assert len(created) == 1 and outcomes.count("429") == 7, outcomes
        listed = [b.id for b in oai.batches.list()] + [b.id for b in ant.messages.batches.list()]
        assert listed == created


def _status(url: str, key: str | None = None) -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_are_open_by_default_and_behind_a_key_with_require_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics is open unless [metrics] require_key = true: then a key of [auth] (of the
    tenants in [metrics] tenants, if given) is needed. /healthz is always open."""
    monkeypatch.setenv("SERVE_TEST_KEYS", "key-a:tenant-a,key-ops:ops")
    for n, (metrics, expected) in enumerate(
        (
            ("", {None: 200, "nope": 200, "key-a": 200, "key-ops": 200}),
            ("[metrics]\nrequire_key = true", {None: 401, "nope": 401, "key-a": 200}),
            (
                '[metrics]\nrequire_key = true\ntenants = ["ops"]',
                {None: 401, "key-a": 401, "key-ops": 200},
            ),
        )
    ):
        folder = tmp_path / str(n)
        folder.mkdir()
        with serving(write_config(folder, extra=f"{AUTH}\n{metrics}")) as url:
            root = url.removesuffix("/v1")
            seen = {key: _status(f"{root}/metrics", key) for key in expected}
            assert seen == expected, metrics
            assert _status(f"{root}/healthz") == 200
            assert _status(f"{root}/") == 401  # the dashboard asks for a key with [auth]
            if expected[None] == 401:
                request = urllib.request.Request(f"{root}/metrics")
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=10)
                assert refused.value.headers["www-authenticate"] == "Bearer"
                assert "API key" in orjson.loads(refused.value.read())["error"]


def test_metrics_settings_that_cannot_hold_are_refused(tmp_path: Path) -> None:
    models = {"rev": {"backend": "python", "function": "serving:answer"}}
    for metrics, message in (
        ({"require_key": True}, "[metrics] require_key: there are no keys to ask for; add [auth]"),
        (
            {"tenants": ["ops"]},
            "[metrics] tenants: applies with require_key = true",
        ),
    ):
        with pytest.raises(JobFileError) as refused:
            parse_config({"models": models, "metrics": metrics}, tmp_path, "serve.toml")
        assert str(refused.value).startswith(f"serve.toml: {message}")
