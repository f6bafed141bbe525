"""`overnight serve`: OpenAI's Batches API over the python backend and the local model,
through the official SDK."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import openai
import pytest
from serve_helpers import (
    chat_line,
    client,
    lines_of,
    serving,
    upload,
    wait_for,
    write_config,
)

CHAT = "/v1/chat/completions"


def test_a_chat_batch_runs_on_the_python_function(tmp_path: Path) -> None:
    texts = {f"r{i}": f"text {i}" for i in range(10)}
    texts["bad"] = "boom"  # the function raises PermanentError for it
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        file_id = upload(oai, [chat_line(cid, text) for cid, text in texts.items()])
        created = oai.batches.create(
            input_file_id=file_id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={"team": "support"},
        )
        assert created.status == "validating" and created.id.startswith("batch_")
        assert created.metadata == {"team": "support"}
        assert created.expires_at == created.created_at + 24 * 3600
        batch = wait_for(oai, created.id, ("completed", "failed"))

        assert batch.status == "completed", batch.errors
        assert batch.model == "rev"
        assert batch.request_counts.model_dump() == {"total": 11, "completed": 10, "failed": 1}
        for when in ("in_progress_at", "finalizing_at", "completed_at"):
            assert getattr(batch, when) >= batch.created_at
        out = lines_of(oai, batch.output_file_id)
        assert sorted(line["custom_id"] for line in out) == sorted(set(texts) - {"bad"})
        for line in out:
            assert line["error"] is None and line["id"].startswith("batch_req_")
            assert line["response"]["status_code"] == 200
            body = line["response"]["body"]
            assert body["object"] == "chat.completion" and body["model"] == "rev"
            message = body["choices"][0]["message"]
            assert message == {
                "role": "assistant",
                "content": texts[line["custom_id"]][::-1],
                "refusal": None,
            }
            assert body["choices"][0]["finish_reason"] == "stop"
        (err,) = lines_of(oai, batch.error_file_id)
        assert err["custom_id"] == "bad" and err["response"]["status_code"] == 500
        assert err["response"]["body"]["error"]["message"] == "the model refused this one"
        output_file = oai.files.retrieve(batch.output_file_id)  # type: ignore[arg-type]
        assert output_file.purpose == "batch_output"
        assert oai.batches.retrieve(batch.id).model_dump() == batch.model_dump()


def test_an_embeddings_batch_on_the_python_function(tmp_path: Path) -> None:
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        lines = [
            {
                "custom_id": f"e{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "rev", "input": "x" * i},
            }
            for i in range(3)
        ]
        created = oai.batches.create(
            input_file_id=upload(oai, lines), endpoint="/v1/embeddings", completion_window="24h"
        )
        batch = wait_for(oai, created.id, ("completed", "failed"))
        assert batch.status == "completed" and batch.error_file_id is None
        got = {
            line["custom_id"]: line["response"]["body"]
            for line in lines_of(oai, batch.output_file_id)
        }
        assert got["e2"] == {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [2.0, 1.0]}],
            "model": "rev",
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }
        assert len(got) == 3


@pytest.mark.slow
def test_an_embeddings_batch_on_the_local_model(tmp_path: Path) -> None:
    texts = ["the invoice was charged twice", "the app crashes at login", "refund my payment"]
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        lines = [
            {
                "custom_id": f"t{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "all-MiniLM-L6-v2", "input": text},
            }
            for i, text in enumerate(texts)
        ]
        created = oai.batches.create(
            input_file_id=upload(oai, lines), endpoint="/v1/embeddings", completion_window="24h"
        )
        batch = wait_for(oai, created.id, ("completed", "failed"), timeout=300)
        assert batch.status == "completed", batch.errors
        assert batch.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
        vectors = {
            line["custom_id"]: np.array(line["response"]["body"]["data"][0]["embedding"])
            for line in lines_of(oai, batch.output_file_id)
        }
    assert sorted(vectors) == ["t0", "t1", "t2"]
    for v in vectors.values():
        assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-3
    # Two texts about payment are closer to each other than to the crash.
    assert vectors["t0"] @ vectors["t2"] > vectors["t0"] @ vectors["t1"]


def test_a_file_that_does_not_validate_fails_the_batch_naming_its_lines(tmp_path: Path) -> None:
    lines = [
        chat_line("a", "fine"),
        b"{not json",
        chat_line("a", "again"),  # duplicate custom_id
        {**chat_line("c", "x"), "url": "/v1/embeddings"},
        chat_line("d", "x", model="gpt-5"),  # not in serve.toml
        {**chat_line("e", "x"), "method": "GET"},
    ]
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, lines), endpoint=CHAT, completion_window="24h"
        )
        batch = wait_for(oai, created.id, ("completed", "failed"))
        assert batch.status == "failed" and batch.failed_at is not None
        assert batch.output_file_id is None and batch.error_file_id is None
        got = [(e.code, e.line, e.param) for e in batch.errors.data]  # type: ignore[union-attr]
        assert got == [
            ("invalid_json_line", 2, None),
            ("duplicate_custom_id", 3, "custom_id"),
            ("url_mismatch", 4, "url"),
            ("model_not_found", 5, "body.model"),
            ("invalid_method", 6, "method"),
        ]
        messages = [e.message for e in batch.errors.data]  # type: ignore[union-attr]
        assert "'gpt-5' is not served here" in messages[3]
        # The local model embeds; it does not chat.
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line("a", "x", model="all-MiniLM-L6-v2")]),
            endpoint=CHAT,
            completion_window="24h",
        )
        batch = wait_for(oai, created.id, ("completed", "failed"))
        assert [(e.code, e.line) for e in batch.errors.data] == [("unsupported_endpoint", 1)]  # type: ignore[union-attr]
        empty = oai.batches.create(
            input_file_id=upload(oai, []), endpoint=CHAT, completion_window="24h"
        )
        batch = wait_for(oai, empty.id, ("completed", "failed"))
        assert [e.code for e in batch.errors.data] == ["empty_file"]  # type: ignore[union-attr]


def test_create_refuses_bad_requests_in_openais_shape(tmp_path: Path) -> None:
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        file_id = upload(oai, [chat_line("a", "x")])
        for kwargs, param in [
            ({"endpoint": "/v1/completions"}, "endpoint"),
            ({"completion_window": "1h"}, "completion_window"),
            ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ]:
            args = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
            with pytest.raises(openai.BadRequestError) as err:
                oai.batches.create(**{**args, **kwargs})  # type: ignore[arg-type]
            assert err.value.body["param"] == param  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            oai.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
        with pytest.raises(openai.NotFoundError):
            oai.batches.retrieve("batch_nope")
        assert list(oai.batches.list()) == []


def test_batches_list_newest_first_with_pagination(tmp_path: Path) -> None:
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        file_id = upload(oai, [chat_line("a", "x")])
        ids = [
            oai.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id
            for _ in range(5)
        ]
        page = oai.batches.list(limit=2)
        assert [b.id for b in page.data] == ids[:2:-1] and page.has_more
        assert [b.id for b in oai.batches.list(limit=2)] == ids[::-1]  # the SDK pages on
        assert [b.id for b in oai.batches.list(after=ids[2])] == ids[1::-1]
        for batch_id in ids:
            assert wait_for(oai, batch_id, ("completed",)).request_counts.completed == 1


def test_cancel_stops_the_batch_and_reports_every_line_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_TEST_SLEEP", "0.2")
    n = 40
    with serving(write_config(tmp_path, run="batch_size = 2")) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"s{i}", "sleep") for i in range(n)]),
            endpoint=CHAT,
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        while not (tmp_path / "calls.log").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cancelling = oai.batches.cancel(created.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        batch = wait_for(oai, created.id, ("cancelled",))
        out = lines_of(oai, batch.output_file_id)
        errors = lines_of(oai, batch.error_file_id)
        done = [line["custom_id"] for line in out]
        assert 0 < len(done) < n
        assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
        assert sorted(done + [e["custom_id"] for e in errors]) == sorted(f"s{i}" for i in range(n))
        assert batch.request_counts.model_dump() == {
            "total": n,
            "completed": len(done),
            "failed": len(errors),
        }
        with pytest.raises(openai.BadRequestError):  # an ended batch cannot be cancelled
            oai.batches.cancel(created.id)
        assert wait_for(oai, created.id, ("cancelled",)).cancelled_at is not None


def test_a_batch_on_a_postgresql_ledger(tmp_path: Path, pg_ledger_url: str) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('"state/ledger.db"', f'"{pg_ledger_url}"'))
    with serving(config) as url:
        oai = client(url)
        created = oai.batches.create(
            input_file_id=upload(oai, [chat_line(f"p{i}", f"t{i}") for i in range(5)]),
            endpoint=CHAT,
            completion_window="24h",
        )
        batch = wait_for(oai, created.id, ("completed", "failed"))
        assert batch.status == "completed", batch.errors
        got = {
            line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
            for line in lines_of(oai, batch.output_file_id)
        }
        assert got == {f"p{i}": f"t{i}"[::-1] for i in range(5)}
    # The files sit beside serve.toml; the items and the catalogue are in PostgreSQL (where
    # every server on this ledger shares it: test_serve_shared.py).
    assert (tmp_path / ".overnight/serve/files" / batch.output_file_id).exists()  # type: ignore[operator]
    assert not (tmp_path / ".overnight/serve/catalogue.db").exists()
    from overnight.store import open_ledger

    ledger = open_ledger(pg_ledger_url)
    try:
        job = ledger.get_job(created.id)
        assert job is not None and ledger.counts(job.id)["succeeded"] == 5
    finally:
        ledger.close()
