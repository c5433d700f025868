"""The ops of reclip_ext: each checks its arguments (reclip_ext.checks), allocates its outputs
in the caller's framework on the caller's device (the namespaces of reclip_ext.arrays), hands
DLPack capsules to ``_core`` and returns results of the caller's array kind.

Every function is written once, against the namespace chosen from where the inputs live, so
CPU arrays of any kind, cupy arrays and CUDA tensors go through the same code. Only the
arrays, checks and this module know numpy, torch and cupy.
"""
from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from . import _core
from . import arrays, checks
from .defaults import DEFAULTS



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


def _launch(ns: arrays.Arrays, op: str, kernel, *args, **kwargs):
    """kernel(*args, **kwargs), then under REXT_SYNC=1 a wait for its CUDA work and a check."""
    sync = sync_requested()
    out = kernel(*args, **kwargs)
    if sync and ns.on_cuda:
        try:
            ns.synchronize()
        except Exception as err:  # torch's RuntimeError, cupy's CUDARuntimeError
            raise RuntimeError(f"{op}: its CUDA kernels failed (REXT_SYNC=1): {err}") from err
    return out


def _workspace(ns: arrays.Arrays, op: str, nbytes, *args):
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


def _run_affinity(ns: arrays.Arrays, blocks, opts, normalize: bool, threads: int, precision: str,
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


def _run_normalize(ns: arrays.Arrays, indices, weights, threads: int) -> arrays.Csr:
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
    return arrays.Csr(indptr, ns.copy(cols[:nnz]), ns.copy(data[:nnz]))


def _run_cg(ns: arrays.Arrays, w: arrays.Csr, rhs, opts, threads: int) -> CgResult:
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


def _readout(ns: arrays.Arrays, scores):
    """Labels (argmax) and confidence 1 - H(p)/log m, p = normalised max(scores, 0)."""
    xp = ns.xp
    n, m = int(scores.shape[0]), int(scores.shape[1])
    dt = ns.dtype_name(scores)
    labels = ns.astype(xp.argmax(scores, 1), "int64")
    confidence = ns.zeros((n,), dt)
    # Row chunks keep the float64 temporaries small next to the O(N k) graph.
    rows = checks.chunk_rows(scores)
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
    parts = list(x) if stacked else [x]
    names = [f"x[{i}]" for i in range(len(parts))] if stacked else ["x"]
    if len(parts) not in (1, 2):
        raise ValueError(f"x: expected an array or a pair of arrays, got {len(parts)} arrays")
    if rows is not None and queries is not None:
        raise ValueError("rows: pass rows=(start, stop) for rows of x or queries= for other "
                         "points, not both")
    if queries is not None and exclude_self:
        raise ValueError("exclude_self: queries are not rows of x, so none of x's rows is "
                         "their own; pass exclude_self=False, or rows=(start, stop) for rows "
                         "of x")
    items = list(zip(parts, names)) + ([(queries, "queries")] if queries is not None else [])
    ns = arrays.namespace(items, parts[0])
    with ns.guard:
        blocks, dt = checks.row_blocks(ns, parts, names)
        n, d = sum(int(b.shape[0]) for b in blocks), int(blocks[0].shape[1])
        q, block = None, None
        if queries is None:
            if n < 2:
                raise ValueError(f"x: needs at least 2 rows, got {n}")
            excl = True if exclude_self is None else bool(exclude_self)
            block = checks.rows_arg(rows, n)
            nq = block[1] - block[0]
        else:
            excl = False
            q, q_dt = checks.float_matrix(ns, queries, "queries", min_rows=0)
            if q_dt != dt:
                raise TypeError(f"queries: dtype {q_dt} differs from {names[0]} dtype {dt}")
            if int(q.shape[1]) != d:
                raise ValueError(f"queries: has {int(q.shape[1])} columns but x has {d}")
            nq = int(q.shape[0])
        opts = checks.affinity_options(k, n, excl, weight, gamma, block_rows)
        precision = checks.precision_arg(precision, ns.on_cuda, dt)
        nthreads = checks.threads(threads)
        if normalize:
            for b, name in zip(blocks, names):
                checks.check_nonzero_rows(ns, b, name)
            if q is not None:
                checks.check_nonzero_rows(ns, q, "queries")
        if nq == 0:
            indices, weights = ns.empty((0, opts["k"]), "int64"), ns.empty((0, opts["k"]), dt)
            return ns.result(indices), ns.result(weights)
        indices, weights = _run_affinity(ns, blocks, opts, bool(normalize), nthreads, precision,
                                         rows=block, queries=q)
        return ns.result(indices), ns.result(ns.astype(weights, dt))


def sym_normalize(indices, weights, *, threads=None) -> arrays.Csr:
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
    ns = arrays.namespace([(indices, "indices"), (weights, "weights")], weights)
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
        checks.check_finite(ns, w, "weights")
        if bool((w < 0).any()):
            raise ValueError("weights: entries must be >= 0")
        csr = _run_normalize(ns, ns.layout(ns.astype(idx, "int64")),
                             ns.layout(checks.computed(ns, w)), checks.threads(threads))
        return arrays.Csr(ns.result(csr.indptr), ns.result(csr.indices),
                   ns.result(ns.astype(csr.data, dt)))


def cg_solve(W, rhs, *, alpha=DEFAULTS.alpha, max_iter=DEFAULTS.max_iter, tol=DEFAULTS.tol,
             threads=None, spmm="kernel") -> CgResult:
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
        spmm: the sparse x dense product of each iteration on CUDA: ``"kernel"`` (default,
            reclip_ext's own, fused with the column dot products) or ``"cusparse"`` (cuSPARSE's
            SpMM, opened at run time from libcusparse.so.12: torch's CUDA wheels bring it, or
            set REXT_CUSPARSE_LIBRARY to its path; RuntimeError when it cannot be loaded or
            the build lacks this path, see :func:`reclip_ext.built_with_cusparse`). CPU arrays
            take ``"kernel"``; anything else is a ValueError. Both give the same solution to
            rounding (the sums run in another order).

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
        parts = list(zip(checks.csr_parts(W)[0], ("W.indptr", "W.indices", "W.data")))
    except TypeError:
        parts = []  # reported below, by the argument checks
    ns = arrays.namespace([(rhs, "rhs")] + parts, rhs)
    with ns.guard:
        b, dt = checks.float_matrix(ns, rhs, "rhs")
        opts = checks.cg_options(alpha, max_iter, tol, spmm, ns.on_cuda)
        w = checks.csr_arg(ns, W, int(b.shape[0]), dt)
        result = _run_cg(ns, w, b, opts, checks.threads(threads))
        return CgResult(ns.result(ns.astype(result.x, dt)), ns.result(result.iterations),
                        ns.result(result.residuals))


def label_propagate(text, images, *, k=DEFAULTS.k, alpha=DEFAULTS.alpha,
                    max_iter=DEFAULTS.max_iter, tol=DEFAULTS.tol, weight=DEFAULTS.weight,
                    gamma=DEFAULTS.gamma, normalize=True, block_rows=None, threads=None,
                    precision="exact", spmm="kernel") -> LabelPropagation:
    """Pseudo labels for images by label propagation from class-name embeddings (ReCLIP §3.2).

    Builds the k-NN graph over X = [text; images] (rows L2-normalised when ``normalize``),
    W = D^-1/2 (A + A^T) D^-1/2, solves (I - alpha W) Z = Y with Y the indicator of the m class
    nodes, and reads labels from the image rows of Z. Memory is O(N (k + d) + N m), N = m + n.

    Args:
        text: (m, d) class embeddings, m >= 2.
        images: (n, d) image embeddings of the same dtype (float32 or float64).
        k, weight, gamma, block_rows: as in :func:`knn_affinity`; k <= m + n - 1.
        alpha, max_iter, tol, spmm: as in :func:`cg_solve`.
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
    ns = arrays.namespace([(text, "text"), (images, "images")], images)
    with ns.guard:
        (t, v), dt = checks.row_blocks(ns, [text, images], ["text", "images"])
        if t.shape[0] < 2:
            raise ValueError(f"text: needs at least 2 rows (classes), got shape {tuple(t.shape)}")
        m, n = int(t.shape[0]), int(v.shape[0])
        opts = checks.affinity_options(k, m + n, True, weight, gamma, block_rows)
        cg_opts = checks.cg_options(alpha, max_iter, tol, spmm, ns.on_cuda)
        precision = checks.precision_arg(precision, ns.on_cuda, dt)
        if normalize:
            checks.check_nonzero_rows(ns, t, "text")
            checks.check_nonzero_rows(ns, v, "images")
        nthreads = checks.threads(threads)
        graph = list(_run_affinity(ns, [t, v], opts, bool(normalize), nthreads, precision))
        return _propagate_graph(ns, graph, m, dt, cg_opts, nthreads)


def _propagate_graph(ns: arrays.Arrays, graph: list, m: int, dt: str, cg_opts: dict,
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
