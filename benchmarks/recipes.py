"""The label-propagation implementations the benchmarks compare, stage by stage.

Every recipe turns (text (m, d), images (n, d)) into pseudo labels for the images through the
same three timed stages (docs/mathematics.md §2): ``knn`` (X = [text; images] L2-normalised, the
k nearest neighbours j != i of every row by inner product, weights max(s, 0)), ``normalize``
(W = D^-1/2 (A + A^T) D^-1/2, sparse) and ``solve`` ((I - alpha W) Z = Y for the m class
indicator columns by CG, labels = argmax of the image rows of Z). benchmarks/README.md describes
each recipe of ``RECIPES`` and the sgemm floor. All run with the same thread count
(:func:`configure_threads`); :class:`PeakMemory` and :func:`child_run` let a harness measure
each recipe in a fresh process.

The pieces are shared with the GPU harness (device_bench.py) and the tests: :func:`torch_knn`,
:func:`torch_normalize` and :func:`batched_cg` take arrays on any device (and numpy, for the CG),
:func:`per_class_cg` is the one per-class CG (scipy or cupyx), :func:`environment` the one
description of the machine.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from report import set_thread_env
from report import usable_cores as default_threads

STAGES = ("knn", "normalize", "solve", "total")
RECIPES = ("reclip_ext", "scipy-ref", "scipy-batched", "torch-dense-chunked", "sgemm-floor")
_limits: list[Any] = []  # keeps threadpoolctl limits alive


# --------------------------------------------------------------------------------------------
# Environment


def configure_threads(threads: int) -> dict:
    """Make every library loaded in this process use `threads` threads (the environment for
    later ones and children, threadpoolctl for loaded BLAS/OpenMP pools, torch and faiss if
    imported). Recipes call it again after importing their libraries. Returns what was set."""
    set_thread_env(threads)
    done: dict[str, Any] = {"env": threads}
    try:
        import threadpoolctl

        _limits.append(threadpoolctl.threadpool_limits(limits=threads))
        done["threadpoolctl"] = threads
    except ImportError:
        pass
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        done["torch"] = torch.get_num_threads()
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
        done["faiss"] = threads
    return done


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _preload(*names) -> None:
    """Import these modules (None: nothing) now, so that their import time is not measured."""
    for name in filter(None, names):
        importlib.import_module(name)


def _faiss():
    """faiss, or None when it is missing or REXT_BENCH_NO_FAISS=1 forces the sklearn path."""
    if os.environ.get("REXT_BENCH_NO_FAISS", "") not in ("", "0"):
        return None
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        return None
    return faiss


def import_reclip_ext():
    """Import reclip_ext with stdout sent to stderr: an editable install may print its
    rebuild check, which would otherwise land in the middle of a results table. (The rebuild
    hook hands sys.stdout to a subprocess, so the redirect needs a stream with a file number.)"""
    if "reclip_ext" in sys.modules:
        return sys.modules["reclip_ext"]
    try:
        sys.stderr.fileno()
        quiet = contextlib.redirect_stdout(sys.stderr)
    except (AttributeError, OSError, ValueError):
        quiet = contextlib.nullcontext()
    with quiet:
        import reclip_ext
    return reclip_ext


def environment(threads: int, device: str = "cpu") -> dict:
    """CPU, thread count, library versions, the extension's build and SIMD level; with
    device="cuda" also the GPU torch sees first."""
    import platform

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": default_threads(),
        "threads": threads,
        "numpy": np.__version__,
    }
    for name in _DISTRIBUTIONS:
        env[name] = _version(name)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch_cuda"] = torch.version.cuda
        if device == "cuda":
            prop = torch.cuda.get_device_properties(0)
            env.update({"gpu": prop.name, "sm_count": prop.multi_processor_count,
                        "gpu_memory_bytes": prop.total_memory,
                        "compute_capability": f"{prop.major}.{prop.minor}"})
    try:
        rext = import_reclip_ext()
        env.update({"reclip_ext": rext.__version__, "reclip_ext_file": rext.__file__,
                    "simd_level": rext.simd_level(), "built_with_cuda": rext.built_with_cuda(),
                    "cuda_device_count": rext.cuda_device_count()})
    except Exception as err:  # a broken build may fail with more than ImportError
        env["reclip_ext"] = f"not importable: {type(err).__name__}: {err}"
    try:
        import threadpoolctl

        env["threadpools"] = [
            {k: info.get(k) for k in ("internal_api", "version", "num_threads", "filepath")}
            for info in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        pass
    return env


#: the libraries whose versions a report names, and the distributions that install them
_DISTRIBUTIONS = {"scipy": ("scipy",), "sklearn": ("scikit-learn",),
                  "faiss": ("faiss-cpu", "faiss-gpu", "faiss"), "torch": ("torch",),
                  "psutil": ("psutil",), "cupy": ("cupy-cuda12x", "cupy-cuda11x", "cupy")}


def _version(name: str) -> str | None:
    """A library's version: the loaded module's, else its installed distribution's. Nothing is
    imported here: an import may start thread pools, or for cupy a CUDA context."""
    from importlib import metadata

    if name in sys.modules:
        return getattr(sys.modules[name], "__version__", "?")
    for dist in _DISTRIBUTIONS[name]:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return None


def _proc_field(path: str, key: str) -> str | None:
    """The value of `key` in a /proc file of "key: value" lines; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    import platform

    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------
# Memory


def _status_bytes(key: str) -> int | None:
    """A size from /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    value = _proc_field("/proc/self/status", key)
    return None if value is None else int(value.split()[0]) * 1024


def _rss_bytes() -> int:
    rss = _status_bytes("VmRSS:")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Peak RSS increase of this process since :meth:`reset`.

    On Linux the kernel's high-water mark is reset by writing 5 to /proc/self/clear_refs, so the
    peak is exact. Elsewhere it falls back to ru_maxrss, which cannot be reset: the increase is
    then only seen if the run goes above every earlier peak of the process (``method`` says
    which was used).
    """

    def __init__(self) -> None:
        self.method = "VmHWM" if self._try_reset() else "ru_maxrss"
        self.base = _rss_bytes()

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return _status_bytes("VmHWM:") is not None

    def reset(self) -> None:
        self.base = _rss_bytes()
        if self.method == "VmHWM":
            self._try_reset()

    def peak(self) -> int:
        """Bytes above the RSS at the last reset (>= 0)."""
        top = _status_bytes("VmHWM:") if self.method == "VmHWM" else _maxrss_bytes()
        return max(0, (top or 0) - self.base)


# --------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class Params:
    k: int = 20
    alpha: float = 0.99
    max_iter: int = 20
    tol: float = 1e-6
    threads: int = field(default_factory=default_threads)
    chunk: int = 2048  #: rows per chunk of the dense similarity (torch recipe, sgemm floor)


@dataclass
class RunResult:
    times: dict  #: stage -> seconds
    labels: np.ndarray | None  #: (n,) int64, None for the sgemm floor
    info: dict = field(default_factory=dict)
    peak: int | None = None  #: set by a recipe that measures its own peak (else the harness's)


def _cg_info(iterations, residuals) -> dict:
    """What a batched CG reports: its most iterations and largest relative residual."""
    return {"iterations_max": int(iterations.max()), "residual_max": float(residuals.max())}


def stack_normalised(text: np.ndarray, images: np.ndarray) -> np.ndarray:
    x = np.concatenate([text, images]).astype(np.float32, copy=False)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _drop_self(idx: np.ndarray, sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From k + 1 neighbours per row, drop the row itself (wherever it landed, e.g. after a
    duplicate) or else the last one; keeps the similarity order."""
    is_self = idx == np.arange(len(idx))[:, None]
    keep = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, keep, 1), np.take_along_axis(sim, keep, 1)


def rhs(n_nodes: int, m: int, dtype=np.float32, device=None):
    """Y (n_nodes, m): a one on each class node's own column. numpy, or torch on `device`
    (then `dtype` is a torch dtype)."""
    if device is None:
        y = np.zeros((n_nodes, m), dtype)
        np.fill_diagonal(y, 1)
        return y
    import torch

    y = torch.zeros((n_nodes, m), dtype=dtype, device=device)
    y.diagonal().fill_(1)
    return y


def batched_cg(w, b, alpha: float, max_iter: int, tol: float):
    """(I - alpha W) X = B for all columns at once; B numpy (W scipy sparse or dense) or torch on
    any device (W sparse CSR or dense). One W @ P per iteration, per-column step sizes, dot
    products summed in float64, in-place updates; a column freezes once ||r|| / ||b|| <= tol.
    Returns (x, iterations per column, relative residuals)."""
    if isinstance(b, np.ndarray):
        xp, x, r, p = np, np.zeros_like(b), b.copy(), b.copy()
        iterations = np.zeros(b.shape[1], np.int64)
        dots = lambda u, v: np.einsum("ij,ij->j", u, v, dtype=np.float64)  # noqa: E731
        axpy = lambda y, a, v: np.add(y, a * v, out=y)  # noqa: E731  (y += a v, columnwise a)
        cast = lambda a: a.astype(b.dtype)  # noqa: E731
    else:
        import torch

        xp, x, r, p = torch, torch.zeros_like(b), b.clone(), b.clone()
        iterations = torch.zeros(b.shape[1], dtype=torch.int64, device=b.device)
        dots = lambda u, v: (u * v).sum(0, dtype=torch.float64)  # noqa: E731
        axpy = lambda y, a, v: y.addcmul_(v, a)  # noqa: E731
        cast = lambda a: a.to(b.dtype)  # noqa: E731
    rr = dots(r, r)
    bnorm = xp.sqrt(rr)
    active = bnorm > 0
    for _ in range(max_iter):
        if not active.any():
            break
        q = w @ p
        q *= -alpha
        q += p  # (I - alpha W) p
        pq = dots(p, q)
        step = cast(xp.where(active, rr / xp.where(pq != 0, pq, 1), 0))
        axpy(x, step, p)
        axpy(r, -step, q)
        del q
        rr_new = dots(r, r)
        iterations += active
        active &= xp.sqrt(rr_new) > tol * bnorm
        beta = cast(xp.where(active, rr_new / xp.where(rr != 0, rr, 1), 0))
        p *= beta
        p += r
        rr = rr_new
    return x, iterations, xp.sqrt(rr) / xp.where(bnorm > 0, bnorm, 1)


def per_class_cg(lap, m: int, max_iter: int, tol: float, *, classes=None, keep: bool = True,
                 xp=np, cg=None):
    """The LP-DeepSSL / ZLaP solve: ``cg(lap, e_c)`` once per class column c (all m, or
    `classes`), with scipy (default) or cupyx (xp=cupy, cg=cupyx.scipy.sparse.linalg.cg).
    Returns (Z (N, m) if `keep` else None, iterations per solved class, the tolerance keyword
    used: rtol in recent scipy / cupy, tol in older)."""
    import inspect

    if cg is None:
        from scipy.sparse.linalg import cg
    tol_kw = "rtol" if "rtol" in inspect.signature(cg).parameters else "tol"
    n = lap.shape[0]
    z = xp.zeros((n, m), dtype=lap.dtype) if keep else None
    counts: list[int] = []
    for c in range(m) if classes is None else classes:
        y = xp.zeros(n, dtype=lap.dtype)
        y[c] = 1
        count = [0]

        def tick(_xk, count=count):
            count[0] += 1

        xc, _info = cg(lap, y, maxiter=max_iter, callback=tick, **{tol_kw: tol})
        counts.append(count[0])
        if keep:
            z[:, c] = xc
    return z, counts, tol_kw


def tf32_api() -> str:
    """How this torch switches tf32 for float32 matmuls: the per-backend ``fp32_precision``
    (torch >= 2.9; mixing it with the legacy flag is an error there) or ``allow_tf32``."""
    import torch

    return ("torch.backends.cuda.matmul.fp32_precision"
            if hasattr(torch.backends.cuda.matmul, "fp32_precision")
            else "torch.backends.cuda.matmul.allow_tf32")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.mm operand precision for float32 on CUDA: tf32 for "tf32", full float32 otherwise."""
    import torch

    flags = torch.backends.cuda.matmul
    new_api = hasattr(flags, "fp32_precision")
    name, value = (("fp32_precision", "tf32" if precision == "tf32" else "ieee") if new_api
                   else ("allow_tf32", precision == "tf32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = getattr(flags, name)
        setattr(flags, name, value)
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            setattr(flags, name, old)


def torch_knn(x, k: int, chunk: int, precision: str = "exact"):
    """k nearest neighbours of the unit rows of torch X (any device): row chunks of X @ X^T with
    torch.mm at the operand precision (bf16: operands cast to bfloat16; tf32 / exact: float32
    with tf32 on / off), self excluded, torch.topk per chunk, weights max(s, 0).
    Returns (indices (N, k) int64, weights (N, k) in X's dtype)."""
    import torch

    n = x.shape[0]
    xs = x.to(torch.bfloat16) if precision == "bf16" else x
    idx = torch.empty((n, k), dtype=torch.int64, device=x.device)
    val = torch.empty((n, k), dtype=x.dtype, device=x.device)
    with matmul_precision(precision):
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            s = xs[start:stop] @ xs.T
            s.diagonal(offset=start).fill_(-math.inf)  # self: entries (i, start + i)
            v, i = torch.topk(s, k, dim=1)
            del s
            val[start:stop] = v.clamp_min_(0)
            idx[start:stop] = i
    return idx, val


def torch_normalize(idx, val):
    """W = D^-1/2 (A + A^T) D^-1/2 with torch sparse ops on the graph's device (A + A^T as COO,
    coalesce, degrees, scaling), as a sparse CSR tensor."""
    import torch

    n, k = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(k)
    a = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), val.reshape(-1), (n, n),
                                check_invariants=False)
    b = (a + a.t()).coalesce()
    ij, v = b.indices(), b.values()
    deg = torch.zeros(n, dtype=v.dtype, device=v.device).index_add_(0, ij[0], v)
    dinv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    w = torch.sparse_coo_tensor(ij, v * dinv[ij[0]] * dinv[ij[1]], (n, n), is_coalesced=True,
                                check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return w.to_sparse_csr()


# --------------------------------------------------------------------------------------------
# Recipes


class Recipe:
    """Base: three timed stages; subclasses implement them."""

    name = "?"
    reduced_input = False  #: True: under --project it gets the r-dim coordinates X·U'

    def __init__(self, params: Params | None = None) -> None:
        self.p = params or Params()

    def knn(self, text, images):  # -> graph
        raise NotImplementedError

    def normalize(self, graph):  # -> W
        raise NotImplementedError

    def solve(self, w, m: int):  # -> (labels, info)
        raise NotImplementedError

    def run(self, text, images, meter: PeakMemory | None = None) -> RunResult:
        m = len(text)
        t0 = time.perf_counter()
        graph = self.knn(text, images)
        t1 = time.perf_counter()
        w = self.normalize(graph)
        del graph
        t2 = time.perf_counter()
        labels, info = self.solve(w, m)
        t3 = time.perf_counter()
        times = {"knn": t1 - t0, "normalize": t2 - t1, "solve": t3 - t2, "total": t3 - t0}
        return RunResult(times, labels, info)


class ReclipExt(Recipe):
    name = "reclip_ext"
    reduced_input = True

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.rext = import_reclip_ext()  # takes threads= per call

    def knn(self, text, images):
        # The pair is stacked by rows inside the kernel, as label_propagate does: no copy.
        # Every recipe here weights edges max(s, 0), LP-DeepSSL's choice; the engine's
        # default is ReCLIP's shifted weight, at the same cost.
        return self.rext.knn_affinity((text, images), self.p.k, normalize=True,
                                      weight="relu", threads=self.p.threads)

    def normalize(self, graph):
        return self.rext.sym_normalize(*graph, threads=self.p.threads)

    def solve(self, w, m):
        y = rhs(len(w.indptr) - 1, m, w.data.dtype)
        res = self.rext.cg_solve(w, y, alpha=self.p.alpha, max_iter=self.p.max_iter,
                                 tol=self.p.tol, threads=self.p.threads)
        labels = np.argmax(res.x[m:], axis=1)
        return labels, _cg_info(res.iterations, res.residuals)

    def propagate(self, text, images):
        return self.rext.label_propagate(text, images, k=self.p.k, alpha=self.p.alpha,
                                         max_iter=self.p.max_iter, tol=self.p.tol,
                                         weight="relu", normalize=True,
                                         threads=self.p.threads)

    def run(self, text, images, meter: PeakMemory | None = None) -> RunResult:
        # End to end first, in a fresh process state, so its peak memory is the one reported.
        if meter is not None:
            meter.reset()
        t0 = time.perf_counter()
        out = self.propagate(text, images)
        total = time.perf_counter() - t0
        peak = meter.peak() if meter is not None else None
        labels = np.asarray(out.labels)
        info = _cg_info(np.asarray(out.iterations), np.asarray(out.residuals))
        del out
        if meter is not None:
            meter.reset()
        staged = super().run(text, images)
        if meter is not None:
            info["peak_staged"] = meter.peak()
        times = dict(staged.times, total=total)
        info["stages_sum"] = staged.times["total"]
        info["staged_label_agreement"] = float(np.mean(staged.labels == labels))
        return RunResult(times, labels, info, peak)


class ScipyRef(Recipe):
    """LP-DeepSSL (Iscen et al. 2019) / ZLaP: faiss exact kNN, scipy CSR, per-class scipy cg."""

    name = "scipy-ref"

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        _preload("scipy.sparse.linalg", None if _faiss() else "sklearn.neighbors")
        configure_threads(self.p.threads)

    def knn(self, text, images):
        x = stack_normalised(text, images)
        k = self.p.k
        faiss = _faiss()
        if faiss is not None:
            index = faiss.IndexFlatIP(x.shape[1])
            index.add(x)
            sim, idx = index.search(x, k + 1)
            del index
        else:  # sklearn brute force, cosine distance = 1 - s on unit rows
            from sklearn.neighbors import NearestNeighbors

            nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine")
            dist, idx = nn.fit(x).kneighbors(x)
            sim = (1 - dist).astype(np.float32)
        idx, sim = _drop_self(idx.astype(np.int64, copy=False), sim, k)
        return idx, np.maximum(sim, 0)  # gamma = 1

    @staticmethod
    def knn_backend() -> str:
        return "faiss.IndexFlatIP" if _faiss() is not None else "sklearn brute (cosine)"

    def normalize(self, graph):
        import scipy.sparse as sp

        idx, w = graph
        n, k = idx.shape
        rows = np.repeat(np.arange(n), k)
        a = sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(n, n))
        b = a + a.T
        deg = np.asarray(b.sum(axis=1)).ravel()
        deg[deg == 0] = 1
        d = sp.diags((1.0 / np.sqrt(deg)).astype(w.dtype))
        return (d @ b @ d).tocsr()

    def solve(self, w, m):
        import scipy.sparse as sp

        lap = (sp.identity(w.shape[0], dtype=w.dtype, format="csr") - self.p.alpha * w).tocsr()
        z, counts, _ = per_class_cg(lap, m, self.p.max_iter, self.p.tol)
        return np.argmax(z[m:], axis=1), {"iterations_max": max(counts)}


class ScipyBatched(ScipyRef):
    """The scipy-ref graph, then one batched CG in numpy/scipy for all classes."""

    name = "scipy-batched"

    def solve(self, w, m):
        x, iterations, res = batched_cg(w, rhs(w.shape[0], m, w.dtype), self.p.alpha,
                                        self.p.max_iter, self.p.tol)
        return np.argmax(x[m:], axis=1), _cg_info(iterations, res)


class TorchDenseChunked(Recipe):
    """torch: chunked X @ X^T + topk, torch sparse CSR, batched CG with sparse @ dense."""

    name = "torch-dense-chunked"

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        import torch

        self.torch = torch
        configure_threads(self.p.threads)

    def knn(self, text, images):
        return torch_knn(self.torch.from_numpy(stack_normalised(text, images)), self.p.k,
                         self.p.chunk)

    def normalize(self, graph):
        return torch_normalize(*graph)

    def solve(self, w, m):
        y = rhs(w.shape[0], m, w.dtype, w.device)
        x, iterations, res = batched_cg(w, y, self.p.alpha, self.p.max_iter, self.p.tol)
        return self.torch.argmax(x[m:], dim=1).numpy(), _cg_info(iterations, res)


def chunked_similarity(x: np.ndarray, chunk: int = 2048, lib: str = "numpy",
                       threads: int | None = None):
    """A callable computing X @ X^T in row chunks of `chunk` into one reused (chunk, N) buffer,
    results discarded: the similarity FLOPs of the kNN stage with nothing else. `lib` is
    ``"numpy"`` (numpy.matmul) or ``"torch"`` (torch.mm). Allocation happens here, not in the
    callable."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    chunk = max(1, min(chunk, n))
    if lib == "numpy":
        rows, buf = x, np.empty((chunk, n), np.float32)
        mm = lambda a, o: np.matmul(a, x.T, out=o)  # noqa: E731
    elif lib == "torch":
        import torch

        configure_threads(threads or default_threads())
        rows, buf = torch.from_numpy(x), torch.empty((chunk, n), dtype=torch.float32)
        mm = lambda a, o: torch.mm(a, rows.T, out=o)  # noqa: E731
    else:
        raise ValueError(f"lib must be 'numpy' or 'torch', got {lib!r}")

    def run() -> None:
        for start in range(0, n, chunk):
            block = rows[start:start + chunk]
            mm(block, buf[:block.shape[0]])

    mm(rows[:chunk], buf)  # warm up: thread pools, first touch of the buffer
    return run


def sgemm_floor(x: np.ndarray, chunk: int = 2048, threads: int | None = None,
                libraries=("numpy", "torch")) -> dict:
    """Seconds for the chunked X @ X^T of :func:`chunked_similarity` with each library (torch
    skipped if missing) and the best of them, with its GFLOP/s."""
    n, d = x.shape
    configure_threads(threads or default_threads())
    out: dict[str, Any] = {"flops": 2.0 * n * n * d, "chunk": max(1, min(chunk, n))}
    for lib in libraries:
        if lib == "torch" and not _importable("torch"):
            continue
        run = chunked_similarity(x, chunk, lib, threads)
        t0 = time.perf_counter()
        run()
        out[lib] = time.perf_counter() - t0
        del run
    timed = {lib: out[lib] for lib in libraries if lib in out}
    best = min(timed, key=timed.get)
    out["best"], out["seconds"] = best, timed[best]
    out["gflops"] = out["flops"] / timed[best] / 1e9
    return out


class SgemmFloor(Recipe):
    name = "sgemm-floor"

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        _preload("torch" if _importable("torch") else None)

    def run(self, text, images, meter: PeakMemory | None = None) -> RunResult:
        x = stack_normalised(text, images)
        f = sgemm_floor(x, self.p.chunk, self.p.threads)
        return RunResult({"knn": f["seconds"]}, None, f)


RECIPE_CLASSES = {cls.name: cls for cls in (ReclipExt, ScipyRef, ScipyBatched,
                                            TorchDenseChunked, SgemmFloor)}


def make(name: str, params: Params | None = None) -> Recipe:
    try:
        return RECIPE_CLASSES[name](params)
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}") from None


# --------------------------------------------------------------------------------------------
# Harness side: one recipe, repeated, in whatever process this is


def _prime(recipe: Recipe, text) -> None:
    """One run on a tiny random problem of the same width and dtype: thread pools start and
    lazily loaded library code is paged in before anything is timed or measured."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((recipe.p.k + 32, text.shape[1])).astype(text.dtype)
    recipe.run(rows[:2], rows[2:])


def measure(name: str, text, images, params: Params, *, repeat: int = 1,
            warmup: int = 0) -> dict:
    """Run one recipe `warmup` + `repeat` times (after a tiny priming run); medians of the stage
    times, the largest peak RSS increase, labels of the last run."""
    recipe = make(name, params)
    _prime(recipe, text)
    meter = PeakMemory()
    for _ in range(warmup):
        recipe.run(text, images)
    runs, peaks = [], []
    result = None
    for _ in range(max(1, repeat)):
        result = None  # free the previous run's arrays before measuring
        meter.reset()
        result = recipe.run(text, images, meter)
        peaks.append(result.peak if result.peak is not None else meter.peak())
        runs.append(result.times)
    stages = [s for s in STAGES if s in runs[0]]
    return {
        "recipe": name,
        "times": {s: float(np.median([r[s] for r in runs])) for s in stages},
        "runs": runs,
        "peak_rss": int(max(peaks)),
        "peak_method": meter.method,
        "labels": result.labels,
        "info": result.info,
        "dim": int(text.shape[1]),
    }


def child_run(name: str, inputs: dict, params: Params, repeat: int, warmup: int) -> dict:
    """Entry point of a fresh ('spawn') child process: load the .npy inputs, pin threads,
    then :func:`measure`. The parent must already have set the thread environment."""
    configure_threads(params.threads)
    if name == "reclip_ext":
        import_reclip_ext()  # the editable rebuild check, outside the measurement
    text = np.load(inputs["text"])
    images = np.load(inputs["images"])
    return measure(name, text, images, params, repeat=repeat, warmup=warmup)
