"""The Python face of reclip_ext: argument validation, array-kind handling, result types.

This is the only module that knows numpy, torch and cupy. It checks every argument (so errors
name what the user passed), turns inputs into views the kernels accept (column-contiguous; no
copy when they already are), allocates the outputs, hands DLPack capsules to ``_core`` and
returns results of the caller's array kind on the caller's device.

Every function is written once, against a small array namespace chosen from where the inputs
live: CPU arrays of any kind are processed through zero-copy numpy views (:class:`_Host`),
cupy arrays through cupy (:class:`_Cupy`) and CUDA tensors through torch
(:class:`_TorchCuda`). Only what really differs between them lives there: reading the
caller's array, dtype names, allocation, layout copies, DLPack capsules, the current stream
and the device guard.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Any, NamedTuple

import numpy as np

from . import _core
from .defaults import DEFAULTS

_WEIGHTS = ("relu", "shift")
_PRECISIONS = ("exact", "tf32", "bf16")
_CHUNK_ELEMENTS = 1 << 24  # elements per chunk of the scans below (bounds their temporaries)
_HALF_FLOATS = ("float16", "bfloat16")  # CUDA only: computed in float32, results cast back


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
        """The same matrix as a ``scipy.sparse.csr_array`` (CPU arrays only; needs scipy, which
        reclip_ext itself does not)."""
        try:
            import scipy.sparse
        except ImportError:
            raise ImportError("Csr.to_scipy needs scipy, which is not installed: "
                              "pip install scipy") from None

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
# Array kinds and placement


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


def _placement(items: list[tuple[Any, str]]) -> int | None:
    """None when every array is on the CPU; the CUDA device index when all are on one device.

    CUDA input needs a CUDA build (RuntimeError) and a visible device (RuntimeError); arrays on
    different devices are a ValueError naming the argument that differs from the first.
    """
    where: list[tuple[str, int | None]] = []
    for x, name in items:
        kind = _kind(x)
        if kind == "none":
            continue  # reading it raises the TypeError naming it
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


# --------------------------------------------------------------------------------------------
# Array namespaces: what differs between the CPU, cupy and torch on a CUDA device
#
# Each offers: array (the caller's argument as this namespace's array), dtype_name, is_int,
# empty / zeros / arange, astype, copy, layout (the kernels' layout), capsule, stream,
# synchronize (wait for the kernels on that stream), result
# (what goes back to the caller), guard (the device context), xp (the module with isfinite,
# argmax, where, log, ...), floats (accepted float dtypes), on_cuda and index (the device).


class _NumpyApi:
    """The operations numpy and cupy spell alike; `xp` is the one module or the other."""

    xp: Any

    def dtype_name(self, a) -> str:
        return str(a.dtype)

    def is_int(self, a) -> bool:
        return bool(np.issubdtype(a.dtype, np.integer))  # cupy dtypes are numpy dtypes

    def empty(self, shape, dtype: str):
        return self.xp.empty(shape, dtype)

    def zeros(self, shape, dtype: str):
        return self.xp.zeros(shape, dtype)

    def arange(self, n: int):
        return self.xp.arange(n)

    def astype(self, a, dtype: str):
        return a.astype(dtype, copy=False)

    def copy(self, a):
        return a.copy()

    def layout(self, a):
        """Columns contiguous and rows at a non-negative stride, copying only when needed."""
        item = a.itemsize
        if a.ndim == 2 and a.shape[0] > 0 and a.shape[1] > 0:
            col_ok = a.shape[1] == 1 or a.strides[1] == item
            row_ok = a.shape[0] == 1 or a.strides[0] >= 0  # stride 0: rows repeat, fine to read
            if col_ok and row_ok and a.strides[0] % item == 0:
                return a
        elif a.ndim == 1 and (a.shape[0] <= 1 or a.strides[0] == item):
            return a
        return self.xp.ascontiguousarray(a)


class _Host(_NumpyApi):
    """CPU arrays of every kind, as zero-copy numpy views. The CPU kernels run on the calling
    thread's pool (stream 0) and size their own scratch; torch callers get torch tensors back,
    sharing the memory the kernels wrote."""

    xp = np
    floats = ("float32", "float64")
    on_cuda = False
    index = None
    guard = contextlib.nullcontext()

    def __init__(self, like: Any):
        self.torch_results = _kind(like) == "torch"

    def array(self, x: Any, name: str) -> np.ndarray:
        return _host_view(x, name)

    def capsule(self, a: np.ndarray):
        try:
            return a.__dlpack__(max_version=(1, 0))
        except TypeError:  # numpy < 2.1 knows only unversioned capsules
            return a.__dlpack__()

    def stream(self) -> int:
        return 0

    def synchronize(self) -> None:
        pass  # the CPU kernels have finished when they return

    def result(self, a: np.ndarray) -> Any:
        if not self.torch_results:
            return a
        import torch

        return torch.from_numpy(np.ascontiguousarray(a))


class _Cupy(_NumpyApi):
    """cupy arrays on one CUDA device: numpy's API there. cupy allocates and launches on the
    current device only, so a call runs inside `guard`; the kernels run on cupy's current
    stream."""

    floats = ("float32", "float64") + _HALF_FLOATS
    on_cuda = True

    def __init__(self, index: int):
        import cupy

        self.xp, self.index = cupy, index
        self.guard = cupy.cuda.Device(index)

    def array(self, x: Any, name: str):
        return x if _kind(x) == "cupy" else self.xp.from_dlpack(x)

    def capsule(self, a):
        return a.toDlpack() if hasattr(a, "toDlpack") else a.__dlpack__()

    def stream(self) -> int:
        return int(self.xp.cuda.get_current_stream().ptr)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def result(self, a):
        return a


class _TorchCuda:
    """torch tensors on one CUDA device (other __dlpack__ producers there are imported as
    tensors, zero-copy). Outputs are allocated on that device and the kernels run on torch's
    current stream."""

    floats = ("float32", "float64") + _HALF_FLOATS
    on_cuda = True
    guard = contextlib.nullcontext()  # torch allocates on the device it is given

    def __init__(self, index: int):
        import torch

        self.xp, self.index = torch, index
        self.device = torch.device("cuda", index)

    def array(self, x: Any, name: str):
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

    def is_int(self, a) -> bool:
        return not a.dtype.is_floating_point and not a.dtype.is_complex and a.dtype != self.xp.bool

    def empty(self, shape, dtype: str):
        return self.xp.empty(shape, dtype=getattr(self.xp, dtype), device=self.device)

    def zeros(self, shape, dtype: str):
        return self.xp.zeros(shape, dtype=getattr(self.xp, dtype), device=self.device)

    def arange(self, n: int):
        return self.xp.arange(n, device=self.device)

    def astype(self, a, dtype: str):
        return a.to(getattr(self.xp, dtype))

    def copy(self, a):
        return a.clone()

    def layout(self, a):
        """Columns contiguous (torch strides are never negative), copying only when needed."""
        ok = (a.ndim == 1 and (a.shape[0] <= 1 or a.stride(0) == 1)) or (
            a.ndim == 2 and (a.shape[1] <= 1 or a.stride(1) == 1))
        return a if ok else a.contiguous()

    def capsule(self, a):
        from torch.utils import dlpack

        # The kernels run on the current stream and may still read `a` after the call returns.
        # A caller's tensor allocated on another stream would go back to that stream's pool
        # when the caller frees it, free for reuse there while our kernels read it: recording
        # the current stream keeps it out of the pool until they are done. (torch ignores the
        # record when the streams are the same, and for memory its allocator did not give.)
        a.record_stream(self.xp.cuda.current_stream(self.device))
        return dlpack.to_dlpack(a)

    def stream(self) -> int:
        return int(self.xp.cuda.current_stream(self.device).cuda_stream)

    def synchronize(self) -> None:
        self.xp.cuda.current_stream(self.device).synchronize()

    def result(self, a):
        return a


_Arrays = _Host | _Cupy | _TorchCuda


def _namespace(items: list[tuple[Any, str]], like: Any) -> _Arrays:
    """The namespace for the arrays of `items`, returning results of the kind of `like`."""
    index = _placement(items)
    if index is None:
        return _Host(like)
    return _Cupy(index) if _kind(like) == "cupy" else _TorchCuda(index)


# --------------------------------------------------------------------------------------------
# Argument checks


def _float_matrix(ns: _Arrays, x: Any, name: str, min_rows: int = 1):
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
    _check_finite(ns, a, name)
    return ns.layout(_computed(ns, a)), dt


def _computed(ns: _Arrays, a):
    """`a` in the dtype the kernels compute in: float32 for the half floats."""
    return ns.astype(a, "float32") if ns.dtype_name(a) in _HALF_FLOATS else a


def _row_blocks(ns: _Arrays, arrays: list, names: list[str]):
    """(validated float matrices of one dtype and width, to be stacked by rows; their dtype)."""
    pairs = [_float_matrix(ns, a, name) for a, name in zip(arrays, names)]
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


def _chunk_rows(a) -> int:
    width = math.prod(a.shape[1:]) if a.ndim > 1 else 1
    return max(1, _CHUNK_ELEMENTS // max(1, width))


def _check_finite(ns: _Arrays, a, name: str) -> None:
    rows = _chunk_rows(a)
    for start in range(0, max(a.shape[0], 1), rows):
        if not bool(ns.xp.isfinite(a[start : start + rows]).all()):
            raise ValueError(f"{name}: contains NaN or Inf")


def _check_nonzero_rows(ns: _Arrays, a, name: str) -> None:
    rows = _chunk_rows(a)
    for start in range(0, a.shape[0], rows):
        nonzeros = (a[start : start + rows] != 0).sum(1)
        if bool((nonzeros == 0).any()):
            row = start + int(nonzeros.argmin())  # the first all-zero row
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


def _rows_arg(rows: Any, n: int) -> tuple[int, int]:
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


def _csr_parts(w: Any):
    if hasattr(w, "indptr") and hasattr(w, "indices") and hasattr(w, "data"):
        return (w.indptr, w.indices, w.data), getattr(w, "shape", None)
    if isinstance(w, (tuple, list)) and len(w) == 3:
        return tuple(w), None
    raise TypeError(
        f"W: expected a Csr, a scipy.sparse CSR matrix or (indptr, indices, data), "
        f"got {type(w).__name__}"
    )


def _csr_arg(ns: _Arrays, w: Any, n_rows: int, dtype: str) -> Csr:
    parts, shape = _csr_parts(w)
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
    _check_finite(ns, data, "W.data")
    return Csr(ns.layout(ns.astype(indptr, "int64")), ns.layout(ns.astype(indices, "int64")),
               ns.layout(_computed(ns, data)))


# --------------------------------------------------------------------------------------------
# Kernel calls on validated arrays: outputs allocated in the caller's framework, on its device


def sync_requested() -> bool:
    """REXT_SYNC=1: every CUDA op waits for its kernels before it returns, so that a fault is
    raised by the op that caused it, not by a later, unrelated call that happens to sync."""
    value = os.environ.get("REXT_SYNC", "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"REXT_SYNC must be 0 or 1 (or unset), got {value!r}")


def _launch(ns: _Arrays, op: str, kernel, *args, **kwargs):
    """kernel(*args, **kwargs), then under REXT_SYNC=1 a wait for its CUDA work and a check."""
    sync = sync_requested()
    out = kernel(*args, **kwargs)
    if sync and ns.on_cuda:
        try:
            ns.synchronize()
        except Exception as err:  # torch's RuntimeError, cupy's CUDARuntimeError
            raise RuntimeError(f"{op}: its CUDA kernels failed (REXT_SYNC=1): {err}") from err
    return out


def _workspace(ns: _Arrays, op: str, nbytes, *args):
    """The op's scratch buffer on the CUDA device, of nbytes(*args) bytes, as a capsule; None
    on the CPU, whose kernels allocate their own. A failed allocation says what was asked."""
    if not ns.on_cuda:
        return None
    size = nbytes(*args)
    try:
        buffer = ns.empty((max(int(size), 1),), "uint8")
    except Exception as err:  # torch.OutOfMemoryError, cupy OutOfMemoryError, ...
        if "memory" not in str(err).lower() and "MemoryError" not in type(err).__name__:
            raise
        raise MemoryError(f"{op}: needs about {size / 2**30:.1f} GiB of CUDA workspace on "
                          f"cuda:{ns.index}, which could not be allocated; reduce N, d, k or m"
                          ) from err
    return ns.capsule(buffer)  # the capsule keeps the buffer alive until the kernel is done


def _run_affinity(ns: _Arrays, blocks, opts, normalize: bool, threads: int, precision: str,
                  rows: tuple[int, int] | None = None, queries=None):
    """The graph's rows of rows [start, stop) of the stacked blocks (rows=None: all), or of
    the separate `queries`, against every stacked row."""
    n = sum(int(b.shape[0]) for b in blocks)
    d, k = int(blocks[0].shape[1]), opts["k"]
    dt = ns.dtype_name(blocks[0])
    start, stop = rows if rows is not None else (0, n)
    nq = int(queries.shape[0]) if queries is not None else stop - start
    indices = ns.empty((nq, k), "int64")
    weights = ns.empty((nq, k), dt)
    workspace = _workspace(ns, "knn_affinity", _core.knn_affinity_workspace_bytes, n, d, k, dt,
                           precision, nq, queries is not None)
    _launch(ns, "knn_affinity", _core.knn_affinity, [ns.capsule(b) for b in blocks],
            ns.capsule(indices), ns.capsule(weights), normalize=normalize, threads=threads,
            stream=ns.stream(), precision=precision, workspace=workspace, query_start=start,
            query_stop=stop, queries=None if queries is None else ns.capsule(queries), **opts)
    return indices, weights


def _run_normalize(ns: _Arrays, indices, weights, threads: int) -> Csr:
    n, k = int(indices.shape[0]), int(indices.shape[1])
    dt = ns.dtype_name(weights)
    indptr = ns.empty((n + 1,), "int64")
    cols = ns.empty((2 * n * k,), "int64")
    data = ns.empty((2 * n * k,), dt)
    workspace = _workspace(ns, "sym_normalize", _core.sym_normalize_workspace_bytes, n, k, dt,
                           ns.index)
    nnz = _launch(ns, "sym_normalize", _core.sym_normalize, ns.capsule(indices),
                  ns.capsule(weights), ns.capsule(indptr), ns.capsule(cols), ns.capsule(data),
                  threads=threads, stream=ns.stream(), workspace=workspace)
    # The 2 N k upper bound is released: keep only the nnz entries.
    return Csr(indptr, ns.copy(cols[:nnz]), ns.copy(data[:nnz]))


def _run_cg(ns: _Arrays, w: Csr, rhs, opts, threads: int) -> CgResult:
    n, m = int(rhs.shape[0]), int(rhs.shape[1])
    dt = ns.dtype_name(rhs)
    x = ns.empty((n, m), dt)
    iterations = ns.empty((m,), "int64")
    residuals = ns.empty((m,), "float64")
    workspace = _workspace(ns, "cg_solve", _core.cg_solve_workspace_bytes, n, m, dt)
    _launch(ns, "cg_solve", _core.cg_solve, *(ns.capsule(a) for a in w), ns.capsule(rhs),
            ns.capsule(x), ns.capsule(iterations), ns.capsule(residuals), threads=threads,
            stream=ns.stream(), workspace=workspace, **opts)
    return CgResult(x, iterations, residuals)


def _readout(ns: _Arrays, scores):
    """Labels (argmax) and confidence 1 - H(p)/log m, p = normalised max(scores, 0)."""
    xp = ns.xp
    n, m = int(scores.shape[0]), int(scores.shape[1])
    dt = ns.dtype_name(scores)
    labels = ns.astype(xp.argmax(scores, 1), "int64")
    confidence = ns.zeros((n,), dt)
    # Row chunks keep the float64 temporaries small next to the O(N k) graph.
    rows = _chunk_rows(scores)
    for start in range(0, n, rows):
        chunk = scores[start : start + rows]
        positive = ns.astype(xp.maximum(chunk, xp.zeros_like(chunk)), "float64")
        total = positive.sum(1)
        p = positive / xp.where(total > 0, total, xp.ones_like(total))[:, None]
        plogp = p * xp.log(xp.where(p > 0, p, xp.ones_like(p)))
        entropy = -plogp.sum(1)
        conf = xp.where(total > 0, 1.0 - entropy / math.log(m), xp.zeros_like(total))
        confidence[start : start + int(total.shape[0])] = ns.astype(conf, dt)
    return labels, confidence


# --------------------------------------------------------------------------------------------
# Public API


def knn_affinity(x, k, *, rows=None, queries=None, exclude_self=None, weight=DEFAULTS.weight,
                 gamma=DEFAULTS.gamma, normalize=False, block_rows=None, threads=None, precision="exact"):
    """k-nearest-neighbour affinities by inner product, never forming the N x N matrix.

    For each row i the k rows j (j != i when ``exclude_self``) with the largest s_ij = x_i . x_j
    are found (ties go to the smaller j) and weighted by f(s): ``"relu"`` max(s, 0)^gamma or
    ``"shift"`` ((1 + s) / 2)^gamma.

    A block of the graph's rows (e.g. one shard's rows, for a sharded graph) is computed by the
    same kernels without the rest: ``rows=(start, stop)`` returns the rows start..stop-1 of the
    whole call's result, each searched against every row of x, with global column indices
    (row i of the block leaves out column start + i when ``exclude_self``). In ``"exact"``
    precision they are bitwise the rows of the whole graph, so the blocks of a partition of
    [0, N) concatenate to the whole call. ``queries=`` searches other points against x as the
    database: they are not rows of x, so no column is their own and ``exclude_self`` cannot be
    True (a query that is a row of x is what ``rows=`` is for).

    Args:
        x: (N, d) float32 or float64 array (numpy, torch, anything with ``__dlpack__``), or a
            pair of arrays (e.g. ``(text, images)``) taken as their row-wise concatenation
            without copying it.
        k: neighbours per row, 1 <= k <= N - 1 (N with ``exclude_self=False`` or ``queries``).
        rows: ``(start, stop)`` with 0 <= start <= stop <= N: only those rows of the graph.
            An empty block gives (0, k) results.
        queries: (Q, d) array of x's dtype, kind and device (Q may be 0): the graph's rows for
            these points against the rows of x. Not together with ``rows``.
        exclude_self: leave i out of its own neighbours; default True, and False for
            ``queries`` (True there is a ValueError).
        weight: ``"shift"`` (the ReCLIP authors' code, the default) or ``"relu"`` (Iscen et al.).
        gamma: exponent of the weight, > 0.
        normalize: L2-normalise rows first (cosine similarity); a zero row is an error. It is
            per row, so a block means the same as in the whole call: every row of x (the
            database) and every query row is normalised. (The graph's symmetric normalisation,
            which needs the whole graph, is :func:`sym_normalize`'s, not this.)
        block_rows: similarity tile size (rows and columns); default from cache sizes (CPU)
            or the kernel's 128-row tile (CUDA; smaller values force smaller tiles, for tests).
        threads: CPU threads; default from the problem size, at most all cores.
        precision: ``"exact"`` (the input dtype's arithmetic), or on CUDA with float32 input
            ``"tf32"`` / ``"bf16"``: tensor-core operands with float32 accumulation; the final
            k neighbours are re-scored in float32, so weights are exact dot products, while the
            neighbour set may differ slightly near ties. Anything else is a ValueError.

    CUDA arrays (torch, cupy, any ``__dlpack__`` on a CUDA device) run on that device on the
    framework's current stream and return arrays of the same kind there (other DLPack
    producers get torch tensors); float16 / bfloat16 inputs are computed in float32.

    Returns:
        (indices (Q, k) int64, weights (Q, k) of x's dtype), sorted by similarity, descending;
        Q = N, stop - start, or the number of queries. Indices are rows of x.

    Example:
        >>> import numpy as np, reclip_ext
        >>> x = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
        >>> idx, w = reclip_ext.knn_affinity(x, 1)
        >>> idx[:, 0].tolist()
        [1, 0, 1]
        >>> reclip_ext.knn_affinity(x, 1, rows=(1, 3))[0][:, 0].tolist()
        [0, 1]
    """
    stacked = isinstance(x, (tuple, list))
    arrays = list(x) if stacked else [x]
    names = [f"x[{i}]" for i in range(len(arrays))] if stacked else ["x"]
    if len(arrays) not in (1, 2):
        raise ValueError(f"x: expected an array or a pair of arrays, got {len(arrays)} arrays")
    if rows is not None and queries is not None:
        raise ValueError("rows: pass rows=(start, stop) for rows of x or queries= for other "
                         "points, not both")
    if queries is not None and exclude_self:
        raise ValueError("exclude_self: queries are not rows of x, so none of x's rows is "
                         "their own; pass exclude_self=False, or rows=(start, stop) for rows "
                         "of x")
    items = list(zip(arrays, names)) + ([(queries, "queries")] if queries is not None else [])
    ns = _namespace(items, arrays[0])
    with ns.guard:
        blocks, dt = _row_blocks(ns, arrays, names)
        n, d = sum(int(b.shape[0]) for b in blocks), int(blocks[0].shape[1])
        q, block = None, None
        if queries is None:
            if n < 2:
                raise ValueError(f"x: needs at least 2 rows, got {n}")
            excl = True if exclude_self is None else bool(exclude_self)
            block = _rows_arg(rows, n)
            nq = block[1] - block[0]
        else:
            excl = False
            q, q_dt = _float_matrix(ns, queries, "queries", min_rows=0)
            if q_dt != dt:
                raise TypeError(f"queries: dtype {q_dt} differs from {names[0]} dtype {dt}")
            if int(q.shape[1]) != d:
                raise ValueError(f"queries: has {int(q.shape[1])} columns but x has {d}")
            nq = int(q.shape[0])
        opts = _affinity_options(k, n, excl, weight, gamma, block_rows)
        precision = _precision_arg(precision, ns.on_cuda, dt)
        nthreads = _threads(threads)
        if normalize:
            for b, name in zip(blocks, names):
                _check_nonzero_rows(ns, b, name)
            if q is not None:
                _check_nonzero_rows(ns, q, "queries")
        if nq == 0:
            indices, weights = ns.empty((0, opts["k"]), "int64"), ns.empty((0, opts["k"]), dt)
            return ns.result(indices), ns.result(weights)
        indices, weights = _run_affinity(ns, blocks, opts, bool(normalize), nthreads, precision,
                                         rows=block, queries=q)
        return ns.result(indices), ns.result(ns.astype(weights, dt))


def sym_normalize(indices, weights, *, threads=None) -> Csr:
    """W = D^-1/2 (A + A^T) D^-1/2 of a k-NN graph, as CSR.

    A has A[i, indices[i, c]] = weights[i, c]; repeated pairs add up. Columns are sorted within
    rows, duplicates merged and zero entries dropped; a node with no edges gets an empty row.

    Args:
        indices: (N, k) integer array, entries in [0, N).
        weights: (N, k) float32 or float64 array, finite and >= 0.
        threads: CPU threads; default from the problem size, at most all cores.

    Returns:
        :class:`Csr` (indptr (N+1,) int64, indices (nnz,) int64, data (nnz,) weights' dtype).

    Example:
        >>> import numpy as np, reclip_ext
        >>> W = reclip_ext.sym_normalize(np.array([[1], [0]]), np.array([[1.0], [1.0]]))
        >>> W.to_scipy().toarray().tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    ns = _namespace([(indices, "indices"), (weights, "weights")], weights)
    with ns.guard:
        idx = ns.array(indices, "indices")
        w = ns.array(weights, "weights")
        if not ns.is_int(idx):
            raise TypeError(f"indices: dtype must be an integer type, got {ns.dtype_name(idx)}")
        dt = ns.dtype_name(w)
        if dt not in ns.floats:
            raise TypeError(f"weights: dtype must be float32 or float64, got {dt}")
        if idx.ndim != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
            raise ValueError("indices: expected a non-empty 2-D array (N, k), got shape "
                             f"{tuple(idx.shape)}")
        if tuple(w.shape) != tuple(idx.shape):
            raise ValueError(f"weights: shape {tuple(w.shape)} does not match indices "
                             f"{tuple(idx.shape)}")
        n = int(idx.shape[0])
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= n:
            raise ValueError(f"indices: entries must be in [0, {n}), found {low}..{high}")
        _check_finite(ns, w, "weights")
        if bool((w < 0).any()):
            raise ValueError("weights: entries must be >= 0")
        csr = _run_normalize(ns, ns.layout(ns.astype(idx, "int64")), ns.layout(_computed(ns, w)),
                             _threads(threads))
        return Csr(ns.result(csr.indptr), ns.result(csr.indices),
                   ns.result(ns.astype(csr.data, dt)))


def cg_solve(W, rhs, *, alpha=DEFAULTS.alpha, max_iter=DEFAULTS.max_iter, tol=DEFAULTS.tol,
             threads=None) -> CgResult:
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
        threads: CPU threads; default from the problem size, at most all cores.

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
        parts = []  # reported below, by the argument checks
    ns = _namespace([(rhs, "rhs")] + parts, rhs)
    with ns.guard:
        b, dt = _float_matrix(ns, rhs, "rhs")
        opts = _cg_options(alpha, max_iter, tol)
        w = _csr_arg(ns, W, int(b.shape[0]), dt)
        result = _run_cg(ns, w, b, opts, _threads(threads))
        return CgResult(ns.result(ns.astype(result.x, dt)), ns.result(result.iterations),
                        ns.result(result.residuals))


def label_propagate(text, images, *, k=DEFAULTS.k, alpha=DEFAULTS.alpha,
                    max_iter=DEFAULTS.max_iter, tol=DEFAULTS.tol, weight=DEFAULTS.weight,
                    gamma=DEFAULTS.gamma, normalize=True, block_rows=None, threads=None,
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
        threads: CPU threads; default from the problem size, at most all cores.
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
    ns = _namespace([(text, "text"), (images, "images")], images)
    with ns.guard:
        (t, v), dt = _row_blocks(ns, [text, images], ["text", "images"])
        if t.shape[0] < 2:
            raise ValueError(f"text: needs at least 2 rows (classes), got shape {tuple(t.shape)}")
        m, n = int(t.shape[0]), int(v.shape[0])
        opts = _affinity_options(k, m + n, True, weight, gamma, block_rows)
        cg_opts = _cg_options(alpha, max_iter, tol)
        precision = _precision_arg(precision, ns.on_cuda, dt)
        if normalize:
            _check_nonzero_rows(ns, t, "text")
            _check_nonzero_rows(ns, v, "images")
        nthreads = _threads(threads)
        graph = list(_run_affinity(ns, [t, v], opts, bool(normalize), nthreads, precision))
        return _propagate_graph(ns, graph, m, dt, cg_opts, nthreads)


def _propagate_graph(ns: _Arrays, graph: list, m: int, dt: str, cg_opts: dict,
                     nthreads: int) -> LabelPropagation:
    """Steps 4-6 on the k-NN lists [indices, weights] of [text; images] (the first m rows are
    the classes): normalise, solve, read out. `graph` is emptied, so that the lists are freed
    before the solve unless the caller keeps other references. reclip_ext.distributed runs
    the very same code on the gathered graph."""
    indices, weights = graph
    graph.clear()
    n = int(indices.shape[0]) - m
    w = _run_normalize(ns, indices, weights, nthreads)
    del indices, weights
    rhs = ns.zeros((m + n, m), ns.dtype_name(w.data))
    diagonal = ns.arange(m)
    rhs[diagonal, diagonal] = 1
    solve = _run_cg(ns, w, rhs, cg_opts, nthreads)
    del w, rhs
    scores = solve.x[m:]
    labels, confidence = _readout(ns, scores)
    return LabelPropagation(*(ns.result(a) for a in (
        labels, ns.astype(scores, dt), ns.astype(confidence, dt), solve.iterations,
        solve.residuals)))
