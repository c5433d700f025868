"""A run directory and the state it holds: what a checkpoint contains (:func:`state`), how a
run is restored from one (:func:`restore`), and the checks that keep a resumed run the same
run: its classes, method, settings, data and base model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import FLAGS, RESUMABLE, RUNTIME, Config, EpochLog
from .models import check_same_base, same_base
from .prompts import check_folders


def state(clf) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The run `clf` as (tensors, metadata): what a checkpoint holds."""
    tensors = {f"text.{k}": v.detach() for k, v in clf.text_params.items()}
    tensors |= {f"visual.{k}": v.detach() for k, v in clf.visual_params.items()}
    tensors |= {"state.nodes_t": clf.nodes_t, "state.nodes_v": clf.nodes_v,
                "state.centres": clf.centres, "rng.torch": torch.get_rng_state()}
    if not clf.loaded.weights_on_disk:
        # No weights file to rebuild the frozen parts from (e.g. a randomly initialised
        # config): the run carries them.
        tensors |= {f"base.{k}": v for k, v in clf.loaded.model.state_dict().items()}
    for name, u in (("basis_t", clf.basis_t), ("basis_v", clf.basis_v)):
        if u is not None:
            tensors[f"state.{name}"] = u
    for side, opt, params in (("text", clf.runner.optimizers["text"], clf.text_params),
                              ("visual", clf.runner.optimizers["visual"], clf.visual_params)):
        for name, p in params.items():
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{side}.{name}"] = buf
    meta = {"model": clf.loaded.spec, "classnames": clf.classnames,
            "templates": clf.templates, "config": dataclasses.asdict(clf.config),
            "epoch": clf.epoch, "iterations": clf.iterations,
            "history": [dataclasses.asdict(h) for h in clf.history]}
    if clf.folders is not None:
        meta["folders"] = clf.folders
    if clf.data is not None:
        meta["data"] = clf.data
    if clf.changes:
        meta["changes"] = clf.changes
    scalers = {side: s.state_dict() for side, s in clf.runner.scalers.items() if s is not None}
    if scalers:  # fp16: resuming must continue with the same loss scale
        meta["grad_scalers"] = scalers
    return tensors, meta


def restore(clf, saved: tuple[dict[str, torch.Tensor], dict[str, Any]], where, *,
            rng: bool = False) -> None:
    """Set the run `clf` to the checkpoint `saved` (tensors, metadata) read from `where`,
    checking that it is a run of this model, method and class list; `rng`: also torch's
    random state (a resumed run continues its random stream)."""
    tensors, meta = saved
    check_meta(meta, where, clf.classnames)
    check_method(meta, where, clf.config.method, clf.config.shot_params)
    check_same_base(meta["model"], clf.loaded.spec, str(where))  # a resume's --model too
    clf.features.forget()  # base weights below may replace the T copy's visual tower

    def tensor(key: str, shape: tuple[int, ...] | None, required: bool = True):
        t = tensors.get(key)
        if t is None and required:
            raise ValueError(f"{where}: checkpoint lacks {key}; was it made for another model?")
        if t is not None and shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{where}: checkpoint {key} has shape {tuple(t.shape)}, the model "
                             f"needs {tuple(shape)}; was it made for another model?")
        return t

    base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
    if base:
        for model in (clf.loaded.model, clf.text_copy, clf.visual_copy):
            try:
                model.load_state_dict(base)
            except RuntimeError as err:  # missing, unexpected or mis-shaped keys
                # the whole of torch's message: its first line alone says nothing
                raise ValueError(f"{where}: checkpoint base weights do not fit the model: "
                                 f"{' '.join(str(err).split())}") from None
    with torch.no_grad():
        for side, params in (("text", clf.text_params), ("visual", clf.visual_params)):
            for name, p in params.items():
                p.copy_(tensor(f"{side}.{name}", p.shape))

    def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(clf.device)

    classes = (len(clf.classnames), clf.features.width)
    # The original class embeddings are the run's where it holds them (encoding them again
    # would give the same, at the cost of every prompt); the rest is trained state that only
    # the run can give.
    clf.start_classes(on_device(tensor("state.nodes_v", classes, required=False)))
    clf.nodes_t = on_device(tensor("state.nodes_t", classes))
    clf.centres = on_device(tensor("state.centres", classes))
    # no shape for the bases: their width follows the rank of the class embeddings
    clf.basis_t = on_device(tensor("state.basis_t", None, required=False))
    clf.basis_v = on_device(tensor("state.basis_v", None, required=False))
    for side, opt, params in (("text", clf.runner.optimizers["text"], clf.text_params),
                              ("visual", clf.runner.optimizers["visual"], clf.visual_params)):
        for name, p in params.items():
            buf = tensor(f"momentum.{side}.{name}", p.shape, required=False)
            if buf is not None:
                opt.state[p]["momentum_buffer"] = buf.to(p.device, copy=True)
    for side, scaler in clf.runner.scalers.items():
        saved_scaler = meta.get("grad_scalers", {}).get(side)
        if scaler is not None and saved_scaler:
            scaler.load_state_dict(saved_scaler)
    if rng:
        state = tensor("rng.torch", None)
        if state.dtype != torch.uint8:
            raise ValueError(f"{where}: checkpoint rng.torch is {state.dtype}, not uint8")
        torch.set_rng_state(state)
    clf.epoch, clf.iterations = meta["epoch"], meta["iterations"]
    clf.changes = list(meta.get("changes", []))
    clf.data = meta.get("data")
    try:
        clf.history = [EpochLog(**h) for h in meta["history"]]
    except TypeError as err:  # an entry that is no object or has other fields
        raise ValueError(f"{where}: run.json history: {err}") from None


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
