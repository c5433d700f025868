"""Float64 dense numpy/scipy references of docs/mathematics.md §2, and the LP-DeepSSL recipe.

Why this module exists: every kernel of reclip_ext is checked against something that is
obviously correct. Nothing here is clever: the full N x N similarity is formed, sorted with
an explicit stable tie rule, densified and solved directly. It is only meant for test sizes.

- ``ref_knn``              steps 1-3 (top-k by similarity, ties to the smaller index, weights)
- ``ref_knn_queries``      the same for other points searched against x
- ``ref_sym_normalize``    step 4 (dense W = D^-1/2 (A + A^T) D^-1/2; ``_csr``: scipy CSR)
- ``ref_solve``/``ref_cg`` step 5 (dense direct solve; textbook CG with the same stop rule)
- ``ref_label_propagate``  steps 1-6
- ``lp_deepssl_recipe``    the LP-DeepSSL style baseline (Iscen et al. 2019): float32
  brute-force kNN in numpy, scipy.sparse CSR, scipy.sparse.linalg.cg per class column (the
  benchmarks' ``recipes.per_class_cg``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import scipy.sparse

import recipes  # benchmarks/recipes.py (tests/conftest.py puts it on the path): its per-class CG


# --------------------------------------------------------------------------------------------
# Steps 1-3: k-NN affinities


def weight_fn(s, weight: str = "shift", gamma: float = 1.0):
    """f(s) of docs/mathematics.md §2, step 3, in the dtype of ``s``: relu max(s, 0)^gamma, shift
    ((1 + s) / 2)^gamma. The shift base is in [0, 1] for cosine similarities; for raw inner
    products below -1 it is clamped at 0 like relu's, so that every weight is >= 0 (what
    sym_normalize requires) and ^gamma is defined for any gamma > 0."""
    s = np.asarray(s)
    if weight == "relu":
        base = np.maximum(s, 0)
    elif weight == "shift":
        base = np.maximum((1 + s) / 2, 0)
    else:
        raise ValueError(weight)
    return base if gamma == 1 else base**gamma


def ref_similarity(x, normalize: bool = False, dtype=np.float64) -> np.ndarray:
    """S = X X^T (rows L2-normalised first when asked).

    float64 (the reference): every S_ij is the same elementwise-product-and-sum of two rows,
    so identical rows give bitwise identical similarities and exact ties stay exact (a BLAS
    matmul does not promise that: its edge tiles take other code paths). Any other ``dtype``:
    a plain numpy matmul in that precision (the same-precision baseline of docs/design.md, Testing).
    """
    a = np.asarray(x).astype(dtype)
    if normalize:
        a = a / np.linalg.norm(a, axis=1, keepdims=True).astype(dtype)
    if dtype != np.float64:
        return a @ a.T
    n, d = a.shape
    s = np.empty((n, n))
    step = max(1, (1 << 22) // max(1, n * d))
    for i in range(0, n, step):
        s[i : i + step] = (a[i : i + step, None, :] * a[None, :, :]).sum(axis=-1)
    return s


def topk_order(s_row: np.ndarray, k: int, skip: int | None = None) -> np.ndarray:
    """The k column indices of ``s_row`` ranked by larger similarity first, ties to the
    smaller index (stable lexsort on (index, -similarity)); column ``skip`` is left out."""
    cols = np.arange(len(s_row))
    if skip is not None:
        cols = cols[cols != skip]
    order = np.lexsort((cols, -s_row[cols]))  # last key is primary
    return cols[order[:k]]


class KnnRef(NamedTuple):
    indices: np.ndarray  #: (N, k) int64, ranked
    weights: np.ndarray  #: (N, k) f(S) of the ranked neighbours
    sim: np.ndarray  #: (N, N) the full similarity used


def ref_knn(x, k: int, exclude_self: bool = True, weight: str = "shift", gamma: float = 1.0,
            normalize: bool = False, dtype=np.float64) -> KnnRef:
    """docs/mathematics.md §2, steps 1-3 with the full N x N similarity (float64 unless ``dtype`` says)."""
    s = ref_similarity(x, normalize, dtype)
    n = s.shape[0]
    idx = np.stack([topk_order(s[i], k, i if exclude_self else None) for i in range(n)])
    sims = np.take_along_axis(s, idx, axis=1)
    return KnnRef(idx.astype(np.int64), weight_fn(sims, weight, gamma).astype(dtype), s)


def ref_knn_queries(x, queries, k: int, weight: str = "shift", gamma: float = 1.0,
                    normalize: bool = False) -> KnnRef:
    """Steps 1-3 for points that are not rows of x: every query against every row of x
    (nothing excluded), in float64; ``sim`` is the (Q, N) similarity."""
    a = np.asarray(x).astype(np.float64)
    q = np.asarray(queries).astype(np.float64)
    if normalize:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = (q[:, None, :] * a[None, :, :]).sum(axis=-1)
    idx = np.stack([topk_order(s[i], k) for i in range(len(q))]).reshape(len(q), k)
    sims = np.take_along_axis(s, idx, axis=1)
    return KnnRef(idx.astype(np.int64), weight_fn(sims, weight, gamma), s)


# --------------------------------------------------------------------------------------------
# Step 4: symmetric normalisation


def ref_affinity_dense(indices, weights, n: int | None = None) -> np.ndarray:
    """Dense A with A[i, indices[i, c]] += weights[i, c] (repeated pairs add up)."""
    indices = np.asarray(indices)
    weights = np.asarray(weights, dtype=np.float64)
    n = indices.shape[0] if n is None else n
    a = np.zeros((n, n))
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    np.add.at(a, (rows, indices.ravel()), weights.ravel())
    return a


def ref_sym_normalize(indices, weights, n: int | None = None) -> np.ndarray:
    """Dense W = D^-1/2 (A + A^T) D^-1/2; zero-degree rows and columns are zero."""
    a = ref_affinity_dense(indices, weights, n)
    b = a + a.T
    deg = b.sum(axis=1)
    inv = np.zeros_like(deg)
    inv[deg > 0] = 1 / np.sqrt(deg[deg > 0])
    return inv[:, None] * b * inv[None, :]


def ref_sym_normalize_csr(indices, weights, n: int | None = None) -> scipy.sparse.csr_array:
    """ref_sym_normalize as a float64 scipy CSR (sorted columns, repeated pairs summed, zero
    weights left out), for graphs too large to densify."""
    indices = np.asarray(indices)
    weights = np.asarray(weights, dtype=np.float64).ravel()
    n = indices.shape[0] if n is None else n
    rows = np.repeat(np.arange(indices.shape[0]), indices.shape[1])
    keep = weights != 0
    a = scipy.sparse.coo_array((weights[keep], (rows[keep], indices.ravel()[keep])), shape=(n, n))
    b = (a + a.T).tocsr()
    b.sum_duplicates()
    deg = np.asarray(b.sum(axis=1)).ravel()
    inv = np.zeros_like(deg)
    inv[deg > 0] = 1 / np.sqrt(deg[deg > 0])
    w = (scipy.sparse.diags_array(inv) @ b @ scipy.sparse.diags_array(inv)).tocsr()
    w.sort_indices()
    return w


# --------------------------------------------------------------------------------------------
# Step 5: the linear solve


def _dense(w) -> np.ndarray:
    if scipy.sparse.issparse(w):
        return w.toarray().astype(np.float64)
    if hasattr(w, "to_scipy"):
        return w.to_scipy().toarray().astype(np.float64)
    return np.asarray(w, dtype=np.float64)


def ref_solve(w, rhs, alpha: float) -> np.ndarray:
    """Z = (I - alpha W)^-1 rhs by numpy.linalg.solve, float64."""
    w = _dense(w)
    return np.linalg.solve(np.eye(w.shape[0]) - alpha * w, np.asarray(rhs, dtype=np.float64))


class CgRef(NamedTuple):
    x: np.ndarray
    iterations: np.ndarray
    residuals: np.ndarray


def ref_cg(w, rhs, alpha: float, max_iter: int, tol: float) -> CgRef:
    """Textbook CG per column from x = 0, float64, dense; a column stops when
    ||r|| / ||b|| <= tol (recursive residual), or after max_iter iterations."""
    a = np.eye(_dense(w).shape[0]) - alpha * _dense(w)
    b_all = np.asarray(rhs, dtype=np.float64)
    xs, its, res = [], [], []
    for j in range(b_all.shape[1]):
        b = b_all[:, j]
        x = np.zeros_like(b)
        bnorm = np.linalg.norm(b)
        it, rel = 0, (1.0 if bnorm > 0 else 0.0)
        if bnorm > 0:
            r = b.copy()
            p = r.copy()
            rs = r @ r
            while it < max_iter and rel > tol:
                q = a @ p
                pq = p @ q
                if not pq > 0:
                    break
                step = rs / pq
                x += step * p
                r -= step * q
                rs_new = r @ r
                it += 1
                rel = math.sqrt(rs_new) / bnorm
                p = r + (rs_new / rs) * p
                rs = rs_new
        xs.append(x)
        its.append(it)
        res.append(rel)
    return CgRef(np.stack(xs, axis=1), np.array(its, np.int64), np.array(res))


# --------------------------------------------------------------------------------------------
# Steps 1-6


def ref_readout(scores) -> tuple[np.ndarray, np.ndarray]:
    """labels = argmax; confidence = 1 - H(p)/log m, p = normalised max(Z, 0); 0 when the
    positive part sums to 0."""
    z = np.asarray(scores, dtype=np.float64)
    m = z.shape[1]
    labels = np.argmax(z, axis=1).astype(np.int64)
    pos = np.maximum(z, 0)
    total = pos.sum(axis=1)
    conf = np.zeros(z.shape[0])
    for i in range(z.shape[0]):
        if total[i] > 0:
            p = pos[i] / total[i]
            p = p[p > 0]
            conf[i] = 1 - float(-(p * np.log(p)).sum()) / math.log(m)
    return labels, conf


class LabelPropagationRef(NamedTuple):
    labels: np.ndarray
    scores: np.ndarray
    confidence: np.ndarray
    w: np.ndarray  #: the dense normalised graph


def ref_label_propagate(text, images, k: int = 20, alpha: float = 0.99, weight: str = "shift",
                        gamma: float = 1.0, normalize: bool = True) -> LabelPropagationRef:
    """docs/mathematics.md §2, steps 1-6 in float64 with an exact (direct) solve."""
    t = np.asarray(text, dtype=np.float64)
    v = np.asarray(images, dtype=np.float64)
    m = t.shape[0]
    x = np.concatenate([t, v])
    knn = ref_knn(x, k, True, weight, gamma, normalize)
    w = ref_sym_normalize(knn.indices, knn.weights)
    y = np.zeros((x.shape[0], m))
    y[np.arange(m), np.arange(m)] = 1
    z = ref_solve(w, y, alpha)
    scores = z[m:]
    labels, conf = ref_readout(scores)
    return LabelPropagationRef(labels, scores, conf, w)


# --------------------------------------------------------------------------------------------
# The LP-DeepSSL style recipe (the baseline users compare with)


class RecipeResult(NamedTuple):
    labels: np.ndarray
    scores: np.ndarray
    iterations: np.ndarray


def lp_deepssl_recipe(text, images, k: int = 20, alpha: float = 0.99, max_iter: int = 20,
                      tol: float = 1e-6, weight: str = "shift", gamma: float = 1.0,
                      normalize: bool = True) -> RecipeResult:
    """Label propagation as LP-DeepSSL (Iscen et al. 2019) does it, in float32:
    brute-force inner-product kNN (numpy), a scipy.sparse CSR graph, W + W^T, symmetric
    normalisation, and scipy.sparse.linalg.cg per class column (rtol=tol, maxiter=max_iter)."""
    x = np.concatenate([np.asarray(text), np.asarray(images)]).astype(np.float32)
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    n, m = x.shape[0], np.asarray(text).shape[0]
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    d = np.take_along_axis(s, part, axis=1)
    d = weight_fn(d, weight, gamma).astype(np.float32)
    rows = np.repeat(np.arange(n), k)
    a = scipy.sparse.csr_array((d.ravel(), (rows, part.ravel())), shape=(n, n))
    b = (a + a.T).tocsr()
    deg = np.asarray(b.sum(axis=1)).ravel()
    deg[deg == 0] = 1
    dinv = scipy.sparse.diags_array((1 / np.sqrt(deg)).astype(np.float32))
    wn = (dinv @ b @ dinv).tocsr()
    op = (scipy.sparse.eye_array(n, dtype=np.float32, format="csr") - alpha * wn).tocsr()
    op = op.astype(np.float32)
    z, iterations, _ = recipes.per_class_cg(op, m, max_iter, tol)
    scores = z[m:]
    return RecipeResult(np.argmax(scores, axis=1).astype(np.int64), scores,
                        np.array(iterations, np.int64))
