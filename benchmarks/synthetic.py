"""Synthetic CLIP-like embeddings and ReCLIP's P2 projection, shared by the benchmarks.

The data imitate what label propagation sees in ReCLIP: m class-name (text) embeddings and n image
embeddings in d dimensions, with

* classes in groups of related classes (a shared "superclass" direction), so that zero-shot
  mistakes are mostly between siblings;
* a "modality gap": one offset shared by all text embeddings and another shared by all images;
* images that mix their class with a sibling class (ambiguous images), a per-class misalignment
  between the image cluster and its class-name embedding, a per-class image feature the text
  does not see (what makes image clusters tighter than the zero-shot geometry suggests), and
  isotropic noise.

So zero-shot classification (nearest class-name embedding) is imperfect, and propagation over the
k-NN graph improves on it. Everything is seeded and float32 by default. Only numpy is needed.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

import numpy as np


class ClipLike(NamedTuple):
    text: np.ndarray  #: (m, d) L2-normalised class-name embeddings
    images: np.ndarray  #: (n, d) L2-normalised image embeddings
    labels: np.ndarray  #: (n,) int64 ground-truth class of each image


class Projection(NamedTuple):
    text: np.ndarray  #: (m, d) P2-projected, renormalised text embeddings
    images: np.ndarray  #: (n, d) P2-projected, renormalised image embeddings
    text_r: np.ndarray  #: (m, r) the same rows in the coordinates of U' (r = rank(T) - 1)
    images_r: np.ndarray  #: (n, r)
    basis: np.ndarray  #: (d, r) U', orthonormal columns


def _normalise(a):
    """Rows scaled to unit L2 norm (numpy or torch)."""
    if isinstance(a, np.ndarray):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)
    return a / a.norm(dim=-1, keepdim=True)


def _draws(seed: int, device):
    """The random draws of :func:`clip_like` from numpy's generator (float64) or from torch's on a
    device (float32): the model is written once, only the source of numbers differs."""
    if device is None:
        rng = np.random.default_rng(seed)
        return SimpleNamespace(
            normal=lambda *shape: rng.standard_normal(shape), uniform=rng.random,
            integers=lambda low, high, n: rng.integers(low, high, size=n), arange=np.arange,
            permutation=rng.permutation, where=np.where, empty=lambda n, d: np.empty((n, d)))
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(device=device, dtype=torch.float32)
    return SimpleNamespace(
        normal=lambda *shape: torch.randn(*shape, generator=gen, **f32),
        uniform=lambda n: torch.rand(n, generator=gen, **f32),
        integers=lambda low, high, n: torch.randint(low, high, (n,), generator=gen, device=device),
        arange=lambda n: torch.arange(n, device=device),
        permutation=lambda a: a[torch.randperm(len(a), generator=gen, device=device)],
        where=torch.where, empty=lambda n, d: torch.empty(n, d, **f32))


def clip_like(n: int, m: int, d: int, *, seed: int = 0, dtype=np.float32, group: int = 5,
              superclass: float = 0.8, gap_text: float = 0.5, gap_image: float = 0.8,
              mix: float = 0.7, shift: float = 0.3, own: float = 0.5, noise: float = 0.6,
              device=None, chunk: int = 131072) -> ClipLike:
    """Seeded CLIP-like data (see the module docstring).

    Args:
        n: images; m: classes (>= 2); d: embedding dimension.
        group: classes per superclass; superclass: weight of the superclass direction.
        gap_text, gap_image: norms of the text and image modality offsets.
        mix: images mix in a sibling class with a weight drawn from U(0, mix).
        shift: norm of each class's in-span misalignment; own: norm of its image-only feature.
        noise: norm of the isotropic image noise.
        device: None for numpy arrays (drawn in float64, returned as `dtype`); a torch device
            ("cpu", "cuda") for torch tensors drawn there in float32 by torch's generator (the
            same model, another random stream).
        chunk: images drawn per block (bounds the temporary memory; numpy's stream and torch's
            on the CPU do not depend on it).
    """
    if m < 2 or n < 1 or d < 1:
        raise ValueError(f"need m >= 2, n >= 1, d >= 1; got n={n}, m={m}, d={d}")
    draw = _draws(seed, device)
    groups = max(1, m // group)
    gid = draw.arange(m) % groups
    sup = _normalise(draw.normal(groups, d))
    classes = _normalise(superclass * sup[gid] + _normalise(draw.normal(m, d)))
    gap_t = _normalise(draw.normal(d)) * gap_text
    gap_i = _normalise(draw.normal(d)) * gap_image
    text = _normalise(classes + gap_t)

    y = draw.permutation(draw.arange(n) % m)
    per_group = max(2, m // groups)
    sibling = (y + groups * draw.integers(1, per_group, n)) % m
    sibling = draw.where(sibling == y, (y + 1) % m, sibling)
    weight = draw.uniform(n)[:, None] * mix
    misalign = _normalise(draw.normal(m, m) @ classes) * shift
    offset = misalign + _normalise(draw.normal(m, d)) * own + gap_i  # per class
    images = draw.empty(n, d)
    for start in range(0, n, chunk):  # the isotropic noise last: drawn block by block
        w, yc = weight[start:start + chunk], y[start:start + chunk]
        rows = (1 - w) * classes[yc] + w * classes[sibling[start:start + chunk]] + offset[yc]
        rows += draw.normal(len(yc), d) * (noise / np.sqrt(d))
        images[start:start + len(yc)] = _normalise(rows)
    if device is None:
        return ClipLike(text.astype(dtype), images.astype(dtype), y.astype(np.int64))
    return ClipLike(text, images, y)


def p2_projection(text: np.ndarray, images: np.ndarray) -> Projection:
    """ReCLIP's P2: project onto span(U') and renormalise, where U holds the left singular
    vectors of Tᵀ (T = normalised text embeddings, rows) and U' is U without its first column.

    Returns the projected d-dimensional rows (for baselines) and their exact r-dimensional
    coordinates X·U' (for reclip_ext), r = rank(T) - 1; both have the same cosine similarities.
    """
    dtype = text.dtype
    t64 = _normalise(text.astype(np.float64))
    u, s, _ = np.linalg.svd(t64.T, full_matrices=False)  # (d, min(d, m))
    rank = int(np.sum(s > s[0] * max(t64.shape) * np.finfo(np.float64).eps))
    basis = u[:, 1:rank]  # U'
    if basis.shape[1] < 1:
        raise ValueError("P2 projection needs text embeddings of rank >= 2")

    def project(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coords = x.astype(np.float64) @ basis  # (rows, r)
        norms = np.linalg.norm(coords, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError("a row projects to zero under P2")
        coords /= norms
        return (coords @ basis.T).astype(dtype), coords.astype(dtype)

    tp, tr = project(text)
    vp, vr = project(images)
    return Projection(tp, vp, tr, vr, basis.astype(dtype))


def projection_check(proj: Projection, *, sample: int = 2000, seed: int = 0) -> float:
    """Largest |cos_d(x_i, x_j) - cos_r(x_i, x_j)| over a random subsample of rows of [T; V]:
    the projected d-dim rows against their r-dim coordinates (should be ~float32 eps)."""
    rng = np.random.default_rng(seed)
    full = np.concatenate([proj.text, proj.images])
    reduced = np.concatenate([proj.text_r, proj.images_r])
    rows = rng.choice(len(full), size=min(sample, len(full)), replace=False)
    a = _normalise(full[rows].astype(np.float64))
    b = _normalise(reduced[rows].astype(np.float64))
    return float(np.max(np.abs(a @ a.T - b @ b.T)))


def zero_shot(text, images, chunk: int = 8192):
    """Labels by the nearest class-name embedding (cosine), in row chunks; numpy (float32
    products) or torch on any device (in the rows' dtype)."""
    if isinstance(images, np.ndarray):
        t = _normalise(text.astype(np.float32)).T
        parts = [(images[i:i + chunk].astype(np.float32) @ t).argmax(1)
                 for i in range(0, len(images), chunk)]
        return np.concatenate(parts).astype(np.int64)
    import torch

    t = _normalise(text).T
    return torch.cat([(images[i:i + chunk] @ t).argmax(1) for i in range(0, len(images), chunk)])
