#!/usr/bin/env python
"""GPU benchmark of reclip_ext.label_propagate against a torch baseline and the ZLaP recipe.

    python -P benchmarks/device_bench.py --json out.json                # full: n 100k, 1.28M
    python -P benchmarks/device_bench.py --quick --json out.json        # n = 100k only
    python -P benchmarks/device_bench.py --device cpu --n 2000 --m 10 --d 64   # CPU smoke run

benchmarks/README.md ("GPU") describes what is measured: per case (n, m, d, k; N = n + m graph
nodes) and operand precision, the stages knn / normalize / solve / total of reclip_ext, of the
torch baseline and of ZLaP (torch graph, cupyx per-class CG, classes past --zlap-classes
extrapolated), the machine's torch.mm rates and copy bandwidth, neighbour recall against a
float64 top-k, label agreement and accuracy, and the derived kNN TFLOP/s and CG GB/s (the byte
model: nnz·(4 + 8) + passes·N·m·4 per iteration, `passes` full N×m fp32 reads or writes: SpMM
reads P and writes Q, the updates of X, R and P the rest). Data: synthetic.clip_like generated
on the device with a fixed torch seed. Cases run in order of n (largest first with
--largest-first), then m descending, so the headline case comes before the smaller m.
--budget-s skips whatever would run past it (predicted from the same method's time at another N;
a method's first run is never skipped that way); the JSON is rewritten atomically after every
case, and a failed method is recorded without losing the others.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # python -P does not add the script's folder
    sys.path.insert(0, str(HERE))

import recipes  # noqa: E402  (numpy only at import: the shared torch / CG pieces)
import synthetic  # noqa: E402  (numpy only at import: the data model)
from report import Clock, fmt_ratio, fmt_time, header, log, passive_omp_waits  # noqa: E402
from reclip.checkpoint import write_json  # noqa: E402  (stdlib only: the project's atomic writer)

#: a raw torch loop measured on one H200 (torch 2.11, same sizes): sanity anchors for the table
ANCHORS = {
    "mm_tflops": {"bf16": 790.0, "tf32": 412.0, "fp32": 51.0},
    "copy_gbps": 4250.0,
    "torch_knn_s_n1.28M": {"bf16": 16.9, "tf32": 27.3, "exact": 68.7},
    "torch_normalize_s_n1.28M": 0.2,
    "torch_cg_s_n1.28M_m1000": 1.77,
    "zlap_cg_s_n1.28M_m1000": 11.1,
}
#: the performance targets, stated for n = 1.28M, m = 1000, d = 768, k = 20
TARGETS = {
    "total_s_bf16_max": 6.0,
    "recall_bf16_min": 0.98,
    "recall_tf32_min": 0.999,
    "knn_frac_mm_bf16_min": 0.60,
    "cg_frac_copy_min": 0.50,
    "speedup_vs_torch_min": 3.0,
    "speedup_vs_zlap_min": 4.0,
}
PRECISIONS = ("bf16", "tf32", "exact")
SPMMS = ("kernel", "cusparse")  # reclip_ext.cg_solve(spmm=...)
MM_RATE_KEY = {"bf16": "bf16", "tf32": "tf32", "exact": "fp32"}
STAGES = ("knn", "normalize", "solve", "total")


# --------------------------------------------------------------------------------------------
# Command line


def _int_list(text: str) -> list[int]:
    """Comma-separated integers, with k / M suffixes (100k, 1.28M)."""
    out = []
    for part in filter(None, (p.strip().lower().replace("_", "") for p in text.split(","))):
        scale = {"k": 1000, "m": 1_000_000}.get(part[-1], 1)
        out.append(int(round(float(part.rstrip("km")) * scale)))
    if not out:
        raise argparse.ArgumentTypeError("need at least one integer")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a smoke run (exact precision, torch on the CPU, ZLaP skipped)")
    ap.add_argument("--quick", action="store_true",
                    help="preset: n = 100k only, 50 ZLaP classes, 500 recall rows")
    ap.add_argument("--n", type=_int_list, default=None,
                    help="images, comma-separated (100k, 1.28M; k/M suffixes) "
                    "[default 100000,1280000; --quick 100000]")
    ap.add_argument("--m", type=_int_list, default=[1000, 100], help="classes, comma-separated")
    ap.add_argument("--d", type=int, default=768, help="embedding dimension")
    ap.add_argument("--k", type=int, default=20, help="neighbours per node")
    ap.add_argument("--alpha", type=float, default=0.99)
    ap.add_argument("--max-iter", type=int, default=20, help="CG iterations")
    ap.add_argument("--tol", type=float, default=1e-6, help="CG relative residual")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated subset of bf16,tf32,exact [default: all three on "
                    "cuda, exact on cpu]")
    ap.add_argument("--spmm", default=None,
                    help="comma-separated CUDA CG SpMMs timed in reclip_ext's staged solve, "
                    "side by side (kernel, cusparse); the first is the one label_propagate runs "
                    "end to end [default: kernel,cusparse on cuda when reclip_ext was built with "
                    "cuSPARSE, else kernel]")
    ap.add_argument("--exact-max-n", type=int, default=100_000,
                    help="run the exact fp32 precision (reclip_ext and torch) only up to this n")
    ap.add_argument("--baselines", default=None,
                    help="comma-separated subset of torch,zlap ('' for none); zlap needs torch "
                    "and cupy [default: torch,zlap on cuda, torch on cpu]")
    ap.add_argument("--baselines-max-n", type=int, default=None,
                    help="run the baselines only up to this n (reclip_ext runs at every n) "
                    "[default: every n]")
    ap.add_argument("--largest-first", action="store_true",
                    help="run the largest n first: a headline case that must not be skipped by "
                    "--budget-s (a first case is never predicted to overrun)")
    ap.add_argument("--zlap-classes", type=int, default=None,
                    help="classes timed in the ZLaP per-class CG; more are extrapolated "
                    "linearly [default 100; --quick 50]")
    ap.add_argument("--recall-sample", type=int, default=None,
                    help="rows of the float64 exact top-k reference [default 1000; --quick 500]")
    ap.add_argument("--chunk", type=int, default=0,
                    help="rows per torch similarity chunk (0: the most that keep one chunk "
                    "under --chunk-gib)")
    ap.add_argument("--chunk-gib", type=float, default=4.0,
                    help="size of one torch similarity chunk when --chunk is 0")
    ap.add_argument("--cg-passes", type=int, default=10,
                    help="full N×m fp32 reads + writes per CG iteration in the bandwidth model")
    ap.add_argument("--mm-size", type=int, default=None,
                    help="square torch.mm size for the rates [default 8192; cpu 256]")
    ap.add_argument("--mm-repeat", type=int, default=10, help="timed products per rate (median)")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="MiB copied for the bandwidth [default 2048; cpu 64]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip cases and methods that would end past this many seconds "
                    "(predicted from the same method at a smaller N), with a note")
    ap.add_argument("--json", type=Path, default=None,
                    help="write all results here (atomically, after every case)")
    args = ap.parse_args(argv)
    cuda, quick = args.device == "cuda", args.quick
    for name, value in (("n", [100_000] if quick else [100_000, 1_280_000]),
                        ("zlap_classes", 50 if quick else 100),
                        ("recall_sample", 500 if quick else 1000),
                        ("mm_size", 8192 if cuda else 256), ("copy_mib", 2048 if cuda else 64),
                        ("precisions", "bf16,tf32,exact" if cuda else "exact"),
                        ("baselines", "torch,zlap" if cuda else "torch")):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    bad = sorted(set(args.precisions) - set(PRECISIONS))
    if bad or not args.precisions:
        ap.error(f"--precisions: choose from {', '.join(PRECISIONS)} (got {bad or 'none'})")
    if not cuda and set(args.precisions) - {"exact"}:
        ap.error("--device cpu supports --precisions exact only (bf16/tf32 are CUDA modes)")
    if args.spmm is not None:
        args.spmm = [s.strip() for s in args.spmm.split(",") if s.strip()]
        bad = sorted(set(args.spmm) - set(SPMMS))
        if bad or not args.spmm or len(set(args.spmm)) < len(args.spmm):
            ap.error(f"--spmm: distinct names from {', '.join(SPMMS)} (got {args.spmm})")
        if not cuda and args.spmm != ["kernel"]:
            ap.error("--device cpu supports --spmm kernel only (cusparse is a CUDA SpMM)")
    elif not cuda:
        args.spmm = ["kernel"]  # on cuda, main() picks by what reclip_ext was built with
    bad = sorted(set(args.baselines) - {"torch", "zlap"})
    if bad:
        ap.error(f"--baselines: choose from torch, zlap (got {', '.join(bad)})")
    if "zlap" in args.baselines and "torch" not in args.baselines:
        ap.error("--baselines zlap needs torch (ZLaP runs on the torch baseline's graph)")
    if min(args.n) < 1 or min(args.m) < 2 or args.d < 1:
        ap.error("need n >= 1, m >= 2, d >= 1")
    if not 1 <= args.k < min(args.n) + min(args.m):
        ap.error("--k must be in [1, n + m - 1] for every case")
    if not 0 <= args.alpha < 1 or args.max_iter < 1 or args.tol < 0:
        ap.error("need 0 <= alpha < 1, max-iter >= 1, tol >= 0")
    for name in ("baselines_max_n", "zlap_classes", "recall_sample", "cg_passes", "mm_size",
                 "mm_repeat", "copy_mib"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def spmm_default(rext, device: str) -> list[str]:
    """Both SpMMs where the build has cuSPARSE's and the run is on CUDA, else the kernel's."""
    both = device == "cuda" and rext is not None and rext.built_with_cusparse()
    return ["kernel", "cusparse"] if both else ["kernel"]


def cases_of(args) -> list[tuple[int, int]]:
    """(n, m) in run order: n ascending (descending with --largest-first), then m descending
    (the headline case before the small m of the same n)."""
    return [(n, m) for n in sorted(set(args.n), reverse=args.largest_first)
            for m in sorted(set(args.m), reverse=True)]


# --------------------------------------------------------------------------------------------
# Small helpers


class Budget:
    """Seconds left of --budget-s, and a prediction of a method's time from an earlier run at a
    smaller size (the same m if there was one, else the latest): the kNN part grows with N²,
    the rest (normalise, CG) with N·m: t = knn0 · (N / N0)² + rest0 · (N·m) / (N0·m0)."""

    def __init__(self, seconds: float | None) -> None:
        self.t0 = time.perf_counter()
        self.limit = seconds
        self.last: dict[str, dict[int, tuple[int, int, float, float]]] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - self.elapsed()

    def predict(self, key: str, n_nodes: int, m: int) -> float:
        runs = self.last.get(key)
        if not runs:
            return 0.0
        n0, m0, quad, lin = runs.get(m) or list(runs.values())[-1]
        return quad * (n_nodes / n0) ** 2 + lin * (n_nodes * m) / (n0 * m0)

    def refuse(self, key: str, n_nodes: int, m: int) -> str | None:
        """None if the method may run, else the reason it is skipped."""
        left, pred = self.left(), self.predict(key, n_nodes, m)
        if left <= 0 or pred > left:
            return (f"skipped: --budget-s {self.limit:g} (predicted {pred:.1f} s, "
                    f"{max(left, 0):.1f} s left)")
        return None

    def record(self, key: str, n_nodes: int, m: int, wall: float, knn: float = 0.0) -> None:
        """`knn`: the part of `wall` that grows with N² (0 for the per-class CG of ZLaP)."""
        knn = min(max(knn, 0.0), wall)
        runs = self.last.setdefault(key, {})
        runs.pop(m, None)  # re-insert: the latest record comes last
        runs[m] = (n_nodes, m, knn, wall - knn)


def _free(torch, device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        if "cupy" in sys.modules:
            with contextlib.suppress(Exception):
                sys.modules["cupy"].get_default_memory_pool().free_all_blocks()


# --------------------------------------------------------------------------------------------
# Machine ceilings


def measure_rates(torch, device: str, size: int, repeat: int, copy_mib: int) -> dict:
    """torch.mm TFLOP/s at bf16 / tf32 / fp32 operands (random normal data, never zeros) and
    the copy bandwidth in GB/s (bytes read + written), medians of `repeat` timed runs after
    warm-ups; CUDA events on the GPU, perf_counter on the CPU."""
    cuda = device == "cuda"
    gen = torch.Generator(device=device).manual_seed(1234)

    def median_seconds(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeat):
            if not cuda:
                times.append(Clock(torch, device).time(fn)[1])
                continue
            start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return statistics.median(times)

    out: dict[str, Any] = {"mm_size": size, "repeat": repeat, "mm_tflops": {}, "mm_seconds": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32),
                        ("fp32", torch.float32)):
        a = torch.randn(size, size, device=device, generator=gen).to(dtype)
        b = torch.randn(size, size, device=device, generator=gen).to(dtype)
        c = torch.empty(size, size, device=device, dtype=dtype)
        with recipes.matmul_precision("tf32" if name == "tf32" else "exact"):
            t = median_seconds(lambda: torch.mm(a, b, out=c))
        out["mm_seconds"][name] = t
        out["mm_tflops"][name] = 2.0 * size ** 3 / t / 1e12
        a = b = c = None
    numel = copy_mib * 2 ** 20 // 4
    src = torch.randn(numel, device=device, generator=gen)
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src))
    out.update(tf32_api=recipes.tf32_api(), copy_bytes=2 * numel * 4, copy_seconds=t,
               copy_gbps=2 * numel * 4 / t / 1e9)
    src = dst = None
    _free(torch, device)
    return out


# --------------------------------------------------------------------------------------------
# Data


def exact_topk(torch, x, rows, k: int, chunk: int = 65536):
    """Exact k nearest neighbours (j != i) of x[rows] among all rows of x by cosine
    similarity in float64, column chunk by column chunk: (len(rows), k) int64."""
    unit = torch.nn.functional.normalize
    q = unit(x[rows].double(), dim=1)
    s = q.shape[0]
    best_v = torch.full((s, k), -math.inf, dtype=torch.float64, device=x.device)
    best_i = torch.full((s, k), -1, dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        stop = min(x.shape[0], start + chunk)
        sim = q @ unit(x[start:stop].double(), dim=1).T
        local = rows - start
        hit = (local >= 0) & (local < stop - start)
        sim[hit.nonzero().squeeze(1), local[hit]] = -math.inf
        cols = torch.arange(start, stop, device=x.device).expand(s, -1)
        best_v, pos = torch.topk(torch.cat([best_v, sim], 1), k, dim=1)
        best_i = torch.gather(torch.cat([best_i, cols], 1), 1, pos)
    return best_i


def recall(torch, indices, reference) -> float:
    """Mean fraction of each row's reference neighbours found in `indices` (same rows)."""
    indices = torch.as_tensor(indices).to(reference.device)
    found = (indices[:, :, None] == reference[:, None, :]).any(dim=1)
    return float(found.float().mean())


# --------------------------------------------------------------------------------------------
# The torch baseline


def chunk_rows(n_nodes: int, itemsize: int, chunk: int, chunk_gib: float) -> int:
    if chunk > 0:
        return max(1, min(chunk, n_nodes))
    rows = int(chunk_gib * 2 ** 30 // (n_nodes * itemsize))
    return max(1, min(n_nodes, rows // 256 * 256 or rows))


def rext_knn(rext, text, images, x, k: int, kw: dict):
    """reclip_ext.knn_affinity on the pair (text, images), stacked by rows inside the kernel as
    label_propagate does; on the concatenated X if this build refuses a pair. Returns
    ((indices, weights), what was passed). Edges weigh max(s, 0), as in every baseline here."""
    try:
        return (rext.knn_affinity((text, images), k, normalize=True, weight="relu", **kw),
                "(text, images)")
    except TypeError:
        return rext.knn_affinity(x, k, normalize=True, weight="relu", **kw), "X = [text; images]"


def zlap_laplacian(torch, w, alpha: float):
    """The ZLaP recipe's system matrix I - αW as a cupyx.scipy.sparse CSR (float32, int32
    indices) from the torch sparse CSR W, shared through DLPack."""
    import cupy
    import cupyx.scipy.sparse as csp

    n = w.shape[0]
    indptr = cupy.from_dlpack(w.crow_indices().to(torch.int32))
    indices = cupy.from_dlpack(w.col_indices().to(torch.int32))
    data = cupy.from_dlpack(w.values().contiguous())
    wc = csp.csr_matrix((data, indices, indptr), shape=(n, n))
    lap = csp.identity(n, dtype=cupy.float32, format="csr") - alpha * wc
    return lap if lap.dtype == cupy.float32 else lap.astype(cupy.float32)


def zlap_solve(lap, m: int, classes, max_iter: int, tol: float, keep: bool):
    """ZLaP's solve: recipes.per_class_cg with cupyx, one cg per class column c (y = e_c)."""
    import cupy
    import cupyx.scipy.sparse.linalg as csl

    out = recipes.per_class_cg(lap, m, max_iter, tol, classes=classes, keep=keep, xp=cupy,
                               cg=csl.cg)
    cupy.cuda.Device().synchronize()
    return out


# --------------------------------------------------------------------------------------------
# Methods of one case


class Case:
    def __init__(self, torch, rext, args, clock: Clock, budget: Budget, n: int, m: int,
                 env: dict) -> None:
        self.torch, self.rext, self.a = torch, rext, args
        self.clock, self.budget, self.n, self.m = clock, budget, n, m
        self.N = n + m
        self.device = args.device
        self.env = env
        self.labels: dict[str, Any] = {}  # run key -> (n,) labels on the device
        self.graphs: dict[str, Any] = {}  # precision -> (torch W, its times), for ZLaP
        self.record: dict[str, Any] = {"n": n, "m": m, "d": args.d, "k": args.k, "N": self.N,
                                       "runs": {}, "notes": []}

    # -- data and reference ------------------------------------------------------------------

    def prepare(self) -> None:
        torch = self.torch
        (text, images, self.truth), t = self.clock.time(lambda: synthetic.clip_like(
            self.n, self.m, self.a.d, seed=self.a.seed, device=self.device))
        self.x = torch.cat([text, images])  # one (N, d) block; text and images are views of it
        del text, images
        self.text, self.images = self.x[:self.m], self.x[self.m:]
        with recipes.matmul_precision("exact"):
            acc = self._accuracy(synthetic.zero_shot(self.text, self.images, 131072))
        g = torch.Generator(device="cpu").manual_seed(self.a.seed + 1)
        s = min(self.a.recall_sample, self.N)
        self.sample = torch.randperm(self.N, generator=g)[:s].sort().values.to(self.device)
        self.reference, t_ref = self.clock.time(
            lambda: exact_topk(torch, self.x, self.sample, self.a.k))
        self.record["data"] = {"generate_s": t, "zero_shot_accuracy": acc,
                               "model": "benchmarks/synthetic.py clip_like defaults, torch RNG",
                               "seed": self.a.seed}
        self.record["reference"] = {"rows": s, "seconds": t_ref,
                                    "method": "float64 brute force against all N rows"}
        log(f"  data {t:.1f} s (zero-shot accuracy {acc:.4f}); float64 reference of {s} rows "
             f"{t_ref:.1f} s")

    def _accuracy(self, labels) -> float:
        return float((labels.to(self.truth.device) == self.truth).float().mean())

    def _done(self, out: dict, labels, knn, normalize, solve, total) -> dict:
        """A run's record with its stage times, its accuracy if it has labels, which are kept
        for the agreement with reclip_ext."""
        out["times"] = {"knn": knn, "normalize": normalize, "solve": solve, "total": total}
        if labels is not None:
            out["accuracy"] = self._accuracy(labels)
            self.labels[f"{out['recipe']}/{out['precision']}"] = labels
        return out

    # -- reclip_ext --------------------------------------------------------------------------

    def run_reclip_ext(self, precision: str) -> dict:
        torch, rext, a, clock = self.torch, self.rext, self.a, self.clock
        kw = {} if precision == "exact" else {"precision": precision}  # only non-defaults
        out: dict[str, Any] = {"recipe": "reclip_ext", "precision": precision}
        ((idx, w), out["knn_input"]), t_knn = clock.time(
            lambda: rext_knn(rext, self.text, self.images, self.x, a.k, kw))
        out["recall"] = recall(torch, torch.as_tensor(idx)[self.sample], self.reference)
        csr, t_norm = clock.time(lambda: rext.sym_normalize(idx, w))
        idx = w = None
        out["nnz"] = int(torch.as_tensor(csr.data).numel())
        y = recipes.rhs(self.N, self.m, torch.float32, self.device)
        # the same solve with each SpMM; the first one's is the staged solve (and e2e's)
        out["spmm"], out["solve_by_spmm"], staged = a.spmm[0], {}, None
        for spmm in a.spmm:
            res, t = clock.time(lambda: rext.cg_solve(csr, y, alpha=a.alpha, max_iter=a.max_iter,
                                                      tol=a.tol, spmm=spmm))
            labels = torch.argmax(torch.as_tensor(res.x)[self.m:], dim=1)
            its = int(torch.as_tensor(res.iterations).max())
            out["solve_by_spmm"][spmm] = {"solve": t, "iterations": its}
            if staged is None:
                staged, t_solve = labels, t
                out["iterations"] = its
                out["residual_max"] = float(torch.as_tensor(res.residuals).max())
            else:
                out["solve_by_spmm"][spmm]["label_agreement"] = float(
                    (labels == staged).float().mean())
            del res, labels
        csr = y = None
        _free(torch, self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        lp, t_total = clock.time(lambda: rext.label_propagate(
            self.text, self.images, k=a.k, alpha=a.alpha, max_iter=a.max_iter, tol=a.tol,
            weight="relu", normalize=True, spmm=a.spmm[0], **kw))
        if self.device == "cuda":
            # what label_propagate took through torch's allocator above what was allocated
            out["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated() - base)
        labels = torch.as_tensor(lp.labels).to(self.device)
        out["iterations_end_to_end"] = int(torch.as_tensor(lp.iterations).max())
        del lp
        out["staged_label_agreement"] = float((staged.to(labels.device) == labels).float().mean())
        out["stages_sum"] = t_knn + t_norm + t_solve
        return self._done(out, labels, t_knn, t_norm, t_solve, t_total)

    # -- torch -------------------------------------------------------------------------------

    def run_torch(self, precision: str) -> dict:
        torch, a, clock = self.torch, self.a, self.clock
        chunk = chunk_rows(self.N, 2 if precision == "bf16" else 4, a.chunk, a.chunk_gib)
        out: dict[str, Any] = {"recipe": "torch", "precision": precision, "chunk_rows": chunk}
        out["mm"] = {"bf16": "operands .to(bfloat16), bf16 output",
                     "tf32": f"float32, tf32 on ({recipes.tf32_api()})",
                     "exact": f"float32, tf32 off ({recipes.tf32_api()})"}[precision]
        t0 = clock.now()
        (idx, val), t_knn = clock.time(lambda: recipes.torch_knn(self.x, a.k, chunk, precision))
        sample_idx = idx[self.sample]
        w, t_norm = clock.time(lambda: recipes.torch_normalize(idx, val))
        idx = val = None
        out["nnz"] = int(w.values().numel())
        y = recipes.rhs(self.N, self.m, torch.float32, self.device)
        (z, its, res), t_solve = clock.time(
            lambda: recipes.batched_cg(w, y, a.alpha, a.max_iter, a.tol))
        labels = torch.argmax(z[self.m:], dim=1)
        t_total = clock.now() - t0
        z = y = None
        out.update(recall=recall(torch, sample_idx, self.reference), iterations=int(its.max()),
                   residual_max=float(res.max()))
        self._done(out, labels, t_knn, t_norm, t_solve, t_total)
        if "zlap" in a.baselines:
            self.graphs[precision] = (w, out["times"])
        return out

    # -- ZLaP ----------------------------------------------------------------------------------

    def run_zlap(self, precision: str) -> dict:
        torch, a, clock = self.torch, self.a, self.clock
        w, tt = self.graphs.pop(precision)  # the torch baseline's W and stage times
        out: dict[str, Any] = {"recipe": "zlap", "precision": precision,
                               "graph": f"torch/{precision} (same W)"}
        lap, t_build = clock.time(lambda: zlap_laplacian(torch, w, a.alpha))
        w = None
        timed = min(a.zlap_classes, self.m)
        classes = [c * self.m // timed for c in range(timed)]
        keep = timed == self.m
        (z, counts, tol_kw), t_cg = clock.time(
            lambda: zlap_solve(lap, self.m, classes, a.max_iter, a.tol, keep))
        lap = None
        scale = self.m / timed
        t_solve = t_build + t_cg * scale
        out.update({"classes_timed": timed, "extrapolated": not keep,
                    "extrapolation": (f"per-class CG of {timed} of {self.m} classes timed "
                                      f"({t_cg:.3f} s), scaled x{scale:g}") if not keep else None,
                    "build_s": t_build, "cg_timed_s": t_cg, "iterations": max(counts),
                    "tol_keyword": tol_kw})
        labels = None
        if keep:
            import cupy

            labels = torch.from_dlpack(cupy.argmax(z[self.m:], axis=1)).to(self.device)
        return self._done(out, labels, tt["knn"], tt["normalize"], t_solve,
                          tt["knn"] + tt["normalize"] + t_solve)

    # -- derived numbers ----------------------------------------------------------------------

    def derive(self, rates: dict) -> None:
        a, runs = self.a, self.record["runs"]
        flops = 2.0 * self.N * self.N * a.d
        self.record["knn_flops"] = flops
        for key, r in runs.items():
            if "times" not in r:
                continue
            prec = r["precision"]
            t = r["times"]
            if r["recipe"] in ("reclip_ext", "torch"):
                mm = rates["mm_tflops"][MM_RATE_KEY[prec]]
                tflops = flops / t["knn"] / 1e12 if t["knn"] > 0 else None
                iters = r.get("iterations") or 0
                bytes_iter = r["nnz"] * (4 + 8) + a.cg_passes * self.N * self.m * 4
                gbps = bytes_iter * iters / t["solve"] / 1e9 if iters and t["solve"] > 0 else None
                r["derived"] = {
                    "knn_tflops": tflops,
                    "knn_frac_mm": tflops / mm if tflops is not None else None,
                    "mm_rate_used": f"{MM_RATE_KEY[prec]} {mm:.4g} TFLOP/s",
                    "cg_bytes_per_iteration": bytes_iter,
                    "cg_seconds_per_iteration": t["solve"] / iters if iters else None,
                    "cg_gbps": gbps,
                    "cg_frac_copy": gbps / rates["copy_gbps"] if gbps is not None else None,
                }
            own = self.labels.get(key)
            ref = self.labels.get(f"reclip_ext/{prec}")
            if own is not None and ref is not None and r["recipe"] != "reclip_ext":
                r["agreement_with_reclip_ext"] = float((own == ref).float().mean())
        self.record["ratios"] = ratios = {}
        for prec in a.precisions:
            base = runs.get(f"reclip_ext/{prec}", {}).get("times")
            if base:
                ratios[prec] = {
                    f"{other}_over_reclip_ext": {s: t[s] / base[s] if base[s] > 0 else None
                                                 for s in STAGES}
                    for other in ("torch", "zlap")
                    if (t := runs.get(f"{other}/{prec}", {}).get("times"))}
        self.record["targets"] = self._targets()

    def _targets(self) -> dict:
        runs, out = self.record["runs"], {}
        headline = self.n >= 1_280_000 and self.m >= 1000 and self.a.d == 768 and self.a.k == 20

        def put(name, value, least=-math.inf, most=math.inf):
            if value is not None:
                out[name] = {"value": value, "pass": bool(least <= value <= most)}

        rx = {prec: runs.get(f"reclip_ext/{prec}", {}) for prec in PRECISIONS}
        if "times" in rx["bf16"]:
            if headline:
                put("total_s_bf16 <= 6", rx["bf16"]["times"]["total"],
                    most=TARGETS["total_s_bf16_max"])
            put("recall_bf16 >= 0.98", rx["bf16"]["recall"], TARGETS["recall_bf16_min"])
            put("knn_frac_mm_bf16 >= 0.6", rx["bf16"]["derived"]["knn_frac_mm"],
                TARGETS["knn_frac_mm_bf16_min"])
        for prec in ("tf32", "exact"):
            put(f"recall_{prec} >= 0.999", rx[prec].get("recall"), TARGETS["recall_tf32_min"])
        for prec in self.a.precisions:
            put(f"cg_frac_copy_{prec} >= 0.5", rx[prec].get("derived", {}).get("cg_frac_copy"),
                TARGETS["cg_frac_copy_min"])
            for other in ("torch", "zlap"):
                need = TARGETS[f"speedup_vs_{other}_min"]
                ratio = (self.record["ratios"].get(prec, {})
                         .get(f"{other}_over_reclip_ext", {}).get("total"))
                put(f"total_{prec}: {other} / reclip_ext >= {need:g}", ratio, need)
        return out


# --------------------------------------------------------------------------------------------
# Report


def print_case(rec: dict, rates: dict, file=None) -> None:
    p = lambda *s: print(*s, file=file or sys.stdout)  # noqa: E731
    p(f"\n== n={rec['n']:,} m={rec['m']:,} d={rec['d']} k={rec['k']} (N={rec['N']:,})"
      + (f"  data {rec['data']['generate_s']:.1f} s, zero-shot accuracy "
         f"{rec['data']['zero_shot_accuracy']:.4f}" if "data" in rec else ""))
    if rec.get("status") not in (None, "ok"):
        p(f"   {rec['status']}: {rec.get('error') or rec.get('note', '')}")
    runs = rec["runs"]
    head = (f"{'prec':<5} {'stage':<9} {'reclip_ext':>10} {'torch':>9} {'torch/rx':>8} "
            f"{'zlap':>9} {'zlap/rx':>8}")
    p(head)
    p("-" * len(head))
    zlap_notes = []
    for prec in sorted({r["precision"] for r in runs.values()}, key=PRECISIONS.index):
        rx, tr, zl = (runs.get(f"{r}/{prec}", {}) for r in ("reclip_ext", "torch", "zlap"))
        for s in STAGES:
            trx, ttr, tzl = (r.get("times", {}).get(s) for r in (rx, tr, zl))
            if s in ("knn", "normalize") and tzl is not None:
                tzl_txt, zr = "(torch)", None
            else:
                tzl_txt = fmt_time(tzl, 9) + ("*" if tzl is not None and zl.get("extrapolated")
                                              else "")
                zr = tzl / trx if tzl and trx else None
            p(f"{prec:<5} {'total e2e' if s == 'total' else s:<9} {fmt_time(trx, 10)} "
              f"{fmt_time(ttr, 9)} {fmt_ratio(ttr / trx if ttr and trx else None, 8)} "
              f"{tzl_txt:>9} {fmt_ratio(zr, 8)}")
        for r in (rx, tr, zl):
            for tag in ("error", "skipped"):
                if tag in r:
                    p(f"{prec:<5} {r['recipe']} {tag}: {r[tag]}")
        mmk = MM_RATE_KEY[prec]
        derived = [(r, r["derived"]) for r in (rx, tr) if r.get("derived")]
        lines = {
            "kNN  {} of " + f"{mmk} mm {rates['mm_tflops'][mmk]:.3g} TFLOP/s": [
                f"{r['recipe']} {d['knn_tflops']:.3g} TFLOP/s = {100 * d['knn_frac_mm']:.0f}%"
                for r, d in derived if d["knn_tflops"] is not None],
            "CG   {} of " + f"copy {rates['copy_gbps']:.3g} GB/s": [
                f"{r['recipe']} {d['cg_gbps']:.3g} GB/s = {100 * d['cg_frac_copy']:.0f}% "
                f"({r['iterations']} it, {1e3 * d['cg_seconds_per_iteration']:.2f} ms/it)"
                for r, d in derived if d["cg_gbps"] is not None],
            "recall vs float64 ({} rows): ".format(rec.get("reference", {}).get("rows")) + "{}": [
                f"{r['recipe']} {r['recall']:.4f}" for r in (rx, tr) if "recall" in r]}
        for text, parts in lines.items():
            if parts:
                p(f"{prec:<5} " + text.format(" | ".join(parts)))
        by_spmm = rx.get("solve_by_spmm", {})
        if len(by_spmm) > 1:
            first = by_spmm[rx["spmm"]]["solve"]
            p(f"{prec:<5} reclip_ext solve by SpMM: " + " | ".join(
                f"{name} {fmt_time(s['solve'])} s ({s['iterations']} it"
                + (f", x{s['solve'] / first:.2f}, labels agree {s['label_agreement']:.4f}"
                   if "label_agreement" in s else "") + ")" for name, s in by_spmm.items()))
        agree = [f"{r['recipe']} {r['agreement_with_reclip_ext']:.4f}" for r in (tr, zl)
                 if "agreement_with_reclip_ext" in r]
        acc = [f"{r['recipe']} {r['accuracy']:.4f}" for r in (rx, tr, zl) if "accuracy" in r]
        if agree or acc:
            p(f"{prec:<5} labels agree with reclip_ext: {' | '.join(agree) or '-'}; "
              f"accuracy: {' | '.join(acc)}")
        if zl.get("extrapolated"):
            zlap_notes.append(f"{prec}: {zl['extrapolation']}")
    for note in [f"* zlap {n}" for n in zlap_notes] + [f"note: {n}" for n in rec.get("notes", [])]:
        p(note)
    targets = rec.get("targets") or {}
    if targets and rec["n"] >= 1_000_000:
        p("performance targets (stated for n=1.28M, m=1000): " + "; ".join(
            f"{k} {'PASS' if v['pass'] else 'FAIL'} ({v['value']:.3g})"
            for k, v in targets.items()))


# --------------------------------------------------------------------------------------------
# Main


def _guard(torch, device: str, fn, *fargs) -> tuple[dict, float]:
    """Run one method; an exception (OOM included) becomes {"error": ...}; memory is freed."""
    t0 = time.perf_counter()
    try:
        out = fn(*fargs)
    except Exception as err:
        traceback.print_exc(file=sys.stderr)
        out = {"error": f"{type(err).__name__}: {err}"}
    wall = time.perf_counter() - t0
    out["wall_s"] = wall
    _free(torch, device)
    return out, wall


def warm_up(torch, rext, args, clock: Clock) -> dict:
    """Every method at every precision once on a tiny case, untimed: module loads, cuBLAS /
    cuSPARSE handles and cupy's kernel compilation stay out of the numbers. Returns what failed
    (ZLaP's under "zlap": its solve does not depend on the precision)."""
    failed: dict[str, str] = {}
    case = Case(torch, rext, args, clock, Budget(None), max(64, 4 * args.k), 4, {})
    case.prepare()
    for prec in args.precisions:
        for recipe in (["reclip_ext"] if rext is not None else []) + args.baselines:
            if recipe == "zlap" and (prec not in case.graphs or "zlap" in failed):
                continue  # ZLaP solves on the torch baseline's graph
            try:
                getattr(case, f"run_{recipe}")(prec)
            except Exception as err:
                key = "zlap" if recipe == "zlap" else f"{recipe}/{prec}"
                failed[key] = f"{type(err).__name__}: {err}"
    clock.sync()
    del case
    _free(torch, args.device)
    return failed


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.device == "cpu":
        passive_omp_waits()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        log("device_bench: torch sees no CUDA device (use --device cpu for a smoke run)")
        return 3
    clock = Clock(torch, args.device)
    budget = Budget(args.budget_s)
    try:
        rext = recipes.import_reclip_ext()
        rext_error = None
    except Exception as err:  # still measure the machine and the baselines
        rext, rext_error = None, f"{type(err).__name__}: {err}"
        log(f"reclip_ext is not importable: {rext_error}")
    if args.spmm is None:
        args.spmm = spmm_default(rext, args.device)
    env = recipes.environment(torch.get_num_threads(), args.device)
    if rext_error:
        env["reclip_ext"] = f"not importable: {rext_error}"
    log(f"device_bench: {env.get('gpu', 'cpu')}, torch {env['torch']}, reclip_ext "
         f"{env.get('reclip_ext')} ({env.get('reclip_ext_file', '')})")

    rates, t_rates = clock.time(lambda: measure_rates(torch, args.device, args.mm_size,
                                                      args.mm_repeat, args.copy_mib))
    rates["seconds"] = t_rates
    print(f"device_bench on {env.get('gpu', 'cpu')} | torch {env['torch']} (CUDA "
          f"{env['torch_cuda']}) | cupy {env.get('cupy', '-')} | reclip_ext "
          f"{env.get('reclip_ext')} (built_with_cuda {env.get('built_with_cuda')})")
    mm = rates["mm_tflops"]
    anchors = ANCHORS["mm_tflops"]
    print(f"machine: torch.mm {args.mm_size}^3 bf16 {mm['bf16']:.4g} / tf32 {mm['tf32']:.4g} / "
          f"fp32 {mm['fp32']:.4g} TFLOP/s (H200 anchors {anchors['bf16']:g} / "
          f"{anchors['tf32']:g} / {anchors['fp32']:g}); copy {rates['copy_gbps']:.4g} GB/s "
          f"(anchor {ANCHORS['copy_gbps']:g}); median of {args.mm_repeat}")
    if args.device == "cuda" and mm["tf32"] < 1.5 * mm["fp32"]:
        print(f"WARNING: the tf32 mm rate is not above fp32's: is tf32 on ({rates['tf32_api']})?")
    print(f"models: kNN FLOP = 2*N*N*d; CG bytes/iteration = nnz*(4+8) + "
          f"{args.cg_passes}*N*m*4; ratios = baseline time / reclip_ext time (> 1: reclip_ext "
          f"faster); reclip_ext total = label_propagate end to end")

    payload: dict[str, Any] = {
        **header("device_bench.py", argv, args),
        "environment": env,
        "machine": rates,
        "anchors": ANCHORS,
        "targets": TARGETS,
        "models": {
            "knn_flops": "2*N*N*d (the full N x N similarity)",
            "cg_bytes_per_iteration": f"nnz*(4+8) + passes*N*m*4 with passes={args.cg_passes} "
                                      "(fp32 value + int64 column index per nonzero of W; full "
                                      "N x m fp32 reads/writes of the CG vectors: SpMM reads P, "
                                      "writes Q, the X/R/P updates the rest)",
            "cg_gbps": "cg_bytes_per_iteration * iterations / solve seconds",
            "ratios": "baseline seconds / reclip_ext seconds, per stage",
            "zlap": "torch knn + torch normalize (the same graph) + cupyx per-class CG "
                    "(I - alpha W built in cupyx; classes beyond --zlap-classes extrapolated)",
        },
        "warmup_failures": {},
        "cases": [],
        "skipped": [],
        "errors": [],
    }

    def save() -> None:
        payload["wall_s"] = time.perf_counter() - t_start
        if args.json is not None:
            write_json(args.json, payload)

    save()
    if args.device == "cpu" and "zlap" not in args.baselines:
        payload["notes"] = ["zlap not run: the cupyx recipe needs a CUDA device"]
        print("note: zlap not run (the cupyx recipe needs a CUDA device)")
    if "zlap" in args.baselines:
        try:
            importlib.import_module("cupyx.scipy.sparse.linalg")  # and cupy
        except Exception as err:
            args.baselines = [b for b in args.baselines if b != "zlap"]
            note = f"zlap skipped: cupy is not importable ({type(err).__name__}: {err})"
            payload.setdefault("notes", []).append(note)
            print(f"note: {note}")

    failed, t_warm = clock.time(lambda: warm_up(torch, rext, args, clock))
    payload["warmup_failures"], payload["warmup_s"] = failed, t_warm
    for key, err in failed.items():
        print(f"warm-up failed, {key} is left out of every case: {err}")
    save()

    for n, m in cases_of(args):
        case = Case(torch, rext, args, clock, budget, n, m, env)
        rec = case.record
        payload["cases"].append(rec)
        if budget.left() <= 0:
            rec["status"] = "skipped"
            rec["note"] = f"--budget-s {args.budget_s:g} spent ({budget.elapsed():.0f} s)"
            payload["skipped"].append(f"n={n} m={m}: {rec['note']}")
            print(f"\n== n={n:,} m={m:,}: skipped, {rec['note']}")
            save()
            continue
        log(f"case n={n} m={m} d={args.d} k={args.k} ({budget.elapsed():.0f} s elapsed)")
        try:
            case.prepare()
            for prec in args.precisions:
                if prec == "exact" and n > args.exact_max_n:
                    rec["notes"].append(f"exact fp32 runs only for n <= {args.exact_max_n}")
                    continue
                methods = [("reclip_ext", case.run_reclip_ext)]
                if args.baselines_max_n is not None and n > args.baselines_max_n:
                    if prec == args.precisions[0]:
                        rec["notes"].append(f"baselines run only for n <= {args.baselines_max_n}")
                else:  # ZLaP solves on the torch baseline's graph, so after it
                    methods += [(b, getattr(case, f"run_{b}")) for b in ("torch", "zlap")
                                if b in args.baselines]
                for recipe, fn in methods:
                    key = f"{recipe}/{prec}"
                    if recipe == "zlap" and prec not in case.graphs:
                        continue  # the torch baseline failed or was skipped
                    m_eff = min(m, args.zlap_classes) if recipe == "zlap" else m  # classes solved
                    warm_fail = failed.get(key) or failed.get(recipe)  # ZLaP's is precision-free
                    if recipe == "reclip_ext" and rext is None:
                        why = {"error": f"reclip_ext is not importable: {rext_error}"}
                    elif warm_fail:
                        why = {"error": f"warm-up failed: {warm_fail}"}
                    else:
                        why = budget.refuse(key, case.N, m_eff)
                        why = {"skipped": why} if why else None
                    if why:
                        rec["runs"][key] = {"recipe": recipe, "precision": prec, **why}
                        continue
                    log(f"  {key} ...")
                    out, wall = _guard(torch, args.device, fn, prec)
                    out.setdefault("recipe", recipe)
                    out.setdefault("precision", prec)
                    rec["runs"][key] = out
                    if "error" in out:
                        log(f"  {key}: {out['error']}")
                        continue
                    # the part that grows with N^2: reclip_ext computes the kNN twice (staged,
                    # then end to end); ZLaP's kNN is the torch baseline's, already counted
                    quad = {"reclip_ext": 2, "torch": 1}.get(recipe, 0) * out["times"]["knn"]
                    budget.record(key, case.N, m_eff, wall, quad)
                    log(f"  {key}: total {out['times']['total']:.3f} s (wall {wall:.1f} s)")
                case.graphs.pop(prec, None)
                _free(torch, args.device)
            case.derive(rates)
            rec["status"] = "ok"
        except Exception as err:  # data, reference or derivation failed: the case is lost
            traceback.print_exc(file=sys.stderr)
            rec["status"] = "error"
            rec["error"] = f"{type(err).__name__}: {err}"
        finally:
            case.labels.clear()
            case.graphs.clear()
            for name in ("x", "text", "images", "truth", "reference", "sample"):
                case.__dict__.pop(name, None)
            _free(torch, args.device)
        for key, r in [*rec["runs"].items(), ("", rec)]:  # each run's, then the case's
            for tag, into in (("error", "errors"), ("skipped", "skipped")):
                if tag in r:
                    payload[into].append(f"n={n} m={m}{' ' * bool(key)}{key}: {r[tag]}")
        print_case(rec, rates)
        sys.stdout.flush()
        save()

    payload["wall_s"] = time.perf_counter() - t_start
    print(f"\ndevice_bench: {len(payload['cases'])} cases in {payload['wall_s']:.0f} s; "
          f"{len(payload['errors'])} errors, {len(payload['skipped'])} skipped")
    for tag, into in (("error", "errors"), ("skipped", "skipped")):
        for line in payload[into]:
            print(f"  {tag}: {line}")
    save()
    if args.json is not None:
        log(f"wrote {args.json}")
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
