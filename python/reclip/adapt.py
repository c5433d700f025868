"""ReCLIP self-training (§3.3-3.4): two copies of the model, each tuning only its norm layers;
and the SHOT baseline (``Config.method="shot"``) on the same runner.

ReCLIP-T adapts the text encoder: on frozen visual features, pseudo labels come from label
propagation in a projection rebuilt each epoch from the adapted class embeddings, and the
loss is cross-entropy of the projected image . text logits (class embeddings from the first
template, with gradients). ReCLIP-V adapts the visual encoder: pseudo labels come from
propagation of its current features with the initial projection and class nodes, and the loss
is cross-entropy against the pseudo-label class centres. With label sharing each epoch trains
both on the images whose two pseudo labels agree. Prediction averages both sides' logits.

SHOT (Liang et al., ICML 2020), run for CLIP as the ReCLIP paper's baseline: the classifier is
the frozen zero-shot class embeddings (``nodes_v``, which stay the visual side's ``centres``),
and only the visual copy trains (its whole visual tower by default, or its norm layers) on
SHOT's information-maximisation loss plus beta x cross-entropy against SHOT's cluster pseudo
labels, recomputed from the current features at the start of every epoch
(:func:`shot_pseudo_labels`, :func:`shot_loss`). The text copy never trains; prediction,
checkpoints and resuming are those of ReCLIP-V.

Everything runs on ``Config.device``: both model copies, every image and text pass, the class
embeddings and projections, and label propagation (features stay there; only the pseudo labels
come back to the host, as int64 numpy arrays). Forward passes run under ``torch.autocast`` in
``Config.amp``; trainable norm parameters, their gradients and the optimiser state stay
float32, and features are cast to float32 before anything else uses them. Image passes go
through DataLoaders with ``Config.workers`` worker processes, built once per ``fit``.

Started by torchrun (see reclip.distributed), every image pass is sharded over the ranks and
all-gathered, label propagation's k-NN search is split over the ranks (rank 0 solves), and
both copies train under DistributedDataParallel on contiguous parts of each global batch.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import checkpoint, device as devices, distributed, projection
from .models import (LoadedModel, check_same_base, freeze_except_norms, is_visual, model_from_spec,
                     same_base)
from .pseudo_labels import pseudo_labels
from .prompts import DEFAULT_TEMPLATES, check_folders, format_prompts

SIDES = ("both", "text", "visual")
VISUAL_LOSSES = ("released", "mean")
METHODS = ("reclip", "shot")
SHOT_PARAMS = ("encoder", "norms")
#: the learning rate each method's paper used (Config.lr None means this one)
PAPER_LR = {"reclip": 1e-3, "shot": 1e-6}


@dataclass
class Config:
    """Hyper-parameters; the defaults are the paper's."""

    #: "reclip", or "shot": the SHOT baseline (only the visual copy trains; see the module doc)
    method: str = "reclip"
    k: int = 20  #: neighbours in the propagation graph
    alpha: float = 0.99  #: propagation strength
    weight: str = "shift"  #: edge weight ((1+s)/2, the authors' code) or "relu" (max(s,0))
    projection: str = "P2"  #: "P0", "P1" or "P2"
    #: SGD learning rate; None: the method's paper value (PAPER_LR: 1e-3 ReCLIP, 1e-6 SHOT)
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int | None = None  #: None: 64, or 32 above 200 classes
    max_epochs: int = 50
    max_iterations: int = 5000  #: optimiser steps per side
    many_classes: int = 500  #: above this, pseudo labels are model predictions
    pseudo_labels: str = "auto"  #: "auto", "propagation" or "prediction"
    label_sharing: bool = True
    #: "both" (ReCLIP), "text" (ReCLIP-T) or "visual" (ReCLIP-V; what method "shot" sets)
    sides: str = "both"
    #: ReCLIP-V's loss: "released" as in the authors' released code (the batch-mean
    #: cross-entropy divided once more by the batch's image count) or "mean" (the paper's formula)
    visual_loss: str = "released"
    logit_scale: float = 100.0
    #: SHOT: weight of the cross-entropy against its cluster pseudo labels (SHOT's default)
    shot_beta: float = 0.3
    #: SHOT: what trains in the visual copy: "encoder" (every visual-tower parameter, as SHOT
    #: trains its whole feature extractor) or "norms" (its norm layers, as ReCLIP-V)
    shot_params: str = "encoder"
    seed: int = 0
    #: images or prompts per forward pass; also the prompt chunk of ReCLIP-T's training step,
    #: which bounds its memory (see docs/design.md, "Memory")
    encode_batch_size: int = 256
    #: "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"
    device: str = "auto"
    #: autocast of forward passes: "auto" (bf16 on CUDA, off on the CPU), "bf16", "fp16", "off"
    amp: str = "auto"
    #: image-loading worker processes; None: one per usable core, at most 8
    workers: int | None = None
    #: operand precision of label propagation's k-NN search: "exact", or "tf32" / "bf16"
    #: (CUDA only)
    lp_precision: str = "exact"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.shot_params not in SHOT_PARAMS:
            raise ValueError(f"shot_params must be one of {SHOT_PARAMS}, got {self.shot_params!r}")
        if self.method == "shot":
            if self.sides == "text":
                raise ValueError("sides: method 'shot' trains only the visual encoder, so sides "
                                 "'text' has no meaning for it")
            self.sides = "visual"  # SHOT's model is the visual side alone (training, prediction)
        if self.lr is not None and not (isinstance(self.lr, (int, float))
                                        and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive number or None, got {self.lr!r}")
        if not (isinstance(self.shot_beta, (int, float)) and 0 <= self.shot_beta < math.inf):
            raise ValueError(f"shot_beta must be a finite number >= 0, got {self.shot_beta!r}")
        if self.projection not in projection.MODES:
            raise ValueError(f"projection must be one of {projection.MODES}, got {self.projection!r}")
        if self.sides not in SIDES:
            raise ValueError(f"sides must be one of {SIDES}, got {self.sides!r}")
        if self.visual_loss not in VISUAL_LOSSES:
            raise ValueError(f"visual_loss must be one of {VISUAL_LOSSES}, got {self.visual_loss!r}")
        for name in ("k", "max_epochs", "max_iterations", "encode_batch_size"):
            if getattr(self, name) < (0 if name == "max_epochs" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 0):
            raise ValueError(f"workers must be >= 0 or None, got {self.workers}")
        where = self.torch_device()
        devices.amp_dtype(self.amp, where)
        devices.check_lp_precision(self.lp_precision, where)

    def torch_device(self) -> torch.device:
        return devices.resolve(self.device)

    def batch_for(self, classes: int) -> int:
        return self.batch_size or (32 if classes > 200 else 64)

    @property
    def learning_rate(self) -> float:
        """The learning rate the optimiser uses: `lr`, or the method's paper value."""
        return PAPER_LR[self.method] if self.lr is None else self.lr


#: settings of the machine that runs a model rather than of the run: ReCLIP.load takes them
#: anew instead of from run.json (a run trained on CUDA loads on a CPU-only machine)
RUNTIME = ("device", "amp", "workers", "lp_precision")
#: what a resumed run may change without changing what it computes: how far it goes (a run is
#: extended by more epochs or iterations), and where and how it runs. Every other Config field
#: changes the result, and resuming with another value needs allow_changes (--allow-changes)
RESUMABLE = ("max_epochs", "max_iterations", "encode_batch_size", *RUNTIME)
#: the adapt flag of a Config field, where it has one (run.json's change records and the
#: refusal name the field otherwise)
FLAGS = {"method": "--method", "lr": "--lr", "batch_size": "--batch-size",
         "projection": "--projection", "sides": "--sides", "label_sharing": "--no-label-sharing",
         "visual_loss": "--visual-loss", "seed": "--seed", "shot_beta": "--shot-beta",
         "shot_params": "--shot-params", "pseudo_labels": "--pseudo-labels"}


@dataclass
class EpochLog:
    epoch: int
    iterations: int
    agreement: float  #: fraction of images whose T and V pseudo labels agree
    trained: int  #: images trained on this epoch
    loss_text: float | None = None
    loss_visual: float | None = None
    #: when labels are known: pseudo-label accuracies (pseudo_text / pseudo_visual / pseudo_shared)
    #: and the T / V / combined models' accuracies as they enter the epoch
    accuracy: dict[str, float] = field(default_factory=dict)


def _images_arg(images: Any, transform: Callable | None):
    from .data import image_set

    return image_set(images, transform)


class ReCLIP:
    """Source-free adaptation of a CLIP model to unlabelled images.

    Example::

        model = reclip.load_model("ViT-B-32", pretrained="/path/to/weights.pt")
        clf = reclip.ReCLIP(model, ["cat", "dog"], config=reclip.Config(max_epochs=5))
        clf.fit("/path/to/images")
        labels = clf.predict("/path/to/images")
        clf.save("run/")

    ``folders`` (optional) names the image folder of each class when folders are named by an
    id rather than by the class (``folders[i]`` holds ``classnames[i]``, e.g. ImageNet's
    ``n01440764``); it is saved with the run so that accuracies on such folders need no mapping
    file later.
    """

    def __init__(self, model: LoadedModel, classnames: list[str], templates: list[str] | None = None,
                 config: Config | None = None, *, folders: list[str] | None = None) -> None:
        if len(classnames) < 2:
            raise ValueError(f"classnames: need at least 2 classes, got {len(classnames)}")
        if len(set(classnames)) != len(classnames):
            raise ValueError("classnames: contains duplicates")
        self.loaded = model
        self.classnames = list(classnames)
        self.folders = None if folders is None else check_folders(folders, self.classnames)
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.config = config or Config()
        self.device = self.config.torch_device()
        self._amp = devices.amp_dtype(self.config.amp, self.device)
        # the caller's model stays where it is (load_model leaves it on the CPU)
        self.text_copy = copy.deepcopy(model.model).eval().to(self.device)
        self.visual_copy = copy.deepcopy(model.model).eval().to(self.device)
        if self.config.method == "shot":
            self.text_copy.requires_grad_(False)  # SHOT never trains the text side
            self.text_params: dict[str, nn.Parameter] = {}
            self.visual_params = _shot_params(self.visual_copy, self.config.shot_params)
        else:
            self.text_params = _tower_params(self.text_copy, visual=False)
            self.visual_params = _tower_params(self.visual_copy, visual=True)
        self.history: list[EpochLog] = []
        #: settings changed by resuming with allow_changes: {"epoch", "setting", "flag",
        #: "was", "now"}, in order (run.json's "changes")
        self.changes: list[dict[str, Any]] = []
        #: what the run trains on (see data_fingerprint), recorded by fit
        self.data: dict[str, Any] | None = None
        self.epoch = 0
        self.iterations = 0
        # Frozen V-side classifier: class nodes of the original text encoder and its projection.
        self.nodes_v = self._class_nodes(self.visual_copy)
        self.basis_v = projection.basis(self.nodes_v, self.config.projection)
        self.nodes_t = self.nodes_v.clone()
        # a copy too: a saved run must not hold two views of one storage (safetensors refuses
        # them), and the T side keeps this one until it rebuilds it (never, for ReCLIP-V)
        self.basis_t = None if self.basis_v is None else self.basis_v.clone()
        self.centres = self.nodes_v.clone()
        self._opt_t = self._optimizer(self.text_params) if self.text_params else None
        self._opt_v = self._optimizer(self.visual_params)
        # fp16 gradients underflow without loss scaling; bf16 has float32's exponent range
        self._scalers = {side: torch.amp.GradScaler(self.device.type)
                         if self._amp == torch.float16 else None for side in ("text", "visual")}
        self._bars = False  # progress bars inside an epoch, while fit(progress=True) runs
        # (image set, its features) of the T copy, whose visual tower never trains: the
        # zero-shot pass, fit and the final prediction of one set then encode it once
        self._frozen: tuple[Any, torch.Tensor] | None = None
        # torchrun's process group, if this process is one of several (see distributed.py)
        self.world = distributed.current()
        # what trains: the copies themselves, or in a distributed run their DDP-wrapped
        # towers (set up by fit), whose forward passes all-reduce the gradients
        self._train_t: Any = self.text_copy
        self._train_v: Any = self.visual_copy
        #: the pseudo labels of the last epoch ("text" / "visual": n int64, or None)
        self.last_pseudo: dict[str, np.ndarray | None] = {}

    # ------------------------------------------------------------------------------ encoders

    def _optimizer(self, params: dict[str, nn.Parameter]) -> torch.optim.SGD:
        c = self.config
        return torch.optim.SGD(list(params.values()), lr=c.learning_rate, momentum=c.momentum,
                               weight_decay=c.weight_decay)

    def _prompts(self, first_only: bool) -> list[str]:
        templates = self.templates[:1] if first_only else self.templates
        return [p for per_class in format_prompts(self.classnames, templates) for p in per_class]

    def _autocast(self):
        return devices.autocast(self.device, self._amp)

    def _encode_text(self, model: nn.Module, prompts: list[str]) -> torch.Tensor:
        """float32 features of `prompts`, encode_batch_size per forward pass."""
        out = []
        for i in range(0, len(prompts), self.config.encode_batch_size):
            tokens = self.loaded.tokenizer(prompts[i : i + self.config.encode_batch_size])
            with self._autocast():
                feats = model.encode_text(tokens.to(self.device), normalize=True)
            out.append(feats.float())
        return torch.cat(out)

    @torch.no_grad()
    def _class_nodes(self, model: nn.Module) -> torch.Tensor:
        feats = self._encode_text(model, self._prompts(first_only=False))
        return projection.class_nodes(feats.view(len(self.classnames), len(self.templates), -1))

    def _workers(self, data) -> int:
        # an in-memory tensor's items are slices: handing them through worker processes
        # only adds copies
        if data.kind == "tensor":
            return 0
        return devices.default_workers() if self.config.workers is None else self.config.workers

    def _loader(self, data, batch_sampler=None):
        """A DataLoader over `data`: in order, encode_batch_size per batch (in a distributed
        run: over this rank's shard only), or the batches of `batch_sampler`. On CUDA batches
        come in pinned memory, so copies can be asynchronous."""
        from .data import BatchList, loader

        if batch_sampler is None and self.world.active:
            mine, size = self.world.shard(len(data)), self.config.encode_batch_size
            batch_sampler = BatchList([list(mine[i : i + size])
                                       for i in range(0, len(mine), size)])
        return loader(data, self.config.encode_batch_size, num_workers=self._workers(data),
                      batch_sampler=batch_sampler, pin_memory=self.device.type == "cuda")

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    @torch.no_grad()
    def _encode_images(self, model: nn.Module, images, dl=None) -> torch.Tensor:
        """(n, d) float32 features on the device, in item order. Uses the DataLoader `dl`
        over `images` when given; the first pass over a set with a deferred check does it.

        In a distributed run each rank encodes its shard and the blocks are all-gathered, so
        every rank ends with all n rows in item order. A deferred check is settled for all
        ranks at once: the unreadable items any rank found are merged, then every rank stops
        with the same error or drops the same items."""
        from .data import image_set

        data = image_set(images)
        frozen = model is self.text_copy
        if frozen and self._frozen is not None and self._frozen[0] is data \
                and data.unchecked is None:
            return self._frozen[1]
        world = self.world
        mine = world.shard(len(data))
        found: dict[int, str] | None = None
        if data.unchecked is not None:
            found = {} if world.active else None
            batches = data.checking_batches(self.config.encode_batch_size, self._workers(data),
                                            pin_memory=self.device.type == "cuda",
                                            indices=mine if world.active else None, found=found)
        else:
            batches = dl if dl is not None else self._loader(data)
        # filled in place: concatenating per-batch pieces would hold the features twice; the
        # width is the class embeddings' (a rank may get no image at all)
        out = torch.empty(len(mine), self.nodes_v.shape[1], dtype=torch.float32,
                          device=self.device)
        rows = 0
        start = time.perf_counter()
        for x, _, _ in _progress(batches, self._bars, "encode", leave=False):
            with self._autocast():
                f = model.encode_image(self._to_device(x), normalize=True)
            out[rows : rows + len(f)] = f
            rows += len(f)
        out = out[:rows]  # fewer rows than the set had when a deferred check left some out
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the clock below times finished work
        world.work["encode_images"] += rows
        world.work["encode_seconds"] += time.perf_counter() - start
        if world.active:
            blocks = world.shards(len(data))
            counts = [len(b) for b in blocks]
            if found is not None:
                bad = {i: why for part in world.gather_objects(found) for i, why in part.items()}
                counts = [len(b) - sum(i in b for i in bad) for b in blocks]
                data.settle_check(bad)  # the same on every rank: raise, or drop the same items
            out = world.gather_rows(out, counts)
        if frozen:
            self._frozen = (data, out)
        return out

    # ------------------------------------------------------------------------------ training

    def fit(self, images: Any, *, out_dir: str | Path | None = None, resume: bool = False,
            allow_changes: bool = False, labels: np.ndarray | None = None,
            progress: bool = False, log: Callable[[EpochLog], None] | None = None) -> "ReCLIP":
        """Adapt to `images` (a folder, tensor, Dataset or DataLoader) without their labels.

        `labels` (or an ImageFolder layout whose folders are the classes or `folders`) is used
        only to report accuracies per epoch.
        With `out_dir` a checkpoint is written atomically after every epoch; `resume`
        continues from it and reaches the same result as an uninterrupted run. A resumed run
        keeps its settings (see check_resume): other result-changing ones, other data or
        another model are refused (ValueError), unless `allow_changes` continues it under
        this object's settings and appends each change, with the epoch it takes effect
        from, to the run's ``changes``.
        """
        from .data import class_labels

        data = _images_arg(images, self.loaded.preprocess)
        if resume:
            if out_dir is None:
                raise ValueError("resume: needs out_dir")
            if checkpoint.exists(out_dir):
                saved = checkpoint.read(out_dir)
                # its classes and method first: another class list is the plainer error
                check_meta(saved[1], out_dir, self.classnames)
                check_method(saved[1], out_dir, self.config.method, self.config.shot_params)
                changes = check_resume(saved[1], out_dir, self.config, self.templates,
                                       len(self.classnames), data_fingerprint(data),
                                       self.loaded.spec, allow_changes=allow_changes)
                self._restore(saved, out_dir, rng=True)
                self.changes += [{"epoch": self.epoch, **c} for c in changes]
        elif out_dir is not None:
            check_new_run(out_dir, "out_dir", "resume=True")
        self.data = data_fingerprint(data)
        c = self.config
        batch = c.batch_for(len(self.classnames))
        self._bars = progress
        saved = False
        try:
            # the T side's visual tower never trains; a deferred image check happens here,
            # before any training step
            frozen = self._encode_images(self.text_copy, data)
            # of the readable images: folder indices count only when they map to classes
            truth = labels if labels is not None else class_labels(data, self.classnames,
                                                                   self.folders)
            known = truth is not None and len(truth) == len(data) and (np.asarray(truth) >= 0).all()
            # built once: with workers they stay alive across epochs
            from .data import BatchList

            order = BatchList()
            loaders = {"encode": self._loader(data),
                       "train": self._loader(data, batch_sampler=order), "order": order}
            self._wrap_for_ddp()
            for epoch in _progress(range(self.epoch, c.max_epochs), progress, "epochs"):
                if self.iterations >= c.max_iterations:
                    break
                if c.method == "shot":
                    entry = self._epoch_shot(data, epoch, batch, truth if known else None, loaders)
                else:
                    entry = self._epoch(data, frozen, epoch, batch, truth if known else None,
                                        loaders)
                self._stop_if_diverged(epoch)
                self.history.append(entry)
                self.epoch = epoch + 1
                if log:
                    log(entry)
                if out_dir is not None:
                    self._checkpoint(out_dir)
                    saved = True
        finally:
            self._bars = False
        if out_dir is not None and not saved:
            # No epoch ran (max_epochs 0: the zero-shot model, or a resumed run that is already
            # complete): out_dir must still hold this model, not nothing or an older run.
            self._checkpoint(out_dir)
        return self

    def _checkpoint(self, out_dir) -> None:
        """Save the run; in a distributed run rank 0 writes (every rank holds the same state)
        and the others wait for it, so none runs ahead of the checkpoint a restart reads."""
        if self.world.main:
            self.save(out_dir)
        self.world.barrier()

    def _wrap_for_ddp(self) -> None:
        """In a distributed run, train each copy's tower through DistributedDataParallel over
        its norm parameters (the only ones with requires_grad). DDP's hooks fire only for
        graphs built by its forward, so a small module whose forward is the tower's encoder
        is wrapped; constructing DDP broadcasts rank 0's parameters once."""
        if not self.world.active or isinstance(self._train_v, _DDPTower):
            return
        if self.text_params:  # SHOT never trains the text side
            self._train_t = _DDPTower(self.text_copy, visual=False, device=self.device)
        self._train_v = _DDPTower(self.visual_copy, visual=True, device=self.device)

    def _epoch(self, data, frozen: torch.Tensor, epoch: int, batch: int,
               truth: np.ndarray | None, loaders: dict) -> EpochLog:
        c = self.config
        use_t, use_v = c.sides in ("both", "text"), c.sides in ("both", "visual")
        labels_t = labels_v = None
        if use_t:
            self.nodes_t = self._class_nodes(self.text_copy)
            self.basis_t = projection.basis(self.nodes_t, c.projection)
            labels_t = self._pseudo(frozen, self.nodes_t, self.basis_t)
        if use_v:
            feats_v = self._encode_images(self.visual_copy, data, loaders["encode"])
            labels_v = self._pseudo(feats_v, self.nodes_v, self.basis_v)
            self.centres = _centres(feats_v, labels_v, self.nodes_v)
        self.last_pseudo = {"text": labels_t, "visual": labels_v}
        if use_t and use_v:
            agree = labels_t == labels_v
            keep = agree if c.label_sharing else np.ones(len(data), bool)
        else:
            agree = np.ones(len(data), bool)
            keep = agree
        target = labels_t if labels_t is not None else labels_v
        batches = self._epoch_batches(np.flatnonzero(keep), epoch, batch)
        steps = len(batches)
        none = torch.zeros((), device=self.device)

        def step(idx, x, part):
            y = torch.as_tensor(target[idx]).to(self.device)
            return torch.stack([
                self._step_text(frozen[torch.as_tensor(idx).to(self.device)], y, **part)
                if use_t else none,
                self._step_visual(x, y, **part) if use_v else none])

        loss_t, loss_v = self._train(batches, loaders, step, images=use_v, sides=("T", "V"),
                                     epoch=epoch)
        self.iterations += steps
        entry = EpochLog(epoch=epoch, iterations=self.iterations, agreement=float(agree.mean()),
                         trained=sum(len(b) for b in batches),
                         loss_text=float(loss_t) / steps if use_t and steps else None,
                         loss_visual=float(loss_v) / steps if use_v and steps else None)
        if truth is not None:
            truth = np.asarray(truth)
            if labels_t is not None:
                entry.accuracy["pseudo_text"] = float((labels_t == truth).mean())
            if labels_v is not None:
                entry.accuracy["pseudo_visual"] = float((labels_v == truth).mean())
            entry.accuracy["pseudo_shared"] = float((target[keep] == truth[keep]).mean()) if keep.any() else 0.0
            # The models' own predictions as they entered this epoch, from features computed
            # anyway (training changed neither the features nor the class embeddings below).
            # Only with labels: these are n x m matrices.
            side_logits = {}
            if use_t:
                side_logits["text"] = frozen @ self.nodes_t.T
            if use_v:
                side_logits["visual"] = feats_v @ self.centres.T
            for name, logits in side_logits.items():
                entry.accuracy[name] = _accuracy(logits, truth)
            entry.accuracy["combined"] = _accuracy(sum(side_logits.values()), truth)
        return entry

    def _epoch_shot(self, data, epoch: int, batch: int, truth: np.ndarray | None,
                    loaders: dict) -> EpochLog:
        """One epoch of SHOT: cluster pseudo labels of the current visual features, then SGD
        on the information-maximisation loss + beta x their cross-entropy over every image."""
        feats = self._encode_images(self.visual_copy, data, loaders["encode"])
        # the frozen zero-shot classifier: `centres` stays `nodes_v` for SHOT
        logits = self.config.logit_scale * feats @ self.centres.T
        world = self.world
        start = time.perf_counter()
        labels = world.labels_of_rank0(lambda: shot_pseudo_labels(feats, logits), len(data))
        world.work["pseudo_label_seconds"] += time.perf_counter() - start
        batches = self._epoch_batches(np.arange(len(data)), epoch, batch)

        def step(idx, x, part):
            return self._step_shot(x, torch.as_tensor(labels[idx]).to(self.device), **part)[None]

        (loss,) = self._train(batches, loaders, step, images=True, sides=("SHOT",), epoch=epoch)
        self.iterations += len(batches)
        entry = EpochLog(epoch=epoch, iterations=self.iterations, agreement=1.0,
                         trained=sum(len(b) for b in batches),
                         loss_visual=float(loss) / len(batches) if batches else None)
        if truth is not None:
            truth = np.asarray(truth)
            entry.accuracy["pseudo_shot"] = float((labels == truth).mean())
            # the model as it entered this epoch (SHOT's classifier on these features)
            entry.accuracy["combined"] = _accuracy(logits, truth)
        return entry

    def _train(self, batches: list[np.ndarray], loaders: dict, step, *, images: bool,
               sides: tuple[str, ...], epoch: int) -> torch.Tensor:
        """Run `step(items, their images on the device or None, part)` for this rank's part of
        each global batch (see _rank_parts; `part` is {} in a single process, else the weight
        and count keywords of the steps) and return the step losses of `sides` (one loss
        each) summed over the epoch: in a distributed run the sum over ranks / world_size,
        i.e. the single-process sums, since each rank's losses are world_size times its
        share of the batch means.

        A loss that is not finite stops the run (FloatingPointError, see `_diverged`) once
        the epoch's steps are done: the first such step of each side is tracked on the
        device, since a check per step would make the host wait for every step, and the
        steps after it cannot make the weights any more broken than they are."""
        parts = self._rank_parts(batches)
        xs = (self._train_images([idx for idx, _ in parts], loaders) if images and batches
              else None)
        # summed on the device: a float() per step would make the host wait for every step
        total = torch.zeros(len(sides), device=self.device)
        # per side, the first step whose loss is not finite; len(batches) while there is none
        first_bad = torch.full((len(sides),), len(batches), dtype=torch.long, device=self.device)
        start, trained = time.perf_counter(), 0
        for s, ((idx, weight), whole) in enumerate(_progress(list(zip(parts, batches)),
                                                             self._bars, "train", leave=False)):
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
            raise FloatingPointError(self._diverged(
                epoch, f"step {s + 1} of {len(batches)}, side {sides[bad.index(s)]}: the loss "
                       "is not finite"))
        return total

    def _diverged(self, epoch: int, what: str) -> str:
        """The one-line report of a run whose training produced a non-finite value."""
        lr = self.config.learning_rate
        return (f"training diverged in epoch {epoch + 1}, {what} (learning rate {lr:g}); "
                f"nothing of epoch {epoch + 1} was saved: lower the learning rate (reclip "
                f"adapt ... --resume --allow-changes --lr {lr / 10:g} continues from the run's "
                "last checkpoint)")

    def _stop_if_diverged(self, epoch: int) -> None:
        """FloatingPointError (the same on every rank) if the trained parameters, their
        optimiser state or the class embeddings and centres hold a non-finite value after
        `epoch`'s steps: the last step can break the weights without any loss showing it.
        The frozen base weights cannot change, so they are left out."""
        tensors, _ = self.state()
        bad = nonfinite({k: v for k, v in tensors.items() if not k.startswith("base.")})
        if self.world.active:  # every rank stops, or none: a lone rank would hang the others
            flag = self.world.sum(torch.tensor([float(bool(bad))], device=self.device))
            if flag.item() and not bad:
                bad = ["another rank's copy"]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise FloatingPointError(self._diverged(
                epoch, f"after its last step: {bad[0]}{more} holds non-finite values"))

    def _epoch_batches(self, index: np.ndarray, epoch: int, batch: int) -> list[np.ndarray]:
        """The epoch's training batches: `index` in a permutation seeded by (seed, epoch), so a
        resumed run trains on what an uninterrupted one would, cut to the iterations left."""
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 100_003 + epoch)
        order = index[torch.randperm(len(index), generator=g).numpy()]
        steps = min(math.ceil(len(order) / batch), c.max_iterations - self.iterations)
        return [order[s * batch : (s + 1) * batch] for s in range(steps)]

    def _train_images(self, batches: list[np.ndarray], loaders: dict):
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
                yield self._to_device(x)

        return images()

    def _pseudo(self, feats: torch.Tensor, nodes: torch.Tensor, u) -> np.ndarray:
        """Pseudo labels of `feats` (every rank holds the same, all-gathered features).

        In a distributed run every rank gets the same labels from one computation: label
        propagation's k-NN search is split over the ranks and rank 0 solves, predictions are
        rank 0's (see reclip.pseudo_labels). Labels computed separately by each rank could
        differ, since label propagation's reductions (OpenMP on the CPU, atomics on CUDA) need
        not be bitwise reproducible from one process to the next, and ranks that disagree on a
        single label would train on different targets without any error."""
        c = self.config
        start = time.perf_counter()
        labels = pseudo_labels(feats, nodes, u, method=c.pseudo_labels,
                               many_classes=c.many_classes, k=c.k, alpha=c.alpha, weight=c.weight,
                               precision=c.lp_precision, world=self.world)
        self.world.work["pseudo_label_seconds"] += time.perf_counter() - start
        return labels

    def _rank_parts(self, batches: list[np.ndarray]) -> list[tuple[np.ndarray, torch.Tensor | None]]:
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

    def _batch_loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                    count: int) -> torch.Tensor:
        """Cross-entropy of this rank's part of a global batch of `count` items: the batch
        mean in a single process, else the weighted sum scaled as _rank_parts says."""
        each = nn.functional.cross_entropy(logits, y, reduction="none")
        return _batch_mean(each, weight, count, self.world.size)

    def _step_text(self, feats: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                   count: int | None = None) -> torch.Tensor:
        # As in the authors' code, the projection only shapes the pseudo labels: the loss
        # uses plain image . text logits. `weight` / `count`: this rank's part of a global
        # batch of `count` items (see _rank_parts); None in a single process.
        prompts = self._prompts(first_only=True)
        size = self.config.encode_batch_size
        if len(prompts) <= size:  # one chunk: one graph
            text = self._encode_text(self._train_t, prompts)
            return self._sgd_step("text", self._text_loss(feats, text, y, weight, count))
        # Many classes: the graph of all m prompts at once would hold m prompts' activations.
        # The same loss and gradient in bounded memory: the loss's gradient with respect to
        # the text features first, then each chunk re-encoded with a graph and backpropagated
        # with its rows of that gradient (the encoder's gradients add up over the chunks).
        with torch.no_grad():
            text = self._encode_text(self.text_copy, prompts)
        text.requires_grad_(True)

        def through_the_encoder() -> None:
            starts = range(0, len(prompts), size)
            for i in starts:
                # under DDP the chunks' gradients accumulate locally and the last chunk's
                # backward all-reduces the sum (one all-reduce per step, as with one chunk)
                last = i == starts[-1]
                with contextlib.nullcontext() if last else _no_sync(self._train_t):
                    part = self._encode_text(self._train_t, prompts[i : i + size])
                    part.backward(text.grad[i : i + size])

        return self._sgd_step("text", self._text_loss(feats, text, y, weight, count),
                              then=through_the_encoder)

    def _text_loss(self, feats: torch.Tensor, text: torch.Tensor, y: torch.Tensor,
                   weight: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
        logits = self.config.logit_scale * feats @ text.T
        return self._batch_loss(logits, y, weight, count or len(y))

    def _step_visual(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                     count: int | None = None) -> torch.Tensor:
        with self._autocast():
            feats = self._train_v.encode_image(x, normalize=True)
        feats = feats.float()
        logits = self.config.logit_scale * feats @ self.centres.T
        count = count or len(x)
        loss = self._batch_loss(logits, y, weight, count)
        if self.config.visual_loss == "released":
            # The released code computes mean(CE * agree) / sum(agree) over its batch: the
            # visual encoder moves about batch-size times more slowly than the text side. On
            # reclip-digits this keeps ReCLIP-V from drifting with its own pseudo-label errors.
            # The global batch's count: a rank holds only part of it.
            loss = loss / count
        return self._sgd_step("visual", loss)

    def _step_shot(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None,
                   count: int | None = None) -> torch.Tensor:
        # `weight` / `count`: this rank's part of a global batch (see _rank_parts)
        with self._autocast():
            feats = self._train_v.encode_image(x, normalize=True)
        logits = self.config.logit_scale * feats.float() @ self.centres.T
        part = {} if weight is None else {"weight": weight, "count": count, "world": self.world}
        return self._sgd_step("visual", shot_loss(logits, y, self.config.shot_beta, **part))

    def _sgd_step(self, side: str, loss: torch.Tensor,
                  then: Callable[[], None] | None = None) -> torch.Tensor:
        """One SGD step of `side` on `loss` (then `then`, which may add more gradients), with
        fp16 loss scaling when amp is fp16; returns the detached loss, still on the device."""
        opt = self._opt_t if side == "text" else self._opt_v
        scaler = self._scalers[side]
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

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def logits(self, images: Any) -> torch.Tensor:
        """(n, m) combined logits on the device: the mean of the T and V sides' (per
        Config.sides; SHOT's are the V side's, with the zero-shot class embeddings)."""
        data = _images_arg(images, self.loaded.preprocess)
        total, count = None, 0
        dl = None  # one loader (one set of workers) for both passes
        for side, model, classes in (("text", self.text_copy, self.nodes_t),
                                     ("visual", self.visual_copy, self.centres)):
            if self.config.sides in ("both", side):
                if dl is None and data.unchecked is None:
                    dl = self._loader(data)
                # summed in place: at ImageNet scale each n x m side is gigabytes, and a
                # stack of both plus their mean would hold four of them at once
                part = self._encode_images(model, data, dl) @ classes.T
                total = part if total is None else total.add_(part)
                count += 1
        return total.mul_(self.config.logit_scale / count)

    @torch.no_grad()
    def zero_shot_logits(self, images: Any) -> torch.Tensor:
        """(n, m) logits of plain CLIP (P0, no adaptation) on the device: the T copy's visual
        tower never trains and `nodes_v` come from the original text encoder, so these hold
        before and after fit."""
        data = _images_arg(images, self.loaded.preprocess)
        return self._zero_shot_logits_of(self._encode_images(self.text_copy, data))

    def _zero_shot_logits_of(self, frozen: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits of the T copy's image features: logit_scale x cosine with the
        original class embeddings."""
        return self.config.logit_scale * frozen @ self.nodes_v.T

    def zero_shot_predict(self, images: Any) -> np.ndarray:
        """Plain CLIP's class index per image (int64)."""
        return predictions(self.zero_shot_logits(images))

    def predict(self, images: Any) -> np.ndarray:
        """Class index per image (int64)."""
        return predictions(self.logits(images))

    def predict_proba(self, images: Any) -> np.ndarray:
        """(n, m) class probabilities (softmax of the combined logits)."""
        return probabilities(self.logits(images))

    # ------------------------------------------------------------------------------ persistence

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"text.{k}": v.detach() for k, v in self.text_params.items()}
        tensors |= {f"visual.{k}": v.detach() for k, v in self.visual_params.items()}
        tensors |= {"state.nodes_t": self.nodes_t, "state.nodes_v": self.nodes_v,
                    "state.centres": self.centres, "rng.torch": torch.get_rng_state()}
        if not self.loaded.weights_on_disk:
            # No weights file to rebuild the frozen parts from (e.g. a randomly initialised
            # config): the run carries them.
            tensors |= {f"base.{k}": v for k, v in self.loaded.model.state_dict().items()}
        for name, u in (("basis_t", self.basis_t), ("basis_v", self.basis_v)):
            if u is not None:
                tensors[f"state.{name}"] = u
        for side, opt, params in (("text", self._opt_t, self.text_params),
                                  ("visual", self._opt_v, self.visual_params)):
            for name, p in params.items():
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    tensors[f"momentum.{side}.{name}"] = buf
        meta = {"model": self.loaded.spec, "classnames": self.classnames,
                "templates": self.templates, "config": dataclasses.asdict(self.config),
                "epoch": self.epoch, "iterations": self.iterations,
                "history": [dataclasses.asdict(h) for h in self.history]}
        if self.folders is not None:
            meta["folders"] = self.folders
        if self.data is not None:
            meta["data"] = self.data
        if self.changes:
            meta["changes"] = self.changes
        scalers = {side: s.state_dict() for side, s in self._scalers.items() if s is not None}
        if scalers:  # fp16: resuming must continue with the same loss scale
            meta["grad_scalers"] = scalers
        return tensors, meta

    def save(self, directory: str | Path) -> Path:
        """Write the run (trainable tensors + metadata) atomically into `directory`; the
        tensors are written from CPU copies, so a run is the same file wherever it trained.
        A state holding a non-finite tensor is never written (FloatingPointError): the run's
        previous checkpoint stays what --resume continues."""
        tensors, meta = self.state()
        bad = nonfinite(tensors)
        if bad:
            raise FloatingPointError(f"{directory}: not saved: {bad[0]} holds non-finite values"
                                     " (training diverged)")
        return checkpoint.write(directory, tensors, meta)

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", *, amp: str = "auto",
             workers: int | None = None, lp_precision: str = "exact",
             model: str | Path | None = None, pretrained: str | Path | None = None) -> "ReCLIP":
        """Rebuild a saved run on `device`; reads only safetensors and JSON (never executes
        code). The settings of RUNTIME come from the arguments, not from the run. `model` /
        `pretrained` point at the run's base model where it moved (models.model_from_spec:
        it must have the weights the run records)."""
        runtime = {"device": device, "amp": amp, "workers": workers, "lp_precision": lp_precision}
        Config(**runtime)  # a device that does not exist fails before any model loads
        tensors, meta = checkpoint.read(directory)
        check_meta(meta, directory)
        try:
            loaded = model_from_spec(meta["model"], model, pretrained)
        except (ValueError, FileNotFoundError) as err:  # say which run holds the spec
            raise type(err)(f"{directory}: {err}") from None
        fields = {f.name for f in dataclasses.fields(Config)}
        try:
            config = Config(**{k: v for k, v in meta["config"].items()
                               if k in fields and k not in RUNTIME}, **runtime)
        except (TypeError, ValueError) as err:  # a value of the wrong type fails a comparison
            raise ValueError(f"{directory}: run.json config: {err}") from None
        obj = cls(loaded, meta["classnames"], meta["templates"], config, folders=meta.get("folders"))
        obj._restore((tensors, meta), directory)
        return obj

    def _restore(self, saved: tuple[dict[str, torch.Tensor], dict[str, Any]], where, *,
                 rng: bool = False) -> None:
        tensors, meta = saved
        check_meta(meta, where, self.classnames)
        check_method(meta, where, self.config.method, self.config.shot_params)
        check_same_base(meta["model"], self.loaded.spec, str(where))  # a resume's --model too
        self._frozen = None  # base weights below may replace the T copy's visual tower

        def tensor(key: str, like: torch.Tensor | None, required: bool = True):
            t = tensors.get(key)
            if t is None and required:
                raise ValueError(f"{where}: checkpoint lacks {key}; was it made for another model?")
            if t is not None and like is not None and t.shape != like.shape:
                raise ValueError(f"{where}: checkpoint {key} has shape {tuple(t.shape)}, the model "
                                 f"needs {tuple(like.shape)}; was it made for another model?")
            return t

        base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
        if base:
            for model in (self.loaded.model, self.text_copy, self.visual_copy):
                try:
                    model.load_state_dict(base)
                except RuntimeError as err:  # missing, unexpected or mis-shaped keys
                    # the whole of torch's message: its first line alone says nothing
                    raise ValueError(f"{where}: checkpoint base weights do not fit the model: "
                                     f"{' '.join(str(err).split())}") from None
        with torch.no_grad():
            for side, params in (("text", self.text_params), ("visual", self.visual_params)):
                for name, p in params.items():
                    p.copy_(tensor(f"{side}.{name}", p))

        def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(self.device)

        self.nodes_t = on_device(tensor("state.nodes_t", self.nodes_t))
        self.nodes_v = on_device(tensor("state.nodes_v", self.nodes_v))
        self.centres = on_device(tensor("state.centres", self.centres))
        # no shape for the bases: their width follows the rank of the class embeddings
        self.basis_t = on_device(tensor("state.basis_t", None, required=False))
        self.basis_v = on_device(tensor("state.basis_v", None, required=False))
        for side, opt, params in (("text", self._opt_t, self.text_params),
                                  ("visual", self._opt_v, self.visual_params)):
            for name, p in params.items():
                buf = tensor(f"momentum.{side}.{name}", p, required=False)
                if buf is not None:
                    opt.state[p]["momentum_buffer"] = buf.to(p.device, copy=True)
        for side, scaler in self._scalers.items():
            saved_scaler = meta.get("grad_scalers", {}).get(side)
            if scaler is not None and saved_scaler:
                scaler.load_state_dict(saved_scaler)
        if rng:
            state = tensor("rng.torch", None)
            if state.dtype != torch.uint8:
                raise ValueError(f"{where}: checkpoint rng.torch is {state.dtype}, not uint8")
            torch.set_rng_state(state)
        self.epoch, self.iterations = meta["epoch"], meta["iterations"]
        self.changes = list(meta.get("changes", []))
        self.data = meta.get("data")
        try:
            self.history = [EpochLog(**h) for h in meta["history"]]
        except TypeError as err:  # an entry that is no object or has other fields
            raise ValueError(f"{where}: run.json history: {err}") from None


# ---------------------------------------------------------------------------------- helpers


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors holding a NaN or an infinity (one host wait
    for all of them)."""
    names = [k for k, t in tensors.items() if t.is_floating_point()]
    if not names:
        return []
    flags = [torch.isfinite(tensors[k]).all().cpu() for k in names]
    return [k for k, finite in zip(names, flags) if not finite]


#: what run.json must hold for a run to be loaded or resumed, with the JSON types
_META_TYPES = {"model": dict, "classnames": list, "templates": list, "config": dict,
               "epoch": int, "iterations": int, "history": list}


def check_meta(meta: dict[str, Any], where, classnames: list[str] | None = None) -> None:
    """A run's metadata holds what a run needs (ValueError naming `where` otherwise: a
    hand-edited run.json or one of another program), and, given `classnames`, was made with
    exactly that class list and order: a run may only be resumed with its own classes."""
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if not isinstance(value, kind) or (key in ("classnames", "templates")
                                           and not all(isinstance(v, str) for v in value)):
            raise ValueError(f"{where}: run.json has no valid {key!r}; was it written by reclip?")
    if classnames is not None and meta["classnames"] != classnames:
        raise ValueError(f"{where}: checkpoint classes {meta['classnames'][:5]}... do not match "
                         f"the requested classes {classnames[:5]}...")
    if "folders" in meta:  # optional: runs on class-name folders have none
        folders = meta["folders"]
        if not isinstance(folders, list) or not all(isinstance(v, str) for v in folders):
            raise ValueError(f"{where}: run.json has no valid 'folders'; was it written by reclip?")
        check_folders(folders, meta["classnames"], source=f"{where}: run.json folders")


def check_new_run(out_dir: str | Path, name: str, resume: str) -> None:
    """Refuse to start a run over another one: its first checkpoint would replace the old
    run's weights, and whatever that run took hours to learn would be gone."""
    if checkpoint.exists(out_dir):
        raise FileExistsError(f"{name}: {out_dir} already holds a run; pass {resume} to "
                              "continue it, or choose a new directory (or delete that one)")


def check_method(meta: dict[str, Any], where, method: str, shot_params: str) -> None:
    """A run (metadata checked by check_meta) continues only with the method and the trained
    parameters (SHOT's shot_params) it was made with: another one holds other tensors, or the
    same ones trained for another loss (ValueError naming `where` otherwise)."""
    saved = meta["config"]
    made = saved.get("method", "reclip")  # runs written before SHOT existed are ReCLIP runs
    if made != method:
        raise ValueError(f"{where}: the run was made with method {made!r}, not {method!r}; "
                         f"continue it with --method {made}")
    if made == "shot" and saved.get("shot_params") != shot_params:
        raise ValueError(f"{where}: the run trains shot_params {saved.get('shot_params')!r}, "
                         f"not {shot_params!r}")


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_resume(meta: dict[str, Any], where, config: Config, templates: list[str],
                 classes: int, data: dict[str, Any] | None, model: dict[str, Any] | None, *,
                 allow_changes: bool = False) -> list[dict[str, Any]]:
    """What a resumed run (metadata checked by check_meta) would change, refused unless
    `allow_changes`: every Config field outside RESUMABLE, compared by the value in force
    (the learning rate and batch size a None stands for), and the prompt templates; returns
    the changes ({"setting", "flag", "was", "now"}). Other data (see data_fingerprint) and
    another base model (models.same_base: one that only moved keeps its weights' sha256) are
    refused in any case: nothing of the run would be continued. The
    method and the classes are check_method's and check_meta's. Old runs without a data
    fingerprint are not checked for it. ValueError naming `where` and every difference."""
    if model is not None and not same_base(meta["model"], model):
        raise ValueError(f"{where}: the run was made with model {_spec_text(meta['model'])}, "
                         f"not {_spec_text(model)}; resume it with its own --model and "
                         "--pretrained")
    saved_data = meta.get("data")
    if data is not None and isinstance(saved_data, dict) and not same_data(saved_data, data):
        raise ValueError(f"{where}: the run was made on other data ({saved_data.get('count')} "
                         f"images, fingerprint {str(saved_data.get('sha256'))[:12]}), not "
                         f"these ({data['count']} images, {data['sha256'][:12]}); resume it "
                         "with its own --data")
    fields = {f.name for f in dataclasses.fields(Config)}
    try:
        run = Config(**{k: v for k, v in meta["config"].items()
                        if k in fields and k not in RUNTIME})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: run.json config: {err}") from None

    def in_force(c: Config, name: str) -> Any:
        if name == "lr":
            return c.learning_rate
        if name == "batch_size":
            return c.batch_for(classes)
        return getattr(c, name)

    changes = [{"setting": name, "flag": FLAGS.get(name, name), "was": in_force(run, name),
                "now": in_force(config, name)}
               for name in sorted(fields - set(RESUMABLE) - {"method", "shot_params"})
               if in_force(run, name) != in_force(config, name)]
    if list(meta["templates"]) != list(templates):
        changes.append({"setting": "templates", "flag": "--templates", "was": meta["templates"],
                        "now": list(templates)})
    if changes and not allow_changes:
        listed = ", ".join(
            f"{c['flag']} {_show(c['was'])} (given {_show(c['now'])})" if c["setting"] != "templates"
            else f"--templates: {len(c['was'])} templates (given {len(c['now'])} others)"
            for c in changes)
        raise ValueError(f"{where}: resuming would change what the run computes: {listed}; "
                         "resume with the run's settings, or pass --allow-changes to continue "
                         "under the new ones (each change is recorded in run.json)")
    return changes


def _spec_text(spec: dict[str, Any]) -> str:
    """A model spec in a few words: its name, or a config by its digest."""
    import hashlib

    model = spec.get("model")
    if not isinstance(model, str):
        text = json.dumps(model, sort_keys=True).encode()
        model = f"config {hashlib.sha256(text).hexdigest()[:12]}"
    sha = f" (sha256 {spec['sha256'][:12]}...)" if isinstance(spec.get("sha256"), str) else ""
    return f"{model} with pretrained {spec.get('pretrained')}{sha}"


def data_fingerprint(data) -> dict[str, Any] | None:
    """What identifies the images a run trains on: for a folder, the sorted file paths
    relative to it with their sizes, hashed, and their count (the same files under a moved
    folder keep it; a file added, removed, renamed or rewritten at another size changes it);
    for in-memory images their count alone. The files as listed, before any unreadable one is
    skipped."""
    import hashlib
    import os

    if getattr(data, "kind", None) != "files":
        return {"count": len(data)} if hasattr(data, "__len__") else None
    paths = sorted(list(data.paths) + list(data.skipped))
    digest = hashlib.sha256()
    for p in paths:
        digest.update(f"{os.path.relpath(p, data.root)}\0{os.path.getsize(p)}\n".encode())
    return {"count": len(paths), "sha256": digest.hexdigest()}


def same_data(saved: dict[str, Any], given: dict[str, Any]) -> bool:
    """Whether two data fingerprints name the same images (an in-memory set: the same count)."""
    if "sha256" in saved and "sha256" in given:
        return saved["sha256"] == given["sha256"] and saved.get("count") == given["count"]
    return saved.get("count") == given["count"]


def _tower_params(model: nn.Module, *, visual: bool) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze the norm layers of one tower (visual or text)."""
    norms = freeze_except_norms(model)
    keep = {k: p for k, p in norms.items() if is_visual(model, k) == visual}
    for k, p in norms.items():
        p.requires_grad_(k in keep)
    if not keep:
        raise ValueError(f"the model's {'visual' if visual else 'text'} tower has no norm layers to tune")
    return keep


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


class _DDPTower:
    """A copy's tower under DistributedDataParallel, standing in for the copy where training
    encodes (``encode_text`` / ``encode_image``, always normalised)."""

    def __init__(self, model: nn.Module, *, visual: bool, device: torch.device) -> None:
        # no buffer of the towers changes in training: syncing them every forward pass would
        # only cost time (the flag was renamed in newer torch, which warns about the old one)
        import inspect

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


def _no_sync(model) -> contextlib.AbstractContextManager:
    """DDP's no_sync() of a wrapped tower; nothing for a plain copy."""
    return model.no_sync() if isinstance(model, _DDPTower) else contextlib.nullcontext()


def _shot_params(model: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """Freeze everything but what SHOT trains in `model`: the whole visual tower ("encoder":
    SHOT adapts its entire feature extractor and keeps only the classifier fixed, and here the
    classifier is the class embeddings) or its norm layers ("norms", ReCLIP-V's choice: far
    fewer parameters, a smaller checkpoint, and less room to drift)."""
    if which == "norms":
        return _tower_params(model, visual=True)
    keep = {k: p for k, p in model.named_parameters() if is_visual(model, k)}
    for k, p in model.named_parameters():
        p.requires_grad_(k in keep)
    if not keep:
        raise ValueError("the model has no visual tower parameters to tune")
    return keep


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
    (`weight`: see ReCLIP._rank_parts). pbar is the whole batch's: each rank's log sum_i p_i
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
    return (_batch_mean(entropy, weight, count, size) + diversity
            + beta * _batch_mean(cross_entropy, weight, count, size))


def _batch_mean(values: torch.Tensor, weight: torch.Tensor | None, count: int | None,
                world_size: int) -> torch.Tensor:
    """The mean of per-item `values` over a batch: plain in a single process (weight None);
    else this rank's weighted sum times world_size / count, which DDP's average over the ranks
    turns into the mean over the global batch of `count` items (see ReCLIP._rank_parts)."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() * (world_size / count)


def _centres(feats: torch.Tensor, labels: np.ndarray, fallback: torch.Tensor) -> torch.Tensor:
    """Normalised mean feature per pseudo class; a class with no images keeps `fallback`."""
    m = fallback.shape[0]
    y = torch.as_tensor(labels).to(feats.device)
    sums = torch.zeros(m, feats.shape[1], dtype=feats.dtype, device=feats.device).index_add_(0, y, feats)
    counts = torch.bincount(y, minlength=m)
    centres = torch.where(counts[:, None] > 0, sums, fallback.to(feats.dtype))
    return nn.functional.normalize(centres, dim=1)


def predictions(logits: torch.Tensor) -> np.ndarray:
    """The class index (int64, on the host) of each row of `logits`."""
    return logits.argmax(dim=1).cpu().numpy().astype(np.int64)


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """The softmax of each row of `logits`, on the host."""
    return torch.softmax(logits, dim=1).cpu().numpy()


def scores(logits: torch.Tensor, labels: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The predictions of `logits` (n x m), their accuracy against `labels` and the expected
    calibration error of their softmax (see reclip.metrics)."""
    from .metrics import expected_calibration_error

    pred = predictions(logits)
    return (pred, float((pred == labels).mean()),
            expected_calibration_error(probabilities(logits), labels))


def _accuracy(logits: torch.Tensor, truth: np.ndarray) -> float:
    return float((predictions(logits) == truth).mean())


def _progress(it, enabled: bool, desc: str, *, leave: bool = True):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=leave)
