"""Hypothesis property tests for every entry point, valid and invalid inputs alike.

Valid inputs (random shapes, values and options) are compared with the float64 reference;
invalid inputs (random garbage) must raise TypeError or ValueError — never crash, hang or
raise anything else. The "ci" profile (default) draws CI_EXAMPLES per test, >= 1,000 in all;
each property also has an ``exhaustive``-marked twin drawing SLOW_EXAMPLES (``--exhaustive``).
"""
from __future__ import annotations

import functools
import re

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reclip_ext
import reference
from conftest import HAVE_TORCH, SLOW_EXAMPLES, assert_knn_close, to_numpy

FLOAT_DTYPES = st.sampled_from([np.float32, np.float64])


def twin(strategy_kwargs):
    """Decorate a check function into a CI property test and a slow-marked twin."""

    def wrap(check):
        def copy():
            @functools.wraps(check)
            def run(**kw):
                check(**kw)

            return run

        fast = given(**strategy_kwargs)(copy())
        slow = pytest.mark.exhaustive(settings(max_examples=SLOW_EXAMPLES)(
            given(**strategy_kwargs)(copy())))
        return fast, slow

    return wrap


# --------------------------------------------------------------------------------------------
# strategies for valid inputs


def moderate(dtype):
    """Finite values in [-100, 100] whose magnitude is 0 or >= 1e-3 (so the float64 reference
    stays an accurate judge; extreme magnitudes have their own tests)."""
    return st.floats(-100, 100, width=32 if dtype == np.float32 else 64).map(
        lambda v: 0.0 if abs(v) < 1e-3 else v)


@st.composite
def knn_cases(draw):
    dtype = draw(FLOAT_DTYPES)
    n = draw(st.integers(2, 40))
    d = draw(st.integers(1, 12))
    x = draw(hnp.arrays(dtype, (n, d), elements=moderate(dtype)))
    exclude_self = draw(st.booleans())
    k = draw(st.integers(1, n - 1 if exclude_self else n))
    opts = dict(exclude_self=exclude_self, weight=draw(st.sampled_from(["relu", "shift"])),
                gamma=draw(st.sampled_from([1.0, 2.0, 3.0, 0.5])),
                normalize=draw(st.booleans()))
    layout = draw(st.sampled_from(["c", "f", "strided", "pair"]))
    block_rows = draw(st.one_of(st.none(), st.integers(1, 50)))
    if opts["weight"] == "shift" and not opts["normalize"]:
        x = shrink_rows(x)  # s >= -1 (s < -1 has its own test)
    return x, k, opts, layout, block_rows


def shrink_rows(x):
    """Scale by a power of two so that every row norm is <= 1 (raw inner products >= -1)."""
    top = float(np.linalg.norm(x.astype(np.float64), axis=1).max())
    if top <= 1:
        return x
    return (x * 2.0 ** -np.ceil(np.log2(top))).astype(x.dtype)


def with_layout(x, layout):
    if layout == "f":
        return np.asfortranarray(x)
    if layout == "strided":
        return np.repeat(x, 2, axis=0)[::2]
    if layout == "pair":  # the (top, bottom) form of knn_affinity
        return (x[: len(x) // 2], x[len(x) // 2 :])
    return x


@twin(dict(case=knn_cases()))
def check_knn_valid(case):
    x, k, opts, layout, block_rows = case
    if opts["normalize"] and not np.any(x != 0, axis=1).all():
        with pytest.raises(ValueError, match=r"^x(\[\d\])?: row \d+ is all zeros"):
            reclip_ext.knn_affinity(with_layout(x, layout), k, block_rows=block_rows, **opts)
        return
    idx, w = reclip_ext.knn_affinity(with_layout(x, layout), k, block_rows=block_rows, **opts)
    assert_knn_close(x, k, idx, w, **opts)


test_knn_valid, test_knn_valid_slow = check_knn_valid


@twin(dict(dtype=FLOAT_DTYPES, n=st.integers(2, 30), d=st.integers(1, 5),
           lo=st.integers(-3, 0), hi=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
           exclude_self=st.booleans(), block_rows=st.one_of(st.none(), st.integers(1, 40)),
           data=st.data()))
def check_knn_ties_exact(dtype, n, d, lo, hi, seed, exclude_self, block_rows, data):
    """Small-integer vectors: all similarities exact, many ties; the output must equal the
    reference index for index (ties to the smaller index) and weight for weight."""
    x = np.random.default_rng(seed).integers(lo, hi + 1, size=(n, d)).astype(dtype)
    k = data.draw(st.integers(1, n - 1 if exclude_self else n), label="k")
    idx, w = reclip_ext.knn_affinity(x, k, exclude_self=exclude_self, weight="relu", gamma=2.0,
                                     block_rows=block_rows)
    ref = reference.ref_knn(x, k, exclude_self, "relu", 2.0)
    np.testing.assert_array_equal(idx, ref.indices)
    np.testing.assert_array_equal(w, ref.weights.astype(dtype))


test_knn_ties_exact, test_knn_ties_exact_slow = check_knn_ties_exact


@twin(dict(dtype=FLOAT_DTYPES, n=st.integers(2, 12), d=st.integers(1, 5),
           seed=st.integers(0, 2**32 - 1),
           log2_scale=st.integers(-1000, 1000)))
def check_knn_normalize_scale_invariant(dtype, n, d, seed, log2_scale):
    """Cosine similarity does not depend on the rows' scale: for a power-of-two scale that
    keeps every entry a finite normal number, the results are bitwise the same."""
    x = np.random.default_rng(seed).uniform(0.5, 2.0, size=(n, d)) * \
        np.random.default_rng(seed + 1).choice([-1, 1], size=(n, d))
    x = x.astype(dtype)
    info = np.finfo(dtype)
    assume(2.0**log2_scale * 2 < float(info.max) and 2.0**log2_scale * 0.5 > float(info.tiny))
    scaled = (x * np.float64(2.0**log2_scale)).astype(dtype)
    k = max(1, n // 2)
    want = reclip_ext.knn_affinity(x, k, normalize=True)
    got = reclip_ext.knn_affinity(scaled, k, normalize=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


test_knn_normalize_scale_invariant, test_knn_normalize_scale_invariant_slow = (
    check_knn_normalize_scale_invariant)


@st.composite
def graph_cases(draw):
    dtype = draw(FLOAT_DTYPES)
    n = draw(st.integers(1, 30))
    k = draw(st.integers(1, 6))
    indices = draw(hnp.arrays(np.int64, (n, k), elements=st.integers(0, n - 1)))
    weights = draw(hnp.arrays(dtype, (n, k), elements=st.one_of(
        st.just(0.0), st.floats(float(dtype(1e-3)), 10, width=32 if dtype == np.float32 else 64))))
    itype = draw(st.sampled_from([np.int64, np.int32, np.uint8 if n <= 255 else np.int64]))
    return indices.astype(itype), weights


@twin(dict(case=graph_cases()))
def check_sym_normalize_valid(case):
    indices, weights = case
    n = indices.shape[0]
    csr = reclip_ext.sym_normalize(indices, weights)
    indptr, cols, data = (to_numpy(a) for a in csr)
    assert indptr.shape == (n + 1,) and indptr[0] == 0 and indptr[-1] == len(cols) == len(data)
    assert (np.diff(indptr) >= 0).all()
    for i in range(n):
        assert (np.diff(cols[indptr[i] : indptr[i + 1]]) > 0).all()
    assert (data > 0).all() and data.dtype == weights.dtype
    dense = csr.to_scipy().toarray()
    want = reference.ref_sym_normalize(indices, weights)
    tol = 1e-12 if weights.dtype == np.float64 else 1e-6
    np.testing.assert_allclose(dense, want, rtol=tol, atol=tol)
    assert ((dense != 0) == (want != 0)).all()
    np.testing.assert_allclose(dense, dense.T, rtol=tol, atol=tol)


test_sym_normalize_valid, test_sym_normalize_valid_slow = check_sym_normalize_valid


@st.composite
def cg_cases(draw):
    indices, weights = draw(graph_cases())
    weights = weights.astype(np.float64)
    n = indices.shape[0]
    m = draw(st.integers(1, 4))
    rhs = draw(hnp.arrays(np.float64, (n, m), elements=st.one_of(
        st.just(0.0), st.floats(-10, 10).filter(lambda v: abs(v) > 1e-3))))
    alpha = draw(st.one_of(st.just(0.0), st.floats(0, 0.99)))
    max_iter = draw(st.integers(0, 60))
    # (tol = 0 makes the stopping iteration a matter of rounding; see test_cg.py)
    tol = draw(st.sampled_from([1e-12, 1e-8, 1e-4, 1e-2, 0.5]))
    return reclip_ext.sym_normalize(indices, weights), rhs, alpha, max_iter, tol


@twin(dict(case=cg_cases()))
def check_cg_valid(case):
    w, rhs, alpha, max_iter, tol = case
    n, m = rhs.shape
    res = reclip_ext.cg_solve(w, rhs, alpha=alpha, max_iter=max_iter, tol=tol)
    assert res.x.shape == (n, m) and res.iterations.shape == (m,) and res.residuals.shape == (m,)
    assert ((res.iterations >= 0) & (res.iterations <= max_iter)).all()
    ref = reference.ref_cg(w, rhs, alpha, max_iter, tol)
    a = np.eye(n) - alpha * w.to_scipy().toarray()
    bnorm = np.linalg.norm(rhs, axis=0)
    for j in range(m):
        if bnorm[j] == 0:
            assert res.iterations[j] == 0 and res.residuals[j] == 0 and (res.x[:, j] == 0).all()
            continue
        assert abs(int(res.iterations[j]) - int(ref.iterations[j])) <= 1
        if res.iterations[j] < max_iter:  # it stopped early: converged
            assert res.residuals[j] <= tol
        true = np.linalg.norm(rhs[:, j] - a @ res.x[:, j]) / bnorm[j]
        assert abs(true - res.residuals[j]) <= 1e-8 + 1e-6 * res.residuals[j]
        if res.iterations[j] == ref.iterations[j]:
            scale = max(1.0, np.abs(ref.x[:, j]).max())
            np.testing.assert_allclose(res.x[:, j], ref.x[:, j], rtol=0, atol=1e-7 * scale)


test_cg_valid, test_cg_valid_slow = check_cg_valid


@twin(dict(dtype=FLOAT_DTYPES, m=st.integers(2, 5), n=st.integers(1, 40),
           d=st.integers(2, 8), seed=st.integers(0, 2**32 - 1), data=st.data(),
           alpha=st.floats(0, 0.95), weight=st.sampled_from(["relu", "shift"]),
           gamma=st.sampled_from([1.0, 3.0]), normalize=st.booleans()))
def check_label_propagate_valid(dtype, m, n, d, seed, data, alpha, weight, gamma, normalize):
    # continuous random data (tie-free); d >= 2 because normalised 1-d rows all tie at +-1
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((m, d)).astype(dtype)
    images = rng.standard_normal((n, d)).astype(dtype)
    if weight == "shift" and not normalize:  # s >= -1 (s < -1 has its own test)
        text, images = np.split(shrink_rows(np.concatenate([text, images])), [m])
    k = data.draw(st.integers(1, m + n - 1), label="k")
    tol = 1e-12 if dtype == np.float64 else 1e-6
    res = reclip_ext.label_propagate(text, images, k=k, alpha=alpha, max_iter=500, tol=tol,
                                     weight=weight, gamma=gamma, normalize=normalize)
    assert res.labels.shape == (n,) and res.scores.shape == (n, m)
    assert res.iterations.shape == (m,) and res.residuals.shape == (m,)
    assert res.scores.dtype == dtype and res.confidence.dtype == dtype
    np.testing.assert_array_equal(res.labels, np.argmax(res.scores, axis=1))
    ref = reference.ref_label_propagate(text, images, k, alpha, weight, gamma, normalize)
    scale = max(1.0, np.abs(ref.scores).max())
    cond = (1 + alpha) / (1 - alpha)
    if dtype == np.float64:
        atol = 1e-9 * cond * scale
    else:
        # float32: the kNN may break float32 near-ties differently; judge loosely
        atol = 1e-3 * cond * scale
    np.testing.assert_allclose(res.scores, ref.scores, rtol=0, atol=atol)
    conf = res.confidence.astype(np.float64)
    assert ((conf >= -1e-5) & (conf <= 1 + 1e-5)).all()
    _, want_conf = reference.ref_readout(res.scores)
    np.testing.assert_allclose(conf, want_conf, atol=1e-5)


test_label_propagate_valid, test_label_propagate_valid_slow = check_label_propagate_valid


# --------------------------------------------------------------------------------------------
# garbage


def garbage_arrays(max_dims=3):
    """Arrays of any common dtype, shape (0-3 dims, sides 0-5) and value (NaN/Inf and huge
    values included), transposed views, torch tensors, and non-arrays."""
    dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32,
                              np.uint8, np.bool_, np.complex64])
    arrays = dtypes.flatmap(lambda dt: hnp.arrays(
        dt, hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5)))
    others = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=3),
                       st.lists(st.floats(), max_size=4),
                       st.lists(st.lists(st.floats(allow_nan=False), min_size=2, max_size=2),
                                max_size=4))
    out = st.one_of(arrays, arrays.map(lambda a: a.T), others)
    if HAVE_TORCH:
        import torch

        out = st.one_of(out, arrays.map(lambda a: torch.from_numpy(np.ascontiguousarray(a))))
    return out


def float_matrices(rows=(1, 6), cols=(1, 5)):
    """Float matrices of a valid dtype but any values (NaN, Inf, zeros, huge included)."""
    return FLOAT_DTYPES.flatmap(lambda dt: hnp.arrays(
        dt, st.tuples(st.integers(*rows), st.integers(*cols))))


def garbage_ints(low=-3, high=12):
    return st.one_of(st.integers(low, high), st.floats(allow_nan=True), st.booleans(),
                     st.none(), st.text(max_size=2), st.just(np.int32(2)), st.just(2 ** 70),
                     st.just(-(2 ** 63)))


def garbage_reals():
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3),
                     st.booleans(), st.none(), st.text(max_size=2), st.just(np.float32(0.5)),
                     st.just(1e308), st.just(5e-324))


def garbage_strings():
    return st.one_of(st.sampled_from(["relu", "shift", "", "RELU", "gauss", "relu "]),
                     st.none(), st.integers(), st.binary(max_size=3))


@st.composite
def mutated(draw, valid: dict, garbage: dict):
    """A valid argument set with 1 to 3 arguments replaced by garbage, so that every
    argument's checks are reached (not only the first argument's)."""
    args = {name: draw(strategy, label=name) for name, strategy in valid.items()}
    names = sorted(garbage)
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        args[name] = draw(garbage[name], label=f"garbage {name}")
    return args


def call_or_typed_error(fn, *args, **kwargs):
    """Run fn; it may succeed (garbage that happens to be valid) or raise TypeError or
    ValueError with a message. Anything else (or a crash) fails the test."""
    try:
        out = fn(*args, **kwargs)
    except (TypeError, ValueError) as err:
        assert str(err), "an error without a message"
        event(f"{type(err).__name__}: {str(err).split(':')[0].split(' ')[0]}")
        return None
    event("accepted")
    return out


def valid_matrix(rows=(2, 6), cols=(1, 4), dtype=np.float64):
    return hnp.arrays(dtype, st.tuples(st.integers(*rows), st.integers(*cols)),
                      elements=st.floats(0.5, 2))


KNN_VALID = dict(x=valid_matrix(rows=(7, 9)), k=st.integers(1, 6), exclude_self=st.booleans(),
                 weight=st.sampled_from(["relu", "shift"]), gamma=st.floats(0.5, 3),
                 normalize=st.booleans(), block_rows=st.one_of(st.none(), st.integers(1, 9)),
                 threads=st.one_of(st.none(), st.integers(1, 2)))
KNN_GARBAGE = dict(x=st.one_of(garbage_arrays(), float_matrices(),
                                st.tuples(float_matrices(), float_matrices()),
                                st.lists(garbage_arrays(max_dims=2), max_size=3)),
                   k=garbage_ints(),
                   weight=garbage_strings(), gamma=garbage_reals(),
                   block_rows=garbage_ints(-2, 40), threads=garbage_ints(-2, 4))


@twin(dict(args=mutated(KNN_VALID, KNN_GARBAGE)))
def check_knn_garbage(args):
    out = call_or_typed_error(reclip_ext.knn_affinity, **args)
    if out is not None:
        idx, w = (to_numpy(a) for a in out)
        x = args["x"]
        n = sum(np.shape(a)[0] for a in x) if isinstance(x, (tuple, list)) else np.shape(x)[0]
        assert idx.shape == w.shape == (n, int(args["k"]))
        assert ((idx >= 0) & (idx < n)).all()


test_knn_garbage, test_knn_garbage_slow = check_knn_garbage


NORM_VALID = dict(indices=hnp.arrays(np.int64, (6, 3), elements=st.integers(0, 5)),
                  weights=hnp.arrays(np.float64, (6, 3), elements=st.floats(0, 5)),
                  threads=st.one_of(st.none(), st.integers(1, 2)))
NORM_GARBAGE = dict(
    indices=st.one_of(garbage_arrays(), hnp.arrays(
        np.int64, st.tuples(st.integers(0, 7), st.integers(0, 4)), elements=st.integers(-2, 8))),
    weights=st.one_of(garbage_arrays(), float_matrices(rows=(0, 7), cols=(0, 4))),
    threads=garbage_ints(-2, 4))


@twin(dict(args=mutated(NORM_VALID, NORM_GARBAGE)))
def check_sym_normalize_garbage(args):
    out = call_or_typed_error(reclip_ext.sym_normalize, **args)
    if out is not None:
        n = np.shape(args["indices"])[0]
        assert len(out.indptr) == n + 1
        out.to_scipy().check_format(full_check=True)
        assert np.isfinite(to_numpy(out.data)).all(), "finite weights gave non-finite W"


test_sym_normalize_garbage, test_sym_normalize_garbage_slow = check_sym_normalize_garbage


@st.composite
def garbage_csr(draw):
    kind = draw(st.sampled_from(["parts", "corrupted", "corrupted", "other"]))
    if kind == "other":
        return draw(st.one_of(garbage_arrays(), st.tuples(garbage_arrays(), garbage_arrays())))
    if kind == "parts":
        return tuple(draw(garbage_arrays(max_dims=2)) for _ in range(3))
    parts = [np.array(a) for a in W6]
    which = draw(st.integers(0, 2))
    how = draw(st.sampled_from(["value", "truncate", "dtype", "2d"]))
    a = parts[which]
    if how == "value" and a.size:
        bad = [-1, 10**6, 7, 2**62] if a.dtype.kind == "i" else [-1.0, 0.5, np.nan, np.inf]
        a[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from(bad))
    elif how == "truncate":
        a = a[: draw(st.integers(0, max(0, len(a) - 1)))]
    elif how == "2d":
        a = a[None]
    else:
        a = a.astype(draw(st.sampled_from([np.float32, np.float16, np.int32, np.bool_])))
    parts[which] = a
    return tuple(parts)


W6 = reclip_ext.sym_normalize(np.array([[1, 2], [0, 2], [3, 0], [4, 5], [5, 3], [4, 0]]),
                              np.ones((6, 2)))
CG_VALID = dict(W=st.just(W6), rhs=hnp.arrays(np.float64, st.tuples(st.just(6),
                                                                     st.integers(1, 3))),
                alpha=st.floats(0, 0.99), max_iter=st.integers(0, 30),
                tol=st.floats(0, 1), threads=st.one_of(st.none(), st.integers(1, 2)))
CG_GARBAGE = dict(W=garbage_csr(), rhs=st.one_of(garbage_arrays(), float_matrices(
    rows=(0, 7), cols=(0, 3))), alpha=garbage_reals(), max_iter=garbage_ints(-2, 30),
    tol=garbage_reals(), threads=garbage_ints(-2, 4))


@twin(dict(args=mutated(CG_VALID, CG_GARBAGE)))
def check_cg_garbage(args):
    out = call_or_typed_error(reclip_ext.cg_solve, **args)
    if out is not None:
        assert to_numpy(out.x).shape == np.shape(args["rhs"])


test_cg_garbage, test_cg_garbage_slow = check_cg_garbage


LP_VALID = dict(text=valid_matrix(rows=(2, 3), cols=(3, 3)),
                images=valid_matrix(rows=(4, 6), cols=(3, 3)), k=st.integers(1, 5),
                alpha=st.floats(0, 0.99), max_iter=st.integers(0, 30), tol=st.floats(0, 1),
                weight=st.sampled_from(["relu", "shift"]), gamma=st.floats(0.5, 3),
                normalize=st.booleans(), block_rows=st.one_of(st.none(), st.integers(1, 9)),
                threads=st.one_of(st.none(), st.integers(1, 2)))
LP_GARBAGE = dict(text=st.one_of(garbage_arrays(), float_matrices()),
                  images=st.one_of(garbage_arrays(), float_matrices()), k=garbage_ints(),
                  alpha=garbage_reals(), max_iter=garbage_ints(-2, 30), tol=garbage_reals(),
                  weight=garbage_strings(), gamma=garbage_reals(),
                  block_rows=garbage_ints(-2, 40), threads=garbage_ints(-2, 4))


@twin(dict(args=mutated(LP_VALID, LP_GARBAGE)))
def check_label_propagate_garbage(args):
    out = call_or_typed_error(reclip_ext.label_propagate, **args)
    if out is not None:
        n, m = np.shape(args["images"])[0], np.shape(args["text"])[0]
        assert to_numpy(out.scores).shape == (n, m)


test_label_propagate_garbage, test_label_propagate_garbage_slow = check_label_propagate_garbage


@twin(dict(dtype=FLOAT_DTYPES, n=st.integers(2, 20), d=st.integers(1, 6),
           row=st.integers(0, 19), col=st.integers(0, 5),
           bad=st.sampled_from([np.nan, np.inf, -np.inf]),
           where=st.sampled_from(["x", "text", "images", "weights", "rhs", "W.data"])))
def check_nonfinite_always_refused(dtype, n, d, row, col, bad, where):
    """One NaN/Inf anywhere in any float input is refused with a ValueError naming it."""
    row, col = row % n, col % d
    x = np.random.default_rng(n * d).standard_normal((n, d)).astype(dtype)
    pattern = {"x": r"^x:", "text": r"^text:", "images": r"^images:", "weights": r"^weights:",
               "rhs": r"^rhs:", "W.data": r"^W.data:"}[where]
    with pytest.raises(ValueError, match=pattern):
        if where == "x":
            x[row, col] = bad
            reclip_ext.knn_affinity(x, 1)
        elif where in ("text", "images"):
            t, v = x[:2].copy(), np.concatenate([x, x])[2:].copy()
            (t if where == "text" else v)[row % len(t if where == "text" else v), col] = bad
            reclip_ext.label_propagate(t, v, k=1)
        elif where == "weights":
            idx, w = reclip_ext.knn_affinity(x, 1)
            w[row, 0] = bad
            reclip_ext.sym_normalize(idx, w)
        else:
            idx, w = reclip_ext.knn_affinity(x, 1)
            csr = reclip_ext.sym_normalize(idx, np.abs(w) + 1)
            rhs = np.ones((n, 2), dtype)
            if where == "rhs":
                rhs[row, 1] = bad
            else:
                csr.data[row % len(csr.data)] = bad
            reclip_ext.cg_solve(csr, rhs)


test_nonfinite_always_refused, test_nonfinite_always_refused_slow = (
    check_nonfinite_always_refused)


# --------------------------------------------------------------------------------------------
# extreme magnitudes

#: an error about an argument starts with that argument's name
_NAMED = r"^(x|text|images|indices|weights|W|W\.data|rhs|gamma)\b"


@twin(dict(dtype=FLOAT_DTYPES, n=st.integers(3, 30), d=st.integers(2, 6),
           seed=st.integers(0, 2**32 - 1), e=st.sampled_from(range(-30, 31)),
           op=st.sampled_from(["knn_affinity", "sym_normalize", "cg_solve", "cg_solve W",
                               "label_propagate"]),
           weight=st.sampled_from(["relu", "shift"]), gamma=st.sampled_from([1.0, 2.0, 3.0]),
           normalize=st.booleans(), tol=st.sampled_from([0.0, 1e-6])))
def check_extreme_magnitudes_finite(dtype, n, d, seed, e, op, weight, gamma, normalize, tol):
    """A well-conditioned input scaled by 10^e (|e| <= 30, still finite in float32) gives
    finite outputs, or a TypeError / ValueError / MemoryError naming the argument at fault;
    never NaN or Inf. A CG column that stops before max_iter claims convergence: its residual
    is at most tol, or negligible (underflowed) when tol is 0."""
    rng = np.random.default_rng(seed)
    scale = 10.0**e
    x = rng.standard_normal((n, d))
    k = min(3, n - 1)
    try:
        if op == "knn_affinity":
            outs = reclip_ext.knn_affinity((x * scale).astype(dtype), k, weight=weight,
                                           gamma=gamma, normalize=normalize)
        elif op == "sym_normalize":
            idx = rng.integers(0, n, size=(n, k))
            w = (rng.uniform(0.5, 2.0, size=(n, k)) * scale).astype(dtype)
            outs = tuple(reclip_ext.sym_normalize(idx, w))
        elif op.startswith("cg_solve"):
            w = reclip_ext.sym_normalize(*reclip_ext.knn_affinity(x.astype(dtype), k))
            rhs = rng.standard_normal((n, 3)).astype(dtype)
            if op == "cg_solve W":
                w = reclip_ext.Csr(w.indptr, w.indices, (w.data * scale).astype(dtype))
            else:
                rhs = (rhs * scale).astype(dtype)
            res = reclip_ext.cg_solve(w, rhs, tol=tol, max_iter=400)
            outs = (res.x, res.residuals)
            early = res.iterations < 400
            assert (res.residuals[early] <= max(tol, 1e-30)).all(), res.residuals
        else:
            m = min(3, n - 1)
            xs = (x * scale).astype(dtype)
            res = reclip_ext.label_propagate(xs[:m], xs[m:], k=k, weight=weight, gamma=gamma,
                                             normalize=normalize, tol=tol, max_iter=400)
            outs = (res.scores, res.confidence, res.residuals)
    except (TypeError, ValueError, MemoryError) as err:
        event(f"{op}: {type(err).__name__}")
        assert re.match(_NAMED, str(err)), f"the error does not name its argument: {err}"
        return
    event(f"{op}: finite")
    for out in outs:
        assert np.isfinite(to_numpy(out).astype(np.float64)).all(), f"{op} gave NaN or Inf"


test_extreme_magnitudes_finite, test_extreme_magnitudes_finite_slow = (
    check_extreme_magnitudes_finite)
