"""backend = "python": a user function `module:function` over a list of records."""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import OutputCountError, UsageError


def load_function(ref: str, base_dir: Path) -> Callable[[list[Any]], list[Any]]:
    """Import `module:function`, with the job file's folder importable."""
    module_name, _, attr = ref.partition(":")
    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    _forget_other_folders(module_name, base_dir)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"[model] function: cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UsageError(f"[model] function: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise UsageError(f"[model] function: {ref!r} is not callable")
    return fn  # type: ignore[return-value]


def _forget_other_folders(module_name: str, base_dir: Path) -> None:
    """A module of this name that lives in the job's folder, while one of the same name from
    another folder is already imported in this process (an earlier job's `fn.py`, through the
    Python API): that one is dropped, so that this job imports its own rather than silently
    run the other job's function."""
    top = module_name.partition(".")[0]
    spec = importlib.machinery.PathFinder.find_spec(top, [str(base_dir)])
    loaded = sys.modules.get(top)
    if spec is None or spec.origin is None or loaded is None:
        return
    if getattr(loaded, "__file__", None) != spec.origin:
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]


class PythonFunction:
    # A python function is usually cheap per record: batches mostly amortise overhead.
    auto_start = 128
    auto_max = 4096
    window = 1

    def __init__(self, fn: Callable[[list[Any]], list[Any]]) -> None:
        self.fn = fn

    def process(self, inputs: list[Any], batch_size: int) -> list[Any]:
        if len(inputs) > batch_size:
            return [
                out
                for i in range(0, len(inputs), batch_size)
                for out in self.process(inputs[i : i + batch_size], batch_size)
            ]
        outputs = self.fn(inputs)
        if not isinstance(outputs, list | tuple) or len(outputs) != len(inputs):
            got = len(outputs) if isinstance(outputs, list | tuple) else type(outputs).__name__
            raise OutputCountError(
                f"function returned {got} outputs for {len(inputs)} records (expected a list of "
                "the same length)"
            )
        return list(outputs)

    def close(self) -> None:
        pass


def build(function: str, base_dir: str) -> PythonFunction:
    """The predictor from plain data: what a worker process is handed to build it itself."""
    return PythonFunction(load_function(function, Path(base_dir)))
