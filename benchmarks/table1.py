"""The paper's Table 1 protocol for the shipped models on their real targets.

    python benchmarks/table1.py [--targets sklearn-digits,opencv-lowres,printed-digits]
                                [--seeds 0,1,2] [--epochs 4] [--paper-schedule]
                                [--shot-lrs 1e-6,1e-5,1e-4] [--out benchmarks/results/table1]
                                [--propagation-row] [--per-class N] [--protocols P,...]

Each target is adapted from the shipped model it belongs to (reclip.sources.TARGETS: the digit
targets from reclip-digits, the emoji targets from reclip-emoji), with that model's class names
and prompts. ``--propagation-row`` adds ReCLIP with ``pseudo_labels="propagation"`` on targets
above ``Config.many_classes`` classes, where the paper's rule takes the model's predictions.
``--per-class N`` keeps the first N images of each class (fewer renders of an emoji target);
``--shot-only`` leaves ReCLIP out (its text step costs m prompts' gradients per step).

Rows: CLIP zero-shot, SHOT and ReCLIP, each at its final epoch and at its peak epoch; SHOT at
the paper's learning rate (1e-6) and, as a sensitivity row, at the other rates of --shot-lrs.
Columns: transductive (adapt on every image of the target, score the same images) and
inductive (adapt on the train side of the target's fixed split, reclip.sources.target_split,
score its disjoint test side). Each cell is the mean +- std over the seeds, with the expected
calibration error (15 bins) of the softmax beside it.

- The seed changes the training order (and SHOT's and ReCLIP's every random draw); the split
  and the images stay the same, so the spread is that of the adaptation alone.
- "Peak" is the best of the models after epochs 1..E, chosen with the target's labels: an
  oracle figure, as in the paper, that no user without labels can reproduce. "Final" is the
  model after epoch E, the one a run saves.
- The default schedule is --epochs 4 (min(5000 iterations, 4 epochs)) so that the whole table
  (3 targets x 3 seeds x 2 protocols x 4 runs) fits in 40 minutes on two cores;
  --paper-schedule runs the paper's min(5000 iterations, 50 epochs).

Writes OUT.json (every run's per-epoch curve, timings, settings) and OUT.md (the table).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time

from offline import ROOT  # before numpy, torch and reclip: it sets their environment

import numpy as np
import torch

import reclip  # noqa: E402
from reclip import sources  # noqa: E402
from reclip.adapt import scores  # noqa: E402
from reclip.checkpoint import write_json, write_text  # noqa: E402
from reclip.data import image_set  # noqa: E402
from reclip.demo import preprocessed  # noqa: E402

PROTOCOLS = ("transductive", "inductive")
PAPER_SHOT_LR = 1e-6


def score(logits: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    _, acc, ece = scores(logits, labels)
    return {"accuracy": acc, "ece": ece}


def run(loaded, target: sources.Target, train, test, labels: np.ndarray,
        config: reclip.Config) -> dict:
    """Adapt on `train`, scoring the model on `test` after every epoch."""
    torch.manual_seed(config.seed)
    clf = reclip.ReCLIP(loaded, target.classnames(), list(target.templates), config)
    curve: list[dict] = []
    start = time.time()
    clf.fit(train, log=lambda entry: curve.append(
        {"epoch": entry.epoch + 1, **score(clf.logits(test), labels)}))
    if not curve:  # no epoch ran (--epochs 0): the zero-shot model is the final one
        curve.append({"epoch": 0, **score(clf.logits(test), labels)})
    peak = max(curve, key=lambda c: c["accuracy"])  # the first of equal accuracies
    return {"final": curve[-1], "peak": peak, "curve": curve,
            "seconds": round(time.time() - start, 1)}


def methods(args, classes: int) -> list[tuple[str, dict]]:
    rows = []
    if not args.shot_only:
        rows.append(("ReCLIP", {}))
        if args.propagation_row and classes > reclip.Config.many_classes:
            rows.append(("ReCLIP, propagation", {"pseudo_labels": "propagation"}))
    for lr in args.shot_lrs:
        rows.append((f"SHOT lr {lr:g}", {"method": "shot", "lr": lr}))
    return rows


def evaluate_target(name: str, args, say) -> dict:
    target = sources.target(name)
    loaded = reclip.load_model(target.model)
    raw, labels = target.load()
    if args.per_class:
        keep = np.concatenate([np.flatnonzero(labels == c)[:args.per_class]
                               for c in np.unique(labels)])
        raw, labels = raw[np.sort(keep)], labels[np.sort(keep)]
    classes = len(target.classnames())
    images = preprocessed(raw, loaded)
    train_idx, test_idx = sources.target_split(labels)
    everything = image_set(images)  # one set: the frozen tower's features serve fit and scoring
    sets = {"transductive": (everything, everything, labels),
            "inductive": (image_set(images[train_idx]), image_set(images[test_idx]),
                          labels[test_idx])}
    out: dict = {"model": target.model, "classes": classes, "images": int(len(labels)),
                 "train": int(len(train_idx)),
                 "test": int(len(test_idx)), "runs": {}}
    for protocol in args.protocols:
        train, test, truth = sets[protocol]
        zs = reclip.ReCLIP(loaded, target.classnames(), list(target.templates),
                           reclip.Config(max_epochs=0))
        out.setdefault("zero_shot", {})[protocol] = score(zs.zero_shot_logits(test), truth)
        for method, overrides in methods(args, classes):
            for seed in args.seeds:
                config = reclip.Config(max_epochs=args.epochs, max_iterations=args.iterations,
                                       seed=seed, workers=0, **overrides)
                r = run(loaded, target, train, test, truth, config)
                out["runs"].setdefault(protocol, {}).setdefault(method, {})[str(seed)] = r
                say(f"  {name} {protocol:12s} {method:14s} seed {seed}: final "
                    f"{r['final']['accuracy']:.4f} peak {r['peak']['accuracy']:.4f} "
                    f"(epoch {r['peak']['epoch']}) {r['seconds']:.0f} s")
    out["config"] = {m: dataclasses.asdict(reclip.Config(max_epochs=args.epochs,
                                                         max_iterations=args.iterations, **o))
                     for m, o in methods(args, classes)}
    return out


def cell(values: list[dict]) -> str:
    acc = np.array([v["accuracy"] for v in values]) * 100
    ece = np.array([v["ece"] for v in values]) * 100
    return f"{acc.mean():.1f} ± {acc.std():.1f} (ECE {ece.mean():.1f} ± {ece.std():.1f})"


def table(results: dict, args) -> str:
    lines = []
    for name, r in results.items():
        split = (f"; inductive: {r['train']} train / {r['test']} test"
                 if "inductive" in args.protocols else "")
        lines += [f"### {name} ({r['images']} images, {r['classes']} classes, "
                  f"{r['model']}{split})", "",
                  "| method | " + " | ".join(args.protocols) + " |",
                  "|---" * (1 + len(args.protocols)) + "|"]
        lines.append("| CLIP zero-shot | " + " | ".join(
            cell([r["zero_shot"][p]]) for p in args.protocols) + " |")
        for method, _ in methods(args, r["classes"]):
            label = method if method.startswith("ReCLIP") else (
                "SHOT" if float(method.split()[-1]) == PAPER_SHOT_LR
                else f"SHOT, lr {method.split()[-1]} (sensitivity)")
            for when in ("final", "peak"):
                runs = [[run[when] for run in r["runs"][p][method].values()]
                        for p in args.protocols]
                lines.append(f"| {label}, {when} epoch{' (uses labels)' if when == 'peak' else ''}"
                             f" | " + " | ".join(cell(v) for v in runs) + " |")
        lines.append("")
    lines.append(f"Accuracy and ECE in %, mean ± std over seeds {', '.join(map(str, args.seeds))}; "
                 f"min({args.iterations} iterations, {args.epochs} epochs) per run. "
                 "Peak: the best epoch by the target's labels (oracle).")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="sklearn-digits,opencv-lowres,printed-digits",
                   help=f"comma-separated, of {', '.join(sources.TARGETS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=5000)
    p.add_argument("--paper-schedule", action="store_true",
                   help="min(5000 iterations, 50 epochs), as in the paper")
    p.add_argument("--shot-lrs", default="1e-6,1e-5,1e-4",
                   help="SHOT learning rates; 1e-6 is the paper's, the others a sensitivity row")
    p.add_argument("--propagation-row", action="store_true",
                   help="ReCLIP with label propagation too, on targets above 500 classes")
    p.add_argument("--shot-only", action="store_true",
                   help="zero-shot and SHOT rows only (ReCLIP's text step is the costly part "
                        "at many classes)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help="comma-separated columns: transductive, inductive or both")
    p.add_argument("--per-class", type=int, default=0,
                   help="keep the first N images of each class (0: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        f"table1-{datetime.date.today().isoformat()}"),
                   help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: expected integers separated by commas, got {args.seeds!r}")
    try:
        args.shot_lrs = [float(s) for s in args.shot_lrs.split(",") if s]
    except ValueError:
        p.error(f"--shot-lrs: expected numbers separated by commas, got {args.shot_lrs!r}")
    if not all(0 < lr < float("inf") for lr in args.shot_lrs):
        p.error(f"--shot-lrs: learning rates must be positive and finite, got {args.shot_lrs}")
    if args.epochs < 0 or args.iterations < 1 or args.per_class < 0:
        p.error("--epochs and --per-class must be at least 0 and --iterations at least 1")
    args.protocols = args.protocols.split(",")
    if not args.protocols or not set(args.protocols) <= set(PROTOCOLS):
        p.error(f"--protocols: expected some of {', '.join(PROTOCOLS)}, got {args.protocols}")
    if args.paper_schedule:
        args.epochs, args.iterations = 50, 5000
    targets = args.targets.split(",")
    for name in targets:
        if name not in sources.TARGETS:
            p.error(f"--targets: unknown target {name!r}; choose from {', '.join(sources.TARGETS)}")

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    start = time.time()
    results = {}
    for name in targets:
        say(f"== {name}")
        results[name] = evaluate_target(name, args, say)
    text = table(results, args)
    print(text)
    seconds = round(time.time() - start, 1)
    write_json(f"{args.out}.json", {"epochs": args.epochs, "iterations": args.iterations,
                                    "seeds": args.seeds, "shot_lrs": args.shot_lrs,
                                    "threads": torch.get_num_threads(), "seconds": seconds,
                                    "targets": results})
    write_text(f"{args.out}.md", f"{text}\n\nWhole table: {seconds / 60:.1f} min on "
                                 f"{torch.get_num_threads()} threads.\n")
    say(f"wrote {args.out}.json and {args.out}.md ({seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
