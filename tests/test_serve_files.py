"""`overnight serve`: serve.toml and OpenAI's Files API, through the official SDK."""

from __future__ import annotations

import http.client
import subprocess
import sys
import urllib.parse
from pathlib import Path

import openai
import orjson
import pytest
from serve_helpers import chat_line, client, jsonl, serving, upload, write_config


def test_files_upload_list_retrieve_content_delete(tmp_path: Path) -> None:
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        data = jsonl([chat_line("a", "hello"), chat_line("b", "world")])
        first = oai.files.create(file=("first.jsonl", data), purpose="batch")
        assert (first.object, first.filename, first.purpose, first.bytes) == (
            "file",
            "first.jsonl",
            "batch",
            len(data),
        )
        assert first.id.startswith("file-") and first.status == "processed"
        ids = [first.id] + [upload(oai, [chat_line(f"x{i}", "hi")]) for i in range(4)]

        assert oai.files.retrieve(first.id).model_dump() == first.model_dump()
        assert oai.files.content(first.id).content == data
        # Newest first; the SDK pages on `after` until has_more is false.
        assert [f.id for f in oai.files.list()] == ids[::-1]
        page = oai.files.list(limit=2)
        assert [f.id for f in page.data] == ids[:2:-1] and page.has_more
        assert [f.id for f in oai.files.list(limit=2)] == ids[::-1]  # auto-paging: all of them
        assert [f.id for f in oai.files.list(order="asc", limit=3)] == ids

        deleted = oai.files.delete(first.id)
        assert (deleted.id, deleted.deleted) == (first.id, True)
        with pytest.raises(openai.NotFoundError) as err:
            oai.files.retrieve(first.id)
        assert err.value.body == {  # OpenAI's error shape, unwrapped by the SDK
            "message": f"No such File object: {first.id}",
            "type": "invalid_request_error",
            "param": "id",
            "code": "not_found",
        }
        with pytest.raises(openai.NotFoundError):
            oai.files.content(first.id)
        with pytest.raises(openai.NotFoundError):
            oai.files.delete(first.id)
        assert [f.id for f in oai.files.list()] == ids[:0:-1]

    # The files outlive the server: a new one over the same folder lists them.
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        assert [f.id for f in oai.files.list()] == ids[:0:-1]
        assert oai.files.content(ids[1]).content == jsonl([chat_line("x0", "hi")])


def test_an_upload_over_the_limit_is_413_and_leaves_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra="[files]\nmax_upload_bytes = 1000")
    with serving(config) as url:
        oai = client(url)
        ok = oai.files.create(file=("ok.jsonl", b"x" * 1000), purpose="batch")
        with pytest.raises(openai.APIStatusError) as err:
            oai.files.create(file=("big.jsonl", b"x" * 1001), purpose="batch")
        assert err.value.status_code == 413
        assert err.value.body["code"] == "file_too_large"  # type: ignore[index]
        assert "1000 bytes" in err.value.body["message"]  # type: ignore[index]
        # Far over the limit: refused on its Content-Length, before the body is read.
        with pytest.raises(openai.APIStatusError) as err:
            oai.files.create(file=("huge.jsonl", b"x" * 200_000), purpose="batch")
        assert err.value.status_code == 413
        # Without a Content-Length (chunked): refused once the body read passes the limit.
        assert _chunked_upload(url, b"x" * 200_000) == 413
        assert [f.id for f in oai.files.list()] == [ok.id]
        stored = sorted(p.name for p in (tmp_path / "state/serve/files").iterdir())
        assert stored == [ok.id]


def _chunked_upload(url: str, data: bytes) -> int:
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/files",
            body=(body[i : i + 8192] for i in range(0, len(body), 8192)),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            encode_chunked=True,
        )
        return conn.getresponse().status
    finally:
        conn.close()


def test_bad_uploads_are_400_in_openais_shape(tmp_path: Path) -> None:
    with serving(write_config(tmp_path)) as url:
        oai = client(url)
        with pytest.raises(openai.BadRequestError) as err:
            oai.files.create(file=("in.jsonl", b"{}\n"), purpose="fine-tune")
        assert err.value.body["param"] == "purpose"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as err:
            oai.files.create(file=("in.csv", b"a,b\n"), purpose="batch")
        assert err.value.body["message"] == "Invalid file format for Batch API. Must be .jsonl"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError) as err:
            oai.get("/nowhere", cast_to=object)
        assert err.value.body["code"] == "not_found"  # type: ignore[index]
        assert list(oai.files.list()) == []


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "overnight", "serve", "--config", str(config), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[models.m]\nbackend = "python"\n', "[models.\"m\"]: backend = 'python' needs"),
        (
            '[models.m]\nbackend = "python"\nfunction = "f:g"\nfunctoin = 1\n',
            '[models."m"] functoin: unknown key',
        ),
        (
            '[models.m]\nbackend = "vllm"\nname = "some/model"\n',
            '[models."m"] backend: the service runs',
        ),
        (
            '[auth]\nkeys_env = "SERVE_TEST_NO_SUCH_VAR"\n[models.m]\nbackend = "local"\n',
            "[auth] keys_env: $SERVE_TEST_NO_SUCH_VAR is not set",
        ),
        ('ledger = 3\n[models.m]\nbackend = "local"\n', "ledger: Input should be a valid string"),
        (
            '[files]\nmax_upload_bytes = 0\n[models.m]\nbackend = "local"\n',
            "[files] max_upload_bytes: Input should be greater than 0",
        ),
        (
            '[models.m]\nbackend = "python"\nfunction = "serving:nope"\n',
            "[models.\"m\"] function: module 'serving' has no 'nope'",
        ),
        (
            '[models.m]\nbackend = "python"\nfunction = "nomodule:f"\n',
            "[models.\"m\"] function: cannot import module 'nomodule'",
        ),
        (
            '[models.m]\nbackend = "local"\nname = "bert"\n',
            "[models.\"m\"] name: unknown local model 'bert'",
        ),
        ("", "models: required key is missing"),
        ("models = [", "not valid TOML"),
    ],
)
def test_a_bad_config_exits_2_naming_the_key(tmp_path: Path, text: str, named: str) -> None:
    write_config(tmp_path)  # serving.py, the module of the functions
    config = tmp_path / "serve.toml"
    config.write_text(text)
    done = _serve(config)
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "Traceback" not in done.stderr
    assert str(config) in done.stderr


def test_a_missing_config_exits_2(tmp_path: Path) -> None:
    done = _serve(tmp_path / "nope.toml")
    assert done.returncode == 2 and "serve config not found" in done.stderr


def _post(url: str, path: str, chunks: list[bytes], chunked: bool) -> tuple[int, dict]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        body: object = iter(chunks) if chunked else b"".join(chunks)
        conn.request(
            "POST",
            path,
            body=body,
            headers={"Content-Type": "application/json"},
            encode_chunked=chunked,
        )
        response = conn.getresponse()
        return response.status, orjson.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_json_bodies_over_the_limit_are_413_and_bodies_not_json_are_400(
    tmp_path: Path, chunked: bool
) -> None:
    """A batch create (OpenAI's) and a message batch create (Anthropic's, which carries its
    requests in the body) are read within [files] max_upload_bytes: over it, 413, whether
    the size is declared or the body comes in chunks; a body that is not JSON is 400."""
    config = write_config(tmp_path, extra="[files]\nmax_upload_bytes = 1000")
    big = [b'{"requests": [' + b'"x",' * 100] * 5 + [b'"x"]}']
    with serving(config) as url:
        for path in ("/v1/batches", "/v1/messages/batches"):
            status, error = _post(url, path, big, chunked)
            assert status == 413, (path, error)
            assert "1000 bytes" in str(error), error
            status, error = _post(url, path, [b"{not json"], chunked)
            assert status == 400 and "not valid JSON" in str(error), (path, error)
