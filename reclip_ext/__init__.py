"""reclip_ext — the compiled label-propagation engine of reclip.

Fused top-k affinity, symmetric normalisation into CSR and batched conjugate gradient, with
CPU kernels (multithreaded, AVX2/FMA when the CPU has it) and CUDA kernels when built with
them. Every function takes numpy arrays, torch tensors, cupy arrays or any object exposing
``__dlpack__`` and returns results of the same kind, on the same device: CUDA inputs run on
their GPU, on the framework's current stream, with outputs and workspace allocated through the
caller's framework. ``knn_affinity`` / ``label_propagate`` take ``precision="exact"`` (default),
or ``"tf32"`` / ``"bf16"`` tensor-core operands for float32 CUDA input; ``cg_solve`` /
``label_propagate`` take ``spmm="kernel"`` (default) or ``"cusparse"`` for the CUDA CG's
sparse product.
``reclip_ext.distributed.label_propagate`` runs label propagation over torch.distributed ranks
that each hold a shard of the images.

>>> import numpy as np, reclip_ext
>>> rng = np.random.default_rng(0)
>>> text = rng.standard_normal((3, 8)).astype(np.float32)
>>> images = np.repeat(text, 4, axis=0) + 0.1 * rng.standard_normal((12, 8)).astype(np.float32)
>>> reclip_ext.label_propagate(text, images, k=3).labels.tolist()
[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
"""
try:
    from . import _core
except ImportError as err:  # e.g. the source tree shadows an installed (non-editable) build
    raise ImportError(
        f"reclip_ext: the compiled module _core is missing next to {__file__}. If this is the "
        "source checkout, import from another directory (or run python -P), or install "
        "it editable: pip install --no-build-isolation -e ."
    ) from err
from .arrays import Csr
from .ops import (
    CgResult,
    LabelPropagation,
    cg_solve,
    knn_affinity,
    label_propagate,
    sym_normalize,
)

from .defaults import DEFAULTS
from . import distributed  # torch is imported only when it is called
from ._version import __version__

__all__ = [
    "CgResult",
    "Csr",
    "DEFAULTS",
    "LabelPropagation",
    "built_with_cuda",
    "built_with_cusparse",
    "cg_solve",
    "cuda_device_count",
    "distributed",
    "knn_affinity",
    "label_propagate",
    "simd_level",
    "sym_normalize",
]


def built_with_cuda() -> bool:
    """True when this build contains the CUDA kernels (it may still find no GPU)."""
    return bool(_core.built_with_cuda())


def built_with_cusparse() -> bool:
    """True when this build can run the CUDA CG with ``spmm="cusparse"`` (compiled against
    cuSPARSE's header; the library itself, libcusparse.so.12, is opened on first use)."""
    return bool(_core.built_with_cusparse())


def cuda_device_count() -> int:
    """Number of visible CUDA devices; 0 without CUDA support, a driver or a device."""
    return int(_core.cuda_device_count())


def simd_level() -> str:
    """The CPU tile kernels in use: ``"avx2"`` or ``"generic"`` (set REXT_SIMD=generic to force)."""
    return str(_core.simd_level())
