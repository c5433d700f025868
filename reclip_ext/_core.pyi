# Stubs for the compiled module; docstrings mirror csrc/bindings/module.cpp. Call these through
# reclip_ext (ops.py), which validates arguments and allocates the outputs.
from typing import Any, Sequence

__version__: str

def knn_affinity(
    sources: Sequence[Any], out_indices: Any, out_weights: Any, k: int, exclude_self: bool,
    normalize: bool, weight: str, gamma: float, block_rows: int, threads: int, stream: int,
    precision: str = "exact", workspace: Any = None, query_start: int = 0,
    query_stop: int = -1, queries: Any = None,
) -> None:
    """Top-k affinity of the stacked rows of `sources` (1 or 2 DLPack capsules) into the
    caller-allocated (Q, k) outputs, for the query rows [query_start, query_stop) of the
    sources (query_stop = -1: all), or for the rows of `queries` (a DLPack capsule, not rows of
    the sources: exclude_self must be False); indices are rows of the sources. precision:
    'exact' | 'tf32' | 'bf16' (the last two: float32 on CUDA). workspace: a uint8 device
    buffer of knn_affinity_workspace_bytes (CUDA only)."""

def sym_normalize(
    indices: Any, weights: Any, out_indptr: Any, out_indices: Any, out_data: Any, threads: int,
    stream: int, workspace: Any = None,
) -> int:
    """D^-1/2 (A + A^T) D^-1/2 into caller-allocated CSR buffers of capacity 2 N k; returns nnz.
    workspace: a uint8 device buffer of sym_normalize_workspace_bytes (CUDA only)."""

def cg_solve(
    indptr: Any, indices: Any, data: Any, rhs: Any, out_x: Any, out_iterations: Any,
    out_residuals: Any, alpha: float, max_iter: int, tol: float, threads: int, stream: int,
    workspace: Any = None, spmm: str = "kernel",
) -> None:
    """Batched CG for (I - alpha W) X = rhs into caller-allocated outputs. workspace: a uint8
    device buffer of cg_solve_workspace_bytes (CUDA only). spmm: 'kernel' | 'cusparse' (CUDA
    only; load_cusparse first)."""

def knn_affinity_workspace_bytes(n: int, d: int, k: int, dtype: str, precision: str = "exact",
                                 queries: int = -1, separate: bool = False) -> int:
    """Bytes of CUDA workspace knn_affinity needs for N rows of d columns and k neighbours,
    for `queries` query rows (-1: all N), `separate` when they are not rows of x."""

def sym_normalize_workspace_bytes(n: int, k: int, dtype: str, device: int) -> int:
    """Bytes of CUDA workspace sym_normalize needs for (N, k) inputs on CUDA device `device`
    (CUB sizes its temporary storage per device, so this needs a device)."""

def cg_solve_workspace_bytes(n: int, m: int, dtype: str) -> int:
    """Bytes of CUDA workspace cg_solve needs for N rows and m right-hand sides."""

def _selftest_topk(
    vals: Sequence[float], idx: Sequence[int], k: int, perturb: Sequence[float] = ...,
) -> tuple[list[float], list[int]]:
    """Streams candidates through the shared top-k insert (int32 lists), optionally re-sorts."""

def _selftest_weight(s: float, weight: str, gamma: float) -> float:
    """The shared affinity weight f(s)."""

def _selftest_sqrt_product(a: float, b: float) -> float:
    """The shared overflow-safe sqrt(a b)."""

def _selftest_cg(bb: float, rs_new: float, pq: float, it: int, tol: float, pp: float = 1.0,
                 floor: float = 0.0) -> dict[str, Any]:
    """One column through the shared CG rules: start from ||b||^2 = bb, step (p.p = pp),
    advance (residual floor `floor`)."""

def _selftest_cg_scale(bmax: float) -> float:
    """The shared power-of-two scale of a CG column with largest entry bmax."""

def _selftest_cg_floor(n: int, tiny: float) -> float:
    """The shared ||r||^2 below which a CG column stops as converged."""

def _selftest_mma_layout() -> list[tuple[tuple[int, int], tuple[int, int],
                                         list[tuple[int, int]]]]:
    """Per lane of the tensor-core tile loop: A and B ldmatrix addresses, accumulator entries."""

def built_with_cuda() -> bool:
    """True when the CUDA kernels were compiled in."""

def built_with_cusparse() -> bool:
    """True when cg_solve's spmm='cusparse' path was compiled in (cuSPARSE itself is opened at
    run time)."""

def load_cusparse(candidates: Sequence[str] = ...) -> str:
    """Opens libcusparse.so.12 for spmm='cusparse' (once per process) and returns what was
    opened: $REXT_CUSPARSE_LIBRARY if set, else the soname, then `candidates` (paths).
    RuntimeError listing the tries when none opens, or in a build without the path."""

def cuda_device_count() -> int:
    """Visible CUDA devices (0 without CUDA support, a driver or a device)."""

def simd_level() -> str:
    """CPU tile kernels in use: 'avx2' or 'generic'."""
