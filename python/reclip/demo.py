"""``reclip demo``: ReCLIP on real images with an embedded model, end to end, offline.

The shipped ``reclip-digits`` model learned digits from OpenCV's handwritten digits (its
source domain). The default target is scikit-learn's bundled ``digits``: other writers, 8x8
pixels, 16 grey levels. ``--target`` picks another of ``reclip.sources.TARGETS``, each adapted
with the model it belongs to: the emoji targets use ``reclip-emoji`` (1066 classes, learned
from Noto Color Emoji). The demo adapts the model to the target without its labels and reports
zero-shot, label-propagation-only and ReCLIP accuracy, the per-epoch curve, and the plots of
the paper's Figures 1 and 2, into ``DIR/report.json`` and ``DIR/*.png``.

``export_split`` writes a target's fixed train / test split as image folders, for the
inductive protocol through the command line (``reclip adapt --inductive`` on the train side,
``reclip eval`` on the test side).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import projection, sources
from .adapt import Config, ReCLIP, scores
from .checkpoint import write_json
from .models import LoadedModel, load_model
from .optional import require
from .pseudo_labels import propagate
from .sources import DIGIT_TEMPLATES, target_split, to_pil

__all__ = ["DIGIT_TEMPLATES", "export_split", "preprocessed", "run_demo", "similarity_stats"]

#: the t-SNE plot shows at most this many images (a seeded sample), so that it stays quick
TSNE_POINTS = 2000


def preprocessed(images: np.ndarray, loaded: LoadedModel) -> torch.Tensor:
    """The model's own eval transform applied once to every image (uint8 N x H x W)."""
    from PIL import Image

    return torch.stack([loaded.preprocess(Image.fromarray(a).convert("RGB")) for a in images])


def similarity_stats(image_feats: torch.Tensor, labels: np.ndarray,
                     nodes: torch.Tensor) -> dict[str, dict[str, float]]:
    """Fig. 2 of the paper: mean text-text cosine between different classes and mean cosine of
    each image with its own class's text, under P0 / P1 / P2."""
    out = {}
    m = nodes.shape[0]
    for mode in projection.MODES:
        u = projection.basis(nodes, mode)
        t = projection.project(nodes, u)
        v = projection.project(image_feats, u)
        tt = t @ t.T
        off = tt[~torch.eye(m, dtype=torch.bool)]
        same = (v * t[torch.as_tensor(labels)]).sum(1)
        out[mode] = {"text_text": float(off.mean()), "image_text_same_class": float(same.mean())}
    return out


def _save(fig, out: Path, name: str) -> str:
    """Write `fig` to out/name atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = out / f".{name}.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, out / name)
    plt.close(fig)
    return name


def _plots(out: Path, before: torch.Tensor, after: torch.Tensor, nodes_before: torch.Tensor,
           nodes_after: torch.Tensor, labels: np.ndarray, stats: dict, curve: list[dict],
           zero_shot: float, lp_only: float) -> list[str]:
    require("matplotlib", "the demo's plots").use("Agg")
    import matplotlib.pyplot as plt

    TSNE = require("sklearn.manifold", "the demo's t-SNE plot").TSNE

    written = []
    m = nodes_before.shape[0]
    shown = np.arange(len(labels))
    if len(shown) > TSNE_POINTS:
        shown = np.sort(np.random.default_rng(0).choice(len(shown), TSNE_POINTS, replace=False))
    # many classes: only the nodes of the classes shown, in a map that does not repeat colours
    nodes_shown = np.unique(labels[shown]) if m > 10 else np.arange(m)
    cmap, star = ("tab10", 160) if m <= 10 else ("nipy_spectral", 30)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, feats, nodes, title in ((axes[0], before, nodes_before, "before (zero-shot CLIP)"),
                                    (axes[1], after, nodes_after, "after ReCLIP")):
        both = torch.cat([nodes[nodes_shown], feats[shown]]).numpy()
        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=30).fit_transform(both)
        k = len(nodes_shown)
        ax.scatter(xy[k:, 0], xy[k:, 1], c=labels[shown], cmap=cmap, vmin=0, vmax=m - 1, s=6,
                   alpha=0.7)
        ax.scatter(xy[:k, 0], xy[:k, 1], c=nodes_shown, cmap=cmap, vmin=0, vmax=m - 1, s=star,
                   marker="*", edgecolors="black", linewidths=0.8)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("t-SNE of image (dots) and class (stars) embeddings, coloured by true class")
    written.append(_save(fig, out, "tsne.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    modes = list(stats)
    x = np.arange(len(modes))
    ax.bar(x - 0.2, [stats[k]["text_text"] for k in modes], 0.4, label="text-text (different classes)")
    ax.bar(x + 0.2, [stats[k]["image_text_same_class"] for k in modes], 0.4,
           label="image-text (same class)")
    ax.set_xticks(x, modes)
    ax.set_ylabel("mean cosine similarity")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend()
    ax.set_title("Similarity before adaptation under P0 / P1 / P2")
    written.append(_save(fig, out, "similarity.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [c["epoch"] for c in curve]
    for key, label in (("reclip", "ReCLIP (combined)"), ("pseudo_shared", "pseudo labels (shared)")):
        ax.plot(epochs, [c.get(key) for c in curve], marker="o", markersize=3, label=label)
    ax.axhline(zero_shot, color="gray", linestyle="--", label="zero-shot")
    ax.axhline(lp_only, color="gray", linestyle=":", label="label propagation only")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title("Accuracy per epoch on the target domain")
    written.append(_save(fig, out, "accuracy.png"))
    return written


def export_split(name: str, out_dir: str | Path) -> dict[str, int]:
    """Write the target's fixed split (``reclip.sources.target_split``) as two image folders,
    ``out_dir/train/<class>/NNNNN.png`` and ``out_dir/test/<class>/NNNNN.png`` (NNNNN: the image's
    index in the target), plus ``classes.txt`` and ``templates.txt`` for ``reclip adapt``.
    Returns the number of images on each side."""
    from .checkpoint import write_text

    chosen = sources.target(name)  # an unknown target is named before anything is read
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):  # another export's images would mix with these
        raise FileExistsError(f"{out_dir}: not empty; export into a new or empty folder")
    images, labels = chosen.load()
    names = chosen.classnames()
    counts = {}
    for side, index in zip(("train", "test"), target_split(labels)):
        for folder in names:
            (out / side / folder).mkdir(parents=True, exist_ok=True)
        for i in index:
            path = out / side / names[labels[i]] / f"{i:05d}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            to_pil(images[i]).save(tmp, format="png")
            os.replace(tmp, path)
        counts[side] = int(len(index))
    write_text(out / "classes.txt", "".join(f"{n}\n" for n in names))
    write_text(out / "templates.txt", "".join(f"{t}\n" for t in chosen.templates))
    return counts


def run_demo(out_dir: str | Path, *, model: str | None = None, epochs: int = 10,
             seed: int = 0, plots: bool = True, say: Callable[[str], None] = print,
             device: str = "auto", amp: str = "auto", lp_precision: str = "exact",
             target: str = "sklearn-digits", iterations: int | None = None) -> dict:
    """Adapt `model` (default: the target's own shipped model) to `target` (one of
    reclip.sources.TARGETS) without labels on `device`; write report.json and plots."""
    start = time.time()
    if plots:  # refuse a missing plotting package before minutes of work, not after
        require("matplotlib", "the demo's plots")
        require("sklearn.manifold", "the demo's t-SNE plot")
    chosen = sources.target(target)  # an unknown target costs no model load
    raw, labels = chosen.load()
    classnames = chosen.classnames()
    model = model or chosen.model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    loaded = load_model(model)
    images = preprocessed(raw, loaded)
    config = Config(max_epochs=epochs, seed=seed, device=device, amp=amp,
                    lp_precision=lp_precision,
                    **({} if iterations is None else {"max_iterations": iterations}))
    clf = ReCLIP(loaded, classnames, list(chosen.templates), config)

    # one pass of the unadapted encoder serves the zero-shot scores and label propagation
    frozen = clf.encode_images(images, side="text")
    _, zero_shot, zero_shot_ece = scores(clf.zero_shot_logits_of(frozen), labels)
    lp_only = float((propagate(frozen, clf.nodes_v, clf.basis_v, k=config.k, alpha=config.alpha,
                               weight=config.weight, precision=lp_precision) == labels).mean())
    frozen = frozen.cpu()  # for the statistics and plots
    say(f"target: {target}, {len(labels)} images, {len(classnames)} classes (labels used only "
        f"to score)")
    say(f"zero-shot accuracy {zero_shot:.4f} | label propagation only {lp_only:.4f}")

    curve: list[dict] = []

    def log(entry):
        acc = entry.accuracy["combined"]  # the model after this epoch, as predict gives it
        curve.append({"epoch": entry.epoch + 1, "reclip": acc, **entry.accuracy,
                      "agreement": entry.agreement})
        say(f"epoch {entry.epoch + 1:2d}: ReCLIP accuracy {acc:.4f}  pseudo-label accuracy "
            f"{entry.accuracy.get('pseudo_shared', float('nan')):.4f}  agreement {entry.agreement:.3f}")

    clf.fit(images, labels=labels, log=log)
    _, final, final_ece = scores(clf.logits(images), labels)
    say(f"ReCLIP accuracy {final:.4f} (zero-shot {zero_shot:.4f}, error reduced by "
        f"{(1 - (1 - final) / max(1 - zero_shot, 1e-12)):.1%}; label propagation only "
        f"{lp_only:.4f}, {final - lp_only:+.4f})")

    stats = similarity_stats(frozen, labels, clf.nodes_v.cpu())
    report = {"model": model, "target": target, "images": int(len(labels)),
              "zero_shot_accuracy": zero_shot, "label_propagation_accuracy": lp_only,
              "zero_shot_ece": zero_shot_ece, "reclip_accuracy": final,
              "reclip_ece": final_ece, "per_epoch": curve, "similarity": stats,
              "config": dataclasses.asdict(config)}
    if plots:
        after = clf.encode_images(images, side="visual").cpu()
        report["plots"] = _plots(out, frozen, after, clf.nodes_v.cpu(), clf.centres.cpu(), labels,
                                 stats, curve, zero_shot, lp_only)
    report["seconds"] = round(time.time() - start, 1)
    write_json(out / "report.json", report)
    say(f"wrote {out / 'report.json'}" + (f" and {', '.join(report['plots'])}" if plots else ""))
    return report
