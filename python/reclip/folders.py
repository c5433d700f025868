"""Model folders as people have them on disk: transformers ``CLIPModel`` folders, the
HuggingFace hub cache, and open_clip's hub folders.

- A **transformers folder** holds ``config.json`` (``model_type`` ``"clip"``), the weights
  (``model.safetensors``, ``pytorch_model.bin`` or a sharded index of either), the tokenizer
  (``vocab.json`` + ``merges.txt``, or ``tokenizer.json``) and ``preprocessor_config.json``.
  It loads as :class:`HFCLIP`, which gives the pipeline open_clip's interface (``encode_image``,
  ``encode_text``, ``logit_scale``). Tokens come from :class:`BPETokenizer` on the folder's
  files, images from :class:`HFImageTransform` on torchvision; neither runs transformers'
  tokenizer or image processor, and both give the same tensors as they do.
- An **open_clip folder** holds ``open_clip_config.json`` and ``open_clip_model.safetensors``
  or ``open_clip_pytorch_model.bin``, as ``timm/`` and ``laion/`` publish them.
- The **hub cache** (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``) holds either kind as ``models--ORG--NAME/snapshots/<hash>/``,
  with ``refs/main`` naming the snapshot. A snapshot folder, a ``models--ORG--NAME`` entry or
  a name ``ORG/NAME`` found in the cache all work; nothing is ever downloaded.

Every failure a user can cause is one line naming the folder and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import one_line

TRANSFORMERS = "transformers"
OPEN_CLIP_HUB = "open_clip-hub"

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

#: ``ORG/NAME`` as the hub spells repository ids
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# --------------------------------------------------------------------------------------------
# where a model is


def hub_cache() -> Path:
    """The HuggingFace hub cache folder, as huggingface_hub finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"


def is_hub_name(text: str) -> bool:
    return bool(_HUB_NAME.fullmatch(text)) and not text.lower().endswith(".json")


def is_cache_entry(folder: Path) -> bool:
    return folder.name.startswith("models--") and (folder / "snapshots").is_dir()


def snapshot_of(entry: Path) -> Path:
    """The snapshot a ``models--ORG--NAME`` cache entry's ``refs/main`` names."""
    ref = entry / "refs" / "main"
    if not ref.is_file():
        raise FileNotFoundError(f"{entry}: a hub cache entry without refs/main; give its "
                                f"snapshots/<hash> folder instead")
    commit = ref.read_text(encoding="utf-8").strip()
    snapshot = entry / "snapshots" / commit
    if not commit or not snapshot.is_dir():
        raise FileNotFoundError(f"{entry}: refs/main names snapshot {commit!r}, which is not "
                                f"in {entry / 'snapshots'}")
    return snapshot


def find_in_cache(name: str) -> Path:
    """The snapshot of hub model ``ORG/NAME`` in the local cache; never downloads."""
    entry = hub_cache() / ("models--" + name.replace("/", "--"))
    if not entry.is_dir():
        raise FileNotFoundError(f"model {name!r} is not in the local HuggingFace cache (looked "
                                f"for {entry}); reclip never downloads: give a model folder")
    return snapshot_of(entry)


def folder_format(folder: Path) -> str:
    """:data:`OPEN_CLIP_HUB` or :data:`TRANSFORMERS`; ValueError for a folder of neither.
    A folder with both (``laion/`` repositories) loads as open_clip when its weights are
    there."""
    has_open_clip = (folder / OPEN_CLIP_CONFIG).is_file()
    if has_open_clip and any((folder / w).is_file() for w in OPEN_CLIP_WEIGHTS):
        return OPEN_CLIP_HUB
    if (folder / "config.json").is_file():
        return TRANSFORMERS
    if has_open_clip:
        return OPEN_CLIP_HUB  # whose missing weights are then named
    raise ValueError(f"{folder}: neither a transformers model folder (config.json) nor an "
                     f"open_clip one ({OPEN_CLIP_CONFIG})")


def open_clip_weights(folder: Path) -> Path:
    for name in OPEN_CLIP_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no weights beside {OPEN_CLIP_CONFIG} "
                            f"({' or '.join(OPEN_CLIP_WEIGHTS)})")


def hf_weight_files(folder: Path) -> list[Path]:
    """The weights files of a transformers folder: one file, or the shards of its index."""
    for name in _HF_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
    for name in _HF_INDEXES:
        if (folder / name).is_file():
            index = _read_json(folder / name, folder)
            shards = sorted(set((index.get("weight_map") or {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if not shards or missing:
                raise FileNotFoundError(f"{folder}: {name} names missing shards "
                                        f"({', '.join(missing[:3]) or 'none listed'})")
            return [folder / s for s in shards]
    raise FileNotFoundError(f"{folder}: no weights ({', '.join(_HF_WEIGHTS)} or a sharded "
                            f"index); a hub snapshot whose blobs were never fetched looks so too")


def weights_hash(files: list[Path]) -> str:
    """sha256 of a weights file (what ``sha256sum`` prints, and the name of its blob in the
    hub cache); of several, the sha256 of their digests in name order."""
    digests = []
    for path in files:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        digests.append(h.hexdigest())
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def _read_json(path: Path, folder: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot read {path.name}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{folder}: {path.name} is not a JSON object")
    return data


# --------------------------------------------------------------------------------------------
# text: CLIP's byte-level BPE on the folder's own vocabulary


def _byte_symbols() -> dict[int, str]:
    """Byte -> the printable character byte-level BPE writes it as: printable Latin-1 bytes
    stand for themselves, the others for 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class BPETokenizer:
    """CLIP's tokenizer on a vocabulary and merge list: NFC, whitespace runs to one space,
    lower case; words, single digits and punctuation runs are byte-level BPE encoded with
    ``</w>`` closing each word; then ``[bos] tokens [eos]``, cut to ``context_length`` (eos
    kept last) and padded with the pad token."""

    _WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int,
                 *, bos: str, eos: str, pad: str, unk: str, where: str = "<tokenizer>"):
        import regex

        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.context_length = int(context_length)
        missing = [t for t in (bos, eos, pad, unk) if t not in vocab]
        if missing:
            raise ValueError(f"{where}: tokenizer vocabulary lacks {missing[0]!r}")
        self.bos, self.eos, self.pad, self.unk = (vocab[t] for t in (bos, eos, pad, unk))
        # written in a text, the start and end markers are those tokens, as in CLIP's tokenizer
        self.specials = {bos: self.bos, eos: self.eos}
        self.words = regex.compile(self._WORDS)
        self.bytes = _byte_symbols()
        self.cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best = min((r for r in pairs if r[0] is not None), default=None)
            if best is None:
                break
            a, b = parts[best[1]], parts[best[1] + 1]
            merged, i = [], 0
            while i < len(parts):  # every occurrence of the pair, left to right
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab.get(p, self.unk) for p in parts]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
        ids: list[int] = []
        for word in self.words.findall(text):
            if word in self.specials:
                ids.append(self.specials[word])
                continue
            ids += self._bpe("".join(self.bytes[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos, *self.encode(text)][: self.context_length - 1] + [self.eos]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    @classmethod
    def from_folder(cls, folder: Path, context_length: int) -> "BPETokenizer":
        """From ``vocab.json`` + ``merges.txt``, else ``tokenizer.json``; special tokens as
        ``tokenizer_config.json`` / ``special_tokens_map.json`` name them (CLIP's otherwise)."""
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json", folder)
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines
                      if line.strip() and not line.startswith("#version")]
        elif (folder / "tokenizer.json").is_file():
            model = _read_json(folder / "tokenizer.json", folder).get("model") or {}
            if model.get("type") != "BPE":
                raise ValueError(f"{folder}: tokenizer.json is not a BPE tokenizer, which CLIP's is")
            vocab = dict(model.get("vocab") or {})
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m)
                      for m in model.get("merges") or []]
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or "
                                    f"tokenizer.json)")
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{folder}: the tokenizer's merges are not pairs of symbols")
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                for key, value in _read_json(folder / name, folder).items():
                    value = value.get("content") if isinstance(value, dict) else value
                    if key in special and isinstance(value, str):
                        special[key] = value
        return cls(vocab, merges, context_length, bos=special["bos_token"],
                   eos=special["eos_token"], pad=special["pad_token"], unk=special["unk_token"],
                   where=str(folder))


# --------------------------------------------------------------------------------------------
# images: preprocessor_config.json on torchvision


class HFImageTransform:
    """What transformers' ``CLIPImageProcessor`` does to one PIL image, on torchvision:
    to RGB (transparency composited onto white), resize (shortest edge, or to height x width)
    with antialiasing, centre crop (offsets rounded down, zero padding when the crop is
    larger), then rescale and normalise as one ``(x - mean / scale) / (std / scale)``."""

    # PIL's resampling numbers, as preprocessor configs store them
    _RESAMPLE = {0: "NEAREST_EXACT", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX",
                 5: "HAMMING"}

    def __init__(self, cfg: dict, where: str):
        def size_of(value, key):
            if isinstance(value, int):
                return {key: value}
            if isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
                return value
            raise ValueError(f"{where}: preprocessor_config.json has an unusable "
                             f"{'size' if key == 'shortest_edge' else 'crop_size'}: {value!r}")

        self.resize = bool(cfg.get("do_resize", True))
        self.size = size_of(cfg.get("size", 224), "shortest_edge")
        if self.resize and "shortest_edge" not in self.size and not {"height", "width"} <= set(self.size):
            raise ValueError(f"{where}: preprocessor_config.json size needs shortest_edge, or "
                             f"height and width: {self.size!r}")
        resample = cfg.get("resample", 3)
        if resample not in self._RESAMPLE:
            raise ValueError(f"{where}: preprocessor_config.json has an unknown resample {resample!r}")
        self.resample = self._RESAMPLE[resample]
        self.crop = bool(cfg.get("do_center_crop", True))
        crop = size_of(cfg.get("crop_size", 224), "height")
        crop = {"height": crop["height"], "width": crop.get("width", crop["height"])}
        self.crop_size = (crop["height"], crop["width"])
        self.rescale = bool(cfg.get("do_rescale", True))
        self.factor = float(cfg.get("rescale_factor", 1 / 255))
        self.normalize = bool(cfg.get("do_normalize", True))
        self.mean = [float(v) for v in cfg.get("image_mean", (0.48145466, 0.4578275, 0.40821073))]
        self.std = [float(v) for v in cfg.get("image_std", (0.26862954, 0.26130258, 0.27577711))]
        self.rgb = bool(cfg.get("do_convert_rgb", True))

    def _resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        short = self.size["shortest_edge"]
        if min(h, w) == short:
            return h, w
        return (int(short * h / w), short) if w < h else (short, int(short * w / h))

    def __call__(self, image) -> torch.Tensor:
        import numpy as np
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        # v2: uint8 images are resized in uint8, as transformers does (v1 goes through float)
        from torchvision.transforms.v2 import functional as tvF

        if self.rgb:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                image = image.convert("RGB")
        x = torch.from_numpy(np.array(image))
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        x = x.contiguous()
        if self.resize:
            x = tvF.resize(x, list(self._resized_shape(*x.shape[-2:])),
                           interpolation=getattr(InterpolationMode, self.resample), antialias=True)
        if self.crop:
            ch, cw = self.crop_size
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                pad = [max(cw - w, 0) // 2, max(ch - h, 0) // 2, (max(cw - w, 0) + 1) // 2,
                       (max(ch - h, 0) + 1) // 2]
                x = tvF.pad(x, pad, fill=0)
                h, w = x.shape[-2:]
            x = tvF.crop(x, (h - ch) // 2, (w - cw) // 2, ch, cw)
        if self.normalize:
            scale = 1.0 / self.factor if self.rescale else 1.0
            mean = torch.tensor(self.mean) * scale
            std = torch.tensor(self.std) * scale
            return tvF.normalize(x.to(torch.float32), mean.tolist(), std.tolist())
        return x.to(torch.float32) * self.factor if self.rescale else x.to(torch.float32)

    def __repr__(self) -> str:
        return (f"HFImageTransform(size={self.size}, resample={self.resample}, "
                f"crop={self.crop_size if self.crop else None}, mean={self.mean}, std={self.std})")


# --------------------------------------------------------------------------------------------
# the model


class HFCLIP(nn.Module):
    """A transformers ``CLIPModel`` with the interface the pipeline uses of open_clip's
    ``CLIP``: ``encode_image`` / ``encode_text`` (``get_image_features`` /
    ``get_text_features``, optionally L2-normalised) and ``logit_scale`` (log of the scale,
    as open_clip keeps it). Its image tower is what :attr:`visual_prefixes` names:
    ``vision_model`` and ``visual_projection``."""

    visual_prefixes = ("hf.vision_model.", "hf.visual_projection.")

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.embed_dim = int(hf.config.projection_dim)
        size = hf.config.vision_config.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.hf.logit_scale

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 5 returns the model output with the projected features as its
        # pooler_output; earlier versions the tensor itself
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self._features(self.hf.get_image_features(pixel_values=image))
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self._features(self.hf.get_text_features(input_ids=tokens))
        return nn.functional.normalize(feats, dim=-1) if normalize else feats


def transformers_config(folder: Path) -> dict:
    """config.json of a transformers CLIP folder; ValueError naming another architecture."""
    cfg = _read_json(folder / "config.json", folder)
    kind = cfg.get("model_type")
    if kind != "clip":
        what = f"model_type {kind!r}" if kind else "no model_type"
        hint = (" (SigLIP's sigmoid head is not supported yet)" if kind == "siglip" else "")
        raise ValueError(f"{folder}: config.json is of {what}, not a transformers CLIPModel "
                         f"(model_type 'clip'){hint}")
    for tower in ("text_config", "vision_config"):
        if not isinstance(cfg.get(tower, {}), dict):
            raise ValueError(f"{folder}: config.json {tower} is not an object")
    return cfg


def load_transformers(folder: Path, load_guard) -> tuple[HFCLIP, BPETokenizer, HFImageTransform, list[Path]]:
    """(model, tokenizer, image transform, weights files) of a transformers CLIP folder;
    each missing part is named before anything heavy loads."""
    from .optional import require

    cfg = transformers_config(folder)
    files = hf_weight_files(folder)
    context = int((cfg.get("text_config") or {}).get("max_position_embeddings", 77))
    tokenizer = BPETokenizer.from_folder(folder, context)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no preprocessor_config.json (the image size, crop "
                                f"and normalisation)")
    preprocess = HFImageTransform(_read_json(folder / "preprocessor_config.json", folder),
                                  str(folder))
    transformers = require("transformers", f"the transformers model folder {folder}", extra="hf")
    try:
        with load_guard() as reports:
            hf = transformers.CLIPModel.from_pretrained(str(folder), local_files_only=True,
                                                        dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing one-liner
        raise ValueError(f"{folder}: cannot load the CLIPModel: {one_line(e)}") from None
    bad = [r for r in reports if "MISSING" in r or "MISMATCH" in r]
    if bad:
        raise ValueError(f"{folder}: the weights do not fit config.json (missing or mismatched "
                         f"parameters)")
    return HFCLIP(hf).eval(), tokenizer, preprocess, files


def hf_tokenizer_here(folder: Path, cfg: dict) -> Optional[dict[str, Any]]:
    """An open_clip config whose HF tokenizer is named by hub id, with the tokenizer's files
    in the folder itself (as ``timm/`` repositories ship them): the config pointing at the
    folder instead; None when there is nothing to change."""
    text_cfg = cfg.get("text_cfg") or {}
    name = text_cfg.get("hf_tokenizer_name")
    if (isinstance(name, str) and is_hub_name(name) and not Path(name).is_dir()
            and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file())):
        return {**cfg, "text_cfg": {**text_cfg, "hf_tokenizer_name": str(folder)}}
    return None
