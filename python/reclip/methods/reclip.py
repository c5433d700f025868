"""ReCLIP's self-training (§3.3-3.4): a text copy and a visual copy of the model, each tuning
only its norm layers, trained on the pseudo labels both agree on.

ReCLIP-T adapts the text encoder: on frozen visual features, pseudo labels come from label
propagation in a projection rebuilt each epoch from the adapted class embeddings, and the loss
is cross-entropy of the image . text logits (class embeddings from the first template, with
gradients). ReCLIP-V adapts the visual encoder: pseudo labels come from propagation of its
current features with the initial projection and class nodes, and the loss is cross-entropy
against the pseudo-label class centres. With label sharing each epoch trains both on the
images whose two pseudo labels agree.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import projection, trainable
from ..config import EpochLog
from ..pseudo_labels import pseudo_labels
from ..runner import no_sync
from .base import Method


class ReCLIPMethod(Method):
    """ReCLIP's epoch and steps on the state of `clf` (a reclip.ReCLIP)."""

    name = "reclip"

    @staticmethod
    def trainable(text_copy: nn.Module, visual_copy: nn.Module):
        return (trainable.tower_params(text_copy, visual=False),
                trainable.tower_params(visual_copy, visual=True))

    def epoch(self, data, frozen: torch.Tensor, epoch: int, batch: int,
              truth: np.ndarray | None, loaders: dict) -> EpochLog:
        clf, c = self.clf, self.clf.config
        use_t, use_v = c.sides in ("both", "text"), c.sides in ("both", "visual")
        labels_t = labels_v = None
        if use_t:
            clf.nodes_t = clf.class_nodes(clf.text_copy)
            # weights that are finite but huge after the last epoch (which the check after it
            # lets through) can overflow here: that is divergence too, not a failed SVD
            if not torch.isfinite(clf.nodes_t).all():
                raise self.diverged_at_start(epoch, "the text copy's class embeddings are not "
                                             "finite")
            try:
                clf.basis_t = projection.basis(clf.nodes_t, c.projection)
            except ValueError as err:  # embeddings the training collapsed (fine at the start)
                raise self.diverged_at_start(
                    epoch, f"the text copy's class embeddings collapsed ({err})") from None
            labels_t = self.pseudo(frozen, clf.nodes_t, clf.basis_t)
        if use_v:
            feats_v = self.visual_features(data, loaders, frozen)
            if not torch.isfinite(feats_v).all():  # the same for the visual copy's features
                raise self.diverged_at_start(epoch, "the visual copy's image features are not "
                                             "finite")
            labels_v = self.pseudo(feats_v, clf.nodes_v, clf.basis_v)
            clf.centres = centres(feats_v, labels_v, clf.nodes_v)
        clf.last_pseudo = {"text": labels_t, "visual": labels_v}
        if use_t and use_v:
            agree = labels_t == labels_v
            keep = agree if c.label_sharing else np.ones(len(data), bool)
        else:
            agree = np.ones(len(data), bool)
            keep = agree
        target = labels_t if labels_t is not None else labels_v
        batches = clf.runner.batches(np.flatnonzero(keep), epoch, batch, clf.iterations)
        steps = len(batches)
        none = torch.zeros((), device=clf.device)

        def step(idx, x, part):
            y = torch.as_tensor(target[idx]).to(clf.device)
            loss_t = self.timed("text", lambda: self.step_text(
                frozen[torch.as_tensor(idx).to(clf.device)], y, **part)) if use_t else none
            loss_v = self.timed("visual", lambda: self.step_visual(x, y, **part)) if use_v else none
            return torch.stack([loss_t, loss_v])

        loss_t, loss_v = clf.runner.train(batches, loaders, step, images=use_v,
                                          sides=("T", "V"), epoch=epoch)
        clf.iterations += steps
        entry = EpochLog(epoch=epoch, iterations=clf.iterations, agreement=float(agree.mean()),
                         trained=sum(len(b) for b in batches),
                         loss_text=float(loss_t) / steps if use_t and steps else None,
                         loss_visual=float(loss_v) / steps if use_v and steps else None)
        if truth is not None:
            truth = np.asarray(truth)
            if labels_t is not None:
                entry.accuracy["pseudo_text"] = float((labels_t == truth).mean())
            if labels_v is not None:
                entry.accuracy["pseudo_visual"] = float((labels_v == truth).mean())
            entry.accuracy["pseudo_shared"] = (float((target[keep] == truth[keep]).mean())
                                               if keep.any() else 0.0)
            # The model after this epoch, as predict() sees it: the trained copies with the
            # class embeddings and centres this epoch started from. Only with labels: these
            # are n x m matrices, and the visual pass is the next epoch's first one.
            side_logits = {}
            if use_t:
                side_logits["text"] = frozen @ clf.nodes_t.T
            if use_v:
                side_logits["visual"] = self.trained_features(data, loaders) @ clf.centres.T
            for name, logits in side_logits.items():
                entry.accuracy[name] = accuracy(logits, truth)
            entry.accuracy["combined"] = accuracy(sum(side_logits.values()), truth)
        return entry

    def pseudo(self, feats: torch.Tensor, nodes: torch.Tensor, u) -> np.ndarray:
        """Pseudo labels of `feats` (every rank holds the same, all-gathered features).

        In a distributed run every rank gets the same labels from one computation: label
        propagation's k-NN search is split over the ranks and rank 0 solves, predictions are
        rank 0's (see reclip.pseudo_labels). Labels computed separately by each rank could
        differ, since label propagation's reductions (OpenMP on the CPU, atomics on CUDA) need
        not be bitwise reproducible from one process to the next, and ranks that disagree on a
        single label would train on different targets without any error."""
        c, world = self.clf.config, self.clf.world
        start = time.perf_counter()
        labels = pseudo_labels(feats, nodes, u, method=c.pseudo_labels,
                               many_classes=c.many_classes, k=c.k, alpha=c.alpha, weight=c.weight,
                               precision=c.lp_precision, world=world)
        world.work["pseudo_label_seconds"] += time.perf_counter() - start
        return labels

    def diverged_at_start(self, epoch: int, what: str) -> FloatingPointError:
        """The divergence error for what the last epoch's steps broke, found as `epoch` starts."""
        return FloatingPointError(self.clf.runner.diverged(epoch, f"at its start: {what}"))

    def timed(self, side: str, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one step of `side`, adding its wall seconds to the run's work (on CUDA the
        step's kernels are waited for, so that the seconds are the side's own)."""
        device, work = self.clf.device, self.clf.world.work
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        work[f"{side}_steps"] += 1
        work[f"{side}_step_seconds"] += time.perf_counter() - start
        return loss

    def step_text(self, feats: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                  count: int | None = None) -> torch.Tensor:
        """One ReCLIP-T step on image features `feats` with targets `y`. `weight` / `count`:
        this rank's part of a global batch of `count` items (see Runner.rank_parts); None in
        a single process."""
        # As in the authors' code, the projection only shapes the pseudo labels: the loss
        # uses plain image . text logits.
        clf = self.clf
        prompts = clf.prompts(first_only=True)
        size = clf.config.encode_batch_size
        tower = clf.runner.towers["text"]
        if len(prompts) <= size:  # one chunk: one graph
            text = clf.features.text(tower, prompts)
            return clf.runner.step("text", self.text_loss(feats, text, y, weight, count))
        # Many classes: the graph of all m prompts at once would hold m prompts' activations.
        # The same loss and gradient in bounded memory: the loss's gradient with respect to
        # the text features first, then each chunk re-encoded with a graph and backpropagated
        # with its rows of that gradient (the encoder's gradients add up over the chunks).
        with torch.no_grad():
            text = clf.features.text(clf.text_copy, prompts)
        text.requires_grad_(True)

        def through_the_encoder() -> None:
            # chunks of similar length: each is cut after its longest prompt
            order = clf.features.text_order(prompts)
            starts = range(0, len(prompts), size)
            for i in starts:
                chunk = order[i : i + size]
                # under DDP the chunks' gradients accumulate locally and the last chunk's
                # backward all-reduces the sum (one all-reduce per step, as with one chunk)
                with contextlib.nullcontext() if i == starts[-1] else no_sync(tower):
                    part = clf.features.text(tower, prompts, chunk)
                    part.backward(text.grad[chunk.to(text.device)])

        return clf.runner.step("text", self.text_loss(feats, text, y, weight, count),
                               then=through_the_encoder)

    def text_loss(self, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor,
                  weight: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
        """ReCLIP-T's loss: cross-entropy of the image . text logits against `y`."""
        logits = self.clf.config.logit_scale * feats @ text.T
        return self.clf.runner.cross_entropy(logits, y, weight, count or len(y))

    def step_visual(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                    count: int | None = None) -> torch.Tensor:
        """One ReCLIP-V step on images `x` (on the device) with targets `y`."""
        clf = self.clf
        with clf.features.autocast():
            feats = clf.runner.towers["visual"].encode_image(x, normalize=True)
        logits = clf.config.logit_scale * feats.float() @ clf.centres.T
        count = count or len(x)
        loss = clf.runner.cross_entropy(logits, y, weight, count)
        if clf.config.visual_loss == "released":
            # The released code computes mean(CE * agree) / sum(agree) over its batch: the
            # visual encoder moves about batch-size times more slowly than the text side. On
            # reclip-digits this keeps ReCLIP-V from drifting with its own pseudo-label errors.
            # The global batch's count: a rank holds only part of it.
            loss = loss / count
        return clf.runner.step("visual", loss)


def centres(feats: torch.Tensor, labels: np.ndarray, fallback: torch.Tensor) -> torch.Tensor:
    """Normalised mean feature per pseudo class; a class with no images keeps `fallback`."""
    m = fallback.shape[0]
    y = torch.as_tensor(labels).to(feats.device)
    sums = torch.zeros(m, feats.shape[1], dtype=feats.dtype,
                       device=feats.device).index_add_(0, y, feats)
    counts = torch.bincount(y, minlength=m)
    out = torch.where(counts[:, None] > 0, sums, fallback.to(feats.dtype))
    return nn.functional.normalize(out, dim=1)


def accuracy(logits: torch.Tensor, truth: np.ndarray) -> float:
    return float((logits.argmax(dim=1).cpu().numpy() == truth).mean())
