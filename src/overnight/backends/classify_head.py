"""Labels from embeddings: a zero-shot head (label descriptions) or a fitted one (examples).

The embedding model does the expensive work once per text; a head is a small, cheap map
from vectors to label probabilities, so it can be rebuilt (e.g. from the examples file) on
every run without re-embedding the data set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from overnight.backends.local import LocalModel

# Cosine similarities between MiniLM vectors sit in a narrow band (~0.0-0.6), so a plain
# softmax over them is almost uniform. Dividing by 0.05 spreads a 0.1 similarity gap into
# roughly a 7x probability ratio, which reads sensibly as a confidence.
ZERO_SHOT_TEMPERATURE = 0.05

# L2-normalised inputs are small; C=10 regularises lightly, which fits a few hundred
# examples of 384-d vectors best in our measurements (benchmarks/measure_classify_accuracy.py).
FIT_C = 10.0
FIT_MAX_ITER = 2000


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


class ClassifierHead:
    """Maps embeddings to (best label, {label: probability}) in a fixed label order."""

    labels: list[str]
    kind: str  # "zero-shot" or "fitted"

    def __init__(
        self, labels: Sequence[str], kind: str, *, prototypes: Any = None, clf: Any = None
    ):
        # Use the zero_shot / fit constructors; this one just holds the parts.
        self.labels = list(labels)
        self.kind = kind
        self._prototypes = prototypes  # (k, d) label-description vectors, zero-shot only
        self._clf = clf  # fitted sklearn LogisticRegression
        if clf is not None:
            # predict_proba columns follow clf.classes_ (sorted); map them to self.labels.
            position = {label: i for i, label in enumerate(clf.classes_)}
            self._columns = np.array([position[label] for label in self.labels])

    @classmethod
    def zero_shot(cls, model: LocalModel, labels: Mapping[str, str]) -> ClassifierHead:
        """A head from label -> description text; scores are a softmax of cosine similarities."""
        if len(labels) < 2:
            raise ValueError(f"zero-shot classification needs at least 2 labels, got {len(labels)}")
        names = list(labels)
        # Empty descriptions fall back to the label itself, so a bare label list still works.
        texts = [labels[name] or name for name in names]
        prototypes = np.asarray(model.embed(texts), dtype=np.float32)
        return cls(names, "zero-shot", prototypes=prototypes)

    @classmethod
    def fit(
        cls,
        embeddings: np.ndarray,
        labels: Sequence[str],
        label_set: Sequence[str] | None = None,
    ) -> ClassifierHead:
        """Fit a logistic regression on labelled example embeddings.

        label_set fixes the output labels and their order (default: order of first
        appearance). Every label in it must have at least one example: a class the head
        never saw would always score 0, which silently hides a gap in the examples file, so
        we raise instead.
        """
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(embeddings, dtype=np.float32)
        y = [str(label) for label in labels]
        if x.ndim != 2 or x.shape[0] != len(y):
            raise ValueError(
                f"expected one embedding row per example label, got array of shape {x.shape} "
                f"and {len(y)} labels"
            )
        seen = list(dict.fromkeys(y))
        if label_set is None:
            label_order = seen
        else:
            label_order = list(dict.fromkeys(str(label) for label in label_set))
            unknown = [label for label in seen if label not in label_order]
            if unknown:
                raise ValueError(
                    f"examples use labels that are not in the label set: {unknown}; "
                    f"allowed labels: {label_order}"
                )
            missing = [label for label in label_order if label not in seen]
            if missing:
                raise ValueError(
                    f"labels without any examples: {missing}; add at least one example for "
                    f"each (more is better), or remove them from the labels"
                )
        if len(label_order) < 2:
            raise ValueError(
                f"a fitted classifier needs examples of at least 2 labels, got {label_order}"
            )
        clf = LogisticRegression(C=FIT_C, max_iter=FIT_MAX_ITER, random_state=0)
        clf.fit(x, np.array(y, dtype=object))
        return cls(label_order, "fitted", clf=clf)

    def predict(self, embeddings: np.ndarray) -> list[tuple[str, dict[str, float]]]:
        """(best label, {label: probability to 4 dp}) per row, in self.labels order."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-d array of embeddings, got shape {x.shape}")
        if x.shape[0] == 0:
            return []
        if self._clf is not None:
            probs = self._clf.predict_proba(x)[:, self._columns]
        else:
            probs = _softmax((x @ self._prototypes.T) / ZERO_SHOT_TEMPERATURE)
        best = probs.argmax(axis=1)  # ties go to the earlier label
        out: list[tuple[str, dict[str, float]]] = []
        for row, b in zip(probs.tolist(), best.tolist(), strict=True):
            scores = {label: round(p, 4) for label, p in zip(self.labels, row, strict=True)}
            out.append((self.labels[b], scores))
        return out
