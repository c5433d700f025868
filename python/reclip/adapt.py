"""ReCLIP, the public face of an adaptation run: fit / predict / save / load.

A run holds two copies of the model (the text copy, whose visual tower never trains, and the
visual copy), the class embeddings and projections, and its history. What an epoch computes is
its method's (reclip.methods: ReCLIP's self-training, or the SHOT baseline with
``Config.method="shot"``); how the steps run is the runner's (reclip.runner); every text and
image pass goes through one encoder (reclip.features); what a checkpoint holds and the checks
that keep a resumed run the same run are reclip.runs'.

Everything runs on ``Config.device``: both model copies, every image and text pass, the class
embeddings and projections, and label propagation (features stay there; only the pseudo labels
come back to the host, as int64 numpy arrays). Forward passes run under ``torch.autocast`` in
``Config.amp``; trainable parameters, their gradients and the optimiser state stay float32, and
features are cast to float32 before anything else uses them. Image passes go through
DataLoaders with ``Config.workers`` worker processes, built once per ``fit``.

Started by torchrun (see reclip.distributed), every image pass is sharded over the ranks and
all-gathered, label propagation's k-NN search is split over the ranks (rank 0 solves), and
both copies train under DistributedDataParallel on contiguous parts of each global batch.
Prediction sums both sides' logits.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint, distributed, projection, runs
from .config import (FLAGS, METHODS, PAPER_LR, RESUMABLE, RUNTIME, SHOT_PARAMS, SIDES,
                     VISUAL_LOSSES, Config, EpochLog)
from .data import BatchList, image_set
from .features import Features
from .labels import class_labels
from .methods import method_for, shot_loss, shot_pseudo_labels
from .models import LoadedModel, model_from_spec
from .progress import bar
from .prompts import DEFAULT_TEMPLATES, check_folders, check_run_classes, format_prompts
from .runner import Runner
from .runs import (check_meta, check_method, check_new_run, check_resume, data_fingerprint,
                   nonfinite, same_data)

# The run's settings, SHOT's functions and the checks of a resumed run live in their own
# modules; they stay importable from here, where they were first published.
__all__ = ["FLAGS", "METHODS", "PAPER_LR", "RESUMABLE", "RUNTIME", "SHOT_PARAMS", "SIDES",
           "VISUAL_LOSSES", "Config", "EpochLog", "ReCLIP", "check_meta", "check_method",
           "check_new_run", "check_resume", "data_fingerprint", "nonfinite", "predictions",
           "probabilities", "same_data", "scores", "shot_loss", "shot_pseudo_labels"]


def _class_tensor(name: str, doc: str) -> property:
    """An attribute of ReCLIP's class state (kept together: see ReCLIP.start_classes)."""
    return property(lambda clf: clf._class_state()[name],
                    lambda clf, value: clf._class_state().__setitem__(name, value), doc=doc)


class ReCLIP:
    """Source-free adaptation of a CLIP model to unlabelled images.

    Example::

        model = reclip.load_model("reclip-digits")
        clf = reclip.ReCLIP(model, [str(d) for d in range(10)], config=reclip.Config(max_epochs=1))
        clf.fit(images)          # a folder, an image tensor, a Dataset or a DataLoader
        labels = clf.predict(images)
        clf.save("run/")

    ``folders`` (optional) names the image folder of each class when folders are named by an
    id rather than by the class (``folders[i]`` holds ``classnames[i]``, e.g. ImageNet's
    ``n01440764``); it is saved with the run so that accuracies on such folders need no mapping
    file later.

    Every class's prompts go through the text encoder once, when the run is first used, not
    when it is built; a loaded run takes its class embeddings from the checkpoint instead.

    Collaborators, public for benchmarks and tests: ``features`` (the encoder), ``runner`` (the
    training loop: optimisers, scalers, towers) and ``method`` (what an epoch computes).
    """

    def __init__(self, model: LoadedModel, classnames: list[str], templates: list[str] | None = None,
                 config: Config | None = None, *, folders: list[str] | None = None) -> None:
        check_run_classes(classnames)
        self.loaded = model
        self.classnames = list(classnames)
        self.folders = None if folders is None else check_folders(folders, self.classnames)
        self.templates = list(templates or DEFAULT_TEMPLATES)
        self.config = c = config or Config()
        self.device = c.torch_device()
        # torchrun's process group, if this process is one of several (see distributed.py)
        self.world = distributed.current()
        # the caller's model stays where it is (load_model leaves it on the CPU)
        self.text_copy = copy.deepcopy(model.model).eval().to(self.device)
        self.visual_copy = copy.deepcopy(model.model).eval().to(self.device)
        self.features = Features(model.tokenizer, model.embed_dim, c, world=self.world,
                                 frozen=self.text_copy)
        self.method = method_for(self)
        self.text_params, self.visual_params = self.method.trainable(self.text_copy,
                                                                     self.visual_copy)
        self.runner = Runner(c, self.device, self.features.amp, self.world,
                             {"text": self.text_copy, "visual": self.visual_copy},
                             {"text": self.text_params, "visual": self.visual_params})
        self.history: list[EpochLog] = []
        #: settings changed by resuming with allow_changes: {"epoch", "setting", "flag",
        #: "was", "now"}, in order (run.json's "changes")
        self.changes: list[dict[str, Any]] = []
        #: what the run trains on (see runs.data_fingerprint), recorded by fit
        self.data: dict[str, Any] | None = None
        self.epoch = 0
        self.iterations = 0
        # the class state (nodes_v ... centres), started when first used: see start_classes
        self._classes: dict[str, torch.Tensor | None] | None = None
        #: the pseudo labels of the last epoch ("text" / "visual": n int64, or None)
        self.last_pseudo: dict[str, np.ndarray | None] = {}

    # The class state: read or written through _class_state, which starts it on first use.
    nodes_v = _class_tensor("nodes_v", "(m, d) class embeddings of the original text encoder: "
                            "the V side's frozen classifier (and SHOT's)")
    basis_v = _class_tensor("basis_v", "the V side's projection of nodes_v (None for P0)")
    nodes_t = _class_tensor("nodes_t", "(m, d) class embeddings of the T side's text encoder, "
                            "rebuilt by each epoch of ReCLIP-T")
    basis_t = _class_tensor("basis_t", "the T side's projection of nodes_t (None for P0)")
    centres = _class_tensor("centres", "(m, d) the V side's classifier: its pseudo classes' "
                            "mean features")

    def _class_state(self) -> dict[str, torch.Tensor | None]:
        if self._classes is None:
            self.start_classes()
        return self._classes

    def start_classes(self, nodes_v: torch.Tensor | None = None) -> None:
        """Start the class state from the original text encoder's class embeddings: `nodes_v`
        where a saved run holds them (reclip.runs.restore), encoded here otherwise. This is
        the one place that decides: a new run encodes every prompt once, on first use, and a
        loaded run never (at ImageNet's 1,000 classes x 80 templates, 80,000 prompts)."""
        if nodes_v is None:
            # the visual copy's text tower never trains: it is the original text encoder
            # whenever this runs
            nodes_v = self.class_nodes(self.visual_copy)
        basis = projection.basis(nodes_v, self.config.projection)
        # copies: a saved run must not hold two views of one storage (safetensors refuses
        # them), and the T side keeps its own until it rebuilds them (never, for ReCLIP-V)
        self._classes = {"nodes_v": nodes_v, "basis_v": basis, "nodes_t": nodes_v.clone(),
                         "basis_t": None if basis is None else basis.clone(),
                         "centres": nodes_v.clone()}

    def prompts(self, first_only: bool = False) -> list[str]:
        """Every class's prompts, class by class (the first template's alone: ReCLIP-T's)."""
        templates = self.templates[:1] if first_only else self.templates
        return [p for per_class in format_prompts(self.classnames, templates) for p in per_class]

    @torch.no_grad()
    def class_nodes(self, model: torch.nn.Module) -> torch.Tensor:
        """(m, d) class embeddings of `model`'s text tower: the normalised mean over templates."""
        feats = self.features.text(model, self.prompts())
        return projection.class_nodes(feats.view(len(self.classnames), len(self.templates), -1))

    def encode_images(self, images: Any, side: str = "text") -> torch.Tensor:
        """(n, d) float32 image features on the device, in item order, of the text copy (whose
        visual tower never trains: the zero-shot features) or the visual copy."""
        if side not in ("text", "visual"):
            raise ValueError(f"side must be 'text' or 'visual', got {side!r}")
        model = self.text_copy if side == "text" else self.visual_copy
        return self.features.images(model, image_set(images, self.loaded.preprocess))

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
        data = image_set(images, self.loaded.preprocess)
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
                runs.restore(self, saved, out_dir, rng=True)
                self.changes += [{"epoch": self.epoch, **c} for c in changes]
        elif out_dir is not None:
            check_new_run(out_dir, "out_dir", "resume=True")
        self.data = data_fingerprint(data)
        c = self.config
        c.check_graph(len(self.classnames), len(data))
        batch = c.batch_for(len(self.classnames))
        self.features.progress = self.runner.progress = progress
        saved = False
        try:
            # the T side's visual tower never trains; a deferred image check happens here,
            # before any training step
            frozen = self.features.images(self.text_copy, data)
            # of the readable images: folder indices count only when they map to classes
            truth = labels if labels is not None else class_labels(data, self.classnames,
                                                                   self.folders)
            known = truth is not None and len(truth) == len(data) and (np.asarray(truth) >= 0).all()
            # built once: with workers they stay alive across epochs
            order = BatchList()
            loaders = {"encode": self.features.loader(data),
                       "train": self.features.loader(data, batch_sampler=order), "order": order}
            self.runner.wrap_for_ddp()
            for epoch in bar(range(self.epoch, c.max_epochs), progress, "epochs"):
                if self.iterations >= c.max_iterations:
                    break
                entry = self.method.epoch(data, frozen, epoch, batch, truth if known else None,
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
            self.features.progress = self.runner.progress = False
            self.method.forget()
            self.runner.unwrap_ddp()
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

    def _stop_if_diverged(self, epoch: int) -> None:
        """FloatingPointError (the same on every rank) if the trained parameters, their
        optimiser state or the class embeddings and centres hold a non-finite value after
        `epoch`'s steps: the last step can break the weights without any loss showing it.
        The frozen base weights cannot change, so they are left out."""
        tensors, _ = runs.state(self)
        bad = nonfinite({k: v for k, v in tensors.items() if not k.startswith("base.")})
        if self.world.active:  # every rank stops, or none: a lone rank would hang the others
            flag = self.world.sum(torch.tensor([float(bool(bad))], device=self.device))
            if flag.item() and not bad:
                bad = ["another rank's copy"]
        if bad:
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise FloatingPointError(self.runner.diverged(
                epoch, f"after its last step: {bad[0]}{more} holds non-finite values"))

    @torch.no_grad()
    def logits(self, images: Any) -> torch.Tensor:
        """(n, m) combined logits on the device: the mean of the T and V sides' (per
        Config.sides; SHOT's are the V side's, with the zero-shot class embeddings)."""
        data = image_set(images, self.loaded.preprocess)
        total, count = None, 0
        dl = None  # one loader (one set of workers) for both passes
        for side, model, classes in (("text", self.text_copy, self.nodes_t),
                                     ("visual", self.visual_copy, self.centres)):
            if self.config.sides in ("both", side):
                if dl is None and data.unchecked is None:
                    dl = self.features.loader(data)
                # summed in place: at ImageNet scale each n x m side is gigabytes, and a
                # stack of both plus their mean would hold four of them at once
                part = self.features.images(model, data, dl) @ classes.T
                total = part if total is None else total.add_(part)
                count += 1
        return total.mul_(self.config.logit_scale / count)

    @torch.no_grad()
    def zero_shot_logits(self, images: Any) -> torch.Tensor:
        """(n, m) logits of plain CLIP (P0, no adaptation) on the device: the T copy's visual
        tower never trains and `nodes_v` come from the original text encoder, so these hold
        before and after fit."""
        data = image_set(images, self.loaded.preprocess)
        return self.zero_shot_logits_of(self.features.images(self.text_copy, data))

    def zero_shot_logits_of(self, frozen: torch.Tensor) -> torch.Tensor:
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

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The run as (tensors, metadata): what save writes (see reclip.runs.state)."""
        return runs.state(self)

    def save(self, directory: str | Path) -> Path:
        """Write the run (trainable tensors + metadata) atomically into `directory`; the
        tensors are written from CPU copies, so a run is the same file wherever it trained.
        A state holding a non-finite tensor is never written (FloatingPointError): the run's
        previous checkpoint stays what --resume continues."""
        tensors, meta = runs.state(self)
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
        runs.restore(obj, (tensors, meta), directory)
        return obj


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
