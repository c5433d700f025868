"""The Python face of reclip_ext: argument validation, array-kind handling, result types.

This is the only module that knows numpy and torch. It checks every argument (so errors name
what the user passed), turns inputs into views the kernels accept (column-contiguous; no copy
when they already are), allocates the outputs, hands DLPack capsules to ``_core`` and returns
results of the caller's array kind. CPU inputs of any kind are processed through zero-copy
numpy views.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from . import _core

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_WEIGHTS = ("relu", "shift")
_CHUNK_ROWS = 1 << 16  # rows per chunk of row-wise scans (bounds their temporaries)


class Csr(NamedTuple):
    """A square sparse matrix in compressed sparse rows (columns sorted within each row)."""

    indptr: Any  #: (N + 1,) int64 row pointers
    indices: Any  #: (nnz,) int64 column indices
    data: Any  #: (nnz,) values, float32 or float64

    @property
    def shape(self) -> tuple[int, int]:
        n = len(self.indptr) - 1
        return (n, n)

    def to_scipy(self):
        """The same matrix as a ``scipy.sparse.csr_array`` (CPU arrays only)."""
        import scipy.sparse

        arrays = [_host_view(a, name) for a, name in zip(self, ("indptr", "indices", "data"))]
        return scipy.sparse.csr_array((arrays[2], arrays[1], arrays[0]), shape=self.shape)


class CgResult(NamedTuple):
    """Result of :func:`cg_solve`."""

    x: Any  #: (N, m) solution
    iterations: Any  #: (m,) int64 iterations each column ran
    residuals: Any  #: (m,) float64 final ||r|| / ||b|| per column


class LabelPropagation(NamedTuple):
    """Result of :func:`label_propagate`."""

    labels: Any  #: (n,) int64 argmax class of each image
    scores: Any  #: (n, m) propagated class scores Z[m:]
    confidence: Any  #: (n,) 1 - H(p)/log m of the normalised positive scores
    iterations: Any  #: (m,) int64 CG iterations per class
    residuals: Any  #: (m,) float64 final relative CG residual per class


# --------------------------------------------------------------------------------------------
# Array kinds


def _kind(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "numpy"
    module = type(x).__module__.split(".")[0]
    if module in ("torch", "cupy"):
        return module
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return "none"


def _is_cuda(x: Any, kind: str, name: str) -> bool:
    if kind == "numpy" or not hasattr(x, "__dlpack_device__"):
        return False
    try:
        device_type = x.__dlpack_device__()[0]
    except (ValueError, RuntimeError, TypeError, BufferError) as err:
        raise ValueError(f"{name}: arrays must live on the CPU or a CUDA device ({err})") from err
    if device_type in (1, 3):  # kDLCPU, kDLCUDAHost
        return False
    if device_type in (2, 13):  # kDLCUDA, kDLCUDAManaged
        return True
    raise ValueError(f"{name}: arrays must live on the CPU or a CUDA device "
                     f"(DLPack device type {device_type})")


def _host_view(x: Any, name: str) -> np.ndarray:
    """A zero-copy numpy view of a CPU array of any kind; typed errors for anything else."""
    kind = _kind(x)
    if kind == "none":
        raise TypeError(
            f"{name}: expected a numpy array, torch tensor or an object exposing __dlpack__, "
            f"got {type(x).__name__}"
        )
    if kind == "torch" and str(x.layout) != "torch.strided":
        raise TypeError(f"{name}: sparse tensors ({x.layout}) are not supported; pass a dense tensor")
    if _is_cuda(x, kind, name):
        if not _core.built_with_cuda():
            raise RuntimeError("reclip_ext was built without CUDA")
        raise RuntimeError(
            f"{name}: the CUDA kernels are not implemented in this version of reclip_ext; "
            "move the arrays to the CPU"
        )
    if kind == "numpy":
        return x
    if kind == "torch":
        x = x.detach()
        if x.is_conj() or x.is_neg():
            x = x.resolve_conj().resolve_neg()
        try:
            return x.numpy()
        except TypeError as err:  # e.g. bfloat16 has no numpy dtype
            raise TypeError(f"{name}: dtype must be float32 or float64, got {x.dtype}") from err
    try:
        return np.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError) as err:
        raise TypeError(f"{name}: could not read it through DLPack ({err})") from err


def _wrap(result: np.ndarray, like: Any) -> Any:
    """Return `result` (a numpy array) as the array kind of `like`."""
    if _kind(like) == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(result))
    return result


def _capsule(a: np.ndarray):
    try:
        return a.__dlpack__(max_version=(1, 0))
    except TypeError:  # numpy < 2.1 knows only unversioned capsules
        return a.__dlpack__()


def _kernel_layout(a: np.ndarray) -> np.ndarray:
    """Columns contiguous and rows at a non-negative stride, copying only when needed."""
    if a.ndim == 2 and a.shape[0] > 0 and a.shape[1] > 0:
        col_ok = a.shape[1] == 1 or a.strides[1] == a.itemsize
        row_ok = a.shape[0] == 1 or a.strides[0] >= 0  # stride 0: rows repeat, fine to read
        if col_ok and row_ok and a.strides[0] % a.itemsize == 0:
            return a
    elif a.ndim == 1 and (a.shape[0] <= 1 or a.strides[0] == a.itemsize):
        return a
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------
# Argument checks


def _float_matrix(x: Any, name: str, *, min_rows: int = 1) -> np.ndarray:
    a = _host_view(x, name)
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name}: dtype must be float32 or float64, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows, dims), got shape {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows, got shape {a.shape}")
    if a.shape[1] < 1:
        raise ValueError(f"{name}: needs at least 1 column, got shape {a.shape}")
    _check_finite(a, name)
    return _kernel_layout(a)


def _check_finite(a: np.ndarray, name: str) -> None:
    for start in range(0, max(a.shape[0], 1), _CHUNK_ROWS):
        if not np.isfinite(a[start : start + _CHUNK_ROWS]).all():
            raise ValueError(f"{name}: contains NaN or Inf")


def _check_nonzero_rows(a: np.ndarray, name: str) -> None:
    for start in range(0, a.shape[0], _CHUNK_ROWS):
        zero = ~np.any(a[start : start + _CHUNK_ROWS] != 0, axis=1)
        if zero.any():
            row = start + int(np.argmax(zero))
            raise ValueError(f"{name}: row {row} is all zeros and cannot be L2-normalised")


def _int_arg(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _real_arg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


_MAX_THREADS = 1024


def _threads(threads: Any) -> int:
    return 0 if threads is None else _int_arg(threads, "threads", 1, _MAX_THREADS)


def _affinity_options(k, n, exclude_self, weight, gamma, block_rows) -> dict:
    limit = n - 1 if exclude_self else n
    k = _int_arg(k, "k", 1)
    if k > limit:
        raise ValueError(
            f"k must be < N = {n} (the number of rows{'' if exclude_self else ' + 1'}), got {k}"
            if exclude_self
            else f"k must be <= N = {n}, got {k}"
        )
    if weight not in _WEIGHTS:
        raise ValueError(f"weight must be one of {_WEIGHTS}, got {weight!r}")
    gamma = _real_arg(gamma, "gamma")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    block_rows = 0 if block_rows is None else _int_arg(block_rows, "block_rows", 1)
    return dict(k=k, exclude_self=bool(exclude_self), weight=weight, gamma=gamma,
                block_rows=block_rows)


def _cg_options(alpha, max_iter, tol) -> dict:
    alpha = _real_arg(alpha, "alpha")
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    max_iter = _int_arg(max_iter, "max_iter", 0)
    tol = _real_arg(tol, "tol")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return dict(alpha=alpha, max_iter=max_iter, tol=tol)


# --------------------------------------------------------------------------------------------
# Kernel calls on validated host arrays


def _run_affinity(blocks, opts, normalize, threads):
    n = sum(b.shape[0] for b in blocks)
    indices = np.empty((n, opts["k"]), np.int64)
    weights = np.empty((n, opts["k"]), blocks[0].dtype)
    _core.knn_affinity([_capsule(b) for b in blocks], _capsule(indices), _capsule(weights),
                       normalize=normalize, threads=threads, stream=0, **opts)
    return indices, weights


def _run_normalize(indices, weights, threads) -> Csr:
    n, k = indices.shape
    indptr = np.empty(n + 1, np.int64)
    cols = np.empty(2 * n * k, np.int64)
    data = np.empty(2 * n * k, weights.dtype)
    nnz = _core.sym_normalize(_capsule(indices), _capsule(weights), _capsule(indptr),
                              _capsule(cols), _capsule(data), threads=threads, stream=0)
    return Csr(indptr, cols[:nnz].copy(), data[:nnz].copy())


def _run_cg(w: Csr, rhs: np.ndarray, opts, threads) -> CgResult:
    n, m = rhs.shape
    x = np.empty((n, m), rhs.dtype)
    iterations = np.empty(m, np.int64)
    residuals = np.empty(m, np.float64)
    _core.cg_solve(*(_capsule(a) for a in w), _capsule(rhs), _capsule(x), _capsule(iterations),
                   _capsule(residuals), threads=threads, stream=0, **opts)
    return CgResult(x, iterations, residuals)


def _readout(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (argmax) and confidence 1 - H(p)/log m, p = normalised max(scores, 0)."""
    n, m = scores.shape
    labels = np.argmax(scores, axis=1).astype(np.int64)
    confidence = np.zeros(n, scores.dtype)
    # Row chunks keep the float64 temporaries small next to the O(N k) graph.
    for start in range(0, n, _CHUNK_ROWS):
        positive = np.maximum(scores[start : start + _CHUNK_ROWS], 0).astype(np.float64)
        total = positive.sum(axis=1)
        p = positive / np.where(total > 0, total, 1.0)[:, None]
        plogp = p * np.log(np.where(p > 0, p, 1.0))
        entropy = -plogp.sum(axis=1)
        confidence[start : start + len(total)] = np.where(total > 0, 1.0 - entropy / math.log(m), 0.0)
    return labels, confidence


# --------------------------------------------------------------------------------------------
# Public API


def knn_affinity(x, k, *, exclude_self=True, weight="relu", gamma=1.0, normalize=False,
                 block_rows=None, threads=None):
    """k-nearest-neighbour affinities by inner product, never forming the N x N matrix.

    For each row i the k rows j (j != i when ``exclude_self``) with the largest s_ij = x_i . x_j
    are found (ties go to the smaller j) and weighted by f(s): ``"relu"`` max(s, 0)^gamma or
    ``"shift"`` ((1 + s) / 2)^gamma.

    Args:
        x: (N, d) float32 or float64 array (numpy, torch, anything with ``__dlpack__``), or a
            pair of arrays (e.g. ``(text, images)``) taken as their row-wise concatenation
            without copying it.
        k: neighbours per row, 1 <= k <= N - 1 (N with ``exclude_self=False``).
        exclude_self: leave i out of its own neighbours.
        weight: ``"relu"`` (Iscen et al.) or ``"shift"`` (the ReCLIP authors' code).
        gamma: exponent of the weight, > 0.
        normalize: L2-normalise rows first (cosine similarity); a zero row is an error.
        block_rows: similarity tile size (rows and columns); default from cache sizes.
        threads: CPU threads; default all cores.

    Returns:
        (indices (N, k) int64, weights (N, k) of x's dtype), sorted by similarity, descending.

    Example:
        >>> import numpy as np, reclip_ext
        >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
        >>> idx, w = reclip_ext.knn_affinity(x, 1)
        >>> idx[:, 0].tolist()
        [1, 0, 1]
    """
    stacked = isinstance(x, (tuple, list))
    arrays = list(x) if stacked else [x]
    names = [f"x[{i}]" for i in range(len(arrays))] if stacked else ["x"]
    if len(arrays) not in (1, 2):
        raise ValueError(f"x: expected an array or a pair of arrays, got {len(arrays)} arrays")
    blocks = _row_blocks(arrays, names)
    n = sum(b.shape[0] for b in blocks)
    if n < 2:
        raise ValueError(f"x: needs at least 2 rows, got {n}")
    opts = _affinity_options(k, n, exclude_self, weight, gamma, block_rows)
    if normalize:
        for b, name in zip(blocks, names):
            _check_nonzero_rows(b, name)
    indices, weights = _run_affinity(blocks, opts, bool(normalize), _threads(threads))
    return _wrap(indices, arrays[0]), _wrap(weights, arrays[0])


def _row_blocks(arrays: list, names: list[str]) -> list[np.ndarray]:
    """Validated float matrices of one dtype and width, to be stacked by rows."""
    blocks = [_float_matrix(a, name) for a, name in zip(arrays, names)]
    for b, name in zip(blocks[1:], names[1:]):
        if b.dtype != blocks[0].dtype:
            raise TypeError(f"{name}: dtype {b.dtype} differs from {names[0]} dtype {blocks[0].dtype}")
        if b.shape[1] != blocks[0].shape[1]:
            raise ValueError(f"{name}: has {b.shape[1]} columns but {names[0]} has {blocks[0].shape[1]}")
    return blocks


def sym_normalize(indices, weights, *, threads=None) -> Csr:
    """W = D^-1/2 (A + A^T) D^-1/2 of a k-NN graph, as CSR.

    A has A[i, indices[i, c]] = weights[i, c]; repeated pairs add up. Columns are sorted within
    rows, duplicates merged and zero entries dropped; a node with no edges gets an empty row.

    Args:
        indices: (N, k) integer array, entries in [0, N).
        weights: (N, k) float32 or float64 array, finite and >= 0.
        threads: CPU threads; default all cores.

    Returns:
        :class:`Csr` (indptr (N+1,) int64, indices (nnz,) int64, data (nnz,) weights' dtype).

    Example:
        >>> import numpy as np, reclip_ext
        >>> W = reclip_ext.sym_normalize(np.array([[1], [0]]), np.array([[1.0], [1.0]]))
        >>> W.to_scipy().toarray().tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    idx = _host_view(indices, "indices")
    w = _host_view(weights, "weights")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices: dtype must be an integer type, got {idx.dtype}")
    if w.dtype not in _FLOATS:
        raise TypeError(f"weights: dtype must be float32 or float64, got {w.dtype}")
    if idx.ndim != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"indices: expected a non-empty 2-D array (N, k), got shape {idx.shape}")
    if w.shape != idx.shape:
        raise ValueError(f"weights: shape {w.shape} does not match indices {idx.shape}")
    n = idx.shape[0]
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"indices: entries must be in [0, {n}), found {idx.min()}..{idx.max()}")
    _check_finite(w, "weights")
    if (w < 0).any():
        raise ValueError("weights: entries must be >= 0")
    csr = _run_normalize(_kernel_layout(idx.astype(np.int64, copy=False)), _kernel_layout(w),
                         _threads(threads))
    return Csr(*(_wrap(a, weights) for a in csr))


def _csr_arg(w: Any, n_rows: int, dtype: np.dtype) -> Csr:
    if hasattr(w, "indptr") and hasattr(w, "indices") and hasattr(w, "data"):
        parts, shape = (w.indptr, w.indices, w.data), getattr(w, "shape", None)
    elif isinstance(w, (tuple, list)) and len(w) == 3:
        parts, shape = tuple(w), None
    else:
        raise TypeError(
            f"W: expected a Csr, a scipy.sparse CSR matrix or (indptr, indices, data), "
            f"got {type(w).__name__}"
        )
    indptr, indices, data = (_host_view(a, f"W.{nm}") for a, nm in
                             zip(parts, ("indptr", "indices", "data")))
    for a, nm in ((indptr, "indptr"), (indices, "indices")):
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"W.{nm}: dtype must be an integer type, got {a.dtype}")
        if a.ndim != 1:
            raise ValueError(f"W.{nm}: expected a 1-D array, got shape {a.shape}")
    if data.dtype not in _FLOATS:
        raise TypeError(f"W.data: dtype must be float32 or float64, got {data.dtype}")
    if data.dtype != dtype:
        raise TypeError(f"W.data: dtype {data.dtype} differs from rhs dtype {dtype}")
    n = len(indptr) - 1
    if shape is not None and tuple(shape) != (n, n):
        raise ValueError(f"W: must be square, got shape {tuple(shape)}")
    if n != n_rows:
        raise ValueError(f"W: has {n} rows but rhs has {n_rows}")
    if data.shape != indices.shape:
        raise ValueError(f"W: data has {data.shape[0]} entries but indices has {indices.shape[0]}")
    if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise ValueError("W.indptr: must start at 0, be non-decreasing and end at nnz")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"W.indices: entries must be in [0, {n})")
    _check_finite(data, "W.data")
    return Csr(*(_kernel_layout(a) for a in (indptr.astype(np.int64, copy=False),
                                             indices.astype(np.int64, copy=False), data)))


def cg_solve(W, rhs, *, alpha=0.99, max_iter=20, tol=1e-6, threads=None) -> CgResult:
    """Solve (I - alpha W) X = rhs for all columns at once by batched conjugate gradient.

    The m columns are m independent CG recurrences that share one sparse x dense product per
    iteration, starting from X = 0. A column stops when ||r|| / ||b|| <= tol; all stop after
    ``max_iter``. (I - alpha W) must be symmetric positive definite, which holds for the
    symmetric normalised W of :func:`sym_normalize` and 0 <= alpha < 1.

    Args:
        W: (N, N) symmetric matrix: a :class:`Csr`, a scipy.sparse CSR matrix, or a tuple
            (indptr, indices, data); data of rhs's dtype.
        rhs: (N, m) float32 or float64 right-hand sides.
        alpha: in [0, 1).
        max_iter: iteration limit, >= 0.
        tol: relative residual at which a column stops, >= 0.
        threads: CPU threads; default all cores.

    Returns:
        :class:`CgResult` (x (N, m), iterations (m,) int64, residuals (m,) float64).

    Example:
        >>> import numpy as np, reclip_ext
        >>> W = reclip_ext.sym_normalize(np.array([[1], [0]]), np.ones((2, 1)))
        >>> r = reclip_ext.cg_solve(W, np.eye(2), alpha=0.5)
        >>> np.round(r.x, 4).tolist()
        [[1.3333, 0.6667], [0.6667, 1.3333]]
    """
    b = _float_matrix(rhs, "rhs")
    opts = _cg_options(alpha, max_iter, tol)
    w = _csr_arg(W, b.shape[0], b.dtype)
    result = _run_cg(w, b, opts, _threads(threads))
    return CgResult(*(_wrap(a, rhs) for a in result))


def label_propagate(text, images, *, k=20, alpha=0.99, max_iter=20, tol=1e-6, weight="relu",
                    gamma=1.0, normalize=True, block_rows=None, threads=None) -> LabelPropagation:
    """Pseudo labels for images by label propagation from class-name embeddings (ReCLIP §3.2).

    Builds the k-NN graph over X = [text; images] (rows L2-normalised when ``normalize``),
    W = D^-1/2 (A + A^T) D^-1/2, solves (I - alpha W) Z = Y with Y the indicator of the m class
    nodes, and reads labels from the image rows of Z. Memory is O(N (k + d) + N m), N = m + n.

    Args:
        text: (m, d) class embeddings, m >= 2.
        images: (n, d) image embeddings of the same dtype (float32 or float64).
        k, weight, gamma, block_rows: as in :func:`knn_affinity`; k <= m + n - 1.
        alpha, max_iter, tol: as in :func:`cg_solve`.
        normalize: L2-normalise every row first (a zero row is an error).
        threads: CPU threads; default all cores.

    Returns:
        :class:`LabelPropagation` (labels, scores, confidence, iterations, residuals), arrays of
        the images' kind.

    Example:
        >>> import numpy as np, reclip_ext
        >>> text = np.eye(2, dtype=np.float32)
        >>> images = np.array([[1, .1], [.9, .2], [.1, 1], [.2, .8]], np.float32)
        >>> reclip_ext.label_propagate(text, images, k=2).labels.tolist()
        [0, 0, 1, 1]
    """
    t, v = _row_blocks([text, images], ["text", "images"])
    if t.shape[0] < 2:
        raise ValueError(f"text: needs at least 2 rows (classes), got shape {t.shape}")
    m, n = t.shape[0], v.shape[0]
    opts = _affinity_options(k, m + n, True, weight, gamma, block_rows)
    cg_opts = _cg_options(alpha, max_iter, tol)
    if normalize:
        _check_nonzero_rows(t, "text")
        _check_nonzero_rows(v, "images")
    nthreads = _threads(threads)
    indices, weights = _run_affinity([t, v], opts, bool(normalize), nthreads)
    w = _run_normalize(indices, weights, nthreads)
    del indices, weights
    rhs = np.zeros((m + n, m), t.dtype)
    rhs[np.arange(m), np.arange(m)] = 1
    solve = _run_cg(w, rhs, cg_opts, nthreads)
    scores = solve.x[m:]
    labels, confidence = _readout(scores)
    return LabelPropagation(*(_wrap(a, images) for a in
                              (labels, scores, confidence, solve.iterations, solve.residuals)))
