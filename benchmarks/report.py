"""What the benchmark scripts share: thread settings, progress lines, a device-aware clock, number
formats and the head of a JSON report. Standard library only: importable before numpy and torch."""
from __future__ import annotations

import os
import sys
import time

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def usable_cores() -> int:
    """All cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_thread_env(threads: int) -> None:
    """Thread counts for the libraries loaded afterwards and for child processes: call it before
    numpy and torch are imported where possible."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)


def passive_omp_waits() -> None:
    """torch's and reclip_ext's OpenMP pools in one process: with the default active spin-wait
    each starves the other on a small machine (by up to 75x for a small model). Only effective
    before torch loads (tests/conftest.py and offline.py do the same)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages; None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Clock:
    """Host wall time that includes the device's queued work: on CUDA, synchronise first."""

    def __init__(self, torch, device) -> None:
        self.torch, self.cuda = torch, str(device).startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def time(self, fn):
        """(fn(), its seconds)."""
        t0 = self.now()
        out = fn()
        return out, self.now() - t0


def fmt_time(t, width: int = 0) -> str:
    return ("-" if t is None else f"{t:.3f}" if t < 100 else f"{t:.1f}").rjust(width)


def fmt_ratio(r, width: int = 0) -> str:
    return ("-" if r is None else f"{r:.2f}x").rjust(width)


def header(script: str, argv, args, **config) -> dict:
    """The command, the time and the settings (`args` without --json, plus `config`)."""
    return {"command": [sys.executable, *sys.argv] if argv is None else [script, *argv],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {k: v for k, v in vars(args).items() if k != "json"} | config}
