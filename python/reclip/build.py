"""An open_clip network from a resolved config (:mod:`reclip.resolve`): the module, its
weights from a local file, its tokenizer and its eval image transform.

The network is built directly (``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` from the config dict,
as open_clip's ``create_model`` does internally), never through open_clip's registry or hub.
Weight files are read without running pickled code: safetensors, a ``torch.save`` state dict
(``weights_only=True``) or the weights of an OpenAI TorchScript archive.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import pickle
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .errors import one_line
from .resolve import packaged_resource, prepare_config

#: keys a TorchScript (OpenAI) checkpoint carries besides the weights
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def open_clip_parts(cfg: dict, where: str, name: Optional[str],
                    weights: Optional[str]) -> tuple[nn.Module, Callable, Callable]:
    """(network in eval mode on the CPU, tokenizer, eval image transform) of config `cfg`, with
    the weights of file `weights` (None: the towers as initialised, but for an HF text tower's
    own pretrained weights). `where` names the model in errors, `name` is its open_clip name."""
    build_cfg, pp_overrides, hf_pretrained = prepare_config(cfg, where)
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
        raise ValueError(f"cannot create the tokenizer of model {where}: {one_line(e)}") from None
    return net, tokenizer, preprocess


# --------------------------------------------------------------------------------------------
# the network


@contextlib.contextmanager
def hf_load_guard():
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
    from open_clip.model import CustomTextCLIP

    from .cut_text import CutTextCLIP

    cfg = copy.deepcopy(cfg)
    is_hf = bool(cfg["text_cfg"].get("hf_model_name"))
    custom_text = bool(cfg.pop("custom_text", False)) or is_hf
    if custom_text:
        cls = CoCa if "multimodal_cfg" in cfg else CustomTextCLIP
    else:
        cls = CutTextCLIP  # open_clip's CLIP, whose text tower may be given fewer tokens
    try:
        with hf_load_guard() as reports:
            net = cls(**cfg, cast_dtype=None)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError, OSError,
            ImportError) as e:
        raise ValueError(f"cannot build model {where}: {one_line(e)}") from None
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


def _head(path: str, size: int) -> bytes:
    """The first `size` bytes of a file (fewer for a shorter or unreadable one)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _is_safetensors(path: str) -> bool:
    """Whether the file starts as safetensors does (a little-endian header length, then the
    header's JSON), whatever its name."""
    head = _head(path, 9)
    return len(head) == 9 and head[8:] == b"{" and 0 < int.from_bytes(head[:8], "little") < 2**32


def _unreadable(path: str, error: Exception) -> str:
    """Why a weights file could not be read, for a user: what the file holds where that is
    known (the readers' own messages, such as torch's advice to load pickles unsafely, are
    for a programmer), else what it is not."""
    # torch's weights-only reader refuses every class it does not know as an "unsupported
    # global"; any other refusal is a byte that is no pickle at all
    if isinstance(error, pickle.UnpicklingError) and "unsupported global" in str(error).lower():
        return (f"pretrained weights file {path} holds pickled Python objects (such as a whole "
                "model saved with torch.save(model)), not a state dict: reclip reads only "
                "state dicts of tensors (torch.load with weights_only) and never runs pickled "
                "code; where the model was saved, save its weights with "
                "torch.save(model.state_dict(), PATH)")
    # a zip archive (torch.save's format) or safetensors, damaged (a download cut short)
    if _head(path, 4) == b"PK\x03\x04" or _is_safetensors(path):
        return f"cannot read pretrained weights {path}: {one_line(error)}"
    return (f"pretrained weights file {path} is not a torch checkpoint, safetensors or "
            "TorchScript file")


def _read_state_dict(path: str) -> dict:
    """State dict of a safetensors / torch.save / TorchScript file; no pickled code is run."""
    from open_clip.factory import load_state_dict
    from safetensors.torch import load_file

    try:
        if _is_torchscript(path):  # OpenAI's released checkpoints; weights only are read
            with warnings.catch_warnings():  # torch.jit is deprecated in recent torch
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(path, map_location="cpu").state_dict()
            for key in _JIT_EXTRA_KEYS:
                sd.pop(key, None)
        elif _is_safetensors(path):  # by its content: open_clip goes by the name's suffix
            sd = load_file(path, device="cpu")
        else:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: for a programmer
                warnings.simplefilter("ignore", UserWarning)
                sd = load_state_dict(path, device="cpu", weights_only=True)
    except StopIteration:
        raise ValueError(f"pretrained weights file {path} holds no tensors") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is a user-facing one-liner
        raise ValueError(_unreadable(path, e)) from None
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
        raise ValueError(f"pretrained weights {path} do not fit the model: {one_line(e)}") from None
    missing = [k for k in result.missing_keys
               if not (hf_pretrained and k.startswith("text.transformer."))]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise ValueError(f"pretrained weights {path} do not fit the model: keys {'; '.join(parts)}")


def load_packaged_weights(model: nn.Module, name: str) -> None:
    """The packaged subset on top of a model whose HF text backbone came from its pip package:
    every key of the file must be used, and the model keys it leaves out must be exactly the
    backbone's (``text.transformer.*``)."""
    ref = packaged_resource(name, 1)
    with resources.as_file(ref) as path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"packaged model {name!r}: weights {path} are missing from "
                                    f"the installed reclip package")
        sd = _read_state_dict(str(path))
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"packaged weights of {name!r} do not fit its config: {one_line(e)}") from None
    backbone = {k for k in model.state_dict() if k.startswith("text.transformer.")}
    if result.unexpected_keys or set(result.missing_keys) != backbone:
        odd = list(result.unexpected_keys) + sorted(set(result.missing_keys) ^ backbone)
        raise ValueError(f"packaged weights of {name!r} do not fit its config (e.g. key {odd[0]})")


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
