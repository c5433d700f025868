#!/usr/bin/env python
"""Side-by-side benchmark of reclip_ext against the usual label-propagation recipes.

    python benchmarks/compare.py                       # small demo (~30 s on 2 cores)
    python benchmarks/compare.py --n 50000 --m 100 --d 768 --project --repeat 3 --json out.json
    python benchmarks/compare.py --load 2                  # the same, beside 2 busy processes

Seeded synthetic CLIP-like embeddings (synthetic.py), optionally ReCLIP's P2 projection
(--project: reclip_ext gets the exact r = m - 1 coordinates), then every recipe of recipes.py on
the same data, each in a fresh 'spawn' child process with the same thread count; per-stage times,
peak RSS, ratios and label agreement as benchmarks/README.md ("compare.py") describes.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # python -P does not add the script's folder
    sys.path.insert(0, str(HERE))

from report import (fmt_ratio, fmt_time, header, loadavg, log, set_thread_env,  # noqa: E402
                    usable_cores)

ALL_RECIPES = ("reclip_ext", "scipy-ref", "scipy-batched", "torch-dense-chunked", "sgemm-floor")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="images")
    ap.add_argument("--m", type=int, default=20, help="classes")
    ap.add_argument("--d", type=int, default=384, help="embedding dimension")
    ap.add_argument("--k", type=int, default=20, help="neighbours per node")
    ap.add_argument("--alpha", type=float, default=0.99)
    ap.add_argument("--max-iter", type=int, default=20, help="CG iterations")
    ap.add_argument("--tol", type=float, default=1e-6, help="CG relative residual")
    ap.add_argument("--project", action="store_true",
                    help="apply ReCLIP's P2 projection first (reclip_ext gets r = m-1 coords)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per recipe (median)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed runs first, in each process that runs a recipe")
    ap.add_argument("--interleave", action="store_true",
                    help="run the --repeat rounds round-robin over the recipes, each run in a "
                    "fresh process (fairer when the machine's load changes during the run)")
    ap.add_argument("--recipes", default=",".join(ALL_RECIPES),
                    help="comma-separated subset of: " + ", ".join(ALL_RECIPES))
    ap.add_argument("--threads", type=int, default=None, help="threads for every recipe "
                    "(default: all usable cores)")
    ap.add_argument("--load", type=int, default=0, help="busy-loop processes to run in the "
                    "background while the recipes are measured (timings under a fixed load)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=2048,
                    help="rows per dense similarity chunk (torch recipe, sgemm floor)")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--in-process", action="store_true",
                    help="run recipes in this process (faster, less faithful peak memory)")
    ap.add_argument("--min-agreement", type=float, default=None,
                    help="exit with status 2 if a recipe agrees with reclip_ext on a smaller "
                    "fraction of images (e.g. 0.999)")
    args = ap.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(args.recipes) - set(ALL_RECIPES))
    if unknown:
        ap.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(ALL_RECIPES)}")
    if args.n < 1 or args.m < 2 or args.d < 1:
        ap.error("need --n >= 1, --m >= 2, --d >= 1")
    if not 1 <= args.k < args.n + args.m:
        ap.error(f"--k must be in [1, n + m - 1 = {args.n + args.m - 1}]")
    if args.repeat < 1 or args.warmup < 0:
        ap.error("need --repeat >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.load < 0:
        ap.error("--load must be >= 0")
    return args


# Spins, but looks up its parent every few milliseconds and exits once the parent is gone, so
# a benchmark that is killed outright does not leave it running.
_BUSY_LOOP = ("import os\nparent = os.getppid()\n"
              "while os.getppid() == parent:\n    for _ in range(100_000): pass\n")


@contextlib.contextmanager
def busy_load(count: int):
    """`count` busy-loop processes for the duration of the block (their Popen objects); they
    are stopped when it ends, also when it raises."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP],
                                          stdin=subprocess.DEVNULL))
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _run_job(job: dict, params, args, isolate: bool, repeat: int) -> dict:
    import recipes

    t0 = time.perf_counter()
    try:
        if isolate:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                out = pool.submit(recipes.child_run, job["recipe"], job["inputs"], params,
                                  repeat, args.warmup).result()
        else:
            import numpy as np

            text, images = (np.load(job["inputs"][key]) for key in ("text", "images"))
            out = recipes.measure(job["recipe"], text, images, params, repeat=repeat,
                                  warmup=args.warmup)
    except Exception as err:  # a failed (or killed) recipe is reported, the others still run
        out = {"recipe": job["recipe"], "error": f"{type(err).__name__}: {err}",
               "dim": job["dim"]}
    out["wall_s"] = time.perf_counter() - t0
    return out


def _merge(outs: list[dict]) -> dict:
    """One record from the rounds of --interleave: medians over all runs, the largest peak."""
    import numpy as np

    failed = [o for o in outs if "error" in o]
    if failed:
        return failed[0]
    merged = dict(outs[-1])
    runs = [run for o in outs for run in o["runs"]]
    merged["runs"] = runs
    merged["times"] = {s: float(np.median([r[s] for r in runs])) for s in runs[0]}
    merged["peak_rss"] = max(o["peak_rss"] for o in outs)
    merged["wall_s"] = sum(o["wall_s"] for o in outs)
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or usable_cores()
    set_thread_env(threads)  # before numpy/BLAS load here and in every child (they inherit it)

    import numpy as np

    import recipes
    import synthetic

    recipes.configure_threads(threads)
    env = recipes.environment(threads)
    env["loadavg_start"] = loadavg()
    n, m, d = args.n, args.m, args.d
    n_nodes = n + m

    t0 = time.perf_counter()
    data = synthetic.clip_like(n, m, d, seed=args.seed)
    log(f"data: {n} images, {m} classes, d={d} in {time.perf_counter() - t0:.1f} s")
    info: dict = {"zero_shot_accuracy": float(np.mean(synthetic.zero_shot(data.text, data.images)
                                                     == data.labels))}
    inputs = {"base": (data.text, data.images), "reduced": (data.text, data.images)}
    if args.project:
        t0 = time.perf_counter()
        proj = synthetic.p2_projection(data.text, data.images)
        info["projection_s"] = time.perf_counter() - t0
        info["r"] = int(proj.basis.shape[1])
        info["projection_max_cos_diff"] = synthetic.projection_check(proj, seed=args.seed)
        info["zero_shot_accuracy_projected"] = float(
            np.mean(synthetic.zero_shot(proj.text, proj.images) == data.labels))
        inputs = {"base": (proj.text, proj.images), "reduced": (proj.text_r, proj.images_r)}

    params = recipes.Params(k=args.k, alpha=args.alpha, max_iter=args.max_iter, tol=args.tol,
                            threads=threads, chunk=args.chunk)
    # The background load (--load) lasts from the inputs' files to the last recipe's run.
    with tempfile.TemporaryDirectory(prefix="reclip-bench-") as tmp, busy_load(args.load):
        files, dims = {}, {tag: int(text.shape[1]) for tag, (text, _) in inputs.items()}
        for tag, pair in inputs.items():
            files[tag] = {key: os.path.join(tmp, f"{tag}_{key}.npy") for key in ("text", "images")}
            for key, rows in zip(("text", "images"), pair):
                np.save(files[tag][key], np.ascontiguousarray(rows))
        tag_of = {name: "reduced" if cls.reduced_input else "base"  # reclip_ext gets r dims
                  for name, cls in recipes.RECIPE_CLASSES.items()}
        jobs = [{"key": name, "recipe": name, "inputs": files[tag_of[name]],
                 "dim": dims[tag_of[name]]} for name in args.recipes if name != "sgemm-floor"]
        if "sgemm-floor" in args.recipes:  # a floor at each dimension a recipe gets
            wanted = {job["dim"] for job in jobs} or {dims["base"]}
            for tag in ("reduced", "base"):
                if dims[tag] in wanted:
                    wanted.discard(dims[tag])
                    jobs.append({"key": f"sgemm-floor@{dims[tag]}", "recipe": "sgemm-floor",
                                 "inputs": files[tag], "dim": dims[tag]})
        rounds, per_run = (args.repeat, 1) if args.interleave else (1, args.repeat)
        outs: dict[str, list] = {job["key"]: [] for job in jobs}
        for rnd in range(rounds):
            for job in jobs:
                if outs[job["key"]] and "error" in outs[job["key"]][-1]:
                    continue
                tag = f" round {rnd + 1}/{rounds}" if rounds > 1 else ""
                log(f"running {job['key']} (dim {job['dim']}){tag} ...")
                out = _run_job(job, params, args, not args.in_process, per_run)
                outs[job["key"]].append(out)
                times = out.get("times", {})
                status = out.get("error") or f"{times.get('total', times.get('knn')):.3f} s"
                log(f"  {job['key']}: {status} (wall {out['wall_s']:.1f} s)")
        results = {key: _merge(o) for key, o in outs.items()}

    env["loadavg_end"] = loadavg()

    # Ratios, agreement, accuracy
    ref = results.get("reclip_ext")
    ref_ok = ref is not None and "error" not in ref
    ref_labels = np.asarray(ref["labels"]) if ref_ok else None
    floors = {r["dim"]: r["times"]["knn"] for k, r in results.items()
              if k.startswith("sgemm-floor") and "error" not in r}
    for key, r in results.items():
        if "error" in r:
            continue
        times = r["times"]
        if "total" in times and ref_ok:
            r["total_vs_reclip_ext"] = times["total"] / ref["times"]["total"]
        if not key.startswith("sgemm-floor") and r["dim"] in floors:
            r["knn_vs_floor"] = times["knn"] / floors[r["dim"]]
        labels = r.pop("labels", None)
        if labels is not None:
            labels = np.asarray(labels)
            r["accuracy"] = float(np.mean(labels == data.labels))
            if ref_ok:
                r["agreement"] = float(np.mean(labels == ref_labels))

    # Report
    nxn = 4 * n_nodes * n_nodes
    proj_text = (f", P2 projection (baselines d={d}, reclip_ext r={info['r']})"
                 if args.project else "")
    print(f"reclip label propagation: n={n} images, m={m} classes, d={d}, N={n_nodes} nodes, "
          f"k={args.k}, alpha={args.alpha}, CG {args.max_iter} it / tol {args.tol:g}{proj_text}")
    plural = "s" if threads != 1 else ""
    print(f"{env['cpu']}, {threads} thread{plural}"
          f"{f', --load {args.load} (busy-loop processes beside it)' if args.load else ''}"
          f" | reclip_ext {env.get('reclip_ext')} "
          f"(simd {env.get('simd_level')}) | numpy {env['numpy']}, scipy {env.get('scipy')}, "
          f"faiss {env.get('faiss')}, torch {env.get('torch')} | median of {args.repeat}"
          f"{', ' + str(args.warmup) + ' warm-up' if args.warmup else ''}"
          f"{', in-process' if args.in_process else ', one spawn process per recipe'}"
          f"{' per run, interleaved' if args.interleave and not args.in_process else ''}")
    load = env["loadavg_start"]
    if load is not None:
        busy = load[0] >= 0.5 * usable_cores()
        print(f"load average at start {load[0]:.2f} (1 min) on {usable_cores()} cores"
              + (": the machine is busy, timings may be noisy (try --repeat 3 --interleave)"
                 if busy else ""))
    if args.project:
        print(f"P2 check: max |cos(projected d-dim) - cos(r-dim coords)| over "
              f"{min(2000, n_nodes)} rows = {info['projection_max_cos_diff']:.2e}")
    print(f"N x N float32 would be {nxn / 2**20:,.1f} MiB ({nxn / 1e9:.2f} GB) — compare peak "
          f"memory against it")
    print(f"zero-shot accuracy {info['zero_shot_accuracy']:.4f}" + (
        f" (after P2: {info['zero_shot_accuracy_projected']:.4f})" if args.project else ""))
    print()
    head = (f"{'recipe':<22} {'dim':>5} {'knn s':>9} {'norm s':>8} {'solve s':>8} {'total s':>9} "
            f"{'peak MiB':>9} {'tot/rext':>9} {'knn/floor':>9} {'agree':>7} {'acc':>7}")
    print(head)
    print("-" * len(head))
    for key, r in results.items():
        if "error" in r:
            print(f"{key:<22} {r['dim']:>5}  FAILED: {r['error']}")
            continue
        t = r["times"]
        if key.startswith("sgemm-floor"):
            fi = r["info"]
            blank = " " * 29
            print(f"{'sgemm-floor':<22} {r['dim']:>5} {fmt_time(t['knn']):>9}{blank}"
                  f"{r['peak_rss'] / 2**20:>9.1f}   {fi['best']} {fi['gflops']:.0f} GFLOP/s "
                  f"(numpy {fi.get('numpy', float('nan')):.3f} s, "
                  f"torch {fi.get('torch', float('nan')):.3f} s)")
            continue
        agree = r.get("agreement")
        print(f"{key:<22} {r['dim']:>5} {fmt_time(t['knn']):>9} {fmt_time(t['normalize']):>8} "
              f"{fmt_time(t['solve']):>8} {fmt_time(t['total']):>9} "
              f"{r['peak_rss'] / 2**20:>9.1f} {fmt_ratio(r.get('total_vs_reclip_ext')):>9} "
              f"{fmt_ratio(r.get('knn_vs_floor')):>9} "
              f"{'-' if agree is None else f'{agree:.4f}':>7} {r['accuracy']:>7.4f}")
    if ref_ok:
        ri = ref["info"]
        print(f"\nreclip_ext: total = label_propagate end to end; its stages were timed separately "
              f"(sum {ri['stages_sum']:.3f} s, labels agree {ri['staged_label_agreement']:.4f}); "
              f"CG residual max {ri.get('residual_max', float('nan')):.1e}")
    if "scipy-ref" in results and "error" not in results["scipy-ref"]:
        print(f"scipy-ref kNN: {recipes.ScipyRef.knn_backend()}")

    failed = [k for k, r in results.items() if "error" in r]
    low = [k for k, r in results.items()
           if args.min_agreement is not None and r.get("agreement", 1.0) < args.min_agreement]
    if low:
        print(f"\nagreement below {args.min_agreement}: {', '.join(low)}")

    if args.json is not None:
        payload = {
            **header("compare.py", argv, args, threads=threads, N=n_nodes),
            "environment": env,
            "data": info,
            "nxn_float32_bytes": nxn,
            "results": results,
            "failed": failed,
        }
        from reclip.checkpoint import write_json  # atomic, as reclip's run files are

        write_json(args.json, payload)
        log(f"wrote {args.json}")
    if failed:
        return 1
    return 2 if low else 0


if __name__ == "__main__":
    sys.exit(main())
