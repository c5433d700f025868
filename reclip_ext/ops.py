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
_PRECISIONS = ("exact", "tf32", "bf16")
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
        raise RuntimeError(f"{name}: is a CUDA array, but this needs CPU arrays (move it to "
                           "the CPU first)")
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
# CUDA inputs: placement, the caller's framework, and the device-side kernel calls


def _placement(items: list[tuple[Any, str]]) -> int | None:
    """None when every array is on the CPU; the CUDA device index when all are on one device.

    CUDA input needs a CUDA build (RuntimeError) and a visible device (RuntimeError); arrays on
    different devices are a ValueError naming the argument that differs from the first.
    """
    where: list[tuple[str, int | None]] = []
    for x, name in items:
        kind = _kind(x)
        if kind == "none":
            continue  # the CPU path raises the TypeError naming it
        if kind == "torch" and str(x.layout) != "torch.strided":
            continue
        where.append((name, int(x.__dlpack_device__()[1]) if _is_cuda(x, kind, name) else None))
    if all(dev is None for _, dev in where):
        return None
    if not _core.built_with_cuda():
        raise RuntimeError("reclip_ext was built without CUDA")
    if _core.cuda_device_count() == 0:
        raise RuntimeError("CUDA input, but no CUDA device is visible to reclip_ext "
                           "(no driver or no GPU); move the arrays to the CPU")
    first_name, first = where[0]
    for name, dev in where[1:]:
        if dev != first:
            def place(d):
                return "the CPU" if d is None else f"cuda:{d}"

            raise ValueError(f"{name}: is on {place(dev)} but {first_name} is on {place(first)}; "
                             "all arrays must be on one device")
    return first


class _Device:
    """Arrays on one CUDA device through the caller's framework: torch for torch tensors (and
    for other __dlpack__ producers, imported zero-copy), cupy for cupy arrays. Allocates
    outputs and workspaces there and runs the kernels on the framework's current stream."""

    def __init__(self, like: Any, index: int):
        self.index = index
        self.cupy = _kind(like) == "cupy"
        if self.cupy:
            import cupy

            self.xp = cupy
        else:
            import torch

            self.xp = torch
            self.device = torch.device("cuda", index)

    # -- current device: cupy launches its kernels (and allocates) on the current device only,
    # so the whole CUDA branch runs inside `with dev:`; torch follows the tensors' device.
    def __enter__(self):
        self._ctx = self.xp.cuda.Device(self.index) if self.cupy else None
        if self._ctx is not None:
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False

    # -- conversion and layout
    def array(self, x: Any, name: str):
        if self.cupy:
            if _kind(x) != "cupy":
                x = self.xp.from_dlpack(x)
            return x
        torch = self.xp
        if not isinstance(x, torch.Tensor):
            try:
                x = torch.from_dlpack(x)
            except (TypeError, BufferError, RuntimeError) as err:
                raise TypeError(f"{name}: could not read it through DLPack ({err})") from err
        x = x.detach()
        if x.is_conj() or x.is_neg():
            x = x.resolve_conj().resolve_neg()
        return x

    def dtype_name(self, a) -> str:
        return str(a.dtype).replace("torch.", "")

    def layout(self, a):
        """Columns contiguous and rows at a non-negative stride, copying only when needed."""
        if self.cupy:
            item = a.itemsize
            ok = (a.ndim == 1 and (a.shape[0] <= 1 or a.strides[0] == item)) or (
                a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == item)
                and (a.shape[0] <= 1 or (a.strides[0] >= 0 and a.strides[0] % item == 0)))
            return a if ok else self.xp.ascontiguousarray(a)
        ok = (a.ndim == 1 and (a.shape[0] <= 1 or a.stride(0) == 1)) or (
            a.ndim == 2 and (a.shape[1] <= 1 or a.stride(1) == 1))
        return a if ok else a.contiguous()

    def astype(self, a, dtype: str):
        if self.cupy:
            return a.astype(dtype, copy=False)
        return a.to(getattr(self.xp, dtype))

    # -- allocation, capsules, stream
    def empty(self, shape, dtype: str):
        if self.cupy:
            with self.xp.cuda.Device(self.index):
                return self.xp.empty(shape, dtype)
        return self.xp.empty(shape, dtype=getattr(self.xp, dtype), device=self.device)

    def zeros(self, shape, dtype: str):
        if self.cupy:
            with self.xp.cuda.Device(self.index):
                return self.xp.zeros(shape, dtype)
        return self.xp.zeros(shape, dtype=getattr(self.xp, dtype), device=self.device)

    def workspace(self, nbytes: int, op: str):
        """The op's scratch buffer; a failed allocation says how much was asked for."""
        try:
            return self.empty((max(int(nbytes), 1),), "uint8")
        except Exception as err:  # torch.OutOfMemoryError, cupy OutOfMemoryError, ...
            if "memory" not in str(err).lower() and "MemoryError" not in type(err).__name__:
                raise
            raise MemoryError(f"{op}: needs about {nbytes / 2**30:.1f} GiB of CUDA workspace on "
                              f"cuda:{self.index}, which could not be allocated; reduce N, d, "
                              "k or m") from err

    def capsule(self, a):
        if self.cupy:
            return a.toDlpack() if hasattr(a, "toDlpack") else a.__dlpack__()
        from torch.utils import dlpack

        return dlpack.to_dlpack(a)

    def stream(self) -> int:
        if self.cupy:
            with self.xp.cuda.Device(self.index):
                return int(self.xp.cuda.get_current_stream().ptr)
        return int(self.xp.cuda.current_stream(self.device).cuda_stream)

    # -- checks (one small device-to-host read each)
    def all_finite(self, a) -> bool:
        return bool(self.xp.isfinite(a).all())

    def first_zero_row(self, a) -> int | None:
        zero = ~(a != 0).any(1) if not self.cupy else ~(a != 0).any(axis=1)
        if not bool(zero.any()):
            return None
        return int(zero.nonzero()[0][0]) if self.cupy else int(zero.nonzero()[0, 0])

    def is_int(self, a) -> bool:
        if self.cupy:
            return bool(np.issubdtype(a.dtype, np.integer))  # cupy dtypes are numpy dtypes
        return not a.dtype.is_floating_point and not a.dtype.is_complex and a.dtype != self.xp.bool

    def minmax(self, a) -> tuple[int, int]:
        return int(a.min()), int(a.max())

    def arange(self, n: int):
        if self.cupy:
            with self.xp.cuda.Device(self.index):
                return self.xp.arange(n)
        return self.xp.arange(n, device=self.device)


_DEVICE_FLOATS = ("float32", "float64", "float16", "bfloat16")


def _device_float_matrix(dev: _Device, x: Any, name: str):
    a = dev.array(x, name)
    dt = dev.dtype_name(a)
    if dt not in _DEVICE_FLOATS:
        raise TypeError(f"{name}: dtype must be float32 or float64 (or float16 / bfloat16 on "
                        f"CUDA), got {dt}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows, dims), got shape {tuple(a.shape)}")
    if a.shape[0] < 1:
        raise ValueError(f"{name}: needs at least 1 rows, got shape {tuple(a.shape)}")
    if a.shape[1] < 1:
        raise ValueError(f"{name}: needs at least 1 column, got shape {tuple(a.shape)}")
    if not dev.all_finite(a):
        raise ValueError(f"{name}: contains NaN or Inf")
    # float16 / bfloat16 are computed in float32 (the results are cast back).
    if dt in ("float16", "bfloat16"):
        a = dev.astype(a, "float32")
    return dev.layout(a), dt


def _device_blocks(dev: _Device, arrays: list, names: list[str]):
    pairs = [_device_float_matrix(dev, a, nm) for a, nm in zip(arrays, names)]
    blocks = [p[0] for p in pairs]
    for (b, dt), nm in zip(pairs[1:], names[1:]):
        if dt != pairs[0][1]:
            raise TypeError(f"{nm}: dtype {dt} differs from {names[0]} dtype {pairs[0][1]}")
        if b.shape[1] != blocks[0].shape[1]:
            raise ValueError(f"{nm}: has {b.shape[1]} columns but {names[0]} has {blocks[0].shape[1]}")
    return blocks, pairs[0][1]


def _compute_dtype(dev: _Device, a) -> str:
    return dev.dtype_name(a)


def _device_affinity(dev: _Device, blocks, opts, normalize: bool, precision: str):
    n = sum(int(b.shape[0]) for b in blocks)
    d = int(blocks[0].shape[1])
    dt = _compute_dtype(dev, blocks[0])
    k = opts["k"]
    indices = dev.empty((n, k), "int64")
    weights = dev.empty((n, k), dt)
    ws = dev.workspace(_core.knn_affinity_workspace_bytes(n, d, k, dt, precision), "knn_affinity")
    _core.knn_affinity([dev.capsule(b) for b in blocks], dev.capsule(indices),
                       dev.capsule(weights), normalize=normalize, threads=0,
                       stream=dev.stream(), precision=precision, workspace=dev.capsule(ws),
                       **opts)
    return indices, weights


def _device_normalize(dev: _Device, indices, weights) -> Csr:
    n, k = int(indices.shape[0]), int(indices.shape[1])
    dt = _compute_dtype(dev, weights)
    indptr = dev.empty((n + 1,), "int64")
    cols = dev.empty((2 * n * k,), "int64")
    data = dev.empty((2 * n * k,), dt)
    ws = dev.workspace(_core.sym_normalize_workspace_bytes(n, k, dt, dev.index), "sym_normalize")
    nnz = _core.sym_normalize(dev.capsule(indices), dev.capsule(weights), dev.capsule(indptr),
                              dev.capsule(cols), dev.capsule(data), threads=0,
                              stream=dev.stream(), workspace=dev.capsule(ws))
    # The 2 N k upper bound is released: keep only the nnz entries.
    return Csr(indptr, cols[:nnz].copy() if dev.cupy else cols[:nnz].clone(),
               data[:nnz].copy() if dev.cupy else data[:nnz].clone())


def _device_cg(dev: _Device, w: Csr, rhs, opts) -> CgResult:
    n, m = int(rhs.shape[0]), int(rhs.shape[1])
    dt = _compute_dtype(dev, rhs)
    x = dev.empty((n, m), dt)
    iterations = dev.empty((m,), "int64")
    residuals = dev.empty((m,), "float64")
    ws = dev.workspace(_core.cg_solve_workspace_bytes(n, m, dt), "cg_solve")
    _core.cg_solve(*(dev.capsule(a) for a in w), dev.capsule(rhs), dev.capsule(x),
                   dev.capsule(iterations), dev.capsule(residuals), threads=0,
                   stream=dev.stream(), workspace=dev.capsule(ws), **opts)
    return CgResult(x, iterations, residuals)


def _device_readout(dev: _Device, scores):
    """labels and confidence on the device, as _readout does on the host."""
    xp = dev.xp
    n, m = int(scores.shape[0]), int(scores.shape[1])
    if dev.cupy:
        labels = xp.argmax(scores, axis=1).astype("int64")
    else:
        labels = xp.argmax(scores, dim=1)
    confidence = dev.zeros((n,), dev.dtype_name(scores))
    for start in range(0, n, _CHUNK_ROWS):
        chunk = scores[start : start + _CHUNK_ROWS]
        positive = dev.astype(xp.maximum(chunk, xp.zeros_like(chunk)), "float64")
        total = positive.sum(1) if not dev.cupy else positive.sum(axis=1)
        ones = xp.ones_like(total)
        p = positive / xp.where(total > 0, total, ones)[:, None]
        plogp = p * xp.log(xp.where(p > 0, p, xp.ones_like(p)))
        entropy = -(plogp.sum(1) if not dev.cupy else plogp.sum(axis=1))
        conf = xp.where(total > 0, 1.0 - entropy / math.log(m), xp.zeros_like(total))
        confidence[start : start + int(total.shape[0])] = dev.astype(conf, dev.dtype_name(scores))
    return labels, confidence


def _precision_arg(precision: Any, on_cuda: bool, dtype: str) -> str:
    if not isinstance(precision, str) or precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision != "exact":
        if not on_cuda:
            raise ValueError(f"precision: {precision!r} runs on CUDA tensor cores only; CPU "
                             "arrays take precision='exact'")
        if dtype == "float64":
            raise ValueError(f"precision: {precision!r} needs float32 input (or float16 / "
                             "bfloat16); float64 takes precision='exact'")
    return precision


# --------------------------------------------------------------------------------------------
# Public API


def knn_affinity(x, k, *, exclude_self=True, weight="relu", gamma=1.0, normalize=False,
                 block_rows=None, threads=None, precision="exact"):
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
        block_rows: similarity tile size (rows and columns); default from cache sizes (CPU)
            or the kernel's 128-row tile (CUDA; smaller values force smaller tiles, for tests).
        threads: CPU threads; default all cores.
        precision: ``"exact"`` (the input dtype's arithmetic), or on CUDA with float32 input
            ``"tf32"`` / ``"bf16"``: tensor-core operands with float32 accumulation; the final
            k neighbours are re-scored in float32, so weights are exact dot products, while the
            neighbour set may differ slightly near ties. Anything else is a ValueError.

    CUDA arrays (torch, cupy, any ``__dlpack__`` on a CUDA device) run on that device on the
    framework's current stream and return arrays of the same kind there (other DLPack
    producers get torch tensors); float16 / bfloat16 inputs are computed in float32.

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
    device = _placement(list(zip(arrays, names)))
    if device is not None:
        with _Device(arrays[0], device) as dev:
            blocks, dt = _device_blocks(dev, arrays, names)
            n = sum(int(b.shape[0]) for b in blocks)
            if n < 2:
                raise ValueError(f"x: needs at least 2 rows, got {n}")
            opts = _affinity_options(k, n, exclude_self, weight, gamma, block_rows)
            precision = _precision_arg(precision, True, dt)
            _threads(threads)
            if normalize:
                for b, name in zip(blocks, names):
                    _device_check_nonzero_rows(dev, b, name)
            indices, weights = _device_affinity(dev, blocks, opts, bool(normalize), precision)
            if dev.dtype_name(weights) != dt:
                weights = dev.astype(weights, dt)
            return indices, weights
    blocks = _row_blocks(arrays, names)
    n = sum(b.shape[0] for b in blocks)
    if n < 2:
        raise ValueError(f"x: needs at least 2 rows, got {n}")
    opts = _affinity_options(k, n, exclude_self, weight, gamma, block_rows)
    _precision_arg(precision, False, str(blocks[0].dtype))
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
    device = _placement([(indices, "indices"), (weights, "weights")])
    if device is not None:
        _threads(threads)
        with _Device(weights, device) as dev:
            return _device_sym_normalize(dev, indices, weights)
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


def _csr_parts(w: Any):
    if hasattr(w, "indptr") and hasattr(w, "indices") and hasattr(w, "data"):
        return (w.indptr, w.indices, w.data), getattr(w, "shape", None)
    if isinstance(w, (tuple, list)) and len(w) == 3:
        return tuple(w), None
    raise TypeError(
        f"W: expected a Csr, a scipy.sparse CSR matrix or (indptr, indices, data), "
        f"got {type(w).__name__}"
    )


def _csr_arg(w: Any, n_rows: int, dtype: np.dtype) -> Csr:
    parts, shape = _csr_parts(w)
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
    try:
        parts = list(zip(_csr_parts(W)[0], ("W.indptr", "W.indices", "W.data")))
    except TypeError:
        parts = []  # reported below, by the CPU or the CUDA argument checks
    device = _placement([(rhs, "rhs")] + parts)
    if device is not None:
        _threads(threads)
        with _Device(rhs, device) as dev:
            b, dt = _device_float_matrix(dev, rhs, "rhs")
            opts = _cg_options(alpha, max_iter, tol)
            w = _device_csr_arg(dev, W, int(b.shape[0]), dt)
            result = _device_cg(dev, w, b, opts)
            x = result.x if dev.dtype_name(result.x) == dt else dev.astype(result.x, dt)
            return CgResult(x, result.iterations, result.residuals)
    b = _float_matrix(rhs, "rhs")
    opts = _cg_options(alpha, max_iter, tol)
    w = _csr_arg(W, b.shape[0], b.dtype)
    result = _run_cg(w, b, opts, _threads(threads))
    return CgResult(*(_wrap(a, rhs) for a in result))


def label_propagate(text, images, *, k=20, alpha=0.99, max_iter=20, tol=1e-6, weight="relu",
                    gamma=1.0, normalize=True, block_rows=None, threads=None,
                    precision="exact") -> LabelPropagation:
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
        precision: operand precision of the k-NN search, as in :func:`knn_affinity`
            (``"tf32"`` / ``"bf16"``: CUDA float32 only).

    CUDA inputs run every stage on their device (see :func:`knn_affinity`).

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
    device = _placement([(text, "text"), (images, "images")])
    if device is not None:
        with _Device(images, device) as dev:
            return _device_label_propagate(dev, text, images, k=k, alpha=alpha,
                                           max_iter=max_iter, tol=tol, weight=weight,
                                           gamma=gamma, normalize=normalize,
                                           block_rows=block_rows, threads=threads,
                                           precision=precision)
    t, v = _row_blocks([text, images], ["text", "images"])
    if t.shape[0] < 2:
        raise ValueError(f"text: needs at least 2 rows (classes), got shape {t.shape}")
    m, n = t.shape[0], v.shape[0]
    opts = _affinity_options(k, m + n, True, weight, gamma, block_rows)
    cg_opts = _cg_options(alpha, max_iter, tol)
    _precision_arg(precision, False, str(t.dtype))
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


# --------------------------------------------------------------------------------------------
# CUDA versions of the public functions' bodies (arguments already placed on one device)


def _device_check_nonzero_rows(dev: _Device, a, name: str) -> None:
    row = dev.first_zero_row(a)
    if row is not None:
        raise ValueError(f"{name}: row {row} is all zeros and cannot be L2-normalised")


def _device_sym_normalize(dev: _Device, indices, weights) -> Csr:
    idx = dev.array(indices, "indices")
    w = dev.array(weights, "weights")
    if not dev.is_int(idx):
        raise TypeError(f"indices: dtype must be an integer type, got {dev.dtype_name(idx)}")
    dt = dev.dtype_name(w)
    if dt not in _DEVICE_FLOATS:
        raise TypeError(f"weights: dtype must be float32 or float64, got {dt}")
    if idx.ndim != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"indices: expected a non-empty 2-D array (N, k), got shape {tuple(idx.shape)}")
    if tuple(w.shape) != tuple(idx.shape):
        raise ValueError(f"weights: shape {tuple(w.shape)} does not match indices {tuple(idx.shape)}")
    n = int(idx.shape[0])
    lo, hi = dev.minmax(idx)
    if lo < 0 or hi >= n:
        raise ValueError(f"indices: entries must be in [0, {n}), found {lo}..{hi}")
    if not dev.all_finite(w):
        raise ValueError("weights: contains NaN or Inf")
    if bool((w < 0).any()):
        raise ValueError("weights: entries must be >= 0")
    if dt in ("float16", "bfloat16"):
        w = dev.astype(w, "float32")
    csr = _device_normalize(dev, dev.layout(dev.astype(idx, "int64")), dev.layout(w))
    data = csr.data if dev.dtype_name(csr.data) == dt else dev.astype(csr.data, dt)
    return Csr(csr.indptr, csr.indices, data)


def _device_csr_arg(dev: _Device, w: Any, n_rows: int, dtype: str) -> Csr:
    parts, shape = _csr_parts(w)
    indptr, indices, data = (dev.array(a, f"W.{nm}") for a, nm in
                             zip(parts, ("indptr", "indices", "data")))
    for a, nm in ((indptr, "indptr"), (indices, "indices")):
        if not dev.is_int(a):
            raise TypeError(f"W.{nm}: dtype must be an integer type, got {dev.dtype_name(a)}")
        if a.ndim != 1:
            raise ValueError(f"W.{nm}: expected a 1-D array, got shape {tuple(a.shape)}")
    ddt = dev.dtype_name(data)
    if ddt not in _DEVICE_FLOATS:
        raise TypeError(f"W.data: dtype must be float32 or float64, got {ddt}")
    if ddt != dtype:
        raise TypeError(f"W.data: dtype {ddt} differs from rhs dtype {dtype}")
    n = int(indptr.shape[0]) - 1
    if shape is not None and tuple(shape) != (n, n):
        raise ValueError(f"W: must be square, got shape {tuple(shape)}")
    if n != n_rows:
        raise ValueError(f"W: has {n} rows but rhs has {n_rows}")
    if tuple(data.shape) != tuple(indices.shape):
        raise ValueError(f"W: data has {data.shape[0]} entries but indices has {indices.shape[0]}")
    nnz = int(indices.shape[0])
    steps = indptr[1:] - indptr[:-1]
    if int(indptr[0]) != 0 or int(indptr[-1]) != nnz or (n > 0 and bool((steps < 0).any())):
        raise ValueError("W.indptr: must start at 0, be non-decreasing and end at nnz")
    if nnz:
        lo, hi = dev.minmax(indices)
        if lo < 0 or hi >= n:
            raise ValueError(f"W.indices: entries must be in [0, {n})")
    if not dev.all_finite(data):
        raise ValueError("W.data: contains NaN or Inf")
    if ddt in ("float16", "bfloat16"):
        data = dev.astype(data, "float32")
    return Csr(*(dev.layout(a) for a in (dev.astype(indptr, "int64"),
                                         dev.astype(indices, "int64"), data)))


def _device_label_propagate(dev: _Device, text, images, *, k, alpha, max_iter, tol, weight,
                            gamma, normalize, block_rows, threads, precision):
    (t, v), dt = _device_blocks(dev, [text, images], ["text", "images"])
    if t.shape[0] < 2:
        raise ValueError(f"text: needs at least 2 rows (classes), got shape {tuple(t.shape)}")
    m, n = int(t.shape[0]), int(v.shape[0])
    opts = _affinity_options(k, m + n, True, weight, gamma, block_rows)
    cg_opts = _cg_options(alpha, max_iter, tol)
    precision = _precision_arg(precision, True, dt)
    _threads(threads)
    if normalize:
        _device_check_nonzero_rows(dev, t, "text")
        _device_check_nonzero_rows(dev, v, "images")
    indices, weights = _device_affinity(dev, [t, v], opts, bool(normalize), precision)
    w = _device_normalize(dev, indices, weights)
    del indices, weights
    rhs = dev.zeros((m + n, m), dev.dtype_name(t))
    diag = dev.arange(m)
    rhs[diag, diag] = 1
    solve = _device_cg(dev, w, rhs, cg_opts)
    del w, rhs
    scores = solve.x[m:]
    labels, confidence = _device_readout(dev, scores)
    if dev.dtype_name(scores) != dt:
        scores, confidence = dev.astype(scores, dt), dev.astype(confidence, dt)
    return LabelPropagation(labels, scores, confidence, solve.iterations, solve.residuals)
