"""Where and in what precision ReCLIP runs: the device, autocast and data-loading settings.

Shared by ``Config`` (ValueError naming the field) and the CLI (the same checks, naming the
flag, made before any model loads). Everything here is cheap: asking torch how many CUDA
devices exist does not initialise CUDA.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .errors import ReclipWarning

DEVICES = "auto, cpu, cuda or cuda:N"
AMP_MODES = ("auto", "bf16", "fp16", "off")
LP_PRECISIONS = ("exact", "tf32", "bf16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def resolve(device: str, name: str = "device") -> torch.device:
    """The torch device for ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; ValueError naming `name` for anything else or a device that does not exist."""
    if not isinstance(device, str):
        raise ValueError(f"{name}: expected {DEVICES}, got {device!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return torch.device("cuda" if count else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"{name}: expected {DEVICES}, got {device!r}")
    if not count:
        raise ValueError(f"{name}: {device!r} requested, but no CUDA device is available")
    if index and int(index) >= count:
        raise ValueError(f"{name}: {device!r} does not exist ({count} CUDA device"
                         f"{'s' if count > 1 else ''}: cuda:0..cuda:{count - 1})")
    # plain "cuda" stays torch's current device; asking which one would initialise CUDA
    return torch.device(device)


def amp_dtype(amp: str, device: torch.device, name: str = "amp") -> torch.dtype | None:
    """The autocast dtype of `amp` on `device` (None: full float32). ``auto`` is bf16 on CUDA
    devices with bf16 tensor cores (compute capability 8.0 on: A100, H100, RTX 30xx on), fp16
    on older ones (V100, T4, where bf16 is emulated and slower than float32), and off on the
    CPU (where bf16 matmuls are emulated on most processors and slower)."""
    if amp not in AMP_MODES:
        raise ValueError(f"{name}: expected one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        if device.type != "cuda":
            amp = "off"
        else:
            amp = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if amp == "fp16" and device.type != "cuda":
        # fp16 training needs a GradScaler, which is a CUDA tool; CPU autocast takes bf16
        raise ValueError(f"{name}: fp16 runs on CUDA only; on the CPU use bf16 or off")
    return _AMP_DTYPES[amp]


def check_lp_precision(precision: str, device: torch.device, name: str = "lp_precision") -> None:
    """tf32 / bf16 label propagation uses CUDA tensor cores: refused on the CPU rather than
    silently run exact, so a run's settings say what actually ran."""
    if precision not in LP_PRECISIONS:
        raise ValueError(f"{name}: expected one of {', '.join(LP_PRECISIONS)}, got {precision!r}")
    if precision != "exact" and device.type != "cuda":
        raise ValueError(f"{name}: {precision} runs on CUDA only; on the CPU use exact")


def worker_count(requested: int | None, name: str = "workers") -> int:
    """Image-loading worker processes: `requested`, but at most one per usable core (more only
    compete for the same cores, and torch warns in a paragraph for each loader: instead a
    ReclipWarning naming `name` says so); None: one per usable core, at most 8."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count()) or 1
    if requested is None:
        return min(8, cores)
    if requested > cores:
        warnings.warn(f"{name}: {requested} is more than the usable cores ({cores}); "
                      f"using {cores}", ReclipWarning)
        return cores
    return requested


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for forward passes in `dtype` on `device`; nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
