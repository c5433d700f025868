"""knn_affinity against the float64 reference (docs/mathematics.md §2, steps 1-3; docs/design.md, Testing).

Parametrised over dtype x shape x forced tiling (block_rows) x options; top-k compared by
neighbour sets and sorted weights. Also: exact tie handling, strided / non-contiguous
inputs, array kinds, thread count and the portable (REXT_SIMD=generic) kernels.
"""
from __future__ import annotations

import numpy as np
import pytest

import reclip_ext
import reference
from conftest import (ARRAY_KINDS, NEEDS_CUDA, assert_knn_close, is_kind, knn_tolerances,
                      random_points, requires_torch, to_kind, to_numpy)

# (N, d, k): N = 2 with k = 1, k = N - 1, small d (1, 3), d = 9, 99, and d = 300 crossing the
# kernel's 256-deep K blocking; N not a multiple of 6 / 8 / 16; N = 131 > the default row tile.
SHAPES = [
    (2, 1, 1),
    (2, 3, 1),
    (7, 3, 6),
    (13, 1, 4),
    (29, 9, 28),
    (37, 99, 5),
    (50, 300, 7),
    (131, 9, 10),
]
BLOCK_ROWS = [None, 1, 5, 16, 37]
OPTIONS = [
    dict(exclude_self=e, weight=w, gamma=g, normalize=nz)
    for e in (True, False) for w in ("relu", "shift") for g in (1.0, 3.0) for nz in (False, True)
]


def _opt_id(o):
    return (f"{'excl' if o['exclude_self'] else 'incl'}-{o['weight']}-g{o['gamma']:g}"
            f"-{'norm' if o['normalize'] else 'raw'}")


@pytest.mark.parametrize("opts", OPTIONS, ids=_opt_id)
@pytest.mark.parametrize("block_rows", BLOCK_ROWS, ids=lambda b: f"br{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-d{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_matches_reference(dtype, shape, block_rows, opts):
    n, d, k = shape
    x = grid_points(n, d, dtype, opts)
    idx, w = reclip_ext.knn_affinity(x, k, block_rows=block_rows, **opts)
    assert isinstance(idx, np.ndarray) and isinstance(w, np.ndarray)
    assert_knn_close(x, k, idx, w, **opts)


def grid_points(n, d, dtype, opts):
    """Gaussian points; for the shift weight on raw inner products, rows get norms in
    [0.3, 1] so that s >= -1 (the shift weight is meant for cosines; s < -1 is tested by
    test_shift_weight_never_negative)."""
    x = random_points(n, d, seed=n * 1000 + d, dtype=np.float64)
    if opts["weight"] == "shift" and not opts["normalize"]:
        norms = np.random.default_rng(n).uniform(0.3, 1.0, size=(n, 1))
        x = x / np.linalg.norm(x, axis=1, keepdims=True) * norms
    return x.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_k_equals_n_without_exclude_self(dtype):
    x = random_points(9, 4, seed=3, dtype=dtype)
    idx, w = reclip_ext.knn_affinity(x, 9, exclude_self=False)
    assert_knn_close(x, 9, idx, w, exclude_self=False)
    assert (np.sort(idx, axis=1) == np.arange(9)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weights_are_f_of_similarity(dtype):
    """Each weight is f(x_i . x_j) of its own (i, j) pair, not only the sorted multiset."""
    x = random_points(40, 6, seed=5, dtype=dtype)
    for weight, gamma in (("relu", 1.0), ("relu", 3.0), ("shift", 1.0), ("shift", 2.5)):
        idx, w = reclip_ext.knn_affinity(x, 6, weight=weight, gamma=gamma, normalize=True)
        s = reference.ref_similarity(x, True)
        want = reference.weight_fn(np.take_along_axis(s, idx, axis=1), weight, gamma)
        tol = 1e-12 if dtype == np.float64 else 2e-6
        np.testing.assert_allclose(w, want, rtol=0, atol=tol)


def test_relu_zero_for_negative_similarity():
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    idx, w = reclip_ext.knn_affinity(x, 2, weight="relu")
    assert idx.tolist() == [[2, 1], [2, 0], [0, 1]]  # S = 0 ties go to the smaller index
    assert w.tolist() == [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    idx, w = reclip_ext.knn_affinity(x, 2, weight="shift")
    assert w.tolist() == [[0.5, 0.0], [0.5, 0.0], [0.5, 0.5]]


@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shift_weight_never_negative(dtype, gamma):
    """Raw inner products below -1 give a negative shift base (1 + s) / 2. The weights must
    still be >= 0 (sym_normalize and label_propagate refuse negative ones), whatever gamma:
    clamped at 0 as for gamma != 1 and as relu does."""
    x = np.array([[2.0, 0.0], [-2.0, 0.0], [-1.5, 0.5]], dtype)  # s_01 = -4, s_02 = -3
    idx, w = reclip_ext.knn_affinity(x, 2, weight="shift", gamma=gamma)
    assert (w >= 0).all(), w
    assert_knn_close(x, 2, idx, w, weight="shift", gamma=gamma)
    reclip_ext.sym_normalize(idx, w)  # must be accepted


# --------------------------------------------------------------------------------------------
# exact ties


@pytest.mark.parametrize("block_rows", BLOCK_ROWS)
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_integer_vectors(dtype, exclude_self, block_rows):
    """Integer-valued vectors: every similarity is exact in both precisions, so the result
    must equal the reference index for index: larger similarity first, ties to the smaller j."""
    rng = np.random.default_rng(11)
    x = rng.integers(-2, 3, size=(45, 3)).astype(dtype)
    for k in (1, 5, 17, 44):
        idx, w = reclip_ext.knn_affinity(x, k, exclude_self=exclude_self, block_rows=block_rows,
                                         weight="relu", gamma=2.0)
        ref = reference.ref_knn(x, k, exclude_self, "relu", 2.0)
        np.testing.assert_array_equal(idx, ref.indices)
        np.testing.assert_array_equal(w, ref.weights.astype(dtype))


@pytest.mark.parametrize("block_rows", BLOCK_ROWS)
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_duplicated_rows(dtype, exclude_self, block_rows):
    """Duplicated rows tie exactly (bitwise-equal similarities, normalised or not): the
    duplicates must come in increasing index order, the whole output equal to the reference
    index for index (the distinct rows are far apart, so float32 cannot reorder them)."""
    base = np.random.default_rng(2).standard_normal((5, 8))
    for normalize in (False, True):  # distinct rows are far apart in similarity
        s = reference.ref_similarity(base, normalize)
        assert min(np.diff(np.sort(r)).min() for r in s) > 1e-3
    rng = np.random.default_rng(4)
    which = rng.permutation(np.repeat(np.arange(5), [4, 3, 5, 2, 6]))
    x = base[which].astype(dtype)
    for normalize in (False, True):
        for k in (1, 3, 6, 19):
            idx, w = reclip_ext.knn_affinity(x, k, exclude_self=exclude_self,
                                             normalize=normalize, block_rows=block_rows,
                                             weight="shift")
            ref = reference.ref_knn(x, k, exclude_self, "shift", normalize=normalize)
            np.testing.assert_array_equal(idx, ref.indices, err_msg=f"normalize={normalize}")
            assert (np.diff(w, axis=1) <= 0).all()


def test_ties_all_equal_rows():
    x = np.ones((10, 4), np.float32)
    idx, _ = reclip_ext.knn_affinity(x, 3)
    expect = [[j for j in range(10) if j != i][:3] for i in range(10)]
    assert idx.tolist() == expect
    idx, _ = reclip_ext.knn_affinity(x, 3, exclude_self=False)
    assert idx.tolist() == [[0, 1, 2]] * 10


# --------------------------------------------------------------------------------------------
# layouts and array kinds


def _layouts(base):
    """(name, view) pairs holding the same (N, d) matrix in different memory layouts."""
    return [
        ("strided_rows", np.repeat(base, 2, axis=0)[::2]),
        ("strided_cols", np.repeat(base, 3, axis=1)[:, ::3]),
        ("fortran", np.asfortranarray(base)),
        ("transposed_view", np.ascontiguousarray(base.T).T),
        ("reversed_rows", np.ascontiguousarray(base[::-1])[::-1]),
        ("column_slice", np.concatenate([base, base[:, :2]], axis=1)[:, : base.shape[1]]),
        ("record_field", _record_field(base)),
        ("misaligned", _misaligned(base)),
    ]


def _record_field(a):
    """A view into a structured array: row stride not a multiple of the item size."""
    rec = np.zeros(a.shape[0], dtype=[("v", a.dtype, (a.shape[1],)), ("pad", "i1")])
    rec["v"] = a
    return rec["v"]


def _misaligned(a):
    """The same values at an address that is not a multiple of the item size."""
    buf = bytearray(a.nbytes + 1)
    out = np.ndarray(a.shape, a.dtype, buffer=buf, offset=1)
    out[...] = a
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layouts_give_identical_results(dtype):
    base = random_points(23, 7, seed=8, dtype=dtype)
    want = reclip_ext.knn_affinity(base, 5, normalize=True, weight="relu", gamma=3)
    for name, x in _layouts(base):
        np.testing.assert_array_equal(x, base)
        got = reclip_ext.knn_affinity(x, 5, normalize=True, weight="relu", gamma=3)
        np.testing.assert_array_equal(got[0], want[0], err_msg=name)
        np.testing.assert_array_equal(got[1], want[1], err_msg=name)


def test_read_only_and_broadcast_inputs():
    base = random_points(15, 4, seed=13)
    ro = base.copy()
    ro.flags.writeable = False
    want = reclip_ext.knn_affinity(base, 3)
    got = reclip_ext.knn_affinity(ro, 3)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # zero row stride: every row the same, so all similarities tie
    x = np.broadcast_to(base[0], (6, 4))
    idx, w = reclip_ext.knn_affinity(x, 3)
    assert idx.tolist() == [[j for j in range(6) if j != i][:3] for i in range(6)]
    # zero column stride
    x = np.broadcast_to(base[:, :1], (15, 4))
    idx, w = reclip_ext.knn_affinity(x, 3)
    np.testing.assert_array_equal(idx, reference.ref_knn(x, 3).indices)


@pytest.mark.parametrize("block_rows", [64, 1000, 10**5, 10**7])
def test_block_rows_larger_than_n(block_rows):
    """A tile larger than the matrix is one tile: same result as the default, no huge
    workspace for a 20-row input."""
    x = random_points(20, 5, seed=14, dtype=np.float32)
    want = reclip_ext.knn_affinity(x, 4)
    got = reclip_ext.knn_affinity(x, 4, block_rows=block_rows)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_concurrent_calls_from_python_threads():
    """The GIL is released during the kernels: concurrent calls must not interfere."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [random_points(200, 16, seed=s, dtype=np.float32) for s in range(6)]
    want = [reclip_ext.knn_affinity(x, 5, normalize=True) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: reclip_ext.knn_affinity(x, 5, normalize=True), xs * 3))
    for i, (idx, w) in enumerate(got):
        np.testing.assert_array_equal(idx, want[i % 6][0])
        np.testing.assert_array_equal(w, want[i % 6][1])


def test_strided_input_matches_reference():
    x = random_points(60, 5, seed=9, dtype=np.float32)[::2]
    assert not x.flags.c_contiguous
    idx, w = reclip_ext.knn_affinity(x, 4)
    assert_knn_close(x, 4, idx, w)


def test_input_is_not_modified():
    x = random_points(20, 5, seed=1)
    y = x.copy()
    reclip_ext.knn_affinity(x, 3, normalize=True)
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_array_kind_in_equals_kind_out(kind, dtype):
    base = random_points(17, 4, seed=6, dtype=dtype)
    want = reclip_ext.knn_affinity(base, 3)
    idx, w = reclip_ext.knn_affinity(to_kind(base, kind), 3)
    assert is_kind(idx, kind) and is_kind(w, kind)
    np.testing.assert_array_equal(to_numpy(idx), want[0])
    np.testing.assert_array_equal(to_numpy(w), want[1])
    assert to_numpy(idx).dtype == np.int64 and to_numpy(w).dtype == dtype


@requires_torch
def test_torch_views():
    import torch

    base = torch.from_numpy(random_points(12, 6, seed=7))
    want = reclip_ext.knn_affinity(base.numpy(), 4)
    views = {
        "transposed": base.T.contiguous().T,
        "strided": torch.repeat_interleave(base, 2, dim=0)[::2],
        "requires_grad": base.clone().requires_grad_(True),
        "neg_view": torch._neg_view(-base),  # a lazy negation bit (resolved by reclip_ext)
    }
    for name, t in views.items():
        idx, w = reclip_ext.knn_affinity(t, 4)
        assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64, name
        np.testing.assert_array_equal(idx.numpy(), want[0], err_msg=name)
        np.testing.assert_allclose(w.numpy(), want[1], rtol=0, atol=1e-15, err_msg=name)


def test_generic_dlpack_object_accepted():
    class Wrapped:
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    x = random_points(10, 3, seed=2)
    idx, w = reclip_ext.knn_affinity(Wrapped(x), 2)
    want = reclip_ext.knn_affinity(x, 2)
    np.testing.assert_array_equal(to_numpy(idx), want[0])
    np.testing.assert_array_equal(to_numpy(w), want[1])


# --------------------------------------------------------------------------------------------
# the pair form: x = (top, bottom) taken as their row-wise concatenation


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("split", [1, 2, 10, 22])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pair_equals_concatenation(dtype, split, kind):
    x = random_points(23, 6, seed=15, dtype=dtype)
    want = reclip_ext.knn_affinity(x, 4, normalize=True, block_rows=5)
    for pair in ((x[:split], x[split:]), [x[:split], x[split:]]):
        top, bottom = (to_kind(np.ascontiguousarray(a), kind) for a in pair)
        form = type(pair)((top, bottom))
        idx, w = reclip_ext.knn_affinity(form, 4, normalize=True, block_rows=5)
        assert is_kind(idx, kind) and is_kind(w, kind)
        np.testing.assert_array_equal(to_numpy(idx), want[0])
        np.testing.assert_array_equal(to_numpy(w), want[1])


def test_pair_strided_blocks_and_single_element():
    x = random_points(30, 5, seed=16)
    want = reclip_ext.knn_affinity(x, 3)
    got = reclip_ext.knn_affinity((np.asfortranarray(x[:7]), np.repeat(x[7:], 2, axis=0)[::2]), 3)
    np.testing.assert_array_equal(got[0], want[0])
    got = reclip_ext.knn_affinity((x,), 3)
    np.testing.assert_array_equal(got[0], want[0])


def test_pair_one_row_each():
    x = random_points(2, 3, seed=17)
    idx, w = reclip_ext.knn_affinity((x[:1], x[1:]), 1)
    assert idx.tolist() == [[1], [0]]
    assert_knn_close(x, 1, idx, w)


# --------------------------------------------------------------------------------------------
# threads and SIMD paths


@pytest.mark.parametrize("block_rows", [None, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_thread_equals_default(dtype, block_rows):
    x = random_points(150, 33, seed=12, dtype=dtype)
    a = reclip_ext.knn_affinity(x, 8, normalize=True, block_rows=block_rows)
    b = reclip_ext.knn_affinity(x, 8, normalize=True, block_rows=block_rows, threads=1)
    c = reclip_ext.knn_affinity(x, 8, normalize=True, block_rows=block_rows, threads=3)
    for got in (b, c):
        np.testing.assert_array_equal(got[0], a[0])
        np.testing.assert_array_equal(got[1], a[1])


@pytest.mark.parametrize("shape", [(2, 1, 1), (37, 99, 5), (50, 300, 7), (131, 9, 10)],
                         ids=lambda s: "N{}-d{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_generic_simd_matches_default(monkeypatch, dtype, shape):
    n, d, k = shape
    x = random_points(n, d, seed=n + d, dtype=dtype)
    default = reclip_ext.knn_affinity(x, k, normalize=True, block_rows=5)
    monkeypatch.setenv("REXT_SIMD", "generic")
    assert reclip_ext.simd_level() == "generic"
    generic = reclip_ext.knn_affinity(x, k, normalize=True, block_rows=5)
    assert_knn_close(x, k, *generic, normalize=True)
    assert_knn_close(x, k, *default, normalize=True)
    # tie-free data: the same neighbour set in every row
    for i, (a, b) in enumerate(zip(default[0].tolist(), generic[0].tolist())):
        assert set(a) == set(b), f"row {i}: {a} (default) vs {b} (generic)"
    tol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(generic[1], default[1], rtol=0, atol=tol)
    monkeypatch.delenv("REXT_SIMD")
    assert reclip_ext.simd_level() in ("avx2", "generic")


def test_generic_simd_exact_on_integer_data(monkeypatch):
    x = np.random.default_rng(3).integers(-3, 4, size=(70, 5)).astype(np.float32)
    default = reclip_ext.knn_affinity(x, 9)
    monkeypatch.setenv("REXT_SIMD", "generic")
    generic = reclip_ext.knn_affinity(x, 9)
    np.testing.assert_array_equal(generic[0], default[0])
    np.testing.assert_array_equal(generic[1], default[1])


# --------------------------------------------------------------------------------------------
# scale invariance of normalize=True (finite inputs whose squared norms leave the range)


@pytest.mark.parametrize(
    "dtype,scale",
    [(np.float32, 2.0**60), (np.float32, 2.0**-60), (np.float64, 2.0**300),
     (np.float64, 2.0**-300), (np.float64, 2.0**600), (np.float64, 2.0**-600)],
    ids=["f32-2^60", "f32-2^-60", "f64-2^300", "f64-2^-300", "f64-2^600", "f64-2^-600"],
)
def test_normalize_is_scale_invariant(dtype, scale):
    """normalize=True means cosine similarity, which does not depend on the rows' scale. For
    a power-of-two scale the normalised rows are bitwise the same, so the results must be
    too, however large or small the (finite, nonzero) rows are."""
    x = random_points(12, 4, seed=21, dtype=dtype)
    want = reclip_ext.knn_affinity(x, 3, normalize=True)
    got = reclip_ext.knn_affinity(x * dtype(scale), 3, normalize=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


# --------------------------------------------------------------------------------------------
# CUDA (the contract of docs/mathematics.md §2; skipped without a device)


@pytest.mark.parametrize("dtype", [
    pytest.param(name, marks=NEEDS_CUDA)
    for name in ("float32", "float16", "bfloat16")
])
def test_cuda_matches_cpu(dtype):
    import torch

    x = random_points(300, 20, seed=4, dtype=np.float32)
    xt = torch.from_numpy(x).to("cuda", getattr(torch, dtype))
    idx, w = reclip_ext.knn_affinity(xt, 6, normalize=True)
    assert idx.is_cuda and w.is_cuda and idx.dtype == torch.int64 and w.dtype == xt.dtype
    xr = xt.float().cpu().numpy()
    if dtype == "float32":
        assert_knn_close(xr, 6, idx.cpu(), w.cpu().float().numpy(), normalize=True)
    else:  # half precision inputs, float32 accumulation
        ref = reference.ref_knn(xr, 6, normalize=True)
        np.testing.assert_allclose(np.sort(w.float().cpu().numpy(), 1), np.sort(ref.weights, 1),
                                   atol=1e-2)


def test_overflowing_similarities_are_refused():
    # float32 rows of norm ~1e20 give x_i . x_j ~ 1e40: refused with the rule, not inf weights.
    x = (np.random.default_rng(0).standard_normal((10, 4)) * 1e20).astype(np.float32)
    with pytest.raises(ValueError, match=r"^x: row norms must be at most 9.22\d*e\+18 .*float64"):
        reclip_ext.knn_affinity(x, 3)
    # the three ways out the message names all work
    for got in (reclip_ext.knn_affinity(x, 3, normalize=True),
                reclip_ext.knn_affinity(x.astype(np.float64), 3),
                reclip_ext.knn_affinity(x * np.float32(1e-10), 3)):
        assert np.isfinite(got[1]).all()
    want = reference.ref_knn(x.astype(np.float64), 3)
    got = reclip_ext.knn_affinity(x.astype(np.float64), 3)
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("weight", ["relu", "shift"])
def test_overflowing_gamma_weights_are_refused(weight):
    # s ~ 1e16 is fine in float32, s^3 ~ 1e48 is not.
    x = (np.random.default_rng(1).standard_normal((10, 4)) * 1e8).astype(np.float32)
    assert np.isfinite(reclip_ext.knn_affinity(x, 3, weight=weight)[1]).all()
    with pytest.raises(ValueError, match=r"^gamma: the weights .* must fit in float32"):
        reclip_ext.knn_affinity(x, 3, weight=weight, gamma=3.0)


# --------------------------------------------------------------------------------------------
# Query blocks: rows=(start, stop) and queries=

BLOCK_OPTIONS = [
    dict(exclude_self=e, weight=w, normalize=nz)
    for e in (True, False) for w in ("relu", "shift") for nz in (False, True)
]


def _blocks(n):
    """Blocks at both edges, a single row, an interior block, everything and empty ones."""
    return [(0, 5), (n - 5, n), (0, 1), (n - 1, n), (13, 14), (7, n - 9), (0, n), (0, 0),
            (n, n), (11, 11)]


@pytest.mark.parametrize("opts", BLOCK_OPTIONS,
                         ids=lambda o: f"{'excl' if o['exclude_self'] else 'incl'}-{o['weight']}"
                                       f"-{'norm' if o['normalize'] else 'raw'}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_row_block_matches_reference(dtype, opts):
    n, d, k = 61, 9, 7  # odd N, not a multiple of any tile
    x = grid_points(n, d, dtype, dict(opts, gamma=1.0))
    ref = reference.ref_knn(x.astype(np.float64), k, **opts)
    tol_s, tol_w = knn_tolerances(x, k, gamma=1.0, ref=ref, **opts)
    for start, stop in _blocks(n):
        idx, w = reclip_ext.knn_affinity(x, k, rows=(start, stop), block_rows=16, **opts)
        assert idx.shape == (stop - start, k) and idx.dtype == np.int64
        assert w.shape == (stop - start, k) and w.dtype == dtype
        for r in range(stop - start):
            i = start + r
            if opts["exclude_self"]:
                assert i not in idx[r]
            want = ref.indices[i]
            if dtype == np.float64:
                np.testing.assert_array_equal(idx[r], want)
            else:  # float32 may reorder neighbours whose float64 similarities are that close
                kth = ref.sim[i, want[-1]]
                assert all(j in want or ref.sim[i, j] >= kth - tol_s for j in idx[r]), (i, idx[r])
            np.testing.assert_allclose(w[r].astype(np.float64), ref.weights[i], rtol=0,
                                       atol=tol_w)


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("block_rows", [None, 1, 6, 37], ids=lambda b: f"br{b}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_partition_blocks_concatenate_to_the_whole_call(dtype, block_rows, kind):
    n, d, k = 143, 300, 10  # d > the 256-deep K blocking
    x = random_points(n, d, seed=3, dtype=dtype)
    xk = to_kind(x, kind)
    for opts in BLOCK_OPTIONS[::3]:
        whole = reclip_ext.knn_affinity(xk, k, block_rows=block_rows, **opts)
        for cuts in ([0, 1, 70, 71, 142, 143], [0, 48, 96, 143], [0, 0, 143, 143]):
            parts = [reclip_ext.knn_affinity(xk, k, rows=(a, b), block_rows=block_rows, **opts)
                     for a, b in zip(cuts[:-1], cuts[1:])]
            assert all(is_kind(p[0], kind) and is_kind(p[1], kind) for p in parts)
            for got, want in zip(zip(*parts), whole):
                np.testing.assert_array_equal(np.concatenate([to_numpy(g) for g in got]),
                                              to_numpy(want))


def test_row_block_of_a_pair_uses_global_rows():
    text, images = random_points(5, 8, seed=1), random_points(30, 8, seed=2)
    whole = reclip_ext.knn_affinity((text, images), 4, normalize=True)
    for start, stop in [(0, 5), (3, 9), (5, 35), (34, 35)]:
        idx, w = reclip_ext.knn_affinity((text, images), 4, rows=(start, stop), normalize=True)
        np.testing.assert_array_equal(idx, whole[0][start:stop])
        np.testing.assert_array_equal(w, whole[1][start:stop])


@pytest.mark.parametrize("weight", ["relu", "shift"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_queries_match_reference(dtype, normalize, weight):
    x = random_points(45, 11, seed=5, dtype=dtype)
    q = random_points(9, 11, seed=6, dtype=dtype)
    if weight == "shift" and not normalize:
        x, q = x / 4, q / 4  # keeps s >= -1, where the shift weight is meant to be used
    idx, w = reclip_ext.knn_affinity(x, 6, queries=q, weight=weight, normalize=normalize,
                                     block_rows=8)
    ref = reference.ref_knn_queries(x, q, 6, weight=weight, normalize=normalize)
    np.testing.assert_array_equal(idx, ref.indices)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(w.astype(np.float64), ref.weights, rtol=rtol, atol=rtol)
    # k may reach N: nothing is excluded
    idx, _ = reclip_ext.knn_affinity(x, 45, queries=q)
    assert (np.sort(idx, 1) == np.arange(45)).all()


def test_queries_that_are_rows_equal_the_row_block_without_exclusion():
    x = random_points(50, 7, seed=8, dtype=np.float32)
    got = reclip_ext.knn_affinity(x, 5, queries=x[10:30], exclude_self=False, normalize=True)
    want = reclip_ext.knn_affinity(x, 5, rows=(10, 30), exclude_self=False, normalize=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_empty_queries_give_empty_results():
    x = random_points(10, 3, dtype=np.float32)
    idx, w = reclip_ext.knn_affinity(x, 4, queries=np.zeros((0, 3), np.float32))
    assert idx.shape == (0, 4) and idx.dtype == np.int64 and w.shape == (0, 4)
    assert w.dtype == np.float32


def test_block_arguments_are_checked():
    x = random_points(10, 3, dtype=np.float32)
    q = random_points(4, 3, dtype=np.float32)
    bad = [
        (dict(rows=(0, 11)), ValueError, r"^rows: \(start, stop\) must satisfy 0 <= start"),
        (dict(rows=(-1, 3)), ValueError, r"^rows: "),
        (dict(rows=(5, 4)), ValueError, r"^rows: "),
        (dict(rows=(0.0, 3)), TypeError, r"^rows must be a pair"),
        (dict(rows=(1, 2, 3)), TypeError, r"^rows must be a pair"),
        (dict(rows=3), TypeError, r"^rows must be a pair"),
        (dict(rows=(True, 3)), TypeError, r"^rows must be a pair"),
        (dict(rows=(0, 3), queries=q, exclude_self=False), ValueError, r"^rows: .*not both"),
        (dict(queries=q, exclude_self=True), ValueError, r"^exclude_self: queries are not rows"),
        (dict(queries=q.astype(np.float64), exclude_self=False), TypeError,
         r"^queries: dtype float64 differs from x dtype float32"),
        (dict(queries=q[:, :2], exclude_self=False), ValueError,
         r"^queries: has 2 columns but x has 3"),
        (dict(queries=q[0], exclude_self=False), ValueError, r"^queries: expected a 2-D"),
        (dict(queries=q.astype(np.int32), exclude_self=False), TypeError, r"^queries: dtype"),
        (dict(queries=[[1.0, 2.0, 3.0]], exclude_self=False), TypeError, r"^queries: expected"),
        (dict(queries=np.full((2, 3), np.nan, np.float32), exclude_self=False), ValueError,
         r"^queries: contains NaN"),
        (dict(queries=np.zeros((2, 3), np.float32), exclude_self=False, normalize=True),
         ValueError, r"^queries: row 0 is all zeros"),
    ]
    for kwargs, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            reclip_ext.knn_affinity(x, 4, **kwargs)
    with pytest.raises(ValueError, match=r"^k must be <= N = 10"):
        reclip_ext.knn_affinity(x, 11, queries=q)  # exclude_self defaults to False for queries
    with pytest.raises(ValueError, match=r"^k must be < N = 10"):
        reclip_ext.knn_affinity(x, 10, rows=(0, 2))


@requires_torch
def test_torch_queries_must_match_x_kind_and_dtype():
    import torch

    x = torch.from_numpy(random_points(12, 4, dtype=np.float32))
    idx, w = reclip_ext.knn_affinity(x, 3, queries=x[:2].clone(), exclude_self=False)
    assert isinstance(idx, torch.Tensor) and idx.shape == (2, 3)
    with pytest.raises(TypeError, match=r"^queries: dtype float64 differs"):
        reclip_ext.knn_affinity(x, 3, queries=x[:2].double(), exclude_self=False)


def test_block_workspace_sizes():
    core = reclip_ext._core
    whole = core.knn_affinity_workspace_bytes(1000, 64, 10, "float32")
    assert core.knn_affinity_workspace_bytes(1000, 64, 10, "float32", "exact", 1000) == whole
    assert core.knn_affinity_workspace_bytes(1000, 64, 10, "float32", "exact", 100) < whole
    # separate queries carry their own packed copy
    assert (core.knn_affinity_workspace_bytes(1000, 64, 10, "float32", "exact", 100, True)
            > core.knn_affinity_workspace_bytes(1000, 64, 10, "float32", "exact", 100))


@pytest.mark.parametrize("precision", [pytest.param(p, marks=NEEDS_CUDA)
                                       for p in ("exact", "tf32")])
def test_cuda_blocks_concatenate_to_the_whole_call(precision):
    import torch

    x = torch.from_numpy(random_points(301, 40, seed=9, dtype=np.float32)).cuda()
    whole = reclip_ext.knn_affinity(x, 8, normalize=True, precision=precision)
    cuts = [0, 1, 128, 200, 301]
    parts = [reclip_ext.knn_affinity(x, 8, rows=(a, b), normalize=True, precision=precision)
             for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole[1], rtol=0, atol=0)
    q = x[5:40].clone()
    got = reclip_ext.knn_affinity(x, 8, queries=q, exclude_self=False, normalize=True,
                                  precision=precision)
    want = reclip_ext.knn_affinity(x, 8, rows=(5, 40), exclude_self=False, normalize=True,
                                   precision=precision)
    assert torch.equal(got[0], want[0])
