#!/usr/bin/env python
"""The ReCLIP pipeline's throughput on a JPEG folder, against the model-time floor.

    python -P benchmarks/pipeline_bench.py --device cuda --model ViT-B-32 --n 50000 --amp bf16
    python -P benchmarks/pipeline_bench.py --device cpu --workers 2 \\
        --model benchmarks/assets/vit-s32-224.json --n 1024 --epochs 1
    python -P benchmarks/pipeline_bench.py --device cpu --workers 0 \\
        --model tests/assets/tiny-vit.json --n 64        # smoke run, seconds

Data: a synthetic ImageFolder of --n JPEGs, built once by a process pool and cached under --cache
(default $XDG_CACHE_HOME/reclip-bench); the model is built without weights (throughput does not
depend on them). Measured in one process, with the pipeline's own settings: the *pipeline*
(the folder scan, then ``ReCLIP.fit`` for --epochs with a checkpoint per epoch, timed per stage
by wrappers around the instance's methods), the *floor* (the same model, batches and autocast fed
from random tensors already on the device: no files, no decode, no loader, no host
synchronisation inside the loops) and the loader's own cost per image. The first batch or step
of every loop is warm-up and not counted. benchmarks/README.md ("pipeline_bench.py") explains
every column; the target is pipeline / floor >= 0.85 for encode and the V step.
"""
from __future__ import annotations

import argparse
import copy
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # python -P does not add the script's folder
    sys.path.insert(0, str(HERE))

from reclip.checkpoint import write_json  # noqa: E402  (stdlib only: the project's atomic writer)
from report import Clock, header, loadavg, log, passive_omp_waits, usable_cores  # noqa: E402

TARGET = 0.85  #: pipeline / floor, for encode and the V step


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (Config.device)")
    p.add_argument("--model", default="ViT-B-32",
                   help="open_clip architecture name or model-config JSON (random init)")
    p.add_argument("--n", type=int, default=1024, help="images in the JPEG folder")
    p.add_argument("--epochs", type=int, default=1, help="ReCLIP epochs (Config.max_epochs)")
    p.add_argument("--workers", type=int, default=None,
                   help="loader worker processes (Config.workers; default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch (Config.batch_size; default: the pipeline's, 64 here)")
    p.add_argument("--encode-batch-size", type=int, default=256,
                   help="images per encode forward pass (Config.encode_batch_size)")
    p.add_argument("--amp", default="auto", help="auto, bf16, fp16 or off (Config.amp)")
    p.add_argument("--classes", type=int, default=10, help="class folders (= classes adapted to)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--cache", type=Path, default=None, help="where JPEG folders are kept")
    p.add_argument("--build-workers", type=int, default=None,
                   help="processes building the JPEG folder (default: usable cores)")
    p.add_argument("--floor-batches", type=int, default=20,
                   help="timed batches / steps per floor loop, at most one pass's worth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all numbers here (atomically)")
    args = p.parse_args(argv)
    for name in ("n", "classes", "size", "encode_batch_size", "floor_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.n < 2 * args.classes:
        p.error("--n must be at least twice --classes")
    return args


# ------------------------------------------------------------------------------- JPEG folder


def cache_root(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reclip-bench"


def _write_jpegs(job: tuple[str, int, int, int, int, int]) -> int:
    """Write images first .. first + count - 1 under root (image i in class folder i mod
    classes); bytes written. Seeded per image: the content does not depend on the split."""
    import numpy as np
    from PIL import Image

    root, classes, first, count, size, quality = job
    written = 0
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        # a coarse random grid upsampled bicubically: smooth colour fields, plus mild noise so
        # that the files are about as large as photographs' at this size and decode alike
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.int16)
        noisy = smooth + rng.normal(0, 6, smooth.shape).astype(np.int16)
        path = os.path.join(root, f"class{i % classes:03d}", f"{i:07d}.jpg")
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=quality)
        written += os.path.getsize(path)
    return written


def jpeg_folder(args) -> tuple[Path, dict]:
    """The cached folder for (n, size, classes, quality), built now if missing. Built in a
    temporary sibling and renamed, so a cut build is never mistaken for a complete one."""
    root = cache_root(args.cache)
    final = root / f"jpeg-n{args.n}-s{args.size}-c{args.classes}-q{args.quality}"
    info: dict[str, Any] = {"path": str(final), "n": args.n, "size": args.size,
                            "classes": args.classes, "quality": args.quality}
    if final.is_dir():
        info.update(built=False, build_s=0.0)
        return final, info
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    procs = max(1, args.build_workers or usable_cores())
    t0 = time.perf_counter()
    try:
        for c in range(args.classes):
            (tmp / f"class{c:03d}").mkdir()
        chunk = 250
        jobs = [(str(tmp), args.classes, s, min(chunk, args.n - s), args.size, args.quality)
                for s in range(0, args.n, chunk)]
        # spawn: this process may have imported torch, whose threads a fork would not carry
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            total = sum(pool.imap_unordered(_write_jpegs, jobs))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info.update(built=True, build_s=time.perf_counter() - t0, build_processes=procs,
                mean_kb=total / args.n / 1e3)
    return final, info


# ------------------------------------------------------------------------------- timing


class TimedLoader:
    """A DataLoader as ReCLIP iterates it, timed. ``iter`` starts the underlying iterator at
    once (so the workers' prefetch starts when the pipeline's would) and records, per batch,
    the host time blocked in ``next`` (`waits`), and per pass the time from the moment the
    first batch has been processed (device synchronised) to the end of the pass, with the
    images after the first batch (`passes`: (seconds, images))."""

    def __init__(self, dl, clock: Clock) -> None:
        self.dl, self.clock = dl, clock
        self.waits: list[float] = []
        self.passes: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self.dl)

    def __getattr__(self, name: str):  # dataset, batch_sampler, ...: the loader's own
        return getattr(self.dl, name)

    def __iter__(self):
        return self._batches(iter(self.dl))

    def _batches(self, it):
        t0, images, i = None, 0, 0
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            self.waits.append(time.perf_counter() - t)
            if i == 1:  # the loop body has processed the first batch: warm-up ends here
                t0 = self.clock.now() - self.waits[-1]
            if i >= 1:
                images += len(batch[0])
            i += 1
            yield batch
        if t0 is not None:
            self.passes.append((self.clock.now() - t0, images))


def timed_method(obj, name: str, record: list, clock, *, sync_first: bool = False,
                 size_arg: int | None = None) -> None:
    """Replace `obj.name` on this instance by a wrapper that records (seconds, rows of
    argument `size_arg` or 0) per call, synchronised at the end (and at the start with
    `sync_first`, for calls that follow unsynchronised device work); same arguments, same
    result."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = clock.now() if sync_first else time.perf_counter()
        out = fn(*a, **kw)
        record.append((clock.now() - t0, len(a[size_arg]) if size_arg is not None else 0))
        return out

    setattr(obj, name, wrapper)


def rate(records: list[tuple[float, int]], skip: int = 1) -> float | None:
    """Rows per second over the records after the first `skip` (warm-up)."""
    rest = records[skip:]
    seconds = sum(s for s, _ in rest)
    return sum(r for _, r in rest) / seconds if rest and seconds > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


# ------------------------------------------------------------------------------- the floor


def measure_floor(torch, clf, loaded, args, clock: Clock) -> dict:
    """Raw loops of the same model, batches and autocast on in-memory device tensors. Takes
    from `clf` what defines the work, so that it cannot drift from the pipeline's: its config,
    autocast context and dtype, first-template prompts, and (reclip.trainable) which
    parameters train."""
    from torch import nn

    from reclip import trainable  # the pipeline's choice of trainable parameters

    c, dev = clf.config, clf.device
    model = copy.deepcopy(loaded.model).eval().to(dev)
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    enc_b = c.encode_batch_size
    train_b = c.batch_for(len(clf.classnames))
    timed_batches = max(1, min(args.floor_batches, math.ceil(args.n / enc_b) - 1))
    timed_steps = max(1, min(args.floor_batches, math.ceil(args.n / train_b) - 1))
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    autocast = clf.features.autocast  # the pipeline's autocast (Config.amp on Config.device)
    scaler_on = clf.features.amp == torch.float16
    out: dict[str, Any] = {"encode_batches": timed_batches, "steps": timed_steps}
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    # encode: forward into one float32 buffer, as Features.images fills its output
    x = torch.randn(enc_b, 3, size, size, generator=g).to(dev)
    with torch.no_grad():
        feats = None
        for i in range(timed_batches + 1):
            if i == 1:
                t0 = clock.now()
            with autocast():
                f = model.encode_image(x, normalize=True)
            if feats is None:
                feats = torch.empty(timed_batches * enc_b, f.shape[1], device=dev)
            feats[i % timed_batches * enc_b:][:len(f)] = f
        out["encode_img_s"] = timed_batches * enc_b / (clock.now() - t0)
    d = feats.shape[1]
    del feats, x

    def steps(loss_of, opt) -> float:
        scaler = torch.amp.GradScaler(dev.type) if scaler_on else None
        for i in range(timed_steps + 1):
            if i == 1:
                t0 = clock.now()
            opt.zero_grad(set_to_none=True)
            loss = loss_of()
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return timed_steps * train_b / (clock.now() - t0)

    centres = nn.functional.normalize(torch.randn(len(clf.classnames), d, generator=g), dim=1).to(dev)
    y = torch.randint(0, len(clf.classnames), (train_b,), generator=g).to(dev)
    xv = torch.randn(train_b, 3, size, size, generator=g).to(dev)

    def visual_loss():
        with autocast():
            f = model.encode_image(xv, normalize=True)
        logits = c.logit_scale * f.float() @ centres.T
        loss = nn.functional.cross_entropy(logits, y)
        return loss / len(xv) if c.visual_loss == "released" else loss

    out["v_step_img_s"] = steps(visual_loss, trainable.optimizer(
        trainable.tower_params(model, visual=True), c))
    xv = None

    tokens = loaded.tokenizer(clf.prompts(first_only=True)).to(dev)
    image_feats = nn.functional.normalize(torch.randn(train_b, d, generator=g), dim=1).to(dev)

    def text_loss():
        with autocast():
            text = model.encode_text(tokens, normalize=True)
        return clf.method.text_loss(image_feats, text.float(), y)

    out["t_step_img_s"] = steps(text_loss, trainable.optimizer(
        trainable.tower_params(model, visual=False), c))
    if clock.cuda:
        out["peak_device_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    model = None
    if clock.cuda:
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------- the pipeline


def measure_loader_cost(torch, data, samples: int) -> dict:
    """Decode + preprocess of one image in this process with one torch thread, which is what
    a DataLoader worker runs (it sets one thread per worker)."""
    from reclip.data import load_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths = data.paths[:samples]
        t0 = time.perf_counter()
        images = [load_image(p) for p in paths]
        t1 = time.perf_counter()
        for img in images:
            data.transform(img)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    return {"images": len(paths), "decode_ms": (t1 - t0) / len(paths) * 1e3,
            "preprocess_ms": (t2 - t1) / len(paths) * 1e3}


def measure_pipeline(torch, clf, data, args, clock: Clock, out_dir: Path) -> dict:
    """ReCLIP.fit as a user calls it, with per-stage timings. The smallest reach into the
    run: the methods features.loader (every DataLoader fit builds: wrapped in TimedLoader),
    method.pseudo (label propagation), method.step_text / method.step_visual (one optimiser
    step of each side) and save (the checkpoint) are replaced on these instances by timing
    wrappers that call the originals with the same arguments."""
    import recipes  # PeakMemory: the kernel's RSS high-water mark, reset here

    loaders: list[tuple[str, TimedLoader]] = []
    make_loader = clf.features.loader

    def loader(data_, batch_sampler=None):
        dl = TimedLoader(make_loader(data_, batch_sampler=batch_sampler), clock)
        loaders.append(("encode" if batch_sampler is None else "train", dl))
        return dl

    clf.features.loader = loader
    pseudo, text, visual, save = [], [], [], []
    timed_method(clf.method, "pseudo", pseudo, clock, sync_first=True)
    timed_method(clf.method, "step_text", text, clock, size_arg=0)
    timed_method(clf.method, "step_visual", visual, clock, size_arg=0)
    timed_method(clf, "save", save, clock)
    peak = recipes.PeakMemory()
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats(clf.device)
    t0 = clock.now()
    clf.fit(data, out_dir=out_dir)
    fit_s = clock.now() - t0
    res: dict[str, Any] = {"fit_s": fit_s, "epochs": clf.epoch, "iterations": clf.iterations,
                           "trained": sum(h.trained for h in clf.history),
                           "agreement": [h.agreement for h in clf.history]}
    passes = [p for kind, dl in loaders if kind == "encode" for p in dl.passes]
    res["encode_passes_img_s"] = [imgs / s for s, imgs in passes]
    res["encode_img_s"] = statistics.median(res["encode_passes_img_s"]) if passes else None
    res["pseudo_s"] = [s for s, _ in pseudo]
    res["pseudo_median_s"] = statistics.median(res["pseudo_s"]) if pseudo else None
    # the V side of the training loop: each batch's wait in the train loader + its step
    waits = [w for kind, dl in loaders if kind == "train" for w in dl.waits]
    if len(waits) == len(visual) and visual:
        v = [(s + w, r) for (s, r), w in zip(visual, waits)]
        res["v_step_img_s"] = rate(v)
        res["v_compute_img_s"] = rate(visual)
        res["v_wait_fraction"] = sum(waits[1:]) / sum(s for s, _ in v[1:]) if len(v) > 1 else None
    res["t_step_img_s"] = rate(text)
    res["v_steps"], res["t_steps"] = len(visual), len(text)
    res["checkpoint_s"] = [s for s, _ in save]
    res["checkpoint_bytes"] = sum(f.stat().st_size for f in out_dir.iterdir())
    res["peak_rss_mib"] = (peak.base + peak.peak()) / 2**20
    res["peak_rss_method"] = peak.method
    if clock.cuda:
        res["peak_device_mib"] = torch.cuda.max_memory_allocated(clf.device) / 2**20
    return res


# ------------------------------------------------------------------------------- report


def _fmt(v, spec=".4g") -> str:
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return ("-" if v is None else format(v, spec)).rjust(int(width or 0))


def print_report(r: dict) -> None:
    p, f, q, env = r["pipeline"], r["floor"], r["ratios"], r["environment"]
    folder, loader = r["folder"], r["loader_cost"]
    print(f"pipeline_bench: {r['config']['model']} on {env['device_name']} | amp "
          f"{env['amp']} | workers {env['workers']} | torch threads {env['torch_threads']} | "
          f"encode batch {env['encode_batch']}, train batch {env['train_batch']}")
    print(f"folder: {folder['n']} JPEGs {folder['size']} px, {folder['classes']} classes "
          f"({'built in ' + format(folder['build_s'], '.1f') + ' s' if folder['built'] else 'cached'})"
          f" {folder['path']}")
    print(f"scan {r['scan_s'] * 1e3:.1f} ms | per image in one worker: decode "
          f"{loader['decode_ms']:.2f} ms + preprocess {loader['preprocess_ms']:.2f} ms -> "
          f"{_fmt(loader['predicted_img_s'])} img/s with {env['workers']} worker(s)")
    rows = [("encode img/s", p["encode_img_s"], f["encode_img_s"], q["encode"]),
            ("ReCLIP-V step img/s", p.get("v_step_img_s"), f["v_step_img_s"], q["v_step"]),
            ("  V step alone img/s", p.get("v_compute_img_s"), f["v_step_img_s"],
             q["v_compute"]),
            ("ReCLIP-T step img/s", p["t_step_img_s"], f["t_step_img_s"], q["t_step"])]
    print(f"{'':22}{'pipeline':>11}{'floor':>11}{'ratio':>8}")
    for name, a, b, c in rows:
        mark = ""
        if c is not None and name.strip() in ("encode img/s", "ReCLIP-V step img/s"):
            mark = "  ok" if c >= TARGET else f"  < {TARGET}"
        print(f"{name:22}{_fmt(a, '11.4g')}{_fmt(b, '11.4g')}{_fmt(c, '8.3f')}{mark}")
    print(f"encode passes img/s: {', '.join(format(v, '.4g') for v in p['encode_passes_img_s'])}"
          f" | V loader wait {_fmt(p.get('v_wait_fraction'), '.1%')} of the V side")
    print(f"pseudo labels: {', '.join(format(s, '.3f') for s in p['pseudo_s'])} s | checkpoint "
          f"{', '.join(format(s, '.3f') for s in p['checkpoint_s'])} s "
          f"({p['checkpoint_bytes'] / 2**20:.1f} MiB) | fit {p['fit_s']:.2f} s, "
          f"{p['epochs']} epoch(s), {p['trained']} images trained")
    mem = f"peak RSS {p['peak_rss_mib']:.0f} MiB (this process)"
    if "peak_device_mib" in p:
        mem += (f" | peak device memory: pipeline {p['peak_device_mib']:.0f} MiB, floor "
                f"{f.get('peak_device_mib', 0):.0f} MiB")
    print(mem)


def environment(torch, clf, data) -> dict:
    import recipes  # the machine and the library versions, as every harness reports them

    dev = clf.device
    return {**recipes.environment(torch.get_num_threads(), dev.type), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"cpu ({usable_cores()} cores)",
            "amp": str(clf.features.amp).replace("torch.", "") if clf.features.amp else "off",
            "workers": clf.features.workers(data),
            "torch_threads": torch.get_num_threads(), "cores": usable_cores(),
            "encode_batch": clf.config.encode_batch_size,
            "train_batch": clf.config.batch_for(len(clf.classnames)),
            "loadavg": loadavg()}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cpu":
        passive_omp_waits()
    import torch

    import reclip
    from reclip.data import image_set

    folder, folder_info = jpeg_folder(args)
    log(f"pipeline_bench: folder {folder} ({'built' if folder_info['built'] else 'cached'})")
    loaded = reclip.load_model(args.model)
    config = reclip.Config(device=args.device, amp=args.amp, workers=args.workers,
                           batch_size=args.batch_size, encode_batch_size=args.encode_batch_size,
                           max_epochs=args.epochs, seed=args.seed)
    torch.manual_seed(args.seed)
    scans = []
    for _ in range(3):  # the first one may read the directories from disk
        t0 = time.perf_counter()
        data = image_set(str(folder), loaded.preprocess)
        scans.append(time.perf_counter() - t0)
    clf = reclip.ReCLIP(loaded, list(data.classes), config=config)
    clock = Clock(torch, clf.device)
    env = environment(torch, clf, data)
    log(f"pipeline_bench: {env['device_name']}, amp {env['amp']}, workers {env['workers']}")
    loader_cost = measure_loader_cost(torch, data, min(args.n, 128))
    per_image = (loader_cost["decode_ms"] + loader_cost["preprocess_ms"]) / 1e3
    loader_cost["predicted_img_s"] = max(1, env["workers"]) / per_image
    log("pipeline_bench: floor")
    floor = measure_floor(torch, clf, loaded, args, clock)
    log("pipeline_bench: pipeline (ReCLIP.fit)")
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as run_dir:
        pipeline = measure_pipeline(torch, clf, data, args, clock, Path(run_dir))
    ratios = {"encode": ratio(pipeline["encode_img_s"], floor["encode_img_s"]),
              "v_step": ratio(pipeline.get("v_step_img_s"), floor["v_step_img_s"]),
              "v_compute": ratio(pipeline.get("v_compute_img_s"), floor["v_step_img_s"]),
              "t_step": ratio(pipeline["t_step_img_s"], floor["t_step_img_s"])}
    report = {
        **header("pipeline_bench.py", argv, args),
        "environment": env, "folder": folder_info, "scan_s": statistics.median(scans),
        "scan_runs_s": scans, "loader_cost": loader_cost, "floor": floor,
        "pipeline": pipeline, "ratios": ratios, "target": TARGET,
        "meets_target": all(ratios[k] is not None and ratios[k] >= TARGET
                            for k in ("encode", "v_step")),
    }
    report["wall_s"] = time.perf_counter() - t_start
    print_report(report)
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
