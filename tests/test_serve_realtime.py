"""`overnight serve`'s real-time endpoints (/v1/embeddings, /v1/chat/completions,
/v1/messages) and their micro-batching, through the official `openai` and `anthropic` SDKs."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx2
import numpy as np
import openai
import orjson
import psutil
import pytest
from serve_helpers import client, free_port, serving, start_process, upload, wait_for

from overnight.errors import JobFileError
from overnight.service.config import load_config

# Each call of the function appends "kind size start end" to calls.log: kind is "rt" for a
# real-time request, "batch" for a batch line. A message "slow" takes SLOW seconds a call,
# "boom" raises; a batch line sleeps BATCH_SLEEP.
FUNCTION = """
import os
import time
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
SLOW = float(os.environ.get("RT_TEST_SLOW", "0.5"))
BATCH_SLEEP = float(os.environ.get("RT_TEST_BATCH_SLEEP", "0.3"))
def answer(lines):
    start = time.time()
    kind = "rt" if lines[0]["custom_id"].startswith("rt_") else "batch"
    if kind == "batch":
        time.sleep(BATCH_SLEEP)
    out = []
    for line in lines:
        if line["url"] == "/v1/embeddings":
            text = line["body"]["input"]
            if isinstance(text, list):
                out.append([[float(len(t)), 1.0] for t in text])
            else:
                out.append([float(len(text)), 1.0])
            continue
        text = line["body"]["messages"][-1]["content"]
        if text == "boom":
            raise ValueError("the model refused this one")
        if text == "slow":
            time.sleep(SLOW)
        out.append(text[::-1])
    with open(LOG, "a") as f:
        f.write(f"{kind} {len(lines)} {start} {time.time()}\\n")
    return out
"""


def write(folder: Path, intake: str = "", extra: str = "", run: str = "batch_size = 1") -> Path:
    (folder / "rtfn.py").write_text(FUNCTION)
    config = folder / "serve.toml"
    config.write_text(
        f'ledger = "state/ledger.db"\n{extra}\n[intake]\n{intake}\n[run]\n{run}\n'
        '[models.rev]\nbackend = "python"\nfunction = "rtfn:answer"\n'
    )
    return config


def calls(folder: Path, kind: str = "rt") -> list[tuple[int, float, float]]:
    path = folder / "calls.log"
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(int(n), float(a), float(b)) for k, n, a, b in rows if k == kind]


def ask(text: str, model: str = "rev") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def test_shapes_through_the_sdks(tmp_path: Path) -> None:
    with serving(write(tmp_path)) as url:
        oai = client(url)
        chat = oai.chat.completions.create(**ask("hello"))
        assert chat.object == "chat.completion"
        assert chat.choices[0].message.content == "olleh"
        assert chat.choices[0].finish_reason == "stop"
        assert chat.model == "rev"
        # The function gets the request as a batch line: url and body.
        one = oai.embeddings.create(model="rev", input="abcd")
        assert [d.embedding for d in one.data] == [[4.0, 1.0]]
        many = oai.embeddings.create(model="rev", input=["a", "bb"], encoding_format="float")
        assert [d.embedding for d in many.data] == [[1.0, 1.0], [2.0, 1.0]]
        assert [d.index for d in many.data] == [0, 1]

        claude = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="k", max_retries=0)
        message = claude.messages.create(
            model="rev", max_tokens=16, messages=[{"role": "user", "content": "dlrow"}]
        )
        assert message.type == "message"
        assert message.content[0].type == "text"
        assert message.content[0].text == "world"  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn"


def test_errors_have_the_providers_shapes(tmp_path: Path) -> None:
    with serving(write(tmp_path)) as url:
        oai = client(url)
        with pytest.raises(openai.NotFoundError) as err:
            oai.embeddings.create(model="nope", input="x")
        assert err.value.code == "model_not_found"
        assert err.value.body["param"] == "model"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(**ask("x", model="nope"))
        with pytest.raises(openai.BadRequestError) as err:
            oai.embeddings.create(model="rev", input=[])
        assert err.value.body["param"] == "input"  # type: ignore[index]
        streamed = httpx2.post(f"{url}/chat/completions", json={**ask("x"), "stream": True})
        assert streamed.status_code == 400
        assert streamed.json()["error"]["param"] == "stream"
        # A request whose call raises is a 500 of its own; the function's message is in it.
        with pytest.raises(openai.InternalServerError) as err:
            oai.chat.completions.create(**ask("boom"))
        assert "the model refused this one" in err.value.message
        assert err.value.body["type"] == "server_error"  # type: ignore[index]

        claude = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="k", max_retries=0)
        with pytest.raises(anthropic.NotFoundError) as aerr:
            claude.messages.create(
                model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        assert aerr.value.body == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "model: nope"},
        }
        raw = httpx2.post(f"{url}/messages", json=ask("x"), timeout=10)
        assert raw.status_code == 400
        assert raw.json()["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in raw.json()["error"]["message"]
        bad = httpx2.post(f"{url}/chat/completions", content=b"{nope", timeout=10)
        assert bad.status_code == 400
        assert bad.json()["error"]["message"] == "The body is not valid JSON."


def test_a_call_that_fails_fails_only_its_own_request(tmp_path: Path) -> None:
    config = write(tmp_path, intake="max_batch_size = 8\nmax_wait_ms = 300")
    with serving(config) as url:
        oai = client(url)

        def one(text: str) -> str:
            try:
                return oai.chat.completions.create(**ask(text)).choices[0].message.content or ""
            except openai.InternalServerError:
                return "500"

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, ["abc", "boom", "xyz", "boom"]))
    assert answers == ["cba", "500", "zyx", "500"]


def test_requests_need_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RT_TEST_KEYS", "key-a:tenant-a")
    config = write(tmp_path, extra='[auth]\nkeys_env = "RT_TEST_KEYS"')
    with serving(config) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(**ask("x"))
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").embeddings.create(model="rev", input="x")
        assert (
            httpx2.post(f"{url}/embeddings", json={"model": "rev", "input": "x"}).status_code == 401
        )
        assert (
            client(url, "key-a").chat.completions.create(**ask("ab")).choices[0].message.content
            == "ba"
        )
        base = url.removesuffix("/v1")
        with pytest.raises(anthropic.AuthenticationError) as err:
            anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
                model="rev", max_tokens=8, messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        claude = anthropic.Anthropic(base_url=base, api_key="key-a", max_retries=0)
        message = claude.messages.create(
            model="rev", max_tokens=8, messages=[{"role": "user", "content": "yx"}]
        )
        assert message.content[0].text == "xy"  # type: ignore[union-attr]


def test_concurrent_requests_share_model_calls(tmp_path: Path) -> None:
    config = write(tmp_path, intake="max_batch_size = 8\nmax_wait_ms = 100")
    n = 32
    with serving(config) as url:

        async def burst() -> list[str]:
            async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as oai:
                answers = await asyncio.gather(
                    *(oai.chat.completions.create(**ask(f"text {i}")) for i in range(n))
                )
            return [a.choices[0].message.content or "" for a in answers]

        answers = asyncio.run(burst())
        scraped = httpx2.get(url.removesuffix("/v1") + "/metrics").text
    assert answers == [f"text {i}"[::-1] for i in range(n)]  # each its own answer
    sizes = [size for size, _, _ in calls(tmp_path)]
    assert sum(sizes) == n
    assert max(sizes) <= 8
    assert len(sizes) <= n // 2, sizes  # 32 requests, far fewer calls (4 when all arrive at once)
    # /metrics saw the same calls: their count, the requests they served, the queue empty now
    assert f'overnight_model_batch_size_count{{model="rev"}} {float(len(sizes))}' in scraped
    assert f'overnight_model_batch_size_sum{{model="rev"}} {float(n)}' in scraped
    assert f'overnight_model_call_duration_seconds_count{{model="rev"}} {float(len(sizes))}' in (
        scraped
    )
    assert 'overnight_queue_depth{model="rev"} 0.0' in scraped


def test_a_full_queue_answers_429_with_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT_TEST_SLOW", "0.5")
    config = write(tmp_path, intake="max_batch_size = 1\nmax_wait_ms = 0\nmax_queue = 2")
    with serving(config) as url:

        async def burst() -> list[httpx2.Response]:
            async with httpx2.AsyncClient(timeout=30) as http:
                return await asyncio.gather(
                    *(http.post(f"{url}/chat/completions", json=ask("slow")) for _ in range(8))
                )

        answers = asyncio.run(burst())
        statuses = sorted(r.status_code for r in answers)
        # Two queued (and, once the thread took one, one computing): the rest refused at once.
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        assert set(statuses) == {200, 429}
        refused = next(r for r in answers if r.status_code == 429)
        assert int(refused.headers["retry-after"]) >= 1
        assert int(refused.headers["retry-after-ms"]) >= 500  # a call takes 0.5 s
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        # The SDK sees a RateLimitError (and, left to its retries, honours Retry-After).
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(client(url).chat.completions.create, **ask("slow")) for _ in range(8)
            ]
            errors = [f.exception() for f in futures]
        assert any(isinstance(e, openai.RateLimitError) for e in errors)
        claude = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="k", max_retries=0)
        with ThreadPoolExecutor(8) as pool:
            futures = [
                pool.submit(
                    claude.messages.create,
                    model="rev",
                    max_tokens=8,
                    messages=[{"role": "user", "content": "slow"}],
                )
                for _ in range(8)
            ]
            errors = [f.exception() for f in futures]
        limited = [e for e in errors if isinstance(e, anthropic.RateLimitError)]
        assert limited and limited[0].body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_a_thousand_connections_are_each_answered_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    config = write(tmp_path, intake="max_batch_size = 32\nmax_wait_ms = 10\nmax_queue = 128")
    proc = start_process(config, port := free_port())
    url = f"http://127.0.0.1:{port}/v1"
    try:
        server = psutil.Process(proc.pid)

        async def wave(n: int) -> list[int]:
            limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)
            async with httpx2.AsyncClient(timeout=120, limits=limits) as http:

                async def one(i: int) -> int:
                    r = await http.post(f"{url}/chat/completions", json=ask(f"t{i}"))
                    assert (
                        r.status_code != 200
                        or r.json()["choices"][0]["message"]["content"] == f"t{i}"[::-1]
                    )
                    return r.status_code

                return await asyncio.gather(*(one(i) for i in range(n)))

        asyncio.run(wave(50))  # warm: the function imported, the pools grown
        before = server.memory_info().rss
        statuses = asyncio.run(wave(1000))
        middle = server.memory_info().rss
        statuses += asyncio.run(wave(1000))
        after = server.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(30)
    assert len(statuses) == 2000
    assert set(statuses) <= {200, 429}, set(statuses)  # none lost, none failed
    assert statuses.count(200) >= 128  # at least a queue's worth served each time
    # A second thousand costs (almost) nothing more: nothing piles up.
    assert after - middle < 30 * 2**20, (before, middle, after)
    assert after - before < 120 * 2**20, (before, middle, after)


def test_batch_work_gives_way_to_realtime_requests_on_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT_TEST_BATCH_SLEEP", "0.3")
    config = write(tmp_path, intake="max_batch_size = 8\nmax_wait_ms = 5")
    lines = [
        {
            "custom_id": f"b{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": ask(f"line {i}"),
        }
        for i in range(60)
    ]
    with serving(config) as url:
        oai = client(url)
        batch = oai.batches.create(
            input_file_id=upload(oai, lines),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        deadline = time.monotonic() + 60
        while len(calls(tmp_path, "batch")) < 2:  # the batch's job is computing
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop = time.time() + 3.0
        answered = []

        def client_loop(k: int) -> None:
            own = client(url)
            while time.time() < stop:
                text = f"rt {k}"
                got = own.chat.completions.create(**ask(text)).choices[0].message.content
                answered.append(got == text[::-1])

        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rt = calls(tmp_path, "rt")
        first, last = min(a for _, a, _ in rt), max(b for _, _, b in rt)
        started = [a for _, a, _ in calls(tmp_path, "batch") if first < a < last]
        # Without priority ~10 batch calls (0.3 s each) would start in these 3 s; the job
        # yields at its next commit (the runner groups ~0.5 s of calls), then waits.
        assert all(answered) and len(answered) > 20
        assert len(started) <= 3, (len(started), last - first)
        time.sleep(1.0)  # real-time work quiet: the batch goes on
        assert any(a > last for _, a, _ in calls(tmp_path, "batch"))
        oai.batches.cancel(batch.id)
        wait_for(oai, batch.id, ("cancelled",))


def test_the_local_model_embeds_and_classifies_with_labels(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        intake="max_batch_size = 16\nmax_wait_ms = 50",
        extra="",
    )
    config.write_text(
        config.read_text()
        + '[models.mini]\nbackend = "local"\n'
        + '[models.sorter]\nbackend = "local"\n'
        + 'labels = { billing = "a question about an invoice, a charge or a refund",'
        + ' bug = "the software crashes or shows an error message" }\n'
    )
    with serving(config) as url:
        oai = client(url)
        # The SDK asks for base64 unless told otherwise, and decodes it.
        got = oai.embeddings.create(model="mini", input=["the app crashes", "refund please"])
        floats = oai.embeddings.create(
            model="mini", input="the app crashes", encoding_format="float"
        )
        a = np.array(got.data[0].embedding)
        assert a.shape == (384,)
        assert abs(np.linalg.norm(a) - 1) < 1e-4
        assert np.allclose(a, floats.data[0].embedding, atol=1e-6)
        assert not np.allclose(a, got.data[1].embedding)
        label = oai.chat.completions.create(
            **ask("I was charged twice for my subscription", "sorter")
        )
        assert label.choices[0].message.content == "billing"
        claude = anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="k", max_retries=0)
        message = claude.messages.create(
            model="sorter",
            max_tokens=4,
            messages=[{"role": "user", "content": "It crashes with an error when I click save"}],
        )
        assert message.content[0].text == "bug"  # type: ignore[union-attr]
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(**ask("hello", "mini"))
        assert "labels" in err.value.message


def test_intake_settings_are_checked(tmp_path: Path) -> None:
    config = write(tmp_path, intake="max_batch_size = 0\nmax_wait = 3")
    with pytest.raises(JobFileError) as err:
        load_config(config)
    assert "[intake] max_batch_size: Input should be greater than 0" in str(err.value)
    assert "[intake] max_wait: unknown key" in str(err.value)
    config.write_text(config.read_text().replace("max_batch_size = 0\nmax_wait = 3", ""))
    config.write_text(config.read_text() + 'labels = ["a", "b"]\n')
    with pytest.raises(JobFileError) as err:
        load_config(config)
    assert "labels` applies to backend = 'local'" in str(err.value)
    ok = write(tmp_path, intake="max_batch_size = 4\nmax_wait_ms = 2.5\nmax_queue = 10")
    intake = load_config(ok).spec.intake
    assert (intake.max_batch_size, intake.max_wait_ms, intake.max_queue) == (4, 2.5, 10)
    assert orjson.loads(orjson.dumps(intake.model_dump())) == {
        "max_batch_size": 4,
        "max_wait_ms": 2.5,
        "max_queue": 10,
    }


def test_a_micro_batch_is_encoded_in_sub_batches_of_equal_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[run] batch_size = 8 and 9 texts: two sub-batches of 5 and 4, not 8 and 1 (a small
    batch's fixed cost paid for one text), each text still answered in its place."""
    from overnight.backends.local import LocalModel
    from overnight.service.realtime import Realtime

    config = write(tmp_path, run="batch_size = 8")
    config.write_text(config.read_text() + '[models.mini]\nbackend = "local"\n')
    served = load_config(config)
    sizes: list[int | None] = []
    embed = LocalModel.embed

    def spy(self: LocalModel, texts: list[str], batch_size: int | None = None) -> object:
        sizes.append(batch_size)
        return embed(self, texts, batch_size=batch_size)

    monkeypatch.setattr(LocalModel, "embed", spy)
    call = Realtime(served)._loader("mini", served.models["mini"])()
    texts = [f"ticket number {i} " * (i + 1) for i in range(9)]
    sizes.clear()  # the warm-up call
    together = np.array(call(texts))
    assert sizes == [5]
    alone = np.array([call([t])[0] for t in texts])
    assert np.allclose(together, alone, atol=1e-5)
