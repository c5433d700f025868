"""sym_normalize against the dense reference (docs/mathematics.md §2, step 4) and its CSR invariants."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

import reclip_ext
import reference
from conftest import ARRAY_KINDS, is_kind, random_points, to_kind, to_numpy


def assert_csr_invariants(csr, n, dtype):
    indptr, cols, data = (to_numpy(a) for a in csr)
    assert indptr.dtype == np.int64 and cols.dtype == np.int64 and data.dtype == dtype
    assert indptr.shape == (n + 1,) and indptr[0] == 0 and indptr[-1] == len(cols) == len(data)
    assert (np.diff(indptr) >= 0).all(), "indptr not monotone"
    assert ((cols >= 0) & (cols < n)).all()
    for i in range(n):
        row = cols[indptr[i] : indptr[i + 1]]
        assert (np.diff(row) > 0).all(), f"row {i}: columns not sorted and unique: {row}"
    assert (data != 0).all(), "explicit zeros stored"
    assert np.isfinite(data).all() and (data > 0).all()
    assert csr.shape == (n, n)


def assert_matches_reference(csr, indices, weights, dtype):
    n = np.asarray(indices).shape[0]
    assert_csr_invariants(csr, n, dtype)
    dense = csr.to_scipy().toarray()
    want = reference.ref_sym_normalize(indices, weights)
    tol = 1e-13 if dtype == np.float64 else 4e-7
    np.testing.assert_allclose(dense, want, rtol=tol, atol=tol)
    # the stored pattern is exactly the nonzero pattern of the reference
    assert ((dense != 0) == (want != 0)).all()
    # symmetric: the same pattern, and values equal up to rounding
    assert ((dense != 0) == (dense.T != 0)).all()
    np.testing.assert_allclose(dense, dense.T, rtol=tol, atol=tol)


@pytest.mark.parametrize("block_rows", [None, 3])
@pytest.mark.parametrize("shape", [(2, 3, 1), (7, 4, 6), (40, 5, 6), (101, 9, 10)],
                         ids=lambda s: "N{}-d{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_knn_graph_matches_reference(dtype, shape, block_rows):
    n, d, k = shape
    x = random_points(n, d, seed=n, dtype=dtype)
    idx, w = reclip_ext.knn_affinity(x, k, normalize=True, weight="shift", block_rows=block_rows)
    csr = reclip_ext.sym_normalize(idx, w)
    assert_matches_reference(csr, idx, w, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_duplicates_and_mutual_neighbours_merge(dtype):
    # 0 <-> 1 mutual, (2 -> 0) twice in row 2, (3 -> 3) a self loop, (3 -> 1) twice
    indices = np.array([[1, 2], [0, 2], [0, 0], [3, 1], [1, 1]])
    weights = np.array([[0.5, 0.25], [0.5, 1.0], [2.0, 1.0], [0.75, 0.5], [0.125, 0.25]],
                       dtype)
    csr = reclip_ext.sym_normalize(indices, weights)
    assert_matches_reference(csr, indices, weights, dtype)
    b = reference.ref_affinity_dense(indices, weights)
    b = b + b.T
    assert b[0, 1] == 1.0 and b[0, 2] == 3.25 and b[3, 3] == 1.5 and b[1, 4] == 0.375
    indptr = to_numpy(csr.indptr)
    # row 0 holds columns {1, 2} once each, row 3 {1, 3}, row 4 {1}
    assert to_numpy(csr.indices)[indptr[0] : indptr[1]].tolist() == [1, 2]
    assert to_numpy(csr.indices)[indptr[3] : indptr[4]].tolist() == [1, 3]
    assert to_numpy(csr.indices)[indptr[4] : indptr[5]].tolist() == [1]


def test_two_nodes_doc_example():
    csr = reclip_ext.sym_normalize(np.array([[1], [0]]), np.array([[1.0], [1.0]]))
    assert to_numpy(csr.indptr).tolist() == [0, 1, 2]
    assert to_numpy(csr.indices).tolist() == [1, 0]
    assert to_numpy(csr.data).tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_weights_dropped_and_zero_degree_rows_empty(dtype):
    rng = np.random.default_rng(0)
    n, k = 12, 3
    indices = rng.integers(0, n, size=(n, k))
    weights = rng.uniform(0.1, 1.0, size=(n, k)).astype(dtype)
    weights[:, 2] = 0  # explicit zeros everywhere
    isolated = [4, 9]
    weights[isolated] = 0
    indices[indices == 4] = 5  # nobody points at 4 or 9
    indices[indices == 9] = 8
    csr = reclip_ext.sym_normalize(indices, weights)
    assert_matches_reference(csr, indices, weights, dtype)
    indptr = to_numpy(csr.indptr)
    for i in isolated:
        assert indptr[i + 1] == indptr[i], f"row {i} should be empty"
        assert i not in to_numpy(csr.indices).tolist()


def test_all_zero_weights_give_empty_matrix():
    csr = reclip_ext.sym_normalize(np.array([[1], [0], [0]]), np.zeros((3, 1)))
    assert to_numpy(csr.indptr).tolist() == [0, 0, 0, 0]
    assert len(csr.indices) == 0 and len(csr.data) == 0
    assert csr.to_scipy().shape == (3, 3)


@pytest.mark.parametrize("itype", [np.int32, np.int64, np.uint16, np.int8])
def test_integer_index_types_accepted(itype):
    rng = np.random.default_rng(1)
    indices = rng.integers(0, 20, size=(20, 4))
    weights = rng.uniform(0, 1, size=(20, 4))
    want = reclip_ext.sym_normalize(indices, weights)
    got = reclip_ext.sym_normalize(indices.astype(itype), weights)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_to_scipy():
    x = random_points(30, 4, seed=2)
    idx, w = reclip_ext.knn_affinity(x, 4, normalize=True)
    csr = reclip_ext.sym_normalize(idx, w)
    sp = csr.to_scipy()
    assert isinstance(sp, scipy.sparse.csr_array) and sp.shape == (30, 30)
    assert sp.nnz == len(csr.data) and sp.dtype == np.float64
    sp.check_format(full_check=True)
    assert sp.has_sorted_indices and sp.has_canonical_format
    np.testing.assert_allclose(sp.toarray(), reference.ref_sym_normalize(idx, w), atol=1e-14)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
def test_array_kind_in_equals_kind_out(kind):
    x = random_points(15, 3, seed=3, dtype=np.float32)
    idx, w = reclip_ext.knn_affinity(x, 3)
    want = reclip_ext.sym_normalize(idx, w)
    got = reclip_ext.sym_normalize(to_kind(idx, kind), to_kind(w, kind))
    for a, b in zip(got, want):
        assert is_kind(a, kind)
        np.testing.assert_array_equal(to_numpy(a), b)
    np.testing.assert_array_equal(got.to_scipy().toarray(), want.to_scipy().toarray())


def test_strided_inputs():
    rng = np.random.default_rng(4)
    indices = rng.integers(0, 16, size=(16, 6))
    weights = rng.uniform(0, 1, size=(16, 6))
    want = reclip_ext.sym_normalize(indices[:, ::2].copy(), weights[:, ::2].copy())
    got = reclip_ext.sym_normalize(indices[:, ::2], np.asfortranarray(weights[:, ::2]))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_threads_do_not_change_result():
    x = random_points(300, 5, seed=5)
    idx, w = reclip_ext.knn_affinity(x, 7, normalize=True)
    a = reclip_ext.sym_normalize(idx, w)
    b = reclip_ext.sym_normalize(idx, w, threads=1)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


def test_row_sums_of_regular_graph():
    """A ring where every node has the same degree: W = B / deg, rows sum to 1."""
    n = 9
    indices = np.stack([(np.arange(n) + 1) % n, (np.arange(n) - 1) % n], axis=1)
    csr = reclip_ext.sym_normalize(indices, np.ones((n, 2)))
    dense = csr.to_scipy().toarray()
    np.testing.assert_allclose(dense.sum(axis=1), 1.0, atol=1e-15)
    np.testing.assert_allclose(dense, dense.T, atol=0)


@pytest.mark.parametrize(
    "dtype,scale",
    [(np.float32, 2.0**100), (np.float32, 2.0**-100), (np.float64, 2.0**300),
     (np.float64, 2.0**-300), (np.float64, 2.0**600), (np.float64, 2.0**-600)],
    ids=["f32-2^100", "f32-2^-100", "f64-2^300", "f64-2^-300", "f64-2^600", "f64-2^-600"],
)
def test_scale_invariant(dtype, scale):
    """W = D^-1/2 B D^-1/2 does not change when all weights are scaled by c > 0; for a
    power-of-two c the result must be bitwise the same, for any finite, normal weights (no
    inf from an underflowing deg_i * deg_j, no zeros from an overflowing one)."""
    rng = np.random.default_rng(6)
    indices = rng.integers(0, 10, size=(10, 3))
    weights = rng.uniform(0.5, 2.0, size=(10, 3)).astype(dtype)
    want = reclip_ext.sym_normalize(indices, weights)
    got = reclip_ext.sym_normalize(indices, weights * dtype(scale))
    assert np.isfinite(got.data).all(), got.data
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_to_scipy_without_scipy_names_it(monkeypatch):
    """reclip_ext needs only numpy; the one method that needs scipy says so when it is missing."""
    import sys

    idx, w = reclip_ext.knn_affinity(np.random.default_rng(0).standard_normal((12, 3)), 3)
    csr = reclip_ext.sym_normalize(idx, w)
    for name in [m for m in sys.modules if m.startswith("scipy.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ImportError, match=r"Csr.to_scipy needs scipy.*pip install scipy"):
        csr.to_scipy()


@pytest.mark.subprocess
def test_reclip_ext_imports_with_numpy_only(tmp_path):
    """A fresh interpreter that cannot import torch, scipy or cupy still runs the whole engine."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('torch', 'scipy', 'cupy'): sys.modules[name] = None\n"
            "import numpy as np, reclip_ext\n"
            "t = np.eye(3, 8, dtype=np.float32); v = np.repeat(t, 4, axis=0) + 0.01\n"
            "print(reclip_ext.label_propagate(t, v, k=3).labels.tolist())\n")
    # -P and a neutral cwd: import the installed build, never the source tree's reclip_ext/
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([0] * 4 + [1] * 4 + [2] * 4)
