"""A run's hyper-parameters (:class:`Config`, validated once, with the paper's defaults), the
record of one epoch (:class:`EpochLog`), and which settings a run may change when resumed.

Label propagation's own settings (k, alpha, the edge weight) default to the engine's:
``reclip_ext.DEFAULTS``, the one place they are written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch

import reclip_ext

from . import device as devices, projection
from .pseudo_labels import METHODS as PSEUDO_LABELS, source

WEIGHTS = ("shift", "relu")
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
    k: int = reclip_ext.DEFAULTS.k  #: neighbours in the propagation graph
    alpha: float = reclip_ext.DEFAULTS.alpha  #: propagation strength
    #: edge weight: "shift" ((1+s)/2, the authors' code) or "relu" (max(s,0))
    weight: str = reclip_ext.DEFAULTS.weight
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
        if self.weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {WEIGHTS}, got {self.weight!r}")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise ValueError(f"pseudo_labels must be one of {PSEUDO_LABELS}, got "
                             f"{self.pseudo_labels!r}")
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

    def propagates(self, classes: int) -> bool:
        """Whether this run's pseudo labels come from label propagation (else predictions)."""
        return (self.method == "reclip"
                and source(self.pseudo_labels, classes, self.many_classes) == "propagation")

    def check_graph(self, classes: int, images: int) -> None:
        """ValueError naming k when label propagation's graph, one node per class and per
        image, is too small for k neighbours per node. Never clamped: another k is another
        graph, so it is the user's choice."""
        nodes = classes + images
        if self.propagates(classes) and self.k >= nodes:
            raise ValueError(f"k: label propagation's graph has {classes} class nodes + "
                             f"{images} images = {nodes} nodes, too few for k = {self.k} "
                             f"neighbours each; lower k (--k) to at most {nodes - 1}")

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
         "shot_params": "--shot-params", "pseudo_labels": "--pseudo-labels", "k": "--k",
         "alpha": "--alpha", "weight": "--weight"}


@dataclass
class EpochLog:
    epoch: int
    iterations: int
    agreement: float  #: fraction of images whose T and V pseudo labels agree
    trained: int  #: images trained on this epoch
    loss_text: float | None = None
    loss_visual: float | None = None
    #: when labels are known: the accuracies of the pseudo labels this epoch trained on
    #: (pseudo_text / pseudo_visual / pseudo_shared, or pseudo_shot) and of the T / V /
    #: combined model after this epoch, as predict() would give them
    accuracy: dict[str, float] = field(default_factory=dict)
