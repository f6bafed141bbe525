"""The fake provider speaks the real wire protocol: driven here by the official SDKs alone."""

from __future__ import annotations

import io
import time

import anthropic
import jsonschema
import openai
import pytest
from llm_helpers import SCHEMA

from overnight.testing.fake_provider import FakeProvider


def oai(fake: FakeProvider, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_url, api_key="k", max_retries=0, **kw)


def ant(fake: FakeProvider) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.anthropic_url, api_key="k", max_retries=0)


def test_chat_structured_and_embeddings(fake: FakeProvider) -> None:
    c = oai(fake)
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content == "echo: hello" and r.usage.total_tokens > 0
    r = c.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "o", "schema": SCHEMA, "strict": True},
        },
    )
    jsonschema.validate(__import__("json").loads(r.choices[0].message.content), SCHEMA)
    e = c.embeddings.create(model="e", input=["a", "b"], dimensions=4)
    assert [len(d.embedding) for d in e.data] == [4, 4]
    m = ant(fake).messages.create(
        model="c",
        max_tokens=50,
        messages=[{"role": "user", "content": "x"}],
        tools=[{"name": "t", "input_schema": SCHEMA}],
        tool_choice={"type": "tool", "name": "t"},
    )
    jsonschema.validate(m.content[0].input, SCHEMA)


def test_faults_as_the_sdks_see_them(fake: FakeProvider) -> None:
    c = oai(fake)
    fake.knobs.throttle_next = 1
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.response.headers["retry-after-ms"] == "200"
    fake.knobs.fail_next = 1
    with pytest.raises(openai.InternalServerError):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    fake.knobs.timeout_next, fake.knobs.hang_seconds = 1, 1.0
    with pytest.raises(openai.APITimeoutError):
        oai(fake, timeout=0.2).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(anthropic.NotFoundError, match="missing-model"):
        ant(fake).messages.create(
            model="missing-model", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    fake.knobs.require_key = "right"
    with pytest.raises(anthropic.AuthenticationError):
        ant(fake).messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )


def line(cid: str, model: str = "m") -> bytes:
    import json

    return (
        json.dumps(
            {
                "custom_id": cid,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": model, "messages": [{"role": "user", "content": cid}]},
            }
        )
        + "\n"
    ).encode()


def wait_done(get, done) -> object:
    deadline = time.monotonic() + 10
    while True:
        b = get()
        if done(b) or time.monotonic() > deadline:
            return b
        time.sleep(0.05)


def test_openai_batch_flow_expiry_cancel_and_listing(fake: FakeProvider) -> None:
    c = oai(fake)
    data = b"".join(line(f"r{i}") for i in range(6))
    f = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    fake.knobs.expire_batches, fake.knobs.expire_fraction = True, 0.5
    b = c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "j"},
    )
    b = wait_done(lambda: c.batches.retrieve(b.id), lambda x: x.status == "expired")
    assert b.request_counts.completed == 3 and b.request_counts.failed == 3
    out = c.files.content(b.output_file_id).text.splitlines()
    err = c.files.content(b.error_file_id).text
    assert len(out) == 3 and err.count("batch_expired") == 3
    # validation failure: two models in one file
    bad = c.files.create(
        file=("b.jsonl", io.BytesIO(line("a") + line("b", "other"))), purpose="batch"
    )
    v = c.batches.create(
        input_file_id=bad.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    v = wait_done(lambda: c.batches.retrieve(v.id), lambda x: x.status == "failed")
    assert v.errors.data[0].code == "model_mismatch" and v.errors.data[0].line == 2
    # cancel, then list with pagination (newest first)
    fake.knobs.expire_batches, fake.knobs.batch_seconds = False, 30
    x = c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert c.batches.cancel(x.id).status == "cancelling"
    x = wait_done(lambda: c.batches.retrieve(x.id), lambda b: b.status == "cancelled")
    assert x.status == "cancelled"
    ids = [b.id for b in c.batches.list(limit=1)]  # the SDK pages with `after`
    assert ids == sorted(ids, reverse=True) and len(ids) == 3
    assert fake.stats.batch_creations == 3 and fake.stats.batch_items["r0"] == 2


def test_anthropic_batch_flow(fake: FakeProvider) -> None:
    a = ant(fake)
    reqs = [
        {
            "custom_id": f"q{i}",
            "params": {
                "model": "c",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "x"}],
            },
        }
        for i in range(4)
    ]
    b = a.messages.batches.create(requests=reqs)
    assert b.processing_status == "in_progress" and b.request_counts.processing == 4
    b = wait_done(
        lambda: a.messages.batches.retrieve(b.id), lambda x: x.processing_status == "ended"
    )
    assert b.request_counts.succeeded == 4 and b.results_url
    got = sorted(r.custom_id for r in a.messages.batches.results(b.id))
    assert got == ["q0", "q1", "q2", "q3"]
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        a.messages.batches.create(requests=[{**reqs[0], "custom_id": "has.dot"}])
    fake.knobs.max_batch_bytes = 100
    with pytest.raises(anthropic.APIStatusError) as info:
        a.messages.batches.create(requests=reqs)
    assert info.value.status_code == 413
    assert [x.id for x in a.messages.batches.list(limit=1)] == [b.id]
    a.messages.batches.delete(b.id)
