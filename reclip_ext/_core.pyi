# Stubs for the compiled module; docstrings mirror csrc/bindings/module.cpp. Call these through
# reclip_ext (ops.py), which validates arguments and allocates the outputs.
from typing import Any, Sequence

__version__: str

def knn_affinity(
    sources: Sequence[Any], out_indices: Any, out_weights: Any, k: int, exclude_self: bool,
    normalize: bool, weight: str, gamma: float, block_rows: int, threads: int, stream: int,
) -> None:
    """Top-k affinity of the stacked rows of `sources` (1 or 2 DLPack capsules) into the
    caller-allocated (N, k) outputs."""

def sym_normalize(
    indices: Any, weights: Any, out_indptr: Any, out_indices: Any, out_data: Any, threads: int,
    stream: int,
) -> int:
    """D^-1/2 (A + A^T) D^-1/2 into caller-allocated CSR buffers of capacity 2 N k; returns nnz."""

def cg_solve(
    indptr: Any, indices: Any, data: Any, rhs: Any, out_x: Any, out_iterations: Any,
    out_residuals: Any, alpha: float, max_iter: int, tol: float, threads: int, stream: int,
) -> None:
    """Batched CG for (I - alpha W) X = rhs into caller-allocated outputs."""

def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled in."""

def cuda_device_count() -> int:
    """Visible CUDA devices (0 without CUDA support, a driver or a device)."""

def simd_level() -> str:
    """CPU tile kernels in use: 'avx2' or 'generic'."""
