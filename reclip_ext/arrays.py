"""Where the arrays of reclip_ext live, and the namespace that handles each place.

CPU arrays of any kind (numpy, torch, anything with ``__dlpack__``) are processed through
zero-copy numpy views (``_Host``), cupy arrays through cupy (``_Cupy``) and CUDA tensors through
torch (``_TorchCuda``). Only what really differs between them lives here: reading the caller's
array, dtype names, allocation, layout copies, DLPack capsules, the current stream and the
device guard. :class:`Csr` is the engine's sparse matrix, of any of these kinds.
"""
from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import numpy as np

from . import _core

HALF_FLOATS = ("float16", "bfloat16")  # CUDA only: computed in float32, results cast back


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

        arrays = [host_view(a, name) for a, name in zip(self, ("indptr", "indices", "data"))]
        return scipy.sparse.csr_array((arrays[2], arrays[1], arrays[0]), shape=self.shape)


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


def host_view(x: Any, name: str) -> np.ndarray:
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
        return host_view(x, name)

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

    floats = ("float32", "float64") + HALF_FLOATS
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

    floats = ("float32", "float64") + HALF_FLOATS
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


Arrays = _Host | _Cupy | _TorchCuda


def namespace(items: list[tuple[Any, str]], like: Any) -> Arrays:
    """The namespace for the arrays of `items`, returning results of the kind of `like`."""
    index = _placement(items)
    if index is None:
        return _Host(like)
    return _Cupy(index) if _kind(like) == "cupy" else _TorchCuda(index)
