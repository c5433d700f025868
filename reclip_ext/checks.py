"""The checks of reclip_ext's arguments, shared by every op (and by reclip_ext.distributed):
each error names the argument the user passed. Arrays come back in the kernels' layout and
compute dtype, through the namespace of where they live (reclip_ext.arrays).
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import os
from typing import Any

from . import _core, arrays

WEIGHTS = ("relu", "shift")
PRECISIONS = ("exact", "tf32", "bf16")
SPMMS = ("kernel", "cusparse")
_CHUNK_ELEMENTS = 1 << 24  # elements per chunk of the scans below (bounds their temporaries)
# --------------------------------------------------------------------------------------------
# Argument checks


def float_matrix(ns: arrays.Arrays, x: Any, name: str, min_rows: int = 1):
    """(x in the kernels' layout and compute dtype, the dtype name of x)."""
    a = ns.array(x, name)
    dt = ns.dtype_name(a)
    if dt not in ns.floats:
        also = " (or float16 / bfloat16 on CUDA)" if ns.on_cuda else ""
        raise TypeError(f"{name}: dtype must be float32 or float64{also}, got {dt}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows, dims), got shape {tuple(a.shape)}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got shape {tuple(a.shape)}")
    if a.shape[1] < 1:
        raise ValueError(f"{name}: needs at least 1 column, got shape {tuple(a.shape)}")
    check_finite(ns, a, name)
    return ns.layout(computed(ns, a)), dt


def computed(ns: arrays.Arrays, a):
    """`a` in the dtype the kernels compute in: float32 for the half floats."""
    return ns.astype(a, "float32") if ns.dtype_name(a) in arrays.HALF_FLOATS else a


def row_blocks(ns: arrays.Arrays, parts: list, names: list[str]):
    """(validated float matrices of one dtype and width, to be stacked by rows; their dtype)."""
    pairs = [float_matrix(ns, a, name) for a, name in zip(parts, names)]
    blocks, dt = [b for b, _ in pairs], pairs[0][1]
    for (b, b_dt), name in zip(pairs[1:], names[1:]):
        if b_dt != dt:
            raise TypeError(f"{name}: dtype {b_dt} differs from {names[0]} dtype {dt}")
        if b.shape[1] != blocks[0].shape[1]:
            raise ValueError(f"{name}: has {b.shape[1]} columns but {names[0]} has "
                             f"{blocks[0].shape[1]}")
    return blocks, dt


# Chunks of whole rows bound the temporaries of these scans (host or device memory alike);
# each chunk costs one small read back to Python (a sync on CUDA), so they are sized by
# elements: a few per call even for a graph's millions of values.


def chunk_rows(a) -> int:
    width = math.prod(a.shape[1:]) if a.ndim > 1 else 1
    return max(1, _CHUNK_ELEMENTS // max(1, width))


def check_finite(ns: arrays.Arrays, a, name: str) -> None:
    rows = chunk_rows(a)
    for start in range(0, max(a.shape[0], 1), rows):
        if not bool(ns.xp.isfinite(a[start : start + rows]).all()):
            raise ValueError(f"{name}: contains NaN or Inf")


def check_nonzero_rows(ns: arrays.Arrays, a, name: str) -> None:
    rows = chunk_rows(a)
    for start in range(0, a.shape[0], rows):
        nonzeros = (a[start : start + rows] != 0).sum(1)
        if bool((nonzeros == 0).any()):
            row = start + int(nonzeros.argmin())  # the first all-zero row
            raise ValueError(f"{name}: row {row} is all zeros and cannot be L2-normalised")


def int_arg(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def real_arg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


_MAX_THREADS = 1024


def rows_arg(rows: Any, n: int) -> tuple[int, int]:
    """The query block (start, stop) of knn_affinity: None is every row."""
    if rows is None:
        return 0, n
    if (not isinstance(rows, (tuple, list)) or len(rows) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in rows)):
        raise TypeError(f"rows must be a pair (start, stop) of integers, got {rows!r}")
    start, stop = int(rows[0]), int(rows[1])
    if not 0 <= start <= stop <= n:
        raise ValueError(f"rows: (start, stop) must satisfy 0 <= start <= stop <= N = {n}, "
                         f"got ({start}, {stop})")
    return start, stop


def threads(threads: Any) -> int:
    return 0 if threads is None else int_arg(threads, "threads", 1, _MAX_THREADS)


def affinity_options(k, n, exclude_self, weight, gamma, block_rows) -> dict:
    limit = n - 1 if exclude_self else n
    k = int_arg(k, "k", 1)
    if k > limit:
        raise ValueError(
            f"k must be < N = {n} (the number of rows{'' if exclude_self else ' + 1'}), got {k}"
            if exclude_self
            else f"k must be <= N = {n}, got {k}"
        )
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    gamma = real_arg(gamma, "gamma")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    block_rows = 0 if block_rows is None else int_arg(block_rows, "block_rows", 1)
    return dict(k=k, exclude_self=bool(exclude_self), weight=weight, gamma=gamma,
                block_rows=block_rows)


def cg_options(alpha, max_iter, tol, spmm, on_cuda: bool) -> dict:
    alpha = real_arg(alpha, "alpha")
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    max_iter = int_arg(max_iter, "max_iter", 0)
    tol = real_arg(tol, "tol")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return dict(alpha=alpha, max_iter=max_iter, tol=tol, spmm=spmm_arg(spmm, on_cuda))


def precision_arg(precision: Any, on_cuda: bool, dtype: str) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "exact":
        if not on_cuda:
            raise ValueError(f"precision: {precision!r} runs on CUDA tensor cores only; CPU "
                             "arrays take precision='exact'")
        if dtype == "float64":
            raise ValueError(f"precision: {precision!r} needs float32 input (or float16 / "
                             "bfloat16); float64 takes precision='exact'")
    return precision


def spmm_arg(spmm: Any, on_cuda: bool) -> str:
    """The CG's SpMM; for 'cusparse' on CUDA the library is opened here, so that a missing
    cuSPARSE (or a build without that path) is a RuntimeError before any work is done."""
    if not isinstance(spmm, str) or spmm not in SPMMS:
        raise ValueError(f"spmm must be one of {SPMMS}, got {spmm!r}")
    if spmm == "cusparse":
        if not on_cuda:
            raise ValueError("spmm: 'cusparse' runs on CUDA only; CPU arrays take "
                             "spmm='kernel'")
        _core.load_cusparse(cusparse_candidates())
    return spmm


def cusparse_candidates() -> list[str]:
    """libcusparse.so.12 of the nvidia-cusparse wheel in this environment, where it exists
    (CUDA 13 wheels keep it in nvidia/cu13/lib, CUDA 12 wheels in nvidia/cusparse/lib): the
    loader tries these after the soname, which finds it when torch has already loaded it."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    paths = [os.path.join(root, sub, "lib", "libcusparse.so.12") for root in roots
             for sub in ("cu13", "cusparse")]
    return [p for p in paths if os.path.isfile(p)]


def csr_parts(w: Any):
    if hasattr(w, "indptr") and hasattr(w, "indices") and hasattr(w, "data"):
        return (w.indptr, w.indices, w.data), getattr(w, "shape", None)
    if isinstance(w, (tuple, list)) and len(w) == 3:
        return tuple(w), None
    raise TypeError(
        f"W: expected a Csr, a scipy.sparse CSR matrix or (indptr, indices, data), "
        f"got {type(w).__name__}"
    )


def csr_arg(ns: arrays.Arrays, w: Any, n_rows: int, dtype: str) -> arrays.Csr:
    parts, shape = csr_parts(w)
    indptr, indices, data = (ns.array(a, f"W.{nm}") for a, nm in
                             zip(parts, ("indptr", "indices", "data")))
    for a, nm in ((indptr, "indptr"), (indices, "indices")):
        if not ns.is_int(a):
            raise TypeError(f"W.{nm}: dtype must be an integer type, got {ns.dtype_name(a)}")
        if a.ndim != 1:
            raise ValueError(f"W.{nm}: expected a 1-D array, got shape {tuple(a.shape)}")
    data_dt = ns.dtype_name(data)
    if data_dt not in ns.floats:
        raise TypeError(f"W.data: dtype must be float32 or float64, got {data_dt}")
    if data_dt != dtype:
        raise TypeError(f"W.data: dtype {data_dt} differs from rhs dtype {dtype}")
    n = int(indptr.shape[0]) - 1
    if shape is not None and tuple(shape) != (n, n):
        raise ValueError(f"W: must be square, got shape {tuple(shape)}")
    if n != n_rows:
        raise ValueError(f"W: has {n} rows but rhs has {n_rows}")
    if tuple(data.shape) != tuple(indices.shape):
        raise ValueError(f"W: data has {data.shape[0]} entries but indices has {indices.shape[0]}")
    nnz = int(indices.shape[0])
    steps = indptr[1:] - indptr[:-1]
    if int(indptr[0]) != 0 or int(indptr[-1]) != nnz or bool((steps < 0).any()):
        raise ValueError("W.indptr: must start at 0, be non-decreasing and end at nnz")
    if nnz and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"W.indices: entries must be in [0, {n})")
    check_finite(ns, data, "W.data")
    return arrays.Csr(ns.layout(ns.astype(indptr, "int64")), ns.layout(ns.astype(indices, "int64")),
               ns.layout(computed(ns, data)))
