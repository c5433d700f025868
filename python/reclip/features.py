"""The one encoder of text and images: batched, under autocast, sharded over torchrun's ranks
and gathered, with the features of the tower that never trains kept for reuse.

:class:`Features` is what a ReCLIP run encodes with (its copies, its device and amp, its
DataLoaders). :func:`encode_text` and :func:`encode_images` are the same encoder for one loaded
model, for callers outside a run (benchmarks, tests, notebooks).

Features come back as float32 on the device, L2-normalised, in item order.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from . import device as devices
from .config import Config
from .distributed import World
from .progress import bar


class Features:
    """Encodes text and images for a run.

    `frozen` is the model whose image tower never trains (ReCLIP-T's copy): its features of an
    image set are kept, so the zero-shot pass, fit and the final prediction of one set encode
    it once. `width` is the embedding width (a rank may get no image at all, and still needs
    the shape of what it gathers).
    """

    def __init__(self, tokenizer: Callable, width: int, config: Config, *,
                 world: World | None = None, frozen: nn.Module | None = None) -> None:
        self.tokenizer = tokenizer
        self.width = width
        self.config = config  # read when used: encode_batch_size and workers may be changed
        self.device = config.torch_device()
        self.amp = devices.amp_dtype(config.amp, self.device)
        self.world = world or World()
        self.frozen = frozen
        self.progress = False  #: progress bars over the batches of an image pass
        self._kept: tuple[Any, torch.Tensor] | None = None
        self._tokenized: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._trim: bool | None = None  # whether the text tower ignores trailing padding

    @property
    def batch_size(self) -> int:
        return self.config.encode_batch_size

    def autocast(self):
        return devices.autocast(self.device, self.amp)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def forget(self) -> None:
        """Drop the kept features of the frozen tower (its weights are about to change)."""
        self._kept = None

    def workers(self, data) -> int:
        """Image-loading worker processes for `data`."""
        # an in-memory tensor's items are slices: handing them through worker processes
        # only adds copies
        if data.kind == "tensor":
            return 0
        return devices.worker_count(self.config.workers)

    def loader(self, data, batch_sampler=None):
        """A DataLoader over `data`: in order, batch_size per batch (in a distributed run: over
        this rank's shard only), or the batches of `batch_sampler`. On CUDA batches come in
        pinned memory, so copies can be asynchronous."""
        from .data import BatchList, loader

        if batch_sampler is None and self.world.active:
            mine, size = self.world.shard(len(data)), self.batch_size
            batch_sampler = BatchList([list(mine[i : i + size])
                                       for i in range(0, len(mine), size)])
        return loader(data, self.batch_size, num_workers=self.workers(data),
                      batch_sampler=batch_sampler, pin_memory=self.device.type == "cuda")

    def text(self, model: nn.Module, prompts: list[str],
             part: torch.Tensor | None = None) -> torch.Tensor:
        """float32 features of `prompts` in their order (of `part` only, an index tensor into
        them, in its order), batch_size per forward pass; with gradients when autograd is on
        (ReCLIP-T's step).

        Prompts are far shorter than a tokenizer's context (emoji names: 11 of 32 tokens on
        average), and a text tower's cost is linear in the tokens it reads. So a pass goes
        over the prompts shortest first and cuts each batch after its longest prompt, when
        the tower gives the same features without the trailing padding (see `_trims`)."""
        tokens, lengths = self._tokens(prompts)
        part = torch.arange(len(prompts)) if part is None else part.cpu()
        if not len(part):
            return torch.empty(0, self.width, device=self.device)
        trim = self._trims(model, tokens, lengths)
        by_length = torch.argsort(lengths[part], stable=True) if trim else None
        order = part[by_length] if trim else part
        out = []
        for i in range(0, len(order), self.batch_size):
            batch = order[i : i + self.batch_size]
            rows = tokens[batch]
            if trim:
                rows = rows[:, : int(lengths[batch].max())]
            with self.autocast():
                feats = model.encode_text(rows.to(self.device), normalize=True)
            out.append(feats.float())
        feats = torch.cat(out)
        return feats if not trim else feats[torch.argsort(by_length).to(self.device)]

    def text_order(self, prompts: list[str]) -> torch.Tensor:
        """The prompts' indices, shortest first: the order `text` encodes them in (and the
        one to split them by, so that each part is cut short)."""
        return torch.argsort(self._tokens(prompts)[1], stable=True)

    def _tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompts' tokens and, per prompt, the columns that matter: up to its last
        token that is not padding, plus one padding column (a tower that pads with its
        end-of-text token, as transformers' CLIP does, still finds that token). Kept for
        recent prompt lists: ReCLIP-T encodes the same prompts at every step."""
        key = tuple(prompts)
        if key not in self._tokenized:
            tokens = self.tokenizer(list(prompts)) if prompts else torch.zeros(0, 1, dtype=torch.long)
            # padding is the last column's most common token; a prompt that fills the
            # context keeps all of it
            pad = tokens[:, -1].mode().values if len(tokens) else 0
            content = (tokens != pad).int()
            last = tokens.shape[1] - 1 - torch.argmax(content.flip(1), dim=1)
            lengths = torch.where(content.any(1), last + 2, 1).clamp(max=tokens.shape[1])
            if len(self._tokenized) >= 64:
                self._tokenized.clear()
            self._tokenized[key] = (tokens, lengths)
        return self._tokenized[key]

    def _trims(self, model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> bool:
        """Whether cutting trailing padding leaves this tower's features as they are. True for
        the towers we know (a causal mask or an attention mask over the padding, pooled at a
        token or over the unmasked ones), but a tower that pools at the last position or
        attends to its padding would change, and one with a fixed input width (open_clip's
        own CLIP text tower) refuses shorter tokens: so it is checked once, in float32, on a
        few of the prompts, against the uncut tokens."""
        if self._trim is None:
            if int(lengths.max()) >= tokens.shape[1]:
                return False  # nothing to cut in these prompts; ask again for others
            count = min(4, len(lengths), self.batch_size)  # no more than a batch holds
            pick = torch.argsort(lengths, stable=True)[
                torch.linspace(0, len(lengths) - 1, count).round().long()]
            batch = tokens[pick].to(self.device)
            with torch.no_grad():
                whole = model.encode_text(batch, normalize=True).float()
                try:
                    cut = model.encode_text(batch[:, : int(lengths[pick].max())],
                                            normalize=True).float()
                except Exception:  # a fixed width, refused in any way: never cut
                    cut = None
            self._trim = cut is not None and bool(torch.allclose(whole, cut, atol=1e-4, rtol=0))
        return self._trim

    @torch.no_grad()
    def images(self, model: nn.Module, images, dl=None) -> torch.Tensor:
        """(n, width) features of `images` (anything reclip.data.image_set takes). Uses the
        DataLoader `dl` over them when given; the first pass over a set with a deferred check
        does it.

        In a distributed run each rank encodes its shard and the blocks are all-gathered, so
        every rank ends with all n rows in item order. A deferred check is settled for all
        ranks at once: the unreadable items any rank found are merged, then every rank stops
        with the same error or drops the same items."""
        from .data import image_set

        data = image_set(images)
        keep = self.frozen is not None and model is self.frozen
        if keep and self._kept is not None and self._kept[0] is data and data.unchecked is None:
            return self._kept[1]
        world = self.world
        mine = world.shard(len(data))
        found: dict[int, str] | None = None
        if data.unchecked is not None:
            found = {} if world.active else None
            batches = data.checking_batches(self.batch_size, self.workers(data),
                                            pin_memory=self.device.type == "cuda",
                                            indices=mine if world.active else None, found=found)
        else:
            batches = dl if dl is not None else self.loader(data)
        # filled in place: concatenating per-batch pieces would hold the features twice
        out = torch.empty(len(mine), self.width, dtype=torch.float32, device=self.device)
        rows = 0
        start = time.perf_counter()
        for x, _, _ in bar(batches, self.progress, "encode", leave=False):
            with self.autocast():
                f = model.encode_image(self.to_device(x), normalize=True)
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
        if keep:
            self._kept = (data, out)
        return out


class _EvalMode:
    """Put a module in eval mode, then restore each submodule's own training flag."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _for(loaded, batch_size: int) -> Features:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = Config(device=str(_device_of(loaded.model)), amp="off",
                    encode_batch_size=batch_size, workers=0)
    return Features(loaded.tokenizer, loaded.embed_dim, config)


def encode_text(loaded, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features ``[len(texts), embed_dim]`` of a loaded model (float32, on
    the model's device). Runs in eval mode without gradients (the module's training flags
    are restored afterwards)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    features = _for(loaded, batch_size)
    with torch.no_grad(), _EvalMode(loaded.model):
        return features.text(loaded.model, texts)


def encode_images(loaded, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image features ``[N, embed_dim]`` of preprocessed images ``[N, 3, H, W]``
    of a loaded model (float32, on the model's device); eval mode, no gradients."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor [N, 3, H, W], not {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
    features = _for(loaded, batch_size)
    if not len(images):
        return torch.empty(0, features.width, device=features.device)
    images = images.to(next(loaded.model.parameters()).dtype)
    with _EvalMode(loaded.model):
        return features.images(loaded.model, images)
