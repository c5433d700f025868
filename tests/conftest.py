"""Shared fixtures and helpers of the reclip_ext test suite.

- synthetic CLIP-like data (benchmarks/synthetic.py with well-separated classes),
- the hypothesis profiles ("ci" by default, "slow", "dev"; pick one with HYPOTHESIS_PROFILE)
  and the ``exhaustive`` marker (skipped unless ``--exhaustive`` or ``-m exhaustive``),
- the markers of a fast subset: ``pytest tests -m "not subprocess and not distributed and not
  slow"`` leaves out the tests that start processes, the torch.distributed ones and the slow
  ones (the full suite is still the README's ``pytest tests``),
- array kinds (numpy, torch) to parametrise over, skipped cleanly without torch,
- the k-NN comparison rule of docs/design.md, Testing (neighbour sets + sorted weights, float32 judged
  against a float32 numpy run of the same data).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

# Many small calls into OpenMP regions: on a loaded 2-core machine the default active
# spin-wait of idle threads makes them up to ~10x slower. Must be set before libgomp loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing may come from a model hub: the tests prove the offline paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # synthetic.py

import reference  # noqa: E402
import synthetic  # noqa: E402

try:  # torch is optional for the tests: its cases skip cleanly without it
    import torch
except Exception:  # pragma: no cover - depends on the environment
    torch = None

# --------------------------------------------------------------------------------------------
# hypothesis profiles and the slow marker

#: examples per property test in CI; test_properties.py has >= 10 property tests, so the
#: default run draws >= 1,000 examples in all.
CI_EXAMPLES = 110
#: examples per property test under ``-m exhaustive`` / ``--exhaustive``
SLOW_EXAMPLES = 2500

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, **_common)
settings.register_profile("slow", max_examples=SLOW_EXAMPLES, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--exhaustive", action="store_true", default=False,
                     help="run the tests marked exhaustive (many more hypothesis examples)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--exhaustive") or "exhaustive" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="exhaustive: run with --exhaustive or -m exhaustive")
    for item in items:
        if "exhaustive" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------
# array kinds

HAVE_TORCH = torch is not None
requires_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")

#: parametrise over these: ``@pytest.mark.parametrize("kind", ARRAY_KINDS)``
ARRAY_KINDS = ["numpy", pytest.param("torch", marks=requires_torch)]


def to_kind(a, kind: str):
    """numpy -> the array kind ``kind`` ("numpy" or "torch"), keeping dtype and strides."""
    if kind == "numpy":
        return a
    if kind == "torch":
        if torch is None:
            pytest.skip("torch is not installed")
        return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.as_tensor(a)
    raise ValueError(kind)


def is_kind(a, kind: str) -> bool:
    if kind == "numpy":
        return isinstance(a, np.ndarray)
    return torch is not None and isinstance(a, torch.Tensor)


def to_numpy(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if torch is not None and isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def cuda_available() -> bool:
    import reclip_ext

    return reclip_ext.cuda_device_count() > 0 and HAVE_TORCH and torch.cuda.is_available()


#: marks of a CUDA case: selectable with ``-m cuda``, skipped (visibly) without a device
NEEDS_CUDA = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="no CUDA device")]


# --------------------------------------------------------------------------------------------
# data


#: CLIP-like data from the benchmarks' model (benchmarks/synthetic.py) with well-separated
#: classes: the tests compare labels with the truth, so its confusions (superclasses, modality
#: gaps, sibling mixing, misalignment, image-only features) are off and only isotropic noise is
#: left. Returns (text (m, d), images (n, d), labels (n,)), rows L2-normalised, tie-free.
clip_like = functools.partial(synthetic.clip_like, superclass=0.0, gap_text=0.0, gap_image=0.0,
                              mix=0.0, shift=0.0, own=0.0, noise=0.5)


def random_points(n: int, d: int, *, seed: int = 0, dtype=np.float64) -> np.ndarray:
    """Gaussian (n, d) points (tie-free with probability one)."""
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


@pytest.fixture
def clip_data():
    return clip_like


# --------------------------------------------------------------------------------------------
# the k-NN comparison rule (docs/design.md, Testing)


def knn_tolerances(x, k, *, exclude_self, weight, gamma, normalize, ref=None):
    """(similarity tolerance, weight tolerance) for a result computed in x's dtype.

    float64: a tight relative bound (the reference itself is float64). float32: twice the
    error of a float32 numpy run of the same data against float64, plus a tiny absolute slack.
    """
    x = np.asarray(x)
    ref = ref or reference.ref_knn(x, k, exclude_self, weight, gamma, normalize)
    s64 = ref.sim
    wmax = max(1.0, float(np.abs(ref.weights).max()))
    smax = max(1.0, float(np.abs(s64).max()))
    if x.dtype == np.float64:
        return 1e-9 * smax, 1e-9 * wmax
    ref32 = reference.ref_knn(x, k, exclude_self, weight, gamma, normalize, dtype=np.float32)
    err_s = float(np.abs(ref32.sim.astype(np.float64) - s64).max())
    w32 = np.sort(ref32.weights.astype(np.float64), axis=1)
    w64 = np.sort(ref.weights, axis=1)
    err_w = float(np.abs(w32 - w64).max())
    eps = float(np.finfo(np.float32).eps)
    return 2 * err_s + 4 * eps * smax, 2 * err_w + 4 * eps * wmax


def assert_knn_close(x, k, indices, weights, *, exclude_self=True, weight="shift", gamma=1.0,
                     normalize=False):
    """Check a knn_affinity result against the float64 reference.

    - shapes, dtypes, indices in range, distinct within a row, self excluded when asked;
    - weights sorted descending;
    - neighbour SETS: equal to the reference's wherever the data are tie-free at the k-th
      boundary (a neighbour may differ from the reference only if its float64 similarity is
      within the error bound of the k-th one);
    - sorted weights within the weight tolerance.
    """
    x = np.asarray(x)
    idx, w = to_numpy(indices), to_numpy(weights)
    n = x.shape[0]
    assert idx.shape == (n, k) and idx.dtype == np.int64, (idx.shape, idx.dtype)
    assert w.shape == (n, k) and w.dtype == x.dtype, (w.shape, w.dtype)
    assert ((idx >= 0) & (idx < n)).all(), idx
    for i in range(n):
        assert len(set(idx[i].tolist())) == k, f"row {i}: repeated neighbours {idx[i]}"
    if exclude_self:
        assert not (idx == np.arange(n)[:, None]).any(), "a row lists itself"
    assert (np.diff(w.astype(np.float64), axis=1) <= 0).all(), "weights not sorted descending"

    ref = reference.ref_knn(x, k, exclude_self, weight, gamma, normalize)
    tol_s, tol_w = knn_tolerances(x, k, exclude_self=exclude_self, weight=weight, gamma=gamma,
                                  normalize=normalize, ref=ref)
    s = ref.sim
    for i in range(n):
        got, want = set(idx[i].tolist()), set(ref.indices[i].tolist())
        if got == want:
            continue
        kth = s[i, ref.indices[i, -1]]
        extra, missing = sorted(got - want), sorted(want - got)
        assert all(s[i, j] >= kth - tol_s for j in extra) and all(
            s[i, j] <= kth + tol_s for j in missing
        ), (f"row {i}: neighbour set differs beyond ties: extra {extra} (sim "
            f"{s[i, extra]}), missing {missing} (sim {s[i, missing]}), k-th sim {kth}, "
            f"tolerance {tol_s}")
    # ranked by similarity: the reference similarity of the returned order is non-increasing
    sims = np.take_along_axis(s, idx, axis=1)
    assert (np.diff(sims, axis=1) <= tol_s).all(), "neighbours not ranked by similarity"
    err = np.abs(np.sort(w.astype(np.float64), axis=1) - np.sort(ref.weights, axis=1))
    assert err.max() <= tol_w, f"weights off by {err.max()} > {tol_w}"


@pytest.fixture(scope="module")
def tiny():
    """The tiny open_clip model of tests/assets (seeded random weights); skipped where open_clip
    is not installed (a GPU machine that runs only reclip_ext's tests)."""
    pytest.importorskip("open_clip")
    import torch

    import reclip

    torch.manual_seed(0)
    return reclip.load_model(str(Path(__file__).parent / "assets" / "tiny-vit.json"))


@pytest.fixture(scope="module")
def colour_images():
    """24 preprocessed 32x32 images (for the tiny model) whose strongest colour channel is
    their class (i % 3)."""
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.rand(24, 3, 32, 32, generator=g) * 0.5
    for i in range(24):
        x[i, i % 3] += 1.0
    return x
