"""Projections of ReCLIP §3.1: removing the text-side redundancy from CLIP's embedding space.

The class-name embeddings T (m x d) span the subspace the classifier can see. With the SVD
T^T = U S V^T: P0 = I (plain CLIP), P1 = U U^T (the span of the class embeddings), and
P2 = U' U'^T with U' = U minus its first column, the direction shared by all class names,
which carries class-agnostic information and hides the differences between classes.
Features are L2-normalised after projection.

Because U' has orthonormal columns, cosine similarities after P2 equal those of the
r-dimensional coordinates x U' (r <= m - 1), so label propagation runs on r columns instead
of d (``coordinates``).
"""
from __future__ import annotations

import torch

MODES = ("P0", "P1", "P2")
MAX_COMPONENTS_MANY_CLASSES = 250  # the authors' cap on U' above 500 classes
MANY_CLASSES = 500


def class_nodes(template_features: torch.Tensor) -> torch.Tensor:
    """One embedding per class: the mean of its L2-normalised template embeddings, renormalised.

    Args:
        template_features: (m, t, d) text features, t templates per class.
    """
    if template_features.ndim != 3:
        raise ValueError(f"template_features: expected (classes, templates, dim), got {tuple(template_features.shape)}")
    unit = torch.nn.functional.normalize(template_features.float(), dim=-1)
    return torch.nn.functional.normalize(unit.mean(dim=1), dim=-1)


def basis(classes: torch.Tensor, mode: str = "P2") -> torch.Tensor | None:
    """The orthonormal columns U (P1) or U' (P2) for class embeddings `classes` (m, d); None for P0."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "P0":
        return None
    m = classes.shape[0]
    u, s, _ = torch.linalg.svd(classes.double().T, full_matrices=False)  # u: (d, min(d, m))
    rank = int((s > s[0] * 1e-10).sum())
    u = u[:, :rank]
    if mode == "P2":
        u = u[:, 1:]
        if m > MANY_CLASSES:
            u = u[:, :MAX_COMPONENTS_MANY_CLASSES]
    if u.shape[1] == 0:
        raise ValueError(f"{mode} leaves no dimensions for {m} class embeddings of rank {rank}")
    return u.to(classes.dtype).contiguous()  # the same layout as after a save/load round trip


def coordinates(x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """x expressed in the projection's orthonormal basis (x U); x itself for P0."""
    return x if u is None else x @ u.to(x.dtype)


def project(x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
    """L2-normalised projection of x (n, d): x U U^T (x itself for P0), then normalised.

    Differentiable in x; the basis is treated as a constant.
    """
    y = x if u is None else coordinates(x, u) @ u.to(x.dtype).T
    return torch.nn.functional.normalize(y, dim=-1)
