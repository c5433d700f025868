"""What a real adaptation costs at the paper's scale: the stages of ``reclip-emoji`` on an emoji
target at m = 1066 classes and n up to 106,600 images (100 renders per class), on this machine.

    python benchmarks/emoji_scale.py [--design symbola] [--points 1066x10,1066x30,1066x100,100x320]
                                     [--steps 3] [--out benchmarks/results/emoji-scale-DATE]
                                     [--cli WORK]

Each point ``MxR`` (M classes: the 100-class subset or all 1066; R renders per class) runs in a
fresh process, so that its peak resident memory is its own. A point times each stage of a
ReCLIP epoch through the public API, on in-memory renders:

- ``render``: the seeded jittered renders (the benchmark's data, not part of a run);
- ``preprocess``: the model's own eval transform of every image;
- ``encode``: one pass of the visual tower over every image (the frozen pass; each epoch
  re-encodes once more for the V side);
- ``class nodes`` and ``projection``: the prompts of every class encoded, and P2's basis;
- ``propagation`` and ``prediction``: both ways of making pseudo labels (the paper's rule takes
  predictions above 500 classes), each with the accuracy of its labels (scored with the target
  labels, which choose nothing);
- ``T step`` and ``V step``: seconds per optimiser step of each side, measured on ``--steps``
  steps of a one-sided run on the first images; an epoch has ceil(n / batch) steps when the
  two sides agree on every label, so the per-epoch figures are that many steps (extrapolated,
  and marked so).

With ``--cli WORK`` a point is ``reclip adapt`` itself, on the renders written as an image
folder under WORK (kept for the next run): one epoch capped at ``--steps`` iterations, timed
by the run's own report.json (encode passes, pseudo labels, each side's steps), with the run's
wall seconds and the peak RSS of it and its loader workers.

Growth exponents are least-squares slopes of log(seconds) against log(n) over the 1066-class
points, and the ratio between the two 32k-image points for m.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import resource
import shutil
import subprocess
import sys
import time

from offline import ROOT  # before numpy, torch and reclip: it sets their environment

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import reclip  # noqa: E402
from reclip import emoji, models, projection, sources  # noqa: E402
from reclip.checkpoint import write_json, write_text  # noqa: E402
from reclip.demo import preprocessed  # noqa: E402
from reclip.pseudo_labels import pseudo_labels  # noqa: E402

STAGES = ("render", "preprocess", "encode", "class nodes", "projection", "propagation",
          "prediction")


def clock(times: dict, name: str, fn):
    start = time.perf_counter()
    out = fn()
    times[name] = round(time.perf_counter() - start, 3)
    return out


def step_seconds(loaded, names, images: torch.Tensor, labels: np.ndarray, side: str,
                 steps: int) -> float:
    """Seconds per optimiser step of one side, from a one-epoch run of exactly `steps` steps."""
    config = reclip.Config(sides=side, max_epochs=1, max_iterations=steps, workers=0)
    batch = config.batch_for(len(names))
    clf = reclip.ReCLIP(loaded, names, list(sources.EMOJI_TEMPLATES), config)
    n = batch * steps
    before = clf.world.work["train_seconds"]  # the process's clock, shared by every run in it
    clf.fit(images[:n], labels=labels[:n])
    return (clf.world.work["train_seconds"] - before) / steps


def class_set(m: int) -> tuple[list[int], list[str]]:
    """The emoji codes and class names of m classes: all 1066, or the 100-class subset."""
    codes = emoji.classes() if m == len(emoji.classes()) else emoji.small_classes()
    if len(codes) != m:
        raise SystemExit(f"--points: {m} classes: only {len(emoji.small_classes())} (the "
                         f"subset) or {len(emoji.classes())}")
    return codes, emoji.class_names(codes)


def growth_line(grow: dict) -> list[str]:
    """The growth exponents that could be fitted, as a line after a blank one (none: nothing)."""
    grown = ", ".join(f"{k} {v:.2f}" for k, v in grow.items() if v is not None)
    if not grown:
        return []
    return ["", f"Growth with n at m = 1066 (slope of log seconds on log n): {grown}."]


def one_point(design: str, m: int, renders: int, steps: int) -> dict:
    codes, names = class_set(m)
    times: dict = {}
    images, labels = clock(times, "render", lambda: emoji.render(design, codes, renders, seed=0))
    loaded = models.load_model("reclip-emoji")
    x = clock(times, "preprocess", lambda: preprocessed(images, loaded))
    images = None  # the uint8 renders are not needed past here
    feats = clock(times, "encode", lambda: models.encode_images(loaded, x))
    clf = clock(times, "class nodes", lambda: reclip.ReCLIP(
        loaded, names, list(sources.EMOJI_TEMPLATES), reclip.Config(max_epochs=0)))
    nodes = clf.nodes_v
    u = clock(times, "projection", lambda: projection.basis(nodes, "P2"))
    accuracy = {}
    for method in ("propagation", "prediction"):
        pl = clock(times, method, lambda: pseudo_labels(feats, nodes, u, method=method))
        accuracy[method] = float((pl == labels).mean())
    config = reclip.Config()
    batch = config.batch_for(m)
    per_step = {side: step_seconds(loaded, names, x, labels, side, steps)
                for side in ("text", "visual")}
    epoch_steps = math.ceil(len(labels) / batch)
    return {"design": design, "classes": m, "renders": renders, "images": int(len(labels)),
            "batch": batch, "seconds": times,
            "step_seconds": {"T": round(per_step["text"], 3), "V": round(per_step["visual"], 3)},
            "epoch_seconds_extrapolated": {"T": round(per_step["text"] * epoch_steps, 1),
                                           "V": round(per_step["visual"] * epoch_steps, 1),
                                           "steps": epoch_steps},
            "pseudo_label_accuracy": accuracy,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads()}


def cli_point(design: str, m: int, renders: int, steps: int, work: Path) -> dict:
    """`reclip adapt` itself on a folder of the renders (one epoch capped at `steps`
    iterations: a whole epoch of ReCLIP-T at 1066 classes takes hours on a CPU): its wall
    seconds, its report's stages and the peak RSS of the run and its loader workers."""
    codes, names = class_set(m)
    folder = work / f"{design}-{m}x{renders}"
    if not (folder / "done").exists():  # written once: the images are the same every time
        images, labels = emoji.render(design, codes, renders, seed=0)
        for c, name in enumerate(names):
            (folder / "data" / name).mkdir(parents=True, exist_ok=True)
        for i, (image, c) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(folder / "data" / names[c] / f"{i:06d}.png")
        (folder / "classes.txt").write_text("\n".join(names) + "\n")
        (folder / "templates.txt").write_text("\n".join(sources.EMOJI_TEMPLATES) + "\n")
        (folder / "done").touch()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "reclip", "adapt", "--model", "reclip-emoji",
                    "--data", "data", "--classes", "classes.txt", "--templates", "templates.txt",
                    "--out", "run", "--epochs", "1", "--iterations", str(steps), "--seed", "0",
                    "--device", "cpu", "--quiet"], cwd=folder, check=True)
    wall = time.perf_counter() - start
    report = json.loads((folder / "run" / "report.json").read_text())
    shutil.rmtree(folder / "run")
    return {"design": design, "classes": m, "renders": renders, "images": report["images"],
            "batch": report["config"]["batch_size"] or reclip.Config().batch_for(m),
            "wall_seconds": round(wall, 1), "stages": report["stages"],
            "zero_shot_accuracy": report["zero_shot_accuracy"],
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def cli_table(points: list[dict]) -> str:
    lines = ["| m | n | wall | encode passes | encode | per pass | pseudo labels | T step | "
             "V step | T epoch* | V epoch* | peak RSS |", "|---" * 12 + "|"]
    for p in points:
        s = p["stages"]
        passes = s["encode_images"] / p["images"]
        t, v = (s[f"{k}_step_seconds"] / max(1, s[f"{k}_steps"]) for k in ("text", "visual"))
        steps = math.ceil(p["images"] / p["batch"])
        lines.append(f"| {p['classes']} | {p['images']} | {p['wall_seconds']:.0f} | {passes:g} | "
                     f"{s['encode_seconds']:.0f} | {s['encode_seconds'] / passes:.0f} | "
                     f"{s['pseudo_label_seconds']:.2f} | {t:.2f} | {v:.3f} | {t * steps:.0f} | "
                     f"{v * steps:.0f} | {p['peak_rss_mib'] / 1024:.2f} GiB |")
    many = sorted((p for p in points if p["classes"] == 1066), key=lambda p: p["images"])
    n = [p["images"] for p in many]
    grow = {"encode": slope(n, [p["stages"]["encode_seconds"] for p in many]),
            "pseudo labels": slope(n, [p["stages"]["pseudo_label_seconds"] for p in many]),
            "peak RSS": slope(n, [p["peak_rss_mib"] for p in many])}
    lines += growth_line(grow)
    lines.append("* per epoch: seconds per step times ceil(n / batch) steps, extrapolated, "
                 "not run.")
    return "\n".join(lines)


def slope(xs, ys) -> float | None:
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys) if a > 0 and b > 0]
    if len(pts) < 2:
        return None
    lx, ly = np.array(pts).T
    return float(np.polyfit(lx, ly, 1)[0])


def table(points: list[dict]) -> str:
    cols = [*STAGES, "T step", "V step", "T epoch*", "V epoch*"]
    lines = ["| m | n | " + " | ".join(cols) + " | peak RSS | pseudo-label accuracy "
             "(propagation / prediction) |", "|---" * (len(cols) + 4) + "|"]
    for p in points:
        s, e, st = p["seconds"], p["epoch_seconds_extrapolated"], p["step_seconds"]
        row = [f"{s[k]:.2f}" for k in STAGES] + [f"{st['T']:.2f}", f"{st['V']:.3f}",
                                                f"{e['T']:.0f}", f"{e['V']:.0f}"]
        acc = p["pseudo_label_accuracy"]
        lines.append(f"| {p['classes']} | {p['images']} | " + " | ".join(row) +
                     f" | {p['peak_rss_mib'] / 1024:.2f} GiB | {acc['propagation']:.3f} / "
                     f"{acc['prediction']:.3f} |")
    many = sorted((p for p in points if p["classes"] == 1066), key=lambda p: p["images"])
    grow = {k: slope([p["images"] for p in many], [p["seconds"][k] for p in many])
            for k in ("preprocess", "encode", "propagation", "prediction")}
    grow["peak RSS"] = slope([p["images"] for p in many], [p["peak_rss_mib"] for p in many])
    lines += growth_line(grow)
    pair = {p["classes"]: p for p in points if 30000 <= p["images"] <= 33000}
    if {100, 1066} <= pair.keys():
        a, b = pair[100], pair[1066]
        ratio = {k: slope([100, 1066], [a["seconds"][k], b["seconds"][k]])
                 for k in ("class nodes", "projection", "propagation", "prediction")}
        ratio["T step"] = slope([100, 1066], [a["step_seconds"]["T"], b["step_seconds"]["T"]])
        lines.append("Growth with m at n = 32k (100 to 1066 classes): " + ", ".join(
            f"{k} {v:.2f}" for k, v in ratio.items() if v is not None) + ".")
    lines.append("* per epoch: per-step seconds times ceil(n / batch) steps (every label shared; "
                 "label sharing trains fewer), extrapolated, not run.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--design", default="symbola", choices=("symbola", "emojione"))
    p.add_argument("--points", default="1066x10,1066x30,1066x100,100x320")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cli", metavar="WORK",
                   help="time `reclip adapt` itself on image folders written under WORK "
                        "(--steps iterations of one epoch) instead of the stages in-process")
    p.add_argument("--one", help=argparse.SUPPRESS)  # MxR: run one point here, print its JSON
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        f"emoji-scale-{datetime.date.today().isoformat()}"))
    args = p.parse_args(argv)
    for point in args.points.split(","):  # here, not in each point's process
        m, _, r = point.partition("x")
        if not (m.isdigit() and r.isdigit() and int(m) in (100, 1066) and int(r) >= 1):
            p.error(f"--points: expected MxR with M = 100 or 1066 classes and R >= 1 renders, "
                    f"got {point!r}")
    if args.steps < 1:
        p.error(f"--steps: at least 1, got {args.steps}")
    if args.one:
        m, r = map(int, args.one.split("x"))
        point = (cli_point(args.design, m, r, args.steps, Path(args.cli)) if args.cli
                 else one_point(args.design, m, r, args.steps))
        print(json.dumps(point))
        return 0
    points = []
    for point in args.points.split(","):
        print(f"== {point}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--one", point, "--design", args.design,
                               "--steps", str(args.steps),
                               *(["--cli", str(Path(args.cli).resolve())] if args.cli else [])],
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        points.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(points[-1]), file=sys.stderr, flush=True)
    text = cli_table(points) if args.cli else table(points)
    print(text)
    write_json(f"{args.out}.json", {"points": points, "torch": torch.__version__})
    write_text(f"{args.out}.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
