"""The README's runnable examples: examples/llm/*.toml against the fake provider, and
examples/self-hosted/*.toml on the real SmolLM2 in the process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import overnight
from overnight.testing.fake_provider import FakeProvider

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "llm"


@pytest.mark.usefixtures("keys")
@pytest.mark.parametrize("name", sorted(p.stem for p in EXAMPLES.glob("*.toml")))
def test_example_runs(tmp_path: Path, fake: FakeProvider, name: str) -> None:
    for f in EXAMPLES.iterdir():
        if f.is_file():  # not out/ or .overnight/ left by running the examples by hand
            shutil.copy(f, tmp_path / f.name)
    job_file = tmp_path / f"{name}.toml"
    text = job_file.read_text().replace("http://127.0.0.1:8000", f"http://127.0.0.1:{fake.port}")
    job_file.write_text(text)
    job = overnight.Job.from_file(job_file)
    # Every example that waits on provider batches polls the fake (batches of 0.2 s) fast,
    # whatever its own poll_interval says: set on the loaded spec, not by editing the text.
    model = job.spec.model.model_copy(update={"poll_interval": 0.05})
    job.spec = job.spec.model_copy(update={"model": model})
    assert job.estimate().items >= 3
    report = job.run()
    assert report.exit_code == 0, (report.to_dict(), job.failures())
    assert report.output is not None and report.output.exists()


SELF_HOSTED = Path(__file__).resolve().parent.parent / "examples" / "self-hosted"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in SELF_HOSTED.glob("*.toml")))
def test_self_hosted_example_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The self-hosted examples (examples/self-hosted/*.toml) on the real SmolLM2, in the
    worker process, as the README shows them."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker's torch: see test_transformers.py
    for f in SELF_HOSTED.iterdir():
        if f.is_file():
            shutil.copy(f, tmp_path / f.name)
    report = overnight.Job.from_file(tmp_path / f"{name}.toml").run()
    assert report.exit_code == 0, report.to_dict()
    assert report.output is not None and report.counts["succeeded"] == 5
    assert report.counts.input_tokens > 0
