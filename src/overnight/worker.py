"""A supervised worker process for user code and models in the process (`backend = "local"`,
`"transformers"`, `"vllm"`; `[run] isolation = "process"`).

A python function or a native library can kill the process it runs in (a segfault, the OOM
killer's SIGKILL, `os._exit`) or never return. Run in the runner's own process, one such
record blocks the whole job; run here, it costs one call. The parent hands the child plain
data (a `Recipe`: the function reference and the job's folder, or the model's name, device,
labels and examples), and the child builds the predictor itself, so the parent never imports
the user's heavy dependencies or torch. The child runs the whole task (`runs_task`): a call
sends the records as they are stored in the ledger (JSON bytes, joined, not re-encoded) and
gets back per record its output row as JSON bytes, or the error that record raised. The
runner then does less per record than in its own process, where it parses and serialises
every answer; what isolation adds is one round trip per call (see BENCHMARKS.md).

The parent waits for an answer at most `[run] timeout` seconds. A child that dies or runs
out of time becomes a `WorkerCrashed` / `WorkerTimeout` (transient) error of that call; the
next call starts a new child. The runner splits the failing batch until the record that
kills the worker is alone, and retries it up to `max_attempts` like any transient failure.

The child is a fresh interpreter started with `subprocess`, not `multiprocessing`: spawn and
forkserver both import the parent's `__main__` module again in the child, which would run a
user's script that calls `Job(...).run()` without an `if __name__ == "__main__"` guard a
second time. A `multiprocessing.connection.Connection` over a socket pair carries the
messages (framing and pickling are the library's).
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from . import results
from .errors import (
    EndpointDown,
    InputError,
    InvalidOutput,
    OutputCountError,
    OvernightError,
    PermanentError,
    TransientError,
    UsageError,
    WorkerCrashed,
    WorkerStartError,
    WorkerTimeout,
    error_class,
    is_transient,
)

log = logging.getLogger(__name__)

# Seconds a model call may take when `[run] timeout` is not set. Generous: a call is a whole
# window (up to 4,096 records of a python function, 1,024 texts of the local model on a CPU).
DEFAULT_TIMEOUT = 600.0
# Loading the function or the model is not a call; it gets at least this long.
START_TIMEOUT = 600.0

# Seconds between checks that the child is alive while waiting for its answer.
_LIVENESS_CHECK = 0.5
_CALL = struct.Struct("<I")  # a call: the batch size, then the records as one JSON array
_RESULTS, _ERROR = b"R", b"E"  # an answer: per-record rows or errors, or the call's error

# The child's entry point. The folder overnight was imported from goes first on its path, so
# the child runs the same overnight as the parent; the rest of the parent's path follows.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[2]); "
    "from overnight.worker import child_main; child_main(int(sys.argv[1]))"
)


@dataclass(frozen=True)
class Recipe:
    """How to build a predictor from plain, picklable data: `factory(**kwargs)`, where
    factory is "module:function". `task` (kind, text, labels) turns answers into rows."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    task: tuple[str, str, list[str]] = ("map", "", [])
    window_model: str | None = None  # a local model whose window texts are counted against
    # A self-hosted LLM's task: make_llm_task's arguments (then `task` is not used).
    llm_task: dict[str, Any] | None = None

    def build(self) -> Any:
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)(**self.kwargs)

    def make_task(self) -> Any:
        if self.llm_task is not None:
            from .llm.requests import make_llm_task

            return make_llm_task(**self.llm_task)
        from .tasks import make_task

        return make_task(*self.task)


# -- errors across the process boundary -----------------------------------------------------
# An exception raised by user code may not unpickle in the parent (a custom class whose
# __init__ takes other arguments, a module the parent lacks), so only what the runner needs
# travels: how to treat it, its class name (the item's error_class) and its message.


def _describe(exc: BaseException) -> tuple[str, str, str]:
    if isinstance(exc, OutputCountError):
        kind = "count"
    elif isinstance(exc, InvalidOutput):
        kind = "invalid"
    elif isinstance(exc, EndpointDown):
        kind = "down"
    elif isinstance(exc, UsageError):
        kind = "usage"
    elif is_transient(exc):
        kind = "transient"
    elif isinstance(exc, PermanentError):
        kind = "permanent"
    else:
        kind = "other"
    return kind, error_class(exc), str(exc)


class _RemoteError(Exception):
    """An exception of the worker's that is neither transient nor permanent (ValueError, …):
    the runner splits its batch to find the record that raises it."""


_KINDS: dict[str, type[Exception]] = {
    "count": OutputCountError,
    "down": EndpointDown,
    "usage": UsageError,
    "transient": TransientError,
    "permanent": PermanentError,
    "other": _RemoteError,
}


def _rebuild(desc: tuple[str, str, str]) -> Exception:
    kind, cls, message = desc
    exc: Exception = InvalidOutput(message) if kind == "invalid" else _KINDS[kind](message)
    exc.error_class = cls  # type: ignore[attr-defined]  # the original class name
    return exc


def _death(returncode: int) -> str:
    """How a child ended, as the end of a sentence about it."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    else:
        name = f"{name} (signal {-returncode})"
    if -returncode == signal.SIGKILL:
        name += ": killed from outside, often by the kernel's out-of-memory killer"
    return f"was killed by {name}"


# -- the parent's side -----------------------------------------------------------------------


class WorkerProcess:
    """A predictor whose work happens in a child process, restarted after a crash or a
    timeout. It runs the task too (`runs_task`): `process` takes records as JSON bytes and
    returns per record its output row as JSON bytes, or the exception that record raised;
    a call that kills the child or runs out of time raises WorkerCrashed / WorkerTimeout."""

    runs_task = True

    def __init__(self, recipe: Recipe, hints: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
        # Batching hints of the predictor the child builds (its class, importable cheaply).
        self.auto_start, self.auto_max, self.window = hints.auto_start, hints.auto_max, hints.window
        self.recipe, self.timeout = recipe, timeout
        self.starts = 0  # children started so far (1 + restarts)
        self.truncated = 0  # texts the local model cut to its window (counted in the child)
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._busy = False  # a call is in flight (interrupted while waiting: kill, not wait)
        self._start()  # loading the model counts as setup, not as processing

    def process(self, inputs: list[bytes], batch_size: int) -> list[Any]:
        if self._conn is None:
            self._start()
        assert self._conn is not None
        self._busy = True
        try:
            self._conn.send_bytes(call_message(inputs, batch_size))
        except OSError:  # the child died between calls (say, killed from outside)
            raise self._crashed() from None
        if not self._wait(self.timeout):
            self._stop(kill=True)
            raise WorkerTimeout(
                f"no answer within [run] timeout = {self.timeout:g} s; the worker process was "
                "stopped"
            )
        try:
            reply = self._conn.recv_bytes()
        except (EOFError, OSError):
            raise self._crashed() from None
        self._busy = False
        rows, truncated = read_reply(reply)
        self.truncated += truncated
        return rows

    def close(self) -> None:
        self._stop(kill=self._busy)  # a call cut short (Ctrl-C twice) is not waited for

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        parent, child = socket.socketpair()
        root = str(Path(__file__).resolve().parent.parent)  # the folder holding overnight/
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(child.fileno()), root],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                # What user code prints goes to stderr, beside the progress lines: the
                # runner's stdout carries its report (`--json`) and must stay parseable.
                stdout=_stderr_fd(),
            )
        finally:
            child.close()
        conn = Connection(parent.detach())
        self._proc, self._conn = proc, conn
        self.starts += 1
        what = self.recipe.factory
        try:
            conn.send({"sys_path": sys.path, "recipe": self.recipe, "ppid": os.getpid()})
            if not self._wait(max(self.timeout, START_TIMEOUT)):
                self._stop(kill=True)
                raise WorkerStartError(f"the worker process did not finish loading ({what})")
            status, detail = conn.recv()
        except (EOFError, OSError):
            code = self._reap()
            raise WorkerStartError(
                f"the worker process {_death(code)} while loading ({what})"
            ) from None
        except WorkerCrashed as exc:  # died, while something it forked holds the socket
            raise WorkerStartError(f"{exc} while loading ({what})") from None
        if status != "ready":
            self._stop(kill=True)
            exc = _rebuild(detail)
            if isinstance(exc, OvernightError) and exc.exit_code == 2:
                raise exc
            raise WorkerStartError(f"the worker process could not load ({what}): {detail[2]}")
        log.debug("worker process %d ready (%s)", proc.pid, what)

    def _wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the child's answer: True when there is one to
        read (or the socket's end: the child died), False when time ran out. A child that
        died raises WorkerCrashed at once, even when a process it forked still holds the
        socket open (which it may do until it exits, however long that is)."""
        assert self._conn is not None and self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self._conn.poll(min(max(left, 0.0), _LIVENESS_CHECK)):
                return True
            if self._proc.poll() is not None:
                if self._conn.poll(0):  # its last words arrived as it went
                    return True
                raise self._crashed()
            if left <= 0:
                return False

    def _crashed(self) -> WorkerCrashed:
        code = self._reap()
        return WorkerCrashed(f"the worker process {_death(code)}")

    def _reap(self) -> int:
        """Wait for a child that is dying anyway; its exit code (negative: a signal)."""
        proc = self._proc
        self._close_conn()
        self._busy = False
        if proc is None:
            return 0
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # its socket closed, but it lives on: make sure
            proc.kill()
            code = proc.wait()
        self._proc = None
        return code

    def _stop(self, kill: bool) -> None:
        proc = self._proc
        self._close_conn()  # a child waiting for work sees the end of input and exits
        self._busy = False
        if proc is None:
            return
        if kill:
            proc.kill()
        try:
            proc.wait(timeout=None if kill else 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _stderr_fd() -> int | None:
    """This process's stderr as a file descriptor for the child's stdout (None, inherit
    stdout, when there is no usable one)."""
    try:
        os.fstat(2)
    except OSError:
        return None
    return 2


# -- the child's side ------------------------------------------------------------------------


def _die_with_parent(ppid: int) -> None:
    """A child must not outlive the runner (kill -9 of the runner would leave it computing
    and writing). Linux's prctl(PR_SET_PDEATHSIG) asks the kernel to kill it then; written
    by hand with ctypes rather than adding a dependency for one call. Elsewhere, the end of
    input on the socket stops an idle child."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != ppid:  # the parent died before the line above took effect
        os._exit(1)


def _rows(task: Any, answers: list[Any]) -> list[Any]:
    """Per answer the output row as JSON bytes — an embedding as ("vector", JSON, float32
    bytes), see results.py — or the description of why it has none."""
    parse, dumps, numpy = task.parse, orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    vectors = task.kind == "embed"
    if not vectors:
        try:  # the common case: every answer serialises
            return [dumps(parse(a), option=numpy) for a in answers]
        except Exception:
            pass
    out: list[Any] = []
    for a in answers:
        if isinstance(a, BaseException):
            out.append(_describe(a))
            continue
        try:
            fields = parse(a)
        except Exception as exc:
            out.append(_describe(exc))
            continue
        try:
            row, vector = results.encode(fields, vectors)
        except orjson.JSONEncodeError as exc:
            out.append(("invalid", "unserialisable_output", str(exc)))
        else:
            out.append(row if vector is None else ("vector", row, vector))
    return out


def _compute(predictor: Any, task: Any, records: list[Any], batch_size: int) -> list[Any]:
    """The task over records: build (a record that cannot be built fails alone), compute,
    parse. An exception of the computation itself fails the whole call."""
    build = task.build
    try:  # the common case: every record builds
        inputs = [build(r) for r in records]
    except InputError:
        pass
    else:
        return _rows(task, predictor.process(inputs, batch_size))
    out: list[Any] = [None] * len(records)
    good, inputs = [], []
    for k, r in enumerate(records):
        try:
            inputs.append(build(r))
            good.append(k)
        except InputError as exc:
            out[k] = _describe(exc)
    if good:
        for k, row in zip(good, _rows(task, predictor.process(inputs, batch_size)), strict=True):
            out[k] = row
    return out


def call_message(inputs: list[bytes], batch_size: int) -> bytes:
    """A call as it travels to whatever runs the task: the batch size, then the records (as
    stored in the ledger, JSON bytes) joined into one JSON array, not re-encoded."""
    return _CALL.pack(batch_size) + b"[" + b",".join(inputs) + b"]"


def read_reply(reply: bytes) -> tuple[list[Any], int]:
    """An answer to `call_message`: per record its row as JSON bytes, (JSON, an embedding's
    bytes), or the exception it raised; and the texts cut to the model's window. The call's
    own error is raised."""
    body = pickle.loads(memoryview(reply)[1:])
    if reply[:1] == _ERROR:
        raise _rebuild(body)
    rows, truncated = body
    if all(type(r) is bytes for r in rows):
        return rows, truncated
    return [
        r if type(r) is bytes else (r[1], r[2]) if r[0] == "vector" else _rebuild(r) for r in rows
    ], truncated


def load(recipe: Recipe) -> tuple[Any, Any]:
    """The predictor and the task a recipe describes, as whatever runs the task holds them
    (this worker's child, a Ray actor)."""
    predictor = recipe.build()
    task = recipe.make_task()
    if recipe.window_model:  # the local model: count texts over its window
        from .backends.local import TokenWindow, TruncationWatch

        task = TruncationWatch(task, TokenWindow(recipe.window_model))
    return predictor, task


def answer(predictor: Any, task: Any, msg: bytes) -> bytes:
    """The reply to one `call_message` (read back by `read_reply`); never raises for what
    the task or the model raised."""
    (batch_size,) = _CALL.unpack_from(msg)
    try:
        rows = _compute(predictor, task, orjson.loads(memoryview(msg)[_CALL.size :]), batch_size)
        truncated = getattr(task, "truncated", 0)
        if truncated:
            task.truncated = 0
        return _RESULTS + pickle.dumps((rows, truncated), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # of the computation (or an answer that cannot travel)
        return _ERROR + pickle.dumps(_describe(exc))


def child_main(fd: int) -> None:
    # Ctrl-C reaches the whole process group: the runner finishes the call in flight, so the
    # child must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        init = conn.recv()
    except (EOFError, OSError):  # the runner died before it said what to load
        return
    _die_with_parent(init["ppid"])
    sys.path[:] = init["sys_path"]
    try:
        predictor, task = load(init["recipe"])
    except Exception as exc:
        conn.send(("failed", _describe(exc)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):  # the runner closed the socket (done) or died
            return
        conn.send_bytes(answer(predictor, task, msg))
