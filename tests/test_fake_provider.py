"""The fake provider speaks the real wire protocol: driven here by the official SDKs alone."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import io
import json
import math
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anthropic
import jsonschema
import openai
import pydantic
import pytest
from llm_helpers import SCHEMA

from overnight.testing.fake_provider import FakeProvider, Knobs

T = TypeVar("T")
USER = [{"role": "user", "content": "hello"}]


def oai(fake: FakeProvider, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("api_key", "k")
    return openai.OpenAI(base_url=fake.openai_url, **kw)


def ant(fake: FakeProvider, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("max_retries", 0)
    kw.setdefault("api_key", "k")
    return anthropic.Anthropic(base_url=fake.anthropic_url, **kw)


def wait_for(get: Callable[[], T], done: Callable[[T], bool], seen: list[T] | None = None) -> T:
    deadline = time.monotonic() + 10
    while True:
        value = get()
        if seen is not None:
            seen.append(value)
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


# -- real time: answers ---------------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(pydantic.BaseModel):
    street: str = pydantic.Field(min_length=12, max_length=40)
    zip: str | None


class Node(pydantic.BaseModel):
    name: str
    children: list[Node] = []


class Person(pydantic.BaseModel):
    """Most of what a pydantic schema can say: $defs, enums, bounds, formats, unions."""

    name: str
    age: int = pydantic.Field(ge=18, le=99)
    score: float = pydantic.Field(gt=0, lt=1)
    even: int = pydantic.Field(multiple_of=2, gt=1000)
    colour: Colour
    kind: Literal["a", "b"]
    tags: list[str] = pydantic.Field(min_length=2, max_length=3)
    home: Address
    others: list[Address]
    born: dt.date
    seen: dt.datetime
    id: uuid.UUID
    counts: dict[str, int]
    pair: tuple[int, str]
    tree: Node
    maybe: Address | None = None
    either: int | str


PERSON = Person.model_json_schema()


def check(value: Any, schema: dict[str, Any]) -> None:
    jsonschema.validate(
        value, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def test_chat_text_usage_headers_and_max_tokens(fake: FakeProvider) -> None:
    c = oai(fake)
    raw = c.chat.completions.with_raw_response.create(model="gpt-x", messages=USER)
    r = raw.parse()
    assert raw.headers["x-request-id"].startswith("req_") and r._request_id
    assert raw.headers["content-type"] == "application/json"
    assert r.model == "gpt-x" and r.choices[0].message.content == "echo: hello"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    long = [{"role": "user", "content": "a long question " * 20}]
    r = c.chat.completions.create(model="m", messages=long, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens <= 3
    assert r.choices[0].message.content.startswith("echo: a lo")
    a = ant(fake)
    raw = a.messages.with_raw_response.create(model="claude-x", max_tokens=50, messages=USER)
    m = raw.parse()
    assert raw.headers["request-id"].startswith("req_")
    assert m.content[0].text == "echo: hello" and m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0 and m.model == "claude-x"
    m = a.messages.create(model="c", max_tokens=3, messages=long, system="be brief")
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens <= 3


def test_structured_output_validates_pydantic_schemas(fake: FakeProvider) -> None:
    c = oai(fake)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    contents = set()
    for prompt in ("first", "second"):
        messages = [{"role": "user", "content": prompt}]
        r = c.chat.completions.create(model="m", messages=messages, response_format=fmt)
        content = r.choices[0].message.content
        check(json.loads(content), PERSON)
        Person.model_validate_json(content)  # formats too: date, datetime, uuid
        contents.add(content)
    assert len(contents) == 2  # derived from the prompt
    again = c.chat.completions.create(model="m", messages=messages, response_format=fmt)
    assert again.choices[0].message.content == content  # deterministic
    r = c.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    m = ant(fake).messages.create(
        model="c",
        max_tokens=50,
        messages=USER,
        tools=[{"name": "person", "input_schema": PERSON}],
        tool_choice={"type": "tool", "name": "person"},
    )
    assert m.stop_reason == "tool_use" and m.content[0].type == "tool_use"
    assert m.content[0].name == "person"
    Person.model_validate(m.content[0].input)
    fn = {"type": "function", "function": {"name": "f", "parameters": SCHEMA}}
    r = c.chat.completions.create(
        model="m",
        messages=USER,
        tools=[fn],
        tool_choice={"type": "function", "function": {"name": "f"}},
    )
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "f"
    check(json.loads(call.function.arguments), SCHEMA)


def test_invalid_answers_then_a_repair_is_valid(fake: FakeProvider) -> None:
    fake.knobs.invalid_json_rate = 1.0
    c = oai(fake)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    bad = c.chat.completions.create(model="m", messages=USER, response_format=fmt)
    content = bad.choices[0].message.content
    with pytest.raises(jsonschema.ValidationError):
        check(json.loads(content), PERSON)
    repair = [
        *USER,
        {"role": "assistant", "content": content},
        {"role": "user", "content": "That answer is invalid: 'name' is a required property."},
    ]
    good = c.chat.completions.create(model="m", messages=repair, response_format=fmt)
    Person.model_validate_json(good.choices[0].message.content)
    a = ant(fake)
    tools = [{"name": "t", "input_schema": SCHEMA}]
    choice = {"type": "tool", "name": "t"}
    m = a.messages.create(model="c", max_tokens=50, messages=USER, tools=tools, tool_choice=choice)
    with pytest.raises(jsonschema.ValidationError):
        check(m.content[0].input, SCHEMA)
    followup = [
        *USER,
        {"role": "assistant", "content": [m.content[0].model_dump()]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": m.content[0].id,
                    "content": "validation error: 'topic' is a required property",
                    "is_error": True,
                }
            ],
        },
    ]
    m = a.messages.create(
        model="c", max_tokens=50, messages=followup, tools=tools, tool_choice=choice
    )
    check(m.content[0].input, SCHEMA)
    # json_object without a schema: a broken answer is not JSON at all
    r = c.chat.completions.create(model="m", messages=USER, response_format={"type": "json_object"})
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_embeddings(fake: FakeProvider) -> None:
    c = oai(fake)
    e = c.embeddings.create(model="emb", input=["a", "b", "a"])  # the SDK asks for base64
    vectors = [d.embedding for d in e.data]
    assert [d.index for d in e.data] == [0, 1, 2] and all(len(v) == 8 for v in vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert e.model == "emb" and e.usage.prompt_tokens == e.usage.total_tokens > 0
    f = c.embeddings.create(model="emb", input="a", dimensions=4, encoding_format="float")
    g = c.embeddings.create(model="emb", input="a", dimensions=4)
    assert len(f.data) == 1 and len(f.data[0].embedding) == 4
    assert all(
        math.isclose(x, y, rel_tol=1e-6)
        for x, y in zip(f.data[0].embedding, g.data[0].embedding, strict=True)
    )
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="missing-model", input="a")


def test_async_requests_are_served_concurrently(fake: FakeProvider) -> None:
    fake.knobs.latency = 2.0  # long enough for all 8 to be sent while the first waits

    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=fake.openai_url, api_key="k", max_retries=0)
        messages = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
        rs = await asyncio.gather(
            *(c.chat.completions.create(model="m", messages=m) for m in messages)
        )
        return [r.choices[0].message.content for r in rs]

    assert asyncio.run(main()) == [f"echo: q{i}" for i in range(8)]
    assert fake.stats.peak_in_flight == 8 and fake.stats.in_flight == 0  # all at once
    assert fake.stats.requests["/v1/chat/completions"] == 8
    seen = fake.stats.realtime
    assert len(seen) == 8 and all(s.status == 200 and s.tokens > 0 for s in seen)
    assert max(s.arrived for s in seen) < min(s.answered for s in seen)


# -- real time: faults ----------------------------------------------------------------------


def test_rpm_limit_429_with_retry_after_in_each_shape(fake: FakeProvider) -> None:
    fake.knobs.rpm_limit = 2
    c, a = oai(fake), ant(fake)
    raw = c.chat.completions.with_raw_response.create(model="m", messages=USER)
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    a.messages.create(model="c", max_tokens=5, messages=USER)
    with pytest.raises(openai.RateLimitError) as oe:
        c.chat.completions.create(model="m", messages=USER)
    headers = oe.value.response.headers
    assert 59_000 <= int(headers["retry-after-ms"]) <= 60_000 and float(headers["retry-after"]) > 59
    assert oe.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as ae:
        a.messages.create(model="c", max_tokens=5, messages=USER)
    assert ae.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "retry-after-ms" in ae.value.response.headers
    assert fake.stats.rate_limited == 2 and fake.stats.status_counts[429] == 2
    # The SDK waits as retry-after-ms says (its own backoff would be at most 0.5 s), then
    # succeeds.
    fake.knobs.rpm_limit, fake.knobs.throttle_next, fake.knobs.throttle_seconds = None, 1, 1.0
    t0 = time.monotonic()
    r = oai(fake, max_retries=1).chat.completions.create(model="m", messages=USER)
    assert r.choices[0].message.content == "echo: hello" and time.monotonic() - t0 >= 1.0
    assert fake.stats.rate_limited == 3


def test_500_timeout_malformed_refused(fake: FakeProvider) -> None:
    c, a = oai(fake), ant(fake)
    fake.knobs.fail_next = 2
    with pytest.raises(openai.InternalServerError) as oe:
        c.chat.completions.create(model="m", messages=USER)
    assert oe.value.type == "server_error"
    with pytest.raises(anthropic.InternalServerError) as ae:
        a.messages.create(model="c", max_tokens=5, messages=USER)
    assert ae.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert fake.stats.status_counts[500] == 2
    # A hang: the client's timeout fires, and other requests are not held up: one is
    # answered while the hung one is still inside the server.
    fake.knobs.timeout_next, fake.knobs.hang_seconds = 1, 5.0
    with pytest.raises(openai.APITimeoutError):
        oai(fake, timeout=0.2).chat.completions.create(model="m", messages=USER)
    assert c.chat.completions.create(model="m", messages=USER).choices[0].message.content
    assert fake.stats.in_flight == 1  # the hang goes on
    # 200 with a body that is not JSON: both SDKs let the decoder's error through.
    fake.knobs.malformed_next = 2
    with pytest.raises(json.JSONDecodeError):
        c.chat.completions.create(model="m", messages=USER)
    with pytest.raises(json.JSONDecodeError):
        a.messages.create(model="c", max_tokens=5, messages=USER)
    # Refused: the connection is reset; then the server is back.
    fake.knobs.refuse_connections = True
    with pytest.raises(openai.APIConnectionError):
        c.chat.completions.create(model="m", messages=USER)
    with pytest.raises(anthropic.APIConnectionError):
        ant(fake).messages.batches.list()
    assert fake.stats.connections_refused >= 2
    fake.knobs.refuse_connections = False
    assert c.chat.completions.create(model="m", messages=USER).choices[0].message.content


def test_fail_status_drop_and_out_of_quota(fake: FakeProvider) -> None:
    c, a = oai(fake), ant(fake)
    fake.knobs.fail_next, fake.knobs.fail_status = 2, 408
    with pytest.raises(openai.APIStatusError) as oe:
        c.chat.completions.create(model="m", messages=USER)
    assert oe.value.status_code == 408
    fake.knobs.fail_status = 409
    with pytest.raises(anthropic.ConflictError):
        a.messages.create(model="c", max_tokens=5, messages=USER)
    # Dropped: the request was read (counted), then the connection closed with no answer;
    # batch endpoints are not affected.
    fake.knobs.drop_next = 2
    assert ant(fake).messages.batches.list().data == []
    with pytest.raises(openai.APIConnectionError):
        oai(fake).embeddings.create(model="e", input="x")
    with pytest.raises(anthropic.APIConnectionError):
        ant(fake).messages.create(model="c", max_tokens=5, messages=USER)
    assert fake.stats.connections_dropped == 2 and fake.knobs.drop_next == 0
    assert fake.stats.requests["/v1/embeddings"] == 1  # counted, as it arrived
    assert fake.stats.requests["/v1/messages"] == 2
    assert c.chat.completions.create(model="m", messages=USER).choices[0].message.content
    # Out of quota: OpenAI's 429, without retry-after.
    fake.knobs.out_of_quota = True
    with pytest.raises(openai.RateLimitError) as rl:
        c.chat.completions.create(model="m", messages=USER)
    assert rl.value.code == "insufficient_quota" and "retry-after" not in rl.value.response.headers
    statuses = [s.status for s in fake.stats.realtime]
    assert statuses == [408, 409, 200, 429]  # dropped requests are never answered


def test_fail_rate_is_the_same_run_after_run() -> None:
    def pattern() -> list[bool]:
        with FakeProvider(Knobs(fail_rate=0.5)) as fake:
            c = oai(fake)
            out = []
            for _ in range(16):
                try:
                    c.chat.completions.create(model="m", messages=USER)
                    out.append(True)
                except openai.InternalServerError:
                    out.append(False)
            return out

    first = pattern()
    assert 2 <= first.count(False) <= 14 and pattern() == first


def test_keys_missing_models_and_bad_bodies(fake: FakeProvider) -> None:
    fake.knobs.require_key = "right"
    with pytest.raises(openai.AuthenticationError) as oe:
        oai(fake).chat.completions.create(model="m", messages=USER)
    assert oe.value.code == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError):
        ant(fake).messages.create(model="c", max_tokens=5, messages=USER)
    with pytest.raises(anthropic.AuthenticationError):
        ant(fake).messages.batches.list()  # the batch endpoints too
    c = oai(fake, api_key="right")  # Authorization: Bearer
    assert c.chat.completions.create(model="m", messages=USER).choices
    a = ant(fake, api_key="right")  # x-api-key
    assert a.messages.create(model="c", max_tokens=5, messages=USER).content
    bearer = ant(fake, api_key=None, auth_token="right")  # Authorization: Bearer
    assert bearer.messages.create(model="c", max_tokens=5, messages=USER).content
    with pytest.raises(openai.NotFoundError) as oe:
        c.chat.completions.create(model="missing-model", messages=USER)
    assert oe.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError, match="missing-model") as ae:
        a.messages.create(model="missing-model", max_tokens=5, messages=USER)
    assert ae.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="messages"):
        c.chat.completions.create(model="m", messages=[])
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        a.messages.create(model="c", max_tokens=0, messages=USER)
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        c.get("/no/such/path", cast_to=object)
    assert fake.stats.status_counts[401] == 3 and fake.stats.status_counts[404] == 3


# -- OpenAI batches -------------------------------------------------------------------------


def line(cid: str, model: str = "m", url: str = "/v1/chat/completions", **body: Any) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": cid}], **body}
    record = {"custom_id": cid, "method": "POST", "url": url, "body": body}
    return (json.dumps(record) + "\n").encode()


def upload(c: openai.OpenAI, data: bytes, name: str = "in.jsonl") -> str:
    return c.files.create(file=(name, io.BytesIO(data)), purpose="batch").id


def create(c: openai.OpenAI, file_id: str, **kw: Any) -> Any:
    return c.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h", **kw
    )


def jsonl(c: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [json.loads(x) for x in c.files.content(file_id).text.splitlines()] if file_id else []


def test_openai_batch_full_flow(fake: FakeProvider) -> None:
    c = oai(fake)
    ids = [f"r{i}" for i in range(20)]
    data = b"".join(line(i) for i in ids) + line("bad", messages=[])  # the endpoint refuses it
    f = c.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert (f.object, f.bytes, f.purpose, f.filename, f.status) == (
        "file",
        len(data),
        "batch",
        "in.jsonl",
        "processed",
    )
    assert f.expires_at == f.created_at + 30 * 86400
    assert fake.stats.files_uploaded == 1 and fake.stats.bytes_uploaded == len(data)
    b = create(c, f.id, metadata={"job": "j1"})
    assert b.status == "validating" and b.request_counts.total == 21
    assert b.expires_at == b.created_at + 86400 and b.metadata == {"job": "j1"}
    seen: list[Any] = []
    b = wait_for(lambda: c.batches.retrieve(b.id), lambda x: x.status == "completed", seen)
    statuses = [s.status for s in seen]
    order = ["in_progress", "finalizing", "completed"]
    assert statuses == sorted(statuses, key=order.index) and "in_progress" in statuses
    done = [s.request_counts.completed for s in seen]
    assert done == sorted(done)
    assert (b.request_counts.completed, b.request_counts.failed) == (20, 1)
    assert b.completed_at and b.in_progress_at and b.finalizing_at and b.model == "m"
    assert b.usage.input_tokens > 0 and b.usage.total_tokens > b.usage.input_tokens
    out = jsonl(c, b.output_file_id)
    assert [r["custom_id"] for r in out] != ids  # not in input order ...
    assert sorted(r["custom_id"] for r in out) == sorted(ids)  # ... but all there
    r5 = next(r for r in out if r["custom_id"] == "r5")
    assert r5["error"] is None and r5["response"]["status_code"] == 200
    assert r5["response"]["body"]["choices"][0]["message"]["content"] == "echo: r5"
    (err,) = jsonl(c, b.error_file_id)
    assert err["custom_id"] == "bad" and err["response"]["status_code"] == 400
    assert err["response"]["body"]["error"]["param"] == "messages"
    # the files API around it
    listed = [x.id for x in c.files.list()]
    assert listed[0] == b.error_file_id and set(listed) == {f.id, b.output_file_id, b.error_file_id}
    assert [x.id for x in c.files.list(purpose="batch")] == [f.id]
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_openai_batch_validation(fake: FakeProvider) -> None:
    c = oai(fake)
    cases = {
        "invalid_json_line": (line("a") + b"{not json\n", 2),
        "duplicate_custom_id": (line("a") + line("b") + line("a"), 3),
        "url_mismatch": (line("a") + line("b", url="/v1/embeddings"), 2),
        "model_mismatch": (line("a") + line("b", model="other"), 2),
        "empty_file": (b"\n", None),
    }
    for code, (data, number) in cases.items():
        b = create(c, upload(c, data))
        b = wait_for(lambda b=b: c.batches.retrieve(b.id), lambda x: x.status != "validating")
        assert b.status == "failed" and b.failed_at
        assert (b.errors.data[0].code, b.errors.data[0].line) == (code, number)
    fake.knobs.fail_validation = True  # one batch, then back to normal
    good = upload(c, line("a") + line("b"))
    b = c.batches.retrieve(create(c, good).id)
    assert b.status == "failed" and b.errors.data[0].line == 1
    b = create(c, good)
    b = wait_for(lambda: c.batches.retrieve(b.id), lambda x: x.status == "completed")
    assert b.status == "completed"
    with pytest.raises(openai.BadRequestError, match="jsonl"):
        upload(c, line("a"), name="in.txt")
    fake.knobs.max_batch_bytes = 100
    with pytest.raises(openai.APIStatusError) as info:
        upload(c, line("a") * 3)
    assert info.value.status_code == 413
    fake.knobs.max_batch_bytes, fake.knobs.max_batch_requests = None, 1
    with pytest.raises(openai.BadRequestError):
        create(c, good)


def test_openai_batch_expiry_cancel_listing(fake: FakeProvider) -> None:
    c = oai(fake)
    f = upload(c, b"".join(line(f"r{i}") for i in range(6)))
    fake.knobs.expire_batches = True
    b = create(c, f)
    b = wait_for(lambda: c.batches.retrieve(b.id), lambda x: x.status == "expired")
    assert b.expired_at and (b.request_counts.completed, b.request_counts.failed) == (3, 3)
    errors = jsonl(c, b.error_file_id)
    assert len(jsonl(c, b.output_file_id)) == 3 and len(errors) == 3
    assert all(e["error"]["code"] == "batch_expired" and e["response"] is None for e in errors)
    fake.knobs.expire_batches, fake.knobs.batch_seconds = False, 30
    x = create(c, f)
    assert c.batches.cancel(x.id).status == "cancelling"
    x = wait_for(lambda: c.batches.retrieve(x.id), lambda b: b.status == "cancelled")
    assert x.cancelled_at and x.cancelling_at and x.request_counts.completed == 3
    assert {e["error"]["code"] for e in jsonl(c, x.error_file_id)} == {"batch_cancelled"}
    y = create(c, f)
    ids = [y.id, x.id, b.id]  # newest first
    page = c.batches.list(limit=2)
    assert [p.id for p in page.data] == ids[:2] and page.has_more
    assert [p.id for p in c.batches.list(limit=1)] == ids  # the SDK pages with `after`
    assert [p.id for p in c.batches.list(after=ids[0])] == ids[1:]
    assert c.batches.retrieve(y.id).status == "in_progress"
    fake.complete_batches()
    assert c.batches.retrieve(y.id).status == "completed"
    assert fake.stats.batch_creations == 3 and fake.stats.batch_items["r0"] == 3


# -- Anthropic message batches --------------------------------------------------------------


def request(cid: str, model: str = "c", max_tokens: int = 20) -> dict[str, Any]:
    params = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": cid}],
    }
    return {"custom_id": cid, "params": params}


def test_anthropic_batch_full_flow(fake: FakeProvider) -> None:
    a = ant(fake)
    reqs = [request(f"q{i}") for i in range(4)]
    reqs += [request("gone", model="missing-model"), request("zero", max_tokens=0)]
    b = a.messages.batches.create(requests=reqs)
    assert b.processing_status == "in_progress" and b.results_url is None and b.ended_at is None
    counts = b.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (6, 0, 0)
    assert b.expires_at - b.created_at == dt.timedelta(days=1)
    assert b.created_at.tzinfo is not None
    b = wait_for(
        lambda: a.messages.batches.retrieve(b.id), lambda x: x.processing_status == "ended"
    )
    counts = b.request_counts
    assert (counts.processing, counts.succeeded, counts.errored) == (0, 4, 2)
    assert b.results_url == f"/v1/messages/batches/{b.id}/results" and b.ended_at
    results = {r.custom_id: r.result for r in a.messages.batches.results(b.id)}
    assert results["q2"].type == "succeeded" and results["q2"].message.content[0].text == "echo: q2"
    assert (
        results["gone"].type == "errored" and results["gone"].error.error.type == "not_found_error"
    )
    assert results["zero"].error.error.type == "invalid_request_error"
    # the beta client (?beta=true, anthropic-beta header) sees the same
    beta = a.beta.messages.batches
    assert beta.retrieve(b.id).processing_status == "ended"
    assert sorted(r.custom_id for r in beta.results(b.id)) == sorted(results)
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        a.messages.batches.create(requests=[request("has.dot")])
    with pytest.raises(anthropic.BadRequestError, match="duplicate"):
        a.messages.batches.create(requests=[request("x"), request("x")])
    fake.knobs.max_batch_bytes = 300
    with pytest.raises(anthropic.APIStatusError) as info:
        a.messages.batches.create(requests=reqs)
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    a.messages.batches.delete(b.id)
    with pytest.raises(anthropic.NotFoundError):
        a.messages.batches.retrieve(b.id)


def test_anthropic_cancel_expiry_listing(fake: FakeProvider) -> None:
    a = ant(fake)
    reqs = [request(f"q{i}") for i in range(4)]
    fake.knobs.expire_batches = True
    e = a.messages.batches.create(requests=reqs)
    e = wait_for(
        lambda: a.messages.batches.retrieve(e.id), lambda x: x.processing_status == "ended"
    )
    assert (e.request_counts.succeeded, e.request_counts.expired) == (2, 2)
    kinds = sorted(r.result.type for r in a.messages.batches.results(e.id))
    assert kinds == ["expired", "expired", "succeeded", "succeeded"]
    fake.knobs.expire_batches, fake.knobs.batch_seconds = False, 30
    x = a.messages.batches.create(requests=reqs)
    with pytest.raises(anthropic.BadRequestError):
        a.messages.batches.delete(x.id)  # still in progress
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        list(a.messages.batches.results(x.id))  # the SDK checks before it asks
    canceling = a.messages.batches.cancel(x.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at
    x = a.messages.batches.retrieve(x.id)
    assert x.processing_status == "ended"
    assert (x.request_counts.succeeded, x.request_counts.canceled) == (2, 2)
    assert {r.result.type for r in a.messages.batches.results(x.id)} == {"succeeded", "canceled"}
    y = a.messages.batches.create(requests=reqs)
    z = a.messages.batches.create(requests=reqs)
    ids = [z.id, y.id, x.id, e.id]  # newest first
    page = a.messages.batches.list(limit=2)
    assert [p.id for p in page.data] == ids[:2] and page.has_more
    assert (page.first_id, page.last_id) == (ids[0], ids[1])
    assert [p.id for p in a.messages.batches.list(limit=1)] == ids  # pages with after_id
    # before_id: the page just before (newer than) it; the SDK then pages with first_id
    assert [p.id for p in a.messages.batches.list(limit=1, before_id=e.id)] == ids[2::-1]
    assert fake.stats.batch_creations == 4 and fake.stats.batch_items["q0"] == 4
    fake.complete_batches()
    assert a.messages.batches.retrieve(z.id).processing_status == "ended"


def test_batch_items_count_every_submission_on_both_providers(fake: FakeProvider) -> None:
    c, a = oai(fake), ant(fake)
    create(c, upload(c, line("same") + line("other")))
    a.messages.batches.create(requests=[request("same")])
    fake.knobs.max_batch_bytes = 10
    with pytest.raises(anthropic.APIStatusError):
        a.messages.batches.create(requests=[request("same")])  # refused: not submitted
    assert fake.stats.batch_creations == 2
    assert fake.stats.batch_items == {"same": 2, "other": 1}
    snap = fake.stats.snapshot()
    assert (
        snap.batch_items == fake.stats.batch_items
        and snap.batch_items is not fake.stats.batch_items
    )


# -- the server itself ----------------------------------------------------------------------


def test_stop_and_start_again_keeps_the_port_and_the_batches(fake: FakeProvider) -> None:
    a = ant(fake)
    b = a.messages.batches.create(requests=[request("q")])
    fake.stop()
    with pytest.raises(anthropic.APIConnectionError):
        a.messages.batches.retrieve(b.id)
    fake.start()
    assert a.messages.batches.retrieve(b.id).id == b.id


def test_cli_serves_until_interrupted() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "overnight.testing.fake_provider", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--batch-seconds", "0.1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        urls = [proc.stdout.readline().split()[-1] for _ in range(2)]
        assert urls == [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}"]
        c = openai.OpenAI(base_url=urls[0], api_key="k", max_retries=0)
        assert c.chat.completions.create(model="m", messages=USER).choices[0].message.content
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
