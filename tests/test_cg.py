"""cg_solve against numpy.linalg.solve, scipy.sparse.linalg.cg and the textbook CG of
reference.py (docs/mathematics.md §2, step 5): per-column convergence, stop rules, input forms."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg

import reclip_ext
import reference
from conftest import ARRAY_KINDS, clip_like, is_kind, random_points, to_kind, to_numpy


def graph(n=60, d=5, k=6, dtype=np.float64, seed=0):
    """A normalised k-NN graph W (Csr) over random points."""
    x = random_points(n, d, seed=seed, dtype=dtype)
    idx, w = reclip_ext.knn_affinity(x, k, normalize=True, weight="shift")
    return reclip_ext.sym_normalize(idx, w)


def scipy_cg(w, rhs, alpha, max_iter, tol):
    """scipy.sparse.linalg.cg per column, in rhs's dtype; returns (x, iterations)."""
    sp = w.to_scipy()
    n = sp.shape[0]
    op = (scipy.sparse.eye_array(n, dtype=sp.dtype, format="csr") - alpha * sp).astype(sp.dtype)
    xs, its = [], []
    for j in range(rhs.shape[1]):
        count = [0]

        def callback(_xk, count=count):
            count[0] += 1

        x, _info = scipy.sparse.linalg.cg(op, rhs[:, j], rtol=tol, maxiter=max_iter,
                                          callback=callback)
        xs.append(x)
        its.append(count[0])
    return np.stack(xs, axis=1).astype(rhs.dtype), np.array(its)


def rel_err(x, exact):
    return np.abs(np.asarray(x, np.float64) - exact).max() / np.abs(exact).max()


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("n,m", [(2, 2), (9, 3), (60, 4), (200, 10)])
def test_matches_direct_solve_float64(n, m, alpha):
    w = graph(n, k=min(6, n - 1))
    rhs = np.random.default_rng(n).standard_normal((n, m))
    res = reclip_ext.cg_solve(w, rhs, alpha=alpha, max_iter=1000, tol=1e-12)
    exact = reference.ref_solve(w, rhs, alpha)
    assert res.x.shape == (n, m) and res.x.dtype == np.float64
    assert res.iterations.shape == (m,) and res.iterations.dtype == np.int64
    assert res.residuals.shape == (m,) and res.residuals.dtype == np.float64
    assert (res.residuals <= 1e-12).all() and (res.iterations < 1000).all()
    cond = (1 + alpha) / (1 - alpha)
    assert rel_err(res.x, exact) <= 1e-11 * cond
    # the reported residual is the true one (up to rounding)
    a = np.eye(n) - alpha * w.to_scipy().toarray()
    true = np.linalg.norm(rhs - a @ res.x, axis=0) / np.linalg.norm(rhs, axis=0)
    assert (true <= 1e-11).all()


@pytest.mark.parametrize("alpha", [0.9, 0.99])
def test_float32_within_twice_scipy_float32_error(alpha):
    w64 = graph(150, k=8, dtype=np.float64, seed=1)
    w32 = reclip_ext.Csr(w64.indptr, w64.indices, w64.data.astype(np.float32))
    rhs = np.random.default_rng(1).standard_normal((150, 5)).astype(np.float32)
    exact = reference.ref_solve(w32, rhs, alpha)
    tol = 1e-5
    res = reclip_ext.cg_solve(w32, rhs, alpha=alpha, max_iter=500, tol=tol)
    assert res.x.dtype == np.float32
    x_sp, its_sp = scipy_cg(w32, rhs, alpha, 500, tol)
    err_lib, err_sp = rel_err(res.x, exact), rel_err(x_sp, exact)
    assert err_lib <= 2 * err_sp + 1e-6, (err_lib, err_sp)
    assert (np.abs(res.iterations - its_sp) <= 1).all(), (res.iterations, its_sp)


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("max_iter", [1, 5, 20, 300])
def test_matches_scipy_cg_per_column(alpha, max_iter):
    w = graph(120, k=7, seed=3)
    rhs = np.random.default_rng(3).standard_normal((120, 6))
    rhs[:, 0] = 0
    rhs[5, 0] = 1  # a one-hot column, as in label propagation
    tol = 1e-8
    res = reclip_ext.cg_solve(w, rhs, alpha=alpha, max_iter=max_iter, tol=tol)
    x_sp, its_sp = scipy_cg(w, rhs, alpha, max_iter, tol)
    assert (np.abs(res.iterations - its_sp) <= 1).all(), (res.iterations, its_sp)
    assert (res.iterations <= max_iter).all()
    # same Krylov iterates: close whether converged or not
    np.testing.assert_allclose(res.x, x_sp, rtol=0, atol=1e-9 * np.abs(x_sp).max())
    ref = reference.ref_cg(w, rhs, alpha, max_iter, tol)
    assert (np.abs(res.iterations - ref.iterations) <= 1).all()
    np.testing.assert_allclose(res.residuals, ref.residuals, rtol=1e-6, atol=1e-14)


def test_columns_converge_independently():
    w = graph(80, k=6, seed=4)
    # an eigenvector of W is one of (I - alpha W): CG finishes it in one step, a mix of three
    # in three; random columns take many more
    _, evecs = np.linalg.eigh(w.to_scipy().toarray())
    rng = np.random.default_rng(4)
    rhs = np.stack([evecs[:, -1], rng.standard_normal(80), np.zeros(80),
                    evecs[:, :3] @ [1.0, 2.0, 3.0], rng.standard_normal(80)], axis=1)
    tol = 1e-10
    res = reclip_ext.cg_solve(w, rhs, alpha=0.95, max_iter=200, tol=tol)
    its = res.iterations.tolist()
    assert its[0] == 1, its  # an eigenvector: one step
    assert its[2] == 0 and res.residuals[2] == 0 and (res.x[:, 2] == 0).all()  # zero rhs
    assert 2 <= its[3] <= 4, its  # three eigen-directions: at most three steps (+ rounding)
    assert its[1] > its[3] and its[4] > its[3]
    assert (res.residuals <= tol).all()
    # each column as if solved alone
    for j in range(rhs.shape[1]):
        alone = reclip_ext.cg_solve(w, rhs[:, [j]], alpha=0.95, max_iter=200, tol=tol)
        assert alone.iterations[0] == res.iterations[j]
        np.testing.assert_allclose(alone.x[:, 0], res.x[:, j], rtol=1e-12, atol=1e-12)
    exact = reference.ref_solve(w, rhs, 0.95)
    np.testing.assert_allclose(res.x, exact, atol=1e-8)


def test_zero_rhs():
    w = graph(20, k=3)
    res = reclip_ext.cg_solve(w, np.zeros((20, 3)), alpha=0.9)
    assert (res.x == 0).all() and (res.iterations == 0).all() and (res.residuals == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_iter_zero(dtype):
    w = graph(20, k=3, dtype=dtype)
    rhs = np.random.default_rng(0).standard_normal((20, 2)).astype(dtype)
    res = reclip_ext.cg_solve(w, rhs, alpha=0.9, max_iter=0)
    assert (res.x == 0).all() and res.x.dtype == dtype
    assert (res.iterations == 0).all()
    np.testing.assert_array_equal(res.residuals, [1.0, 1.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_alpha_zero_gives_rhs(dtype):
    w = graph(30, k=4, dtype=dtype)
    rhs = np.random.default_rng(2).standard_normal((30, 3)).astype(dtype)
    res = reclip_ext.cg_solve(w, rhs, alpha=0.0)
    np.testing.assert_allclose(res.x, rhs, rtol=4 * np.finfo(dtype).eps, atol=0)
    assert (res.iterations == 1).all()


def test_tol_zero_runs_max_iter():
    w = graph(50, k=5)
    rhs = np.random.default_rng(5).standard_normal((50, 2))
    res = reclip_ext.cg_solve(w, rhs, alpha=0.99, max_iter=7, tol=0.0)
    assert res.iterations.tolist() == [7, 7]
    ref = reference.ref_cg(w, rhs, 0.99, 7, 0.0)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-10, atol=1e-12)


def test_accepts_scipy_tuple_and_list():
    w = graph(40, k=5)
    rhs = np.random.default_rng(6).standard_normal((40, 3))
    want = reclip_ext.cg_solve(w, rhs, alpha=0.9)
    sp = w.to_scipy()
    forms = {
        "csr_array": sp,
        "csr_matrix": scipy.sparse.csr_matrix(sp),
        "csr_array_int32": scipy.sparse.csr_array(
            (sp.data, sp.indices.astype(np.int32), sp.indptr.astype(np.int32)), shape=sp.shape),
        "tuple": (w.indptr, w.indices, w.data),
        "list": [w.indptr, w.indices, w.data],
        "Csr": reclip_ext.Csr(w.indptr, w.indices, w.data),
    }
    for name, form in forms.items():
        got = reclip_ext.cg_solve(form, rhs, alpha=0.9)
        np.testing.assert_allclose(got.x, want.x, rtol=1e-13, atol=1e-15, err_msg=name)
        np.testing.assert_array_equal(got.iterations, want.iterations, err_msg=name)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
def test_array_kind_follows_rhs(kind):
    w = graph(25, k=4, dtype=np.float32)
    rhs = np.random.default_rng(7).standard_normal((25, 2)).astype(np.float32)
    want = reclip_ext.cg_solve(w, rhs, alpha=0.9)
    w_kind = reclip_ext.Csr(*(to_kind(a, kind) for a in w))
    got = reclip_ext.cg_solve(w_kind, to_kind(rhs, kind), alpha=0.9)
    for a, b in zip(got, want):
        assert is_kind(a, kind)
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-6, atol=1e-7)


def test_strided_rhs():
    w = graph(30, k=4)
    rhs = np.random.default_rng(8).standard_normal((30, 6))
    want = reclip_ext.cg_solve(w, rhs[:, ::2].copy(), alpha=0.9)
    for view in (rhs[:, ::2], np.asfortranarray(rhs[:, ::2])):
        got = reclip_ext.cg_solve(w, view, alpha=0.9)
        np.testing.assert_allclose(got.x, want.x, rtol=1e-13, atol=1e-15)


def test_threads_close():
    w = graph(400, k=8)
    rhs = np.random.default_rng(9).standard_normal((400, 4))
    a = reclip_ext.cg_solve(w, rhs, alpha=0.99, max_iter=50, threads=3)
    b = reclip_ext.cg_solve(w, rhs, alpha=0.99, max_iter=50, threads=1)
    np.testing.assert_allclose(a.x, b.x, rtol=1e-10, atol=1e-12)
    assert (np.abs(a.iterations - b.iterations) <= 1).all()


_NEW_THREADS = """
import os, sys
import numpy as np
import reclip_ext
n, m, threads = (int(a) for a in sys.argv[1:])
x = np.random.default_rng(0).standard_normal((n, 4))
w = reclip_ext.sym_normalize(*reclip_ext.knn_affinity(x, 4, normalize=True, threads=1), threads=1)
before = len(os.listdir("/proc/self/task"))
reclip_ext.cg_solve(w, np.ones((n, m)), threads=threads or None)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
@pytest.mark.parametrize("n, m, threads, spawned", [
    (50, 2, 0, 0),       # default: a tiny solve stays on the calling thread
    (50, 2, 3, 2),       # an explicit count is used as given, however small the problem
    (3000, 80, 0, 3),    # default: enough work for all OMP_NUM_THREADS = 4 threads
])
def test_default_threads_follow_the_work(tmp_path, n, m, threads, spawned):
    """OpenMP starts its worker threads at the first parallel region that asks for them, so
    the threads a fresh process gains during one solve are the solve's thread count - 1."""
    env = dict(os.environ, OMP_NUM_THREADS="4", PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", _NEW_THREADS, str(n), str(m), str(threads)],
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == spawned


def test_team_smaller_than_asked(tmp_path):
    """With OMP_THREAD_LIMIT=1 a region asking for 3 threads runs on 1: the solve's own barrier
    must count the threads that came, not those asked for, or it would wait forever."""
    script = """
import numpy as np, reclip_ext
x = np.random.default_rng(1).standard_normal((300, 4))
w = reclip_ext.sym_normalize(*reclip_ext.knn_affinity(x, 5, normalize=True))
rhs = np.random.default_rng(2).standard_normal((300, 3))
a, b = (reclip_ext.cg_solve(w, rhs, threads=t, max_iter=30) for t in (3, 1))
print(np.array_equal(a.x, b.x) and np.array_equal(a.iterations, b.iterations))
"""
    env = dict(os.environ, OMP_THREAD_LIMIT="1", PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"


def test_label_propagation_system():
    """The system label_propagate solves: Y one-hot on the class nodes."""
    text, images, _ = clip_like(300, 5, 16, dtype=np.float64)
    x = np.concatenate([text, images])
    idx, w = reclip_ext.knn_affinity(x, 10, normalize=True)
    csr = reclip_ext.sym_normalize(idx, w)
    y = np.zeros((305, 5))
    y[np.arange(5), np.arange(5)] = 1
    res = reclip_ext.cg_solve(csr, y, alpha=0.99, max_iter=2000, tol=1e-12)
    np.testing.assert_allclose(res.x, reference.ref_solve(csr, y, 0.99), rtol=0,
                               atol=1e-8 * np.abs(res.x).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tol_zero_stops_when_the_residual_underflows(dtype):
    # With tol = 0 the recursive residual shrinks until its entries underflow; the column must
    # then stop as converged, not iterate on rounding noise into Inf/NaN.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((261, 16)).astype(dtype)
    w = reclip_ext.sym_normalize(*reclip_ext.knn_affinity(x, 3))
    rhs = rng.standard_normal((261, 24)).astype(dtype)
    res = reclip_ext.cg_solve(w, rhs, tol=0.0, max_iter=10000)
    assert np.isfinite(res.x).all() and np.isfinite(res.residuals).all()
    assert (res.iterations < 10000).all() and (res.residuals < 1e-30).all()
    want = reference.ref_solve(w, rhs.astype(np.float64), 0.99)
    atol = (1e-3 if dtype == np.float32 else 1e-9) * np.abs(want).max()
    np.testing.assert_allclose(res.x, want, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("e", [-30, 30])
def test_rhs_scale_is_exact(dtype, e):
    # Columns run on b scaled by a power of two: scaling b by 2^e scales x by 2^e exactly and
    # leaves iterations and residuals unchanged, even where ||b||^2 leaves float32's range.
    w = graph(60, k=4, dtype=dtype)
    rhs = np.random.default_rng(3).standard_normal((60, 3)).astype(dtype)
    base = reclip_ext.cg_solve(w, rhs, alpha=0.9, tol=1e-6)
    f = dtype(2.0 ** (e * 10 // 3))  # 2^-100 or 2^100: 1e-30 / 1e30
    got = reclip_ext.cg_solve(w, rhs * f, alpha=0.9, tol=1e-6)
    np.testing.assert_array_equal(got.x, base.x * f)
    np.testing.assert_array_equal(got.iterations, base.iterations)
    np.testing.assert_array_equal(got.residuals, base.residuals)


def test_indefinite_w_is_refused():
    # 1e30 W makes I - alpha W indefinite: CG breaks down, which is an error naming W.
    w = graph(30, k=3, dtype=np.float32)
    big = reclip_ext.Csr(w.indptr, w.indices, w.data * np.float32(1e30))
    rhs = np.random.default_rng(4).standard_normal((30, 2)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^W: I - alpha W must be symmetric positive definite"):
        reclip_ext.cg_solve(big, rhs)


def test_overflowing_solution_is_refused():
    # b near float32's largest value: x = (I - alpha W)^-1 b exceeds it.
    w = graph(30, k=3, dtype=np.float32)
    rhs = np.full((30, 1), 3e38, np.float32)
    with pytest.raises(ValueError, match=r"^rhs: the solution must fit in float32"):
        reclip_ext.cg_solve(w, rhs, alpha=0.99)
    assert np.isfinite(reclip_ext.cg_solve(w.to_scipy().astype(np.float64), rhs.astype(np.float64),
                                           alpha=0.99).x).all()
