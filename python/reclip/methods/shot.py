"""SHOT (Liang et al., ICML 2020), run for CLIP as the ReCLIP paper's baseline.

The classifier is the frozen zero-shot class embeddings (``nodes_v``, which stay the visual
side's ``centres``), and only the visual copy trains (its whole visual tower by default, or its
norm layers) on SHOT's information-maximisation loss plus beta x cross-entropy against SHOT's
cluster pseudo labels, recomputed from the current features at the start of every epoch
(:func:`shot_pseudo_labels`, :func:`shot_loss`). The text copy never trains; prediction,
checkpoints and resuming are those of ReCLIP-V.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from .. import distributed, trainable
from ..config import EpochLog
from ..runner import batch_mean
from .base import Method
from .reclip import accuracy


class SHOT(Method):
    """SHOT's epoch and step on the state of `clf` (a reclip.ReCLIP)."""

    name = "shot"

    def trainable(self, text_copy: nn.Module, visual_copy: nn.Module):
        text_copy.requires_grad_(False)  # SHOT never trains the text side
        return {}, trainable.shot_params(visual_copy, self.clf.config.shot_params)

    def epoch(self, data, frozen: torch.Tensor, epoch: int, batch: int,
              truth: np.ndarray | None, loaders: dict) -> EpochLog:
        """One epoch of SHOT: cluster pseudo labels of the current visual features, then SGD
        on the information-maximisation loss + beta x their cross-entropy over every image."""
        clf = self.clf
        feats = self.visual_features(data, loaders, frozen)
        # the frozen zero-shot classifier: `centres` stays `nodes_v` for SHOT
        logits = clf.config.logit_scale * feats @ clf.centres.T
        world = clf.world
        start = time.perf_counter()
        labels = world.labels_of_rank0(lambda: shot_pseudo_labels(feats, logits), len(data))
        world.work["pseudo_label_seconds"] += time.perf_counter() - start
        batches = clf.runner.batches(np.arange(len(data)), epoch, batch, clf.iterations)

        def step(idx, x, part):
            return self.step(x, torch.as_tensor(labels[idx]).to(clf.device), **part)[None]

        (loss,) = clf.runner.train(batches, loaders, step, images=True, sides=("SHOT",),
                                   epoch=epoch)
        clf.iterations += len(batches)
        entry = EpochLog(epoch=epoch, iterations=clf.iterations, agreement=1.0,
                         trained=sum(len(b) for b in batches),
                         loss_visual=float(loss) / len(batches) if batches else None)
        if truth is not None:
            truth = np.asarray(truth)
            entry.accuracy["pseudo_shot"] = float((labels == truth).mean())
            # the model after this epoch (SHOT's classifier on its features); the pass is the
            # next epoch's first one
            after = self.trained_features(data, loaders)
            entry.accuracy["combined"] = accuracy(clf.config.logit_scale * after @ clf.centres.T,
                                                  truth)
        return entry

    def step(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
             count: int | None = None) -> torch.Tensor:
        """One SHOT step on images `x` with cluster labels `y`; `weight` / `count`: this rank's
        part of a global batch (see Runner.rank_parts)."""
        clf = self.clf
        with clf.features.autocast():
            feats = clf.runner.towers["visual"].encode_image(x, normalize=True)
        logits = clf.config.logit_scale * feats.float() @ clf.centres.T
        part = {} if weight is None else {"weight": weight, "count": count, "world": clf.world}
        return clf.runner.step("visual", shot_loss(logits, y, clf.config.shot_beta, **part))


@torch.no_grad()
def shot_pseudo_labels(feats: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """SHOT's pseudo labels (int64, on the host) of images with features `feats` (n x d) and
    classifier logits `logits` (n x m): nearest class centroid by cosine distance, the
    centroids first weighted by the softmax of `logits`, then once more as the mean feature of
    each class's images.

    As in SHOT's released code, each feature gets one more coordinate, a constant 1, and is
    L2-normalised before clustering. That changes the geometry the clusters are found in: for
    unit features the cosine of two points becomes (cos + 1) / 2, so no image-centroid cosine
    is negative and all angles shrink. It is part of the baseline as its authors ran it, so we
    keep it; leaving it out would be another baseline. Also as there, a class takes part in a round
    only if it has members: the classifier's predictions for the first round, the first
    round's labels for the second. Its centroid is then a positive combination of points with
    a positive last coordinate, never zero, so no class can produce a NaN.

    Nothing of size n x (d + 1) is formed: with x = [f, 1] / |[f, 1]|, the cosine of x and a
    centroid c = [c_f, c_1] is (f . c_f + c_1) / (|[f, 1]| |c|), and the positive factor
    1 / |[f, 1]| of a row does not change which centroid is nearest.
    """
    feats = feats.float()
    scale = torch.rsqrt((feats * feats).sum(dim=1) + 1)  # 1 / |[f, 1]| per image

    def nearest(weights: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        w = weights * scale[:, None]  # centroids of the normalised points x
        c_f, c_1 = w.T @ feats, w.sum(dim=0)
        norm = torch.sqrt((c_f * c_f).sum(dim=1) + c_1 * c_1)
        cosine = (feats @ c_f.T + c_1) / torch.where(members, norm, 1)
        return cosine.masked_fill(~members, -math.inf).argmax(dim=1)

    m = logits.shape[1]
    predicted = torch.bincount(logits.argmax(dim=1), minlength=m) > 0
    first = nearest(torch.softmax(logits.float(), dim=1), predicted)
    one_hot = nn.functional.one_hot(first, m).to(feats.dtype)
    second = nearest(one_hot, one_hot.sum(dim=0) > 0)
    return second.cpu().numpy().astype(np.int64)


def shot_loss(logits: torch.Tensor, pseudo: torch.Tensor, beta: float, *,
              weight: torch.Tensor | None = None, count: int | None = None,
              world: distributed.World | None = None) -> torch.Tensor:
    """SHOT's objective on a batch of `logits` (B x m): the mean entropy of each image's
    softmax p_i (confident predictions), plus sum_k pbar_k log pbar_k with pbar the batch-mean
    softmax (minimising it spreads predictions over the classes), plus `beta` x the
    cross-entropy against the pseudo labels `pseudo`. Everything comes from log-softmax
    values, so a probability that underflows to 0 gives 0 . finite, never 0 . log 0.

    In a distributed run `logits` are this rank's part of a global batch of `count` items
    (`weight`: see Runner.rank_parts). pbar is the whole batch's: each rank's log sum_i p_i
    is exchanged by an all-reduce that autograd sees, so DDP's averaged gradient is the
    single-process one (the all-reduce's backward sums the world_size ranks' equal gradients
    of pbar, and DDP divides by world_size)."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    cross_entropy = nn.functional.nll_loss(log_p, pseudo, reduction="none")
    log_sum = torch.logsumexp(log_p, dim=0)  # log sum_i p_ik over the items here
    if world is not None and world.active:
        # an empty part (its one item weighs 0) adds nothing: log 0 = -inf, which logsumexp
        # over the ranks takes as 0 (and sends it a zero gradient)
        log_sum = torch.logsumexp(world.all_rows(log_sum + weight.max().log()), dim=0)
    log_mean = log_sum - math.log(count or len(logits))  # log pbar_k
    diversity = (log_mean.exp() * log_mean).sum()
    size = world.size if world is not None else 1
    return (batch_mean(entropy, weight, count, size) + diversity
            + beta * batch_mean(cross_entropy, weight, count, size))
