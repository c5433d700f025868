"""Pseudo labels for unlabelled images (ReCLIP §3.2).

Label propagation (the default) builds a k-NN graph over the projected class and image
embeddings and diffuses the class labels through it with reclip_ext; it works on the exact
r-dimensional coordinates of the projection, so the graph costs O(N r) instead of O(N d).
Above ``many_classes`` classes the paper takes the model's own predictions instead, which we
follow. Both return int64 numpy labels.
"""
from __future__ import annotations

import numpy as np
import torch

import reclip_ext

from .projection import coordinates, project

METHODS = ("auto", "propagation", "prediction")


def propagate(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None, *,
              k: int = 20, alpha: float = 0.99, max_iter: int = 20,
              weight: str = "shift") -> np.ndarray:
    """Labels by label propagation over [classes; images] in the projection's coordinates."""
    t = coordinates(classes.detach().float(), u).cpu().numpy()
    v = coordinates(images.detach().float(), u).cpu().numpy()
    k = min(k, t.shape[0] + v.shape[0] - 1)
    return reclip_ext.label_propagate(t, v, k=k, alpha=alpha, max_iter=max_iter,
                                      weight=weight).labels


def predict(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None) -> np.ndarray:
    """Labels by the zero-shot classifier: argmax of projected cosine similarity."""
    sims = project(images.detach().float(), u) @ project(classes.detach().float(), u).T
    return sims.argmax(dim=1).cpu().numpy().astype(np.int64)


def pseudo_labels(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None, *,
                  method: str = "auto", many_classes: int = 500, k: int = 20,
                  alpha: float = 0.99, weight: str = "shift") -> np.ndarray:
    """Pseudo labels by `method`: "propagation", "prediction", or "auto" (propagation up to
    `many_classes` classes, prediction above)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "propagation" if classes.shape[0] <= many_classes else "prediction"
    if method == "prediction":
        return predict(images, classes, u)
    return propagate(images, classes, u, k=k, alpha=alpha, weight=weight)
