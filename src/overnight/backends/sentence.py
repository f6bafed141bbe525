"""backend = "local": embed and classify with the embedded sentence-transformers model."""

from __future__ import annotations

from typing import Any

from .classify_head import ClassifierHead
from .local import LocalModel


class LocalEmbed:
    auto_start = 8
    auto_max = 256
    # sentence-transformers sorts a call's texts by length before batching them: 1,024 texts
    # a call keep padding low (measured on 2,000 tickets: 1.55x the texts/s of calls of 32 in
    # input order; 1,024 a call reached 0.95x a single sorted call over all of them).
    window = 1024

    def __init__(self, model: LocalModel) -> None:
        self.model = model
        # The first call pays for lazy initialisation; let it count as loading the model.
        self.model.embed(["warm up"])

    def process(self, inputs: list[str], batch_size: int) -> list[Any]:
        return list(self.model.embed(inputs, batch_size=batch_size))

    def close(self) -> None:
        pass


class LocalClassify(LocalEmbed):
    """Embeds the text, then a head picks the label: zero-shot against label descriptions, or
    a logistic regression fitted on the user's labelled examples."""

    def __init__(self, model: LocalModel, head: ClassifierHead) -> None:
        super().__init__(model)
        self.head = head

    def process(self, inputs: list[str], batch_size: int) -> list[Any]:
        return self.head.predict(self.model.embed(inputs, batch_size=batch_size))


def build_head(
    model: LocalModel,
    labels: dict[str, str],
    example_texts: list[str] | None,
    example_labels: list[str] | None,
) -> ClassifierHead:
    if not example_texts:
        return ClassifierHead.zero_shot(model, labels)
    embeddings = model.embed(example_texts, batch_size=32)
    return ClassifierHead.fit(embeddings, example_labels or [], label_set=list(labels))


def build(
    name: str,
    device: str,
    kind: str,
    labels: dict[str, str],
    example_texts: list[str] | None = None,
    example_labels: list[str] | None = None,
) -> LocalEmbed:
    """The predictor from plain data (what a worker process is handed to build it itself):
    loading the model imports torch, so only the process that computes calls this."""
    model = LocalModel(name, device=device)
    if kind == "embed":
        return LocalEmbed(model)
    return LocalClassify(model, build_head(model, labels, example_texts, example_labels))
