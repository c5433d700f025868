"""Pseudo labels for unlabelled images (ReCLIP §3.2).

Label propagation (the default) builds a k-NN graph over the projected class and image
embeddings and diffuses the class labels through it with reclip_ext; it works on the exact
r-dimensional coordinates of the projection, so the graph costs O(N r) instead of O(N d).
Above ``many_classes`` classes the paper takes the model's own predictions instead, which we
follow. Both return int64 numpy labels.

The features stay where they are: on CUDA, label propagation runs there on float32 torch
tensors (the features as float32, in the projection's coordinates), and only the labels are
copied to the host.
"""
from __future__ import annotations

import numpy as np
import torch

import reclip_ext

from .projection import coordinates, project

METHODS = ("auto", "propagation", "prediction")


def propagate(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None, *,
              k: int = 20, alpha: float = 0.99, max_iter: int = 20,
              weight: str = "shift", precision: str = "exact") -> np.ndarray:
    """Labels by label propagation over [classes; images] in the projection's coordinates,
    on the images' device; `precision` is label_propagate's (tf32 / bf16: CUDA only)."""
    t = coordinates(classes.detach().float().to(images.device), u)
    v = coordinates(images.detach().float(), u)
    k = min(k, t.shape[0] + v.shape[0] - 1)
    labels = reclip_ext.label_propagate(t, v, k=k, alpha=alpha, max_iter=max_iter,
                                        weight=weight, precision=precision).labels
    return labels.cpu().numpy().astype(np.int64, copy=False)


def predict(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None) -> np.ndarray:
    """Labels by the zero-shot classifier: argmax of projected cosine similarity."""
    sims = project(images.detach().float(), u) @ project(classes.detach().float(), u).T
    return sims.argmax(dim=1).cpu().numpy().astype(np.int64)


def pseudo_labels(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None, *,
                  method: str = "auto", many_classes: int = 500, k: int = 20,
                  alpha: float = 0.99, weight: str = "shift",
                  precision: str = "exact") -> np.ndarray:
    """Pseudo labels by `method`: "propagation", "prediction", or "auto" (propagation up to
    `many_classes` classes, prediction above)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        method = "propagation" if classes.shape[0] <= many_classes else "prediction"
    if method == "prediction":
        return predict(images, classes, u)
    return propagate(images, classes, u, k=k, alpha=alpha, weight=weight, precision=precision)
