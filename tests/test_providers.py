"""The provider registry: lookups, the job file's vocabulary derived from it, and the SDK
errors' translation."""

from __future__ import annotations

import typing

import httpx2 as httpx
import openai
import pytest

from overnight.llm.providers import BACKENDS, PROVIDERS, provider, sdk_failure
from overnight.spec import Backend, ModelSpec


def test_lookup_and_an_unknown_provider() -> None:
    assert provider("anthropic") is PROVIDERS["anthropic"]
    with pytest.raises(ValueError, match="no provider 'gemini': overnight knows openai, anthropic"):
        provider("gemini")


def test_the_job_files_literals_are_the_registry() -> None:
    """spec.py keeps Literals for pydantic's messages: they must name what the registry has."""
    llm = [b for b in typing.get_args(Backend) if b in BACKENDS]
    assert llm == list(BACKENDS)
    provider_field = ModelSpec.model_fields["provider"].annotation
    assert set(typing.get_args(typing.get_args(provider_field)[0])) == set(PROVIDERS)
    assert BACKENDS["anthropic-batch"].provider == "anthropic"
    assert BACKENDS["anthropic-batch"].mode == "batch"
    assert BACKENDS["auto"].provider is None


def _status_error(status: int, body: object = None, headers: dict | None = None) -> Exception:
    request = httpx.Request("POST", "https://api.example/v1/x")
    response = httpx.Response(status, headers=headers or {}, request=request)
    return openai.APIStatusError(f"Error code: {status}", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, "key_refused"),
        (403, "forbidden"),
        (429, "throttled"),
        (408, "retryable"),
        (409, "retryable"),
        (502, "retryable"),
        (400, "client_error"),
        (413, "client_error"),
    ],
)
def test_status_errors_translate_to_kinds(status: int, kind: str) -> None:
    failure = sdk_failure(_status_error(status, {"error": {"message": "said so"}}))
    assert failure is not None and failure.kind == kind and failure.status == status
    assert failure.said == "said so"
    assert failure.retryable == (kind not in ("key_refused", "forbidden", "client_error"))


def test_quota_retry_after_and_should_retry() -> None:
    exc = _status_error(429, {"error": {"code": "insufficient_quota"}}, {"retry-after-ms": "1500"})
    exc.code = "insufficient_quota"  # type: ignore[attr-defined]
    failure = sdk_failure(exc)
    assert failure is not None and failure.kind == "out_of_quota"
    assert failure.retry_after == 1.5
    said_no = sdk_failure(_status_error(500, headers={"x-should-retry": "false"}))
    assert said_no is not None and said_no.should_retry is False


def test_no_answer_and_not_the_sdks() -> None:
    request = httpx.Request("POST", "https://api.example/v1/x")
    try:
        raise openai.APITimeoutError(request) from httpx.ReadTimeout("slow")
    except openai.APITimeoutError as exc:
        slow = sdk_failure(exc)
    assert slow is not None and slow.kind == "timed_out" and slow.may_have_acted
    try:
        raise openai.APIConnectionError(request=request) from httpx.ConnectError("refused")
    except openai.APIConnectionError as exc:
        down = sdk_failure(exc)
    assert down is not None and down.kind == "unreachable" and down.cause == "ConnectError: refused"
    assert sdk_failure(OSError("disk full")) is None  # a local error is not the provider's


@pytest.mark.parametrize("backend", ["anthropic", "anthropic-batch"])
def test_init_for_anthropic_names_its_model_key_and_url(tmp_path, backend: str) -> None:
    """`overnight init --backend anthropic` wrote gpt-4.1-mini, OPENAI_API_KEY and /v1."""
    from overnight import scaffold

    job = tmp_path / "job.toml"
    text = scaffold.build(job, backend, "generate").files[job]
    assert 'name = "claude-haiku-4-5"' in text and '"ANTHROPIC_API_KEY"' in text
    assert '"http://127.0.0.1:8000"' in text
    lines = scaffold.build(job, backend, "passthrough").files[tmp_path / "job.input.jsonl"]
    assert '"url":"/v1/messages"' in lines and "claude-haiku-4-5" in lines
