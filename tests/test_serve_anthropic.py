"""`overnight serve`: Anthropic's Message Batches API over python functions, through the
official `anthropic` SDK."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import pytest
from serve_helpers import serving, write_config

MODELS = '[models.up]\nbackend = "python"\nfunction = "serving:answer"'
AUTH = '[auth]\nkeys_env = "SERVE_TEST_KEYS"'


def _client(url: str, key: str = "unused") -> anthropic.Anthropic:
    # Anthropic's base URL has no /v1: the SDK adds it to each path.
    return anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key=key, max_retries=0)


def _request(custom_id: str, text: str, model: str = "rev", **params: object) -> dict:
    return {
        "custom_id": custom_id,
        "params": {
            "model": model,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": text}],
            **params,
        },
    }


def _ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while (batch := client.messages.batches.retrieve(batch_id)).processing_status != "ended":
        assert time.monotonic() < deadline, f"still {batch.processing_status}"
        time.sleep(0.1)
    return batch


def test_a_message_batch_mixes_models_and_reports_each_request(tmp_path: Path) -> None:
    with serving(write_config(tmp_path, extra=MODELS)) as url:
        client = _client(url)
        created = client.messages.batches.create(
            requests=[
                _request("a", "hello"),
                _request("b", "world", model="up"),
                _request("c", "boom"),  # the function raises
                _request("d", "x", model="gpt-5"),  # not served: errored, not refused
                _request("e", "x", max_tokens=0),
                _request("f", "x", model="all-MiniLM-L6-v2"),  # embeds; does not chat
            ]  # type: ignore[arg-type]
        )
        assert created.type == "message_batch" and created.id.startswith("msgbatch_")
        assert created.processing_status == "in_progress"
        assert created.request_counts.processing == 6 and created.results_url is None
        batch = _ended(client, created.id)
        assert batch.request_counts.model_dump() == {
            "processing": 0,
            "succeeded": 2,
            "errored": 4,
            "canceled": 0,
            "expired": 0,
        }
        assert batch.ended_at is not None and batch.results_url is not None
        results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
        assert sorted(results) == list("abcdef")
        assert results["a"].type == "succeeded"
        assert results["a"].message.content[0].text == "olleh"  # type: ignore[union-attr]
        assert results["a"].message.model == "rev"  # type: ignore[union-attr]
        assert results["b"].message.model == "up"  # type: ignore[union-attr]
        assert results["c"].type == "errored"
        assert results["c"].error.error.type == "api_error"  # type: ignore[union-attr]
        assert "refused" in results["c"].error.error.message  # type: ignore[union-attr]
        for cid in "def":
            assert results[cid].error.error.type == "invalid_request_error"  # type: ignore[union-attr]
        assert "'gpt-5' is not served" in results["d"].error.error.message  # type: ignore[union-attr]

        # Anthropic's batches are not OpenAI's: each API lists only its own.
        assert [b.id for b in client.messages.batches.list()] == [batch.id]
        deleted = client.messages.batches.delete(batch.id)
        assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")
        with pytest.raises(anthropic.NotFoundError) as err:
            client.messages.batches.retrieve(batch.id)
        assert err.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_create_refuses_bad_requests_in_anthropics_shape(tmp_path: Path) -> None:
    with serving(write_config(tmp_path)) as url:
        client = _client(url)
        for requests in (
            [],
            [_request("a", "x"), _request("a", "y")],
            [_request("has space", "x")],
            [{"custom_id": "a"}],
        ):
            with pytest.raises(anthropic.BadRequestError) as err:
                client.messages.batches.create(requests=requests)  # type: ignore[arg-type]
            assert err.value.body["type"] == "error"  # type: ignore[index]
            assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        assert list(client.messages.batches.list()) == []


def test_message_batches_list_pages_and_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.2")
    monkeypatch.setenv("SERVE_TEST_KEYS", "ka:tenant-a,kb:tenant-b")
    config = write_config(tmp_path, extra=AUTH, run="batch_size = 2")
    with serving(config) as url:
        client = _client(url, "ka")
        ids = [client.messages.batches.create(requests=[_request("q", "x")]).id for _ in range(3)]
        page = client.messages.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[:0:-1] and page.has_more
        assert page.first_id == ids[2] and page.last_id == ids[1]
        assert [b.id for b in client.messages.batches.list(limit=1)] == ids[::-1]  # paging
        assert [b.id for b in client.messages.batches.list(before_id=ids[0])] == ids[:0:-1]

        slow = client.messages.batches.create(
            requests=[_request(f"s{i}", "sleep") for i in range(30)]  # type: ignore[arg-type]
        )
        deadline = time.monotonic() + 60
        while not (tmp_path / "calls.log").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cancelling = client.messages.batches.cancel(slow.id)
        assert cancelling.processing_status == "canceling"
        assert cancelling.cancel_initiated_at is not None
        batch = _ended(client, slow.id)
        counts = batch.request_counts
        assert counts.succeeded > 0 and counts.canceled > 0
        assert counts.succeeded + counts.canceled == 30 and counts.errored == 0
        results = list(client.messages.batches.results(slow.id))
        assert sorted(r.custom_id for r in results) == sorted(f"s{i}" for i in range(30))
        assert sum(r.result.type == "canceled" for r in results) == counts.canceled

        # Keys: x-api-key (the SDK's header); another tenant sees nothing of tenant-a's.
        other = _client(url, "kb")
        with pytest.raises(anthropic.NotFoundError):
            other.messages.batches.retrieve(slow.id)
        with pytest.raises(anthropic.NotFoundError):
            list(other.messages.batches.results(slow.id))
        assert list(other.messages.batches.list()) == []
        with pytest.raises(anthropic.AuthenticationError) as err:
            _client(url, "kc").messages.batches.list()
        assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
