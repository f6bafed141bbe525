"""Shared by the benchmarks: machine description, timing a subprocess with its peak RSS."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench-output"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores ({cpu}), "
        f"{mem:.0f} GiB RAM, Python {platform.python_version()}"
    )


@dataclass
class Timed:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stdout: str


def run_timed(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Timed:
    """Run a command; wall time and the peak RSS of the child (ru_maxrss of the largest)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(
        args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode not in (0, 3):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{args} failed with exit code {proc.returncode}")
    # ru_maxrss is the max over all children so far: only meaningful when this one is the
    # largest, so benchmarks run the overnight process before any larger child.
    return Timed(seconds, max(after, before) / 1024, proc.returncode, proc.stdout)


def overnight_cmd() -> list[str]:
    return [sys.executable, "-m", "overnight"]
