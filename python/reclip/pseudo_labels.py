"""Pseudo labels for unlabelled images (ReCLIP §3.2).

Label propagation (the default) builds a k-NN graph over the projected class and image
embeddings and diffuses the class labels through it with reclip_ext; it works on the exact
r-dimensional coordinates of the projection, so the graph costs O(N r) instead of O(N d).
Above ``many_classes`` classes the paper takes the model's own predictions instead, which we
follow. Both return int64 numpy labels.

The features stay where they are: on CUDA, label propagation runs there on float32 torch
tensors (the features as float32, in the projection's coordinates), and only the labels are
copied to the host.

In a distributed run (a ``reclip.distributed.World`` of several ranks, each holding every
image's features) the k-NN search, the O(n^2) part, is split: each rank searches the graph
rows of its own block of images with ``reclip_ext.distributed.label_propagate``, rank 0 solves
the gathered graph, and the labels are all-gathered, so every rank holds the same labels from
one solve. Predictions are rank 0's, broadcast: an argmax of float products computed in two
processes may differ on a near tie, and ranks that disagree on one label would train on
different targets.
"""
from __future__ import annotations

import numpy as np
import torch

import reclip_ext
from reclip_ext import DEFAULTS

from .projection import coordinates, project

METHODS = ("auto", "propagation", "prediction")


def propagate(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None, *,
              k: int = DEFAULTS.k, alpha: float = DEFAULTS.alpha,
              max_iter: int = DEFAULTS.max_iter, weight: str = DEFAULTS.weight,
              precision: str = "exact", world=None) -> np.ndarray:
    """Labels by label propagation over [classes; images] in the projection's coordinates,
    on the images' device; `precision` is label_propagate's (tf32 / bf16: CUDA only). With an
    active `world` every rank calls it with all the images and searches only its block's rows
    (see the module docstring)."""
    t = coordinates(classes.detach().float().to(images.device), u)
    v = coordinates(images.detach().float(), u)
    options = dict(k=k, alpha=alpha, max_iter=max_iter, weight=weight, precision=precision)
    if world is None or not world.active:
        labels = reclip_ext.label_propagate(t, v, **options).labels
    else:
        rows = world.shard(len(v))
        mine = reclip_ext.distributed.label_propagate(t, v[rows.start : rows.stop], **options)
        counts = [len(block) for block in world.shards(len(v))]
        labels = world.gather_rows(mine.labels.to(torch.int64), counts)
    return labels.cpu().numpy().astype(np.int64, copy=False)


def predict(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None) -> np.ndarray:
    """Labels by the zero-shot classifier: argmax of projected cosine similarity."""
    sims = project(images.detach().float(), u) @ project(classes.detach().float(), u).T
    return sims.argmax(dim=1).cpu().numpy().astype(np.int64)


def source(method: str, classes: int, many_classes: int) -> str:
    """Where the pseudo labels of `classes` classes come from under `method`: "propagation" or
    "prediction" ("auto": propagation up to `many_classes` classes, the paper's rule)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "propagation" if classes <= many_classes else "prediction"
    return method


def pseudo_labels(images: torch.Tensor, classes: torch.Tensor, u: torch.Tensor | None, *,
                  method: str = "auto", many_classes: int = 500, k: int = DEFAULTS.k,
                  alpha: float = DEFAULTS.alpha, weight: str = DEFAULTS.weight,
                  precision: str = "exact", world=None) -> np.ndarray:
    """Pseudo labels by `method`: "propagation", "prediction", or "auto" (propagation up to
    `many_classes` classes, prediction above); the same on every rank of an active `world`."""
    if source(method, classes.shape[0], many_classes) == "prediction":
        if world is None:
            return predict(images, classes, u)
        return world.labels_of_rank0(lambda: predict(images, classes, u), len(images))
    return propagate(images, classes, u, k=k, alpha=alpha, weight=weight, precision=precision,
                     world=world)
