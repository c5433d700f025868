"""The training loop every method shares: the epoch's seeded batches, their images through the
training DataLoader, each rank's part of a global batch, optimiser steps with fp16 loss
scaling, DistributedDataParallel towers, and the stop on divergence.

A method (reclip.methods) decides what an epoch computes and what one step's loss is; the
runner decides how the steps run.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import distributed, trainable
from .progress import bar

SIDES = ("text", "visual")


class Runner:
    """Optimisers, loss scalers and the towers that train, for the parameters `params`
    ({"text": ..., "visual": ...}; an empty side never trains) of the copies `copies`."""

    def __init__(self, config, device: torch.device, amp: torch.dtype | None,
                 world: distributed.World, copies: dict[str, nn.Module],
                 params: dict[str, dict[str, nn.Parameter]]) -> None:
        self.config, self.device, self.world = config, device, world
        self.copies = copies
        self.params = params
        self.optimizers = {side: trainable.optimizer(params[side], config) if params[side]
                           else None for side in SIDES}
        # fp16 gradients underflow without loss scaling; bf16 has float32's exponent range
        self.scalers = {side: torch.amp.GradScaler(device.type) if amp == torch.float16
                        else None for side in SIDES}
        #: what trains: the copies themselves, or in a distributed run their DDP-wrapped towers
        #: (see wrap_for_ddp), whose forward passes all-reduce the gradients
        self.towers: dict[str, Any] = dict(copies)
        self.progress = False  #: progress bars over an epoch's steps

    def wrap_for_ddp(self) -> None:
        """In a distributed run, train each copy's tower through DistributedDataParallel over
        its trained parameters (the only ones with requires_grad). DDP's hooks fire only for
        graphs built by its forward, so a small module whose forward is the tower's encoder
        is wrapped; constructing DDP broadcasts rank 0's parameters once."""
        if not self.world.active or isinstance(self.towers["visual"], DDPTower):
            return
        for side in SIDES:
            if self.params[side]:
                self.towers[side] = DDPTower(self.copies[side], visual=side == "visual",
                                             device=self.device)

    def unwrap_ddp(self) -> None:
        """Train the copies themselves again. A DDP wrapper holds the process group and its
        gloo threads; dropped at the end of fit, it is freed before the group is destroyed,
        not during the interpreter's exit, where gloo's teardown can abort the process."""
        self.towers = dict(self.copies)

    def batches(self, index: np.ndarray, epoch: int, batch: int,
                iterations: int) -> list[np.ndarray]:
        """The epoch's training batches: `index` in a permutation seeded by (seed, epoch), so a
        resumed run trains on what an uninterrupted one would, cut to the iterations left
        after `iterations`."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
        order = index[torch.randperm(len(index), generator=g).numpy()]
        steps = min(math.ceil(len(order) / batch), c.max_iterations - iterations)
        return [order[s * batch : (s + 1) * batch] for s in range(steps)]

    def train(self, batches: list[np.ndarray], loaders: dict, step, *, images: bool,
              sides: tuple[str, ...], epoch: int) -> torch.Tensor:
        """Run `step(items, their images on the device or None, part)` for this rank's part of
        each global batch (see rank_parts; `part` is {} in a single process, else the weight
        and count keywords of the steps) and return the step losses of `sides` (one loss
        each) summed over the epoch: in a distributed run the sum over ranks / world_size,
        i.e. the single-process sums, since each rank's losses are world_size times its
        share of the batch means.

        A loss that is not finite stops the run (FloatingPointError, see `diverged`) once
        the epoch's steps are done: the first such step of each side is tracked on the
        device, since a check per step would make the host wait for every step, and the
        steps after it cannot make the weights any more broken than they are."""
        parts = self.rank_parts(batches)
        xs = (self.images([idx for idx, _ in parts], loaders) if images and batches else None)
        # summed on the device: a float() per step would make the host wait for every step
        total = torch.zeros(len(sides), device=self.device)
        # per side, the first step whose loss is not finite; len(batches) while there is none
        first_bad = torch.full((len(sides),), len(batches), dtype=torch.long, device=self.device)
        start, trained = time.perf_counter(), 0
        for s, ((idx, weight), whole) in enumerate(bar(list(zip(parts, batches)),
                                                       self.progress, "train", leave=False)):
            part = {} if weight is None else {"weight": weight, "count": len(whole)}
            loss = step(idx, next(xs) if xs is not None else None, part)
            total += loss
            first_bad = torch.where(torch.isfinite(loss), first_bad, first_bad.clamp(max=s))
            trained += len(idx) if weight is None else int(weight.sum())
        if self.world.active:
            # the one all-reduce of the epoch's losses; it also waits for the last step, so
            # the clock below times finished work
            total = self.world.sum(total) / self.world.size
            # a rank's part of a batch may blow up alone: every rank must stop at the same step
            first_bad = self.world.min(first_bad)
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once an epoch: the clock times finished work
        self.world.work["train_images"] += trained
        self.world.work["train_seconds"] += time.perf_counter() - start
        bad = first_bad.tolist()
        if min(bad, default=len(batches)) < len(batches):
            s = min(bad)
            raise FloatingPointError(self.diverged(
                epoch, f"step {s + 1} of {len(batches)}, side {sides[bad.index(s)]}: the loss "
                       "is not finite"))
        return total

    def diverged(self, epoch: int, what: str) -> str:
        """The one-line report of a run whose training produced a non-finite value."""
        lr = self.config.learning_rate
        return (f"training diverged in epoch {epoch + 1}, {what} (learning rate {lr:g}); "
                f"nothing of epoch {epoch + 1} was saved: lower the learning rate (reclip "
                f"adapt ... --resume --allow-changes --lr {lr / 10:g} continues from the run's "
                "last checkpoint)")

    def images(self, batches: list[np.ndarray], loaders: dict):
        """An iterator over the images of `batches` on the device, in order, through fit's
        training DataLoader (its batch sampler set to these batches)."""
        loaders["order"].batches = [b.tolist() for b in batches]
        pairs = zip(batches, loaders["train"])  # the loader starts now, not at the first step

        def images():
            for idx, (x, _, got) in pairs:
                # the caller's targets are those of idx: a loader yielding other items would
                # train on wrong targets without any other sign
                if not np.array_equal(got.numpy(), idx):
                    raise RuntimeError(f"training batch holds items {got[:5].tolist()}..., "
                                       f"expected {idx[:5].tolist()}...")
                yield x.to(self.device, non_blocking=True)

        return images()

    def rank_parts(self, batches: list[np.ndarray]) -> list[tuple[np.ndarray, torch.Tensor | None]]:
        """(items, weights) of this rank for each global batch: a contiguous part of it
        (some ranks get one item more when the batch does not divide evenly).

        DDP averages gradients over ranks, so each rank's loss is the sum of its items'
        losses times world_size / global count: the average over ranks is then exactly the
        batch-mean gradient of a single process, however unevenly the batch splits. A rank
        whose part is empty (a last batch shorter than the world) still has to run a forward
        and backward pass for the all-reduce: it takes the batch's first item with weight 0."""
        world = self.world
        if not world.active:
            return [(idx, None) for idx in batches]
        out = []
        for idx in batches:
            part = idx[distributed.split(len(idx), world.size, world.rank)]
            weight = torch.ones(len(part), device=self.device)
            if not len(part):
                part, weight = idx[:1], torch.zeros(1, device=self.device)
            out.append((part, weight))
        return out

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                      count: int) -> torch.Tensor:
        """Cross-entropy of this rank's part of a global batch of `count` items: the batch
        mean in a single process, else the weighted sum scaled as rank_parts says."""
        each = nn.functional.cross_entropy(logits, y, reduction="none")
        return batch_mean(each, weight, count, self.world.size)

    def step(self, side: str, loss: torch.Tensor,
             then: Callable[[], None] | None = None) -> torch.Tensor:
        """One SGD step of `side` on `loss` (then `then`, which may add more gradients), with
        fp16 loss scaling when amp is fp16; returns the detached loss, still on the device."""
        opt, scaler = self.optimizers[side], self.scalers[side]
        opt.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
        if then is not None:
            then()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        return loss.detach()


def batch_mean(values: torch.Tensor, weight: torch.Tensor | None, count: int | None,
               world_size: int) -> torch.Tensor:
    """The mean of per-item `values` over a batch: plain in a single process (weight None);
    else this rank's weighted sum times world_size / count, which DDP's average over the ranks
    turns into the mean over the global batch of `count` items (see Runner.rank_parts)."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() * (world_size / count)


class _Encoder(nn.Module):
    """One tower of a model copy as a module whose forward is its encoder: what
    DistributedDataParallel wraps, since its hooks fire only for graphs built by forward()."""

    def __init__(self, model: nn.Module, visual: bool) -> None:
        super().__init__()
        self.model, self.visual = model, visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.visual:
            return self.model.encode_image(x, normalize=True)
        return self.model.encode_text(x, normalize=True)


class DDPTower:
    """A copy's tower under DistributedDataParallel, standing in for the copy where training
    encodes (``encode_text`` / ``encode_image``, always normalised)."""

    def __init__(self, model: nn.Module, *, visual: bool, device: torch.device) -> None:
        # no buffer of the towers changes in training: syncing them every forward pass would
        # only cost time (the flag was renamed in newer torch, which warns about the old one)
        ddp = nn.parallel.DistributedDataParallel
        flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else "broadcast_buffers")
        self.ddp = ddp(_Encoder(model, visual),
                       device_ids=[device.index] if device.type == "cuda" else None,
                       **{flag: False})

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.ddp(tokens)

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.ddp(x)

    def no_sync(self):
        return self.ddp.no_sync()


def no_sync(tower) -> contextlib.AbstractContextManager:
    """DDP's no_sync() of a wrapped tower; nothing for a plain copy."""
    return tower.no_sync() if isinstance(tower, DDPTower) else contextlib.nullcontext()
