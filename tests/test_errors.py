"""Every bad input of docs/design.md (Errors) gets its typed error, and the message names the argument.

TypeError for dtype / kind, ValueError for shape and value, RuntimeError for CUDA input that
this build or version cannot run. Nothing aborts the interpreter.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse

import reclip_ext
from conftest import NEEDS_CUDA, requires_torch

X = np.random.default_rng(0).standard_normal((6, 3))
X32 = X.astype(np.float32)
TEXT = X[:2].copy()
IMAGES = X[2:].copy()
IDX = np.array([[1, 2], [0, 2], [0, 1]])
WTS = np.array([[0.5, 0.25], [0.5, 1.0], [0.75, 0.5]])
W = reclip_ext.sym_normalize(np.array([[1], [2], [0], [2]]), np.ones((4, 1)))
RHS = np.eye(4)[:, :2].copy()


def with_value(a, index, value):
    a = np.array(a, copy=True)
    a[index] = value
    return a


knn = reclip_ext.knn_affinity
norm = reclip_ext.sym_normalize
cg = reclip_ext.cg_solve
lp = reclip_ext.label_propagate

# (id, call, exception, regex the message must match: it names the argument)
CASES = [
    # ---- knn_affinity: x
    # (a list/tuple of arrays is the pair form (text, images); a nested list of numbers is
    # not an array either way)
    ("knn-x-list", lambda: knn(X.tolist(), 2), (TypeError, ValueError), r"^x"),
    ("knn-x-list-of-2", lambda: knn(X[:2].tolist(), 1), TypeError, r"^x\[0\]: expected"),
    ("knn-x-none", lambda: knn(None, 2), TypeError, r"^x:"),
    ("knn-x-str", lambda: knn("abc", 2), TypeError, r"^x:"),
    ("knn-pair-three", lambda: knn((X, X, X), 2), ValueError, r"^x: expected an array or a pair"),
    ("knn-pair-empty", lambda: knn((), 2), ValueError, r"^x: expected an array or a pair"),
    ("knn-pair-dtype", lambda: knn((X, X32), 2), TypeError,
     r"^x\[1\]: dtype float32 differs from x\[0\] dtype float64"),
    ("knn-pair-cols", lambda: knn((X, X[:, :2]), 2), ValueError,
     r"^x\[1\]: has 2 columns but x\[0\] has 3"),
    ("knn-pair-int", lambda: knn((X, X.astype(int)), 2), TypeError, r"^x\[1\]: dtype"),
    ("knn-pair-nan", lambda: knn((X, with_value(X, (1, 1), np.nan)), 2), ValueError,
     r"^x\[1\]: .*NaN"),
    ("knn-pair-zero-row", lambda: knn((with_value(X, 4, 0.0), X), 2, normalize=True),
     ValueError, r"^x\[0\]: row 4 is all zeros"),
    ("knn-pair-k", lambda: knn((X[:1], X[:2]), 3), ValueError, r"^k must be < N = 3"),
    ("knn-pair-one-row", lambda: knn((X[:1],), 1), ValueError, r"^x: needs at least 2 rows"),
    ("knn-x-int", lambda: knn(X.astype(np.int64), 2), TypeError, r"^x: dtype"),
    ("knn-x-int32", lambda: knn(X.astype(np.int32), 2), TypeError, r"^x: dtype"),
    ("knn-x-float16", lambda: knn(X.astype(np.float16), 2), TypeError, r"^x: dtype.*float16"),
    ("knn-x-complex", lambda: knn(X.astype(np.complex128), 2), TypeError, r"^x: dtype"),
    ("knn-x-bool", lambda: knn(X > 0, 2), TypeError, r"^x: dtype"),
    ("knn-x-object", lambda: knn(X.astype(object), 2), TypeError, r"^x: dtype"),
    ("knn-x-1d", lambda: knn(X[0], 1), ValueError, r"^x: expected a 2-D"),
    ("knn-x-3d", lambda: knn(X[None], 1), ValueError, r"^x: expected a 2-D"),
    ("knn-x-0d", lambda: knn(np.array(1.0), 1), ValueError, r"^x: expected a 2-D"),
    ("knn-x-scalar", lambda: knn(np.float64(1.0), 1), TypeError, r"^x: expected a numpy"),
    ("knn-x-one-row", lambda: knn(X[:1], 1), ValueError, r"^x: needs at least 2 rows"),
    ("knn-x-no-rows", lambda: knn(X[:0], 1), ValueError, r"^x: needs at least \d rows?"),
    ("knn-x-no-cols", lambda: knn(X[:, :0], 1), ValueError, r"^x: needs at least 1 column"),
    ("knn-x-nan", lambda: knn(with_value(X, (2, 1), np.nan), 2), ValueError, r"^x: .*NaN"),
    ("knn-x-inf", lambda: knn(with_value(X, (0, 0), np.inf), 2), ValueError, r"^x: .*Inf"),
    ("knn-x-neginf-f32", lambda: knn(with_value(X32, (5, 2), -np.inf), 2), ValueError,
     r"^x: .*Inf"),
    ("knn-x-zero-row", lambda: knn(with_value(X, 3, 0.0), 2, normalize=True), ValueError,
     r"^x: row 3 is all zeros"),
    # ---- knn_affinity: scalars
    ("knn-k-float", lambda: knn(X, 2.0), TypeError, r"^k must be an integer"),
    ("knn-k-str", lambda: knn(X, "2"), TypeError, r"^k must be an integer"),
    ("knn-k-none", lambda: knn(X, None), TypeError, r"^k must be an integer"),
    ("knn-k-bool", lambda: knn(X, True), TypeError, r"^k must be an integer.*bool"),
    ("knn-k-zero", lambda: knn(X, 0), ValueError, r"^k must be"),
    ("knn-k-negative", lambda: knn(X, -3), ValueError, r"^k must be"),
    ("knn-k-equals-n", lambda: knn(X, 6), ValueError, r"^k must be < N = 6"),
    ("knn-k-above-n-incl-self", lambda: knn(X, 7, exclude_self=False), ValueError,
     r"^k must be <= N = 6"),
    ("knn-weight-unknown", lambda: knn(X, 2, weight="gauss"), ValueError, r"^weight must be"),
    ("knn-weight-case", lambda: knn(X, 2, weight="ReLU"), ValueError, r"^weight must be"),
    ("knn-weight-none", lambda: knn(X, 2, weight=None), ValueError, r"^weight must be"),
    ("knn-gamma-zero", lambda: knn(X, 2, gamma=0), ValueError, r"^gamma must be > 0"),
    ("knn-gamma-negative", lambda: knn(X, 2, gamma=-1.0), ValueError, r"^gamma must be > 0"),
    ("knn-gamma-nan", lambda: knn(X, 2, gamma=float("nan")), ValueError, r"^gamma must be"),
    ("knn-gamma-inf", lambda: knn(X, 2, gamma=float("inf")), ValueError, r"^gamma must be"),
    ("knn-gamma-str", lambda: knn(X, 2, gamma="1"), TypeError, r"^gamma must be a real"),
    ("knn-block-rows-zero", lambda: knn(X, 2, block_rows=0), ValueError, r"^block_rows must"),
    ("knn-block-rows-negative", lambda: knn(X, 2, block_rows=-4), ValueError,
     r"^block_rows must"),
    ("knn-block-rows-float", lambda: knn(X, 2, block_rows=4.0), TypeError,
     r"^block_rows must be an integer"),
    ("knn-threads-zero", lambda: knn(X, 2, threads=0), ValueError, r"^threads must"),
    ("knn-threads-negative", lambda: knn(X, 2, threads=-1), ValueError, r"^threads must"),
    ("knn-threads-float", lambda: knn(X, 2, threads=1.5), TypeError, r"^threads must be an"),
    # ---- sym_normalize
    ("norm-indices-list", lambda: norm(IDX.tolist(), WTS), TypeError, r"^indices:"),
    ("norm-weights-list", lambda: norm(IDX, WTS.tolist()), TypeError, r"^weights:"),
    ("norm-indices-float", lambda: norm(IDX.astype(float), WTS), TypeError, r"^indices: dtype"),
    ("norm-indices-bool", lambda: norm(IDX > 0, WTS), TypeError, r"^indices: dtype"),
    ("norm-weights-int", lambda: norm(IDX, (WTS * 4).astype(int)), TypeError,
     r"^weights: dtype"),
    ("norm-weights-float16", lambda: norm(IDX, WTS.astype(np.float16)), TypeError,
     r"^weights: dtype"),
    ("norm-indices-1d", lambda: norm(IDX[:, 0], WTS[:, 0]), ValueError, r"^indices: expected"),
    ("norm-indices-3d", lambda: norm(IDX[None], WTS[None]), ValueError, r"^indices: expected"),
    ("norm-indices-empty", lambda: norm(IDX[:0], WTS[:0]), ValueError, r"^indices: expected"),
    ("norm-indices-no-cols", lambda: norm(IDX[:, :0], WTS[:, :0]), ValueError,
     r"^indices: expected"),
    ("norm-shape-mismatch", lambda: norm(IDX, WTS[:, :1]), ValueError,
     r"^weights: shape .* does not match indices"),
    ("norm-shape-transposed", lambda: norm(IDX, WTS.T), ValueError, r"^weights: shape"),
    ("norm-index-too-large", lambda: norm(with_value(IDX, (1, 1), 3), WTS), ValueError,
     r"^indices: entries must be in \[0, 3\)"),
    ("norm-index-negative", lambda: norm(with_value(IDX, (2, 0), -1), WTS), ValueError,
     r"^indices: entries must be in"),
    ("norm-weight-negative", lambda: norm(IDX, with_value(WTS, (0, 1), -0.5)), ValueError,
     r"^weights: entries must be >= 0"),
    ("norm-weight-nan", lambda: norm(IDX, with_value(WTS, (0, 1), np.nan)), ValueError,
     r"^weights: .*NaN"),
    ("norm-weight-inf", lambda: norm(IDX, with_value(WTS, (2, 0), np.inf)), ValueError,
     r"^weights: .*Inf"),
    ("norm-threads-zero", lambda: norm(IDX, WTS, threads=0), ValueError, r"^threads must"),
    # ---- cg_solve
    ("cg-W-dense", lambda: cg(np.eye(4), RHS), TypeError, r"^W: expected a Csr"),
    ("cg-W-none", lambda: cg(None, RHS), TypeError, r"^W: expected a Csr"),
    ("cg-W-pair", lambda: cg((W.indptr, W.indices), RHS), TypeError, r"^W: expected a Csr"),
    ("cg-W-data-float32", lambda: cg(W._replace(data=W.data.astype(np.float32)), RHS),
     TypeError, r"^W.data: dtype float32 differs from rhs dtype float64"),
    ("cg-W-data-int", lambda: cg(W._replace(data=W.data.astype(int)), RHS), TypeError,
     r"^W.data: dtype"),
    ("cg-W-indptr-float", lambda: cg(W._replace(indptr=W.indptr.astype(float)), RHS),
     TypeError, r"^W.indptr: dtype"),
    ("cg-W-indices-float", lambda: cg(W._replace(indices=W.indices.astype(float)), RHS),
     TypeError, r"^W.indices: dtype"),
    ("cg-W-indptr-2d", lambda: cg(W._replace(indptr=W.indptr[None]), RHS), ValueError,
     r"^W.indptr: expected a 1-D"),
    ("cg-W-non-square", lambda: cg(scipy.sparse.csr_array(np.ones((4, 5))), RHS), ValueError,
     r"^W: must be square"),
    ("cg-W-rows-mismatch", lambda: cg(W, np.eye(5)[:, :2].copy()), ValueError,
     r"^W: has 4 rows but rhs has 5"),
    ("cg-W-data-length", lambda: cg(W._replace(data=W.data[:-1]), RHS), ValueError,
     r"^W: data has"),
    ("cg-W-indptr-end", lambda: cg(W._replace(indptr=with_value(W.indptr, -1, 99)), RHS),
     ValueError, r"^W.indptr:"),
    ("cg-W-indptr-start", lambda: cg(W._replace(indptr=with_value(W.indptr, 0, 1)), RHS),
     ValueError, r"^W.indptr:"),
    ("cg-W-indptr-decreasing", lambda: cg(W._replace(indptr=np.array([0, 3, 1, 4, 4])), RHS),
     ValueError, r"^W.indptr:"),
    ("cg-W-index-out-of-range", lambda: cg(W._replace(indices=with_value(W.indices, 0, 4)),
                                           RHS), ValueError, r"^W.indices: entries"),
    ("cg-W-index-negative", lambda: cg(W._replace(indices=with_value(W.indices, 1, -1)), RHS),
     ValueError, r"^W.indices: entries"),
    ("cg-W-data-nan", lambda: cg(W._replace(data=with_value(W.data, 0, np.nan)), RHS),
     ValueError, r"^W.data: .*NaN"),
    ("cg-W-data-inf", lambda: cg(W._replace(data=with_value(W.data, 0, np.inf)), RHS),
     ValueError, r"^W.data: .*Inf"),
    ("cg-rhs-list", lambda: cg(W, RHS.tolist()), TypeError, r"^rhs:"),
    ("cg-rhs-int", lambda: cg(W, RHS.astype(int)), TypeError, r"^rhs: dtype"),
    ("cg-rhs-float16", lambda: cg(W, RHS.astype(np.float16)), TypeError, r"^rhs: dtype"),
    ("cg-rhs-1d", lambda: cg(W, RHS[:, 0]), ValueError, r"^rhs: expected a 2-D"),
    ("cg-rhs-3d", lambda: cg(W, RHS[None]), ValueError, r"^rhs: expected a 2-D"),
    ("cg-rhs-no-cols", lambda: cg(W, RHS[:, :0]), ValueError, r"^rhs: needs at least 1 col"),
    ("cg-rhs-nan", lambda: cg(W, with_value(RHS, (1, 1), np.nan)), ValueError, r"^rhs: .*NaN"),
    ("cg-rhs-inf", lambda: cg(W, with_value(RHS, (1, 1), -np.inf)), ValueError,
     r"^rhs: .*Inf"),
    ("cg-alpha-one", lambda: cg(W, RHS, alpha=1.0), ValueError, r"^alpha must be in \[0, 1\)"),
    ("cg-alpha-negative", lambda: cg(W, RHS, alpha=-0.1), ValueError, r"^alpha must be in"),
    ("cg-alpha-large", lambda: cg(W, RHS, alpha=1.5), ValueError, r"^alpha must be in"),
    ("cg-alpha-nan", lambda: cg(W, RHS, alpha=float("nan")), ValueError, r"^alpha must be"),
    ("cg-alpha-str", lambda: cg(W, RHS, alpha="0.5"), TypeError, r"^alpha must be a real"),
    ("cg-alpha-bool", lambda: cg(W, RHS, alpha=False), TypeError, r"^alpha must be a real"),
    ("cg-max-iter-negative", lambda: cg(W, RHS, max_iter=-1), ValueError, r"^max_iter must"),
    ("cg-max-iter-float", lambda: cg(W, RHS, max_iter=10.0), TypeError,
     r"^max_iter must be an integer"),
    ("cg-tol-negative", lambda: cg(W, RHS, tol=-1e-6), ValueError, r"^tol must be >= 0"),
    ("cg-tol-nan", lambda: cg(W, RHS, tol=float("nan")), ValueError, r"^tol must be"),
    ("cg-tol-str", lambda: cg(W, RHS, tol="1e-6"), TypeError, r"^tol must be a real"),
    ("cg-threads-zero", lambda: cg(W, RHS, threads=0), ValueError, r"^threads must"),
    # ---- label_propagate
    ("lp-text-list", lambda: lp(TEXT.tolist(), IMAGES), TypeError, r"^text:"),
    ("lp-images-list", lambda: lp(TEXT, IMAGES.tolist()), TypeError, r"^images:"),
    ("lp-text-int", lambda: lp(TEXT.astype(int), IMAGES), TypeError, r"^text: dtype"),
    ("lp-images-float16", lambda: lp(TEXT, IMAGES.astype(np.float16)), TypeError,
     r"^images: dtype"),
    ("lp-dtype-mismatch", lambda: lp(TEXT, IMAGES.astype(np.float32), k=2), TypeError,
     r"^images: dtype float32 differs from text dtype float64"),
    ("lp-dtype-mismatch-2", lambda: lp(TEXT.astype(np.float32), IMAGES, k=2), TypeError,
     r"^images: dtype float64 differs from text dtype float32"),
    ("lp-text-1d", lambda: lp(TEXT[0], IMAGES), ValueError, r"^text: expected a 2-D"),
    ("lp-images-3d", lambda: lp(TEXT, IMAGES[None]), ValueError, r"^images: expected a 2-D"),
    ("lp-one-class", lambda: lp(TEXT[:1], IMAGES, k=2), ValueError,
     r"^text: needs at least 2 rows"),
    ("lp-no-images", lambda: lp(TEXT, IMAGES[:0], k=1), ValueError, r"^images: needs at least"),
    ("lp-columns-mismatch", lambda: lp(TEXT, IMAGES[:, :2], k=2), ValueError,
     r"^images: has 2 columns but text has 3"),
    ("lp-text-nan", lambda: lp(with_value(TEXT, (1, 2), np.nan), IMAGES, k=2), ValueError,
     r"^text: .*NaN"),
    ("lp-images-inf", lambda: lp(TEXT, with_value(IMAGES, (3, 0), np.inf), k=2), ValueError,
     r"^images: .*Inf"),
    ("lp-text-zero-row", lambda: lp(with_value(TEXT, 1, 0.0), IMAGES, k=2), ValueError,
     r"^text: row 1 is all zeros"),
    ("lp-images-zero-row", lambda: lp(TEXT, with_value(IMAGES, 2, 0.0), k=2), ValueError,
     r"^images: row 2 is all zeros"),
    ("lp-k-too-large", lambda: lp(TEXT, IMAGES, k=6), ValueError, r"^k must be < N = 6"),
    ("lp-k-zero", lambda: lp(TEXT, IMAGES, k=0), ValueError, r"^k must be"),
    ("lp-k-float", lambda: lp(TEXT, IMAGES, k=2.5), TypeError, r"^k must be an integer"),
    ("lp-k-bool", lambda: lp(TEXT, IMAGES, k=True), TypeError, r"^k must be an integer"),
    ("lp-alpha-one", lambda: lp(TEXT, IMAGES, k=2, alpha=1.0), ValueError, r"^alpha must be"),
    ("lp-alpha-negative", lambda: lp(TEXT, IMAGES, k=2, alpha=-0.1), ValueError,
     r"^alpha must be"),
    ("lp-max-iter-negative", lambda: lp(TEXT, IMAGES, k=2, max_iter=-5), ValueError,
     r"^max_iter must"),
    ("lp-tol-negative", lambda: lp(TEXT, IMAGES, k=2, tol=-1.0), ValueError, r"^tol must"),
    ("lp-weight-unknown", lambda: lp(TEXT, IMAGES, k=2, weight="cos"), ValueError,
     r"^weight must be"),
    ("lp-gamma-zero", lambda: lp(TEXT, IMAGES, k=2, gamma=0.0), ValueError, r"^gamma must"),
    ("lp-block-rows-zero", lambda: lp(TEXT, IMAGES, k=2, block_rows=0), ValueError,
     r"^block_rows must"),
    ("lp-threads-negative", lambda: lp(TEXT, IMAGES, k=2, threads=-2), ValueError,
     r"^threads must"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------------------------
# integers too large for the kernels' parameter types still get an error naming them

HUGE = [2**40]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("fn", ["knn", "norm", "cg", "lp"])
def test_huge_threads_named(fn, value):
    call = {"knn": lambda: knn(X, 2, threads=value),
            "norm": lambda: norm(IDX, WTS, threads=value),
            "cg": lambda: cg(W, RHS, threads=value),
            "lp": lambda: lp(TEXT, IMAGES, k=2, threads=value)}[fn]
    with pytest.raises((TypeError, ValueError), match=r"^threads"):
        call()


@pytest.mark.parametrize("value", [2**62, 2**63 - 1])
def test_huge_block_rows_named_or_clamped(value):
    """block_rows beyond any N is either clamped (works) or refused naming block_rows."""
    try:
        knn(X, 2, block_rows=value)
    except (TypeError, ValueError, MemoryError) as err:
        assert str(err).startswith("block_rows"), str(err)


# --------------------------------------------------------------------------------------------
# torch-specific kinds


@requires_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int64", "complex64"])
def test_torch_bad_dtypes(dtype):
    import torch

    x = torch.ones(5, 3, dtype=getattr(torch, dtype))
    with pytest.raises(TypeError, match=r"^x: dtype must be float32 or float64"):
        knn(x, 2)
    t = torch.ones(2, 3, dtype=getattr(torch, dtype))
    with pytest.raises(TypeError, match=r"^text: dtype"):
        lp(t, t, k=2)


@requires_torch
def test_torch_sparse_tensor_message_names_the_problem():
    """A sparse float32 tensor is refused with a TypeError that names x. The dtype is fine,
    so the message must not claim it is the dtype that is wrong."""
    import torch

    x = torch.ones(5, 3).to_sparse()
    with pytest.raises(TypeError, match=r"^x:") as info:
        knn(x, 2)
    assert "got torch.float32" not in str(info.value), str(info.value)


@requires_torch
def test_torch_meta_tensor_names_the_argument():
    import torch

    x = torch.ones(5, 3, device="meta")
    with pytest.raises((TypeError, ValueError), match=r"^x:"):
        knn(x, 2)


# --------------------------------------------------------------------------------------------
# CUDA input


class FakeCudaArray:
    """Anything exposing __dlpack__ and reporting a CUDA device (kDLCUDA = 2), as a cupy
    array or a CUDA torch tensor would. Its __dlpack__ must never be needed on CPU builds."""

    def __init__(self, a):
        self.a = a
        self.shape, self.dtype = a.shape, a.dtype

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (2, 0)


def _cuda_message():
    return r"reclip_ext was built without CUDA" if not reclip_ext.built_with_cuda() else r"CUDA"


def _fake(a):
    return FakeCudaArray(np.ascontiguousarray(a))


CUDA_CASES = [
    ("knn", lambda: knn(_fake(X), 2)),
    ("norm-indices", lambda: norm(_fake(IDX), WTS)),
    ("norm-weights", lambda: norm(IDX, _fake(WTS))),
    ("cg-rhs", lambda: cg(W, _fake(RHS))),
    ("cg-W", lambda: cg(tuple(_fake(a) for a in W), RHS)),
    ("lp-text", lambda: lp(_fake(TEXT), _fake(IMAGES), k=2)),
    ("lp-images", lambda: lp(TEXT, _fake(IMAGES), k=2)),
]


@pytest.mark.parametrize("call", [c[1] for c in CUDA_CASES], ids=[c[0] for c in CUDA_CASES])
def test_cuda_input_refused_without_kernels(call):
    if reclip_ext.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present: the real CUDA tests apply")
    with pytest.raises(RuntimeError, match=_cuda_message()):
        call()


def test_built_without_cuda_message_exact():
    if reclip_ext.built_with_cuda():
        pytest.skip("this build has CUDA")
    with pytest.raises(RuntimeError, match=r"^reclip_ext was built without CUDA$"):
        knn(_fake(X), 2)


# Real CUDA tensors (skipped without a device, so the skip shows in the summary).
_needs_cuda = NEEDS_CUDA


@pytest.mark.parametrize("case", [
    pytest.param("images-on-cpu", marks=_needs_cuda),
    pytest.param("text-on-cpu", marks=_needs_cuda),
])
def test_cuda_device_mismatch_is_value_error(case):
    import torch

    t = torch.from_numpy(TEXT).cuda()
    v = torch.from_numpy(IMAGES).cuda()
    if case == "images-on-cpu":
        v = v.cpu()
    else:
        t = t.cpu()
    with pytest.raises(ValueError, match=r"^(text|images)"):
        lp(t, v, k=2)


@pytest.mark.parametrize("case", [pytest.param("int", marks=_needs_cuda),
                                  pytest.param("nan", marks=_needs_cuda),
                                  pytest.param("k", marks=_needs_cuda)])
def test_cuda_bad_input(case):
    import torch

    x = torch.from_numpy(X32).cuda()
    if case == "int":
        with pytest.raises(TypeError, match=r"^x: dtype"):
            knn(x.int(), 2)
    elif case == "nan":
        x[1, 1] = float("nan")
        with pytest.raises(ValueError, match=r"^x: .*NaN"):
            knn(x, 2)
    else:
        with pytest.raises(ValueError, match=r"^k must be"):
            knn(x, 6)



def test_scans_in_small_chunks_find_the_right_row(monkeypatch):
    """The finite / zero-row scans and the read-out work chunk by chunk (sized by elements):
    forced to chunks of two rows, they still name the right row and give the same result."""
    from reclip_ext import checks

    rng = np.random.default_rng(3)
    text = rng.standard_normal((3, 4))
    images = rng.standard_normal((9, 4))
    want = reclip_ext.label_propagate(text, images, k=3)
    monkeypatch.setattr(checks, "_CHUNK_ELEMENTS", 8)  # two rows of four per chunk
    got = reclip_ext.label_propagate(text, images, k=3)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-12)
    zero = images.copy()
    zero[7] = 0
    with pytest.raises(ValueError, match=r"^images: row 7 is all zeros"):
        reclip_ext.label_propagate(text, zero, k=3)
    nan = images.copy()
    nan[8, 1] = np.nan
    with pytest.raises(ValueError, match=r"^images: contains NaN or Inf"):
        reclip_ext.label_propagate(text, nan, k=3)


# --------------------------------------------------------------------------------------------
# REXT_SYNC: parsed on every call (a CUDA-only switch, but a typo is caught anywhere)


@pytest.mark.parametrize("value,want", [(None, False), ("", False), ("0", False), ("1", True),
                                        (" 1 ", True)])
def test_rext_sync_values(monkeypatch, value, want):
    from reclip_ext import ops

    if value is None:
        monkeypatch.delenv("REXT_SYNC", raising=False)
    else:
        monkeypatch.setenv("REXT_SYNC", value)
    assert ops.sync_requested() is want


@pytest.mark.parametrize("value", ["yes", "2", "true", "on"])
@pytest.mark.parametrize("fn", ["knn", "norm", "cg", "lp"])
def test_rext_sync_bad_value_named(monkeypatch, fn, value):
    call = {"knn": lambda: knn(X, 2), "norm": lambda: norm(IDX, WTS),
            "cg": lambda: cg(W, RHS), "lp": lambda: lp(TEXT, IMAGES, k=2)}[fn]
    monkeypatch.setenv("REXT_SYNC", value)
    with pytest.raises(ValueError, match=r"^REXT_SYNC must be 0 or 1"):
        call()


def test_rext_sync_on_cpu_gives_the_same_result(monkeypatch):
    want = lp(TEXT, IMAGES, k=2)
    monkeypatch.setenv("REXT_SYNC", "1")
    got = lp(TEXT, IMAGES, k=2)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.scores, want.scores)
