"""label_propagate against the float64 reference (docs/mathematics.md §2, steps 1-6) and against the
LP-DeepSSL recipe (float32 numpy kNN + scipy CSR + scipy.sparse.linalg.cg per class)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import reclip_ext
import reference
from conftest import ARRAY_KINDS, NEEDS_CUDA, clip_like, is_kind, to_kind, to_numpy


def ref_unconverged(text, images, k, alpha, max_iter, tol, weight="shift", gamma=1.0,
                    normalize=True):
    """Steps 1-6 in float64 with the textbook CG of reference.py (same stop rule), for
    comparisons at max_iter where CG has not converged."""
    m = len(text)
    x = np.concatenate([text, images]).astype(np.float64)
    knn = reference.ref_knn(x, k, True, weight, gamma, normalize)
    w = reference.ref_sym_normalize(knn.indices, knn.weights)
    y = np.zeros((len(x), m))
    y[np.arange(m), np.arange(m)] = 1
    return reference.ref_cg(w, y, alpha, max_iter, tol)


def check_result(res, n, m, dtype):
    labels, scores, conf, its, resid = (to_numpy(a) for a in res)
    assert labels.shape == (n,) and labels.dtype == np.int64
    assert scores.shape == (n, m) and scores.dtype == dtype
    assert conf.shape == (n,) and conf.dtype == dtype
    assert its.shape == (m,) and its.dtype == np.int64
    assert resid.shape == (m,) and resid.dtype == np.float64
    assert ((labels >= 0) & (labels < m)).all()
    np.testing.assert_array_equal(labels, np.argmax(scores, axis=1))
    c = conf.astype(np.float64)
    assert ((c >= -1e-6) & (c <= 1 + 1e-6)).all()
    # confidence is 1 - H(p)/log m of the returned scores
    _, want_conf = reference.ref_readout(scores)
    np.testing.assert_allclose(c, want_conf, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("weight,gamma", [("relu", 1.0), ("relu", 3.0), ("shift", 1.0)])
@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("n,m,d,k", [(1, 2, 3, 2), (6, 2, 3, 7), (40, 3, 8, 5),
                                     (150, 5, 12, 10)], ids=lambda v: str(v))
def test_matches_reference_float64(n, m, d, k, alpha, weight, gamma):
    text, images, _ = clip_like(n, m, d, noise=0.3, seed=n + m, dtype=np.float64)
    res = reclip_ext.label_propagate(text, images, k=k, alpha=alpha, max_iter=2000, tol=1e-13,
                                     weight=weight, gamma=gamma)
    check_result(res, n, m, np.float64)
    ref = reference.ref_label_propagate(text, images, k, alpha, weight, gamma)
    scale = np.abs(ref.scores).max()
    np.testing.assert_allclose(res.scores, ref.scores, rtol=0, atol=1e-9 * scale)
    # labels identical wherever the reference's top two scores are not a near-tie
    top2 = np.sort(ref.scores, axis=1)[:, -2:] if m > 1 else None
    clear = (top2[:, 1] - top2[:, 0]) > 1e-6 * scale
    np.testing.assert_array_equal(res.labels[clear], ref.labels[clear])
    np.testing.assert_allclose(res.confidence, ref.confidence, rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_iterations_match_reference_cg(dtype, normalize):
    """Default max_iter=20, tol=1e-6: CG has not converged at alpha=0.99; the result must
    still be the same iterate as the textbook CG (same Krylov space, same stop rule)."""
    text, images, _ = clip_like(400, 4, 10, noise=1.0, seed=3, dtype=dtype)
    if not normalize:
        images = images * np.linspace(0.5, 2, 400, dtype=dtype)[:, None]
    res = reclip_ext.label_propagate(text, images, k=5, normalize=normalize)
    check_result(res, 400, 4, dtype)
    ref = ref_unconverged(text, images, 5, 0.99, 20, 1e-6, normalize=normalize)
    assert (ref.iterations == 20).all() and (ref.residuals > 1e-4).all()  # not converged
    np.testing.assert_array_equal(res.iterations, 20)
    tol = 1e-9 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(res.scores, ref.x[4:], rtol=0,
                               atol=tol * np.abs(ref.x).max())
    np.testing.assert_allclose(res.residuals, ref.residuals, rtol=tol * 10)


def test_well_separated_labels_float32():
    text, images, truth = clip_like(300, 6, 16, noise=0.3, seed=5, dtype=np.float32)
    res = reclip_ext.label_propagate(text, images, k=10, alpha=0.9, max_iter=500, tol=1e-6)
    check_result(res, 300, 6, np.float32)
    ref = reference.ref_label_propagate(text, images, 10, 0.9)
    np.testing.assert_array_equal(res.labels, ref.labels)
    np.testing.assert_array_equal(res.labels, truth)
    # float32 scores judged against the float32 recipe's error (docs/design.md, Testing)
    rec = reference.lp_deepssl_recipe(text, images, 10, 0.9, 500, 1e-6)
    scale = np.abs(ref.scores).max()
    err_lib = np.abs(res.scores - ref.scores).max() / scale
    err_rec = np.abs(rec.scores - ref.scores).max() / scale
    assert err_lib <= 2 * err_rec + 1e-6, (err_lib, err_rec)


@pytest.mark.parametrize("weight,gamma", [("relu", 3.0), ("shift", 1.0)],
                         ids=["lp-deepssl-relu3", "reclip-shift1"])
def test_agrees_with_lp_deepssl_recipe(weight, gamma):
    """n = 2000 images, m = 10 classes, d = 64, k = 20, alpha = 0.99, 20 iterations, float32:
    the same labels as the scipy recipe and scores within float32 tolerance."""
    text, images, truth = clip_like(2000, 10, 64, noise=1.0, seed=7, dtype=np.float32)
    kw = dict(k=20, alpha=0.99, max_iter=20, tol=1e-6)
    res = reclip_ext.label_propagate(text, images, weight=weight, gamma=gamma, **kw)
    rec = reference.lp_deepssl_recipe(text, images, weight=weight, gamma=gamma, **kw)
    check_result(res, 2000, 10, np.float32)
    np.testing.assert_array_equal(res.labels, rec.labels)
    scale = np.abs(rec.scores).max()
    np.testing.assert_allclose(res.scores, rec.scores, rtol=0, atol=1e-4 * scale)
    assert (np.abs(res.iterations - rec.iterations) <= 1).all()
    assert np.mean(res.labels == truth) > 0.9  # the data are learnable


@pytest.mark.parametrize("kind", ARRAY_KINDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_array_kind_in_equals_kind_out(kind, dtype):
    text, images, _ = clip_like(30, 3, 5, seed=1, dtype=dtype)
    want = reclip_ext.label_propagate(text, images, k=5)
    got = reclip_ext.label_propagate(to_kind(text, kind), to_kind(images, kind), k=5)
    assert isinstance(got, reclip_ext.LabelPropagation)
    for name, a, b in zip(got._fields, got, want):
        assert is_kind(a, kind), name
        np.testing.assert_allclose(to_numpy(a), b, rtol=1e-5, atol=1e-6, err_msg=name)
    check_result(got, 30, 3, dtype)


def test_layouts():
    text, images, _ = clip_like(40, 4, 6, seed=2, dtype=np.float64)
    want = reclip_ext.label_propagate(text, images, k=6)
    got = reclip_ext.label_propagate(np.asfortranarray(text), np.repeat(images, 2, axis=0)[::2],
                                     k=6)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("block_rows", [1, 4, 33])
def test_block_rows_and_threads(block_rows):
    text, images, _ = clip_like(120, 4, 9, seed=3, dtype=np.float32)
    want = reclip_ext.label_propagate(text, images, k=7)
    got = reclip_ext.label_propagate(text, images, k=7, block_rows=block_rows, threads=1)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 3.0])
def test_unnormalized_shift_weight_runs(gamma):
    """normalize=False with weight="shift" is a valid combination: raw inner products below
    -1 must not make label_propagate fail on its own intermediate graph."""
    rng = np.random.default_rng(0)
    text = 2 * rng.standard_normal((3, 4))
    images = 2 * rng.standard_normal((20, 4))
    res = reclip_ext.label_propagate(text, images, k=22, alpha=0.9, max_iter=500, tol=1e-12,
                                     weight="shift", gamma=gamma, normalize=False)
    ref = reference.ref_label_propagate(text, images, 22, 0.9, "shift", gamma, normalize=False)
    np.testing.assert_allclose(res.scores, ref.scores, atol=1e-9)


@pytest.mark.subprocess
def test_memory_is_not_quadratic(tmp_path):
    """N = 30,010 rows: one N x N float32 matrix would be 3.6 GB; the whole propagation must
    stay far below (docs/mathematics.md §2: memory O(N (k + d)))."""
    code = (
        "import resource, numpy as np, reclip_ext\n"
        "rng = np.random.default_rng(0)\n"
        "text = rng.standard_normal((10, 8)).astype(np.float32)\n"
        "images = rng.standard_normal((30000, 8)).astype(np.float32)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "res = reclip_ext.label_propagate(text, images, k=10, max_iter=5)\n"
        "assert res.scores.shape == (30000, 10)\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    # cwd elsewhere: from the checkout, the source tree would shadow an installed build
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True, cwd=tmp_path).stdout.split()
    before_kib, peak_kib = int(out[-2]), int(out[-1])
    assert peak_kib - before_kib < 400 * 1024, f"peak grew by {(peak_kib - before_kib) >> 10} MiB"


def test_refuses_what_cannot_fit():
    """A result that cannot fit in memory is refused up front with its size, not attempted."""
    x = np.random.default_rng(0).standard_normal((100_000, 2)).astype(np.float32)
    with pytest.raises(MemoryError, match=r"GiB"):
        reclip_ext.knn_affinity(x, 99_999)


def test_doc_example():
    text = np.eye(2, dtype=np.float32)
    images = np.array([[1, .1], [.9, .2], [.1, 1], [.2, .8]], np.float32)
    res = reclip_ext.label_propagate(text, images, k=2)
    assert res.labels.tolist() == [0, 0, 1, 1]
    check_result(res, 4, 2, np.float32)


def test_images_far_from_every_class_get_zero_confidence():
    """An image whose scores are all <= 0 has confidence 0 (no positive mass)."""
    text = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # two clusters: one around the classes, one isolated (its kNN never reaches a class)
    images = np.array([[1, 0.1, 0], [0.1, 1, 0], [0, 0, 1], [0, 0.01, 1], [0.01, 0, 1]])
    res = reclip_ext.label_propagate(text, images, k=2, alpha=0.9, max_iter=100, tol=1e-12)
    ref = reference.ref_label_propagate(text, images, 2, 0.9)
    np.testing.assert_allclose(res.scores, ref.scores, atol=1e-12)
    assert (res.scores[2:] == 0).all()
    np.testing.assert_array_equal(res.confidence[2:], 0)
    np.testing.assert_allclose(res.confidence, ref.confidence, atol=1e-9)


@pytest.mark.parametrize("dtype", [
    pytest.param(name, marks=NEEDS_CUDA)
    for name in ("float32", "float16", "bfloat16")
])
def test_cuda_matches_cpu(dtype):
    import torch

    text, images, _ = clip_like(500, 5, 16, seed=9, dtype=np.float32)
    t = torch.from_numpy(text).to("cuda", getattr(torch, dtype))
    v = torch.from_numpy(images).to("cuda", getattr(torch, dtype))
    res = reclip_ext.label_propagate(t, v, k=10)
    assert res.labels.is_cuda and res.scores.is_cuda and res.scores.dtype == t.dtype
    cpu = reclip_ext.label_propagate(t.float().cpu(), v.float().cpu(), k=10)
    agree = (res.labels.cpu() == cpu.labels).float().mean().item()
    assert agree >= (1.0 if dtype == "float32" else 0.98)
