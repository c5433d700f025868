"""The CUDA kernels' resource usage (ptxas -v) and, with --sass, their inner loops' machine code.

    python benchmarks/ptxas_table.py BUILD_LOG
    python benchmarks/ptxas_table.py --sass [--arch sm_90] [--root DIR] [--json FILE]

BUILD_LOG: registers, shared memory, stack and spills per reclip_ext kernel and architecture
from a build log with nvcc -Xptxas -v output (the toolkit's own kernels, e.g. CUB's, in one
line); exit status 1 when the log holds no ptxas report. Used by .ci/run and device_check.sh.

--sass compiles DIR/csrc/cuda/{affinity,cg}_cuda.cu (DIR: this repository by default, or another
checkout, e.g. a git worktree of an older commit, for a before/after comparison) to cubins with
the CMakeLists.txt flags, disassembles them with nvdisasm ($NVDISASM, PATH, the toolkit's bin/ or
pip's nvidia-cuda-nvdisasm) and, per reclip_ext kernel (the kNN tiles and the CG SpMM), counts
instructions by kind in two loops of the control-flow graph. Loops are natural loops: an edge to
a block that dominates its source, so the out-of-line slow paths nvcc places after a kernel's
EXIT and branches back from are not mistaken for loops.

- inner: the innermost loop (one without a nested loop) with the most HMMA + FFMA + DFMA, ties
  to the most LDG: the hot loop of the products, or of the SpMM's gathers.
- K step (kernels that use cp.async only): the smallest loop that holds both LDGSTS and a
  product instruction. Each K step issues its cp.async copies for a later step and its products
  for this one, so that loop is the K loop whatever nvcc unrolls inside it, and nothing smaller
  (the copy loop, the fragment loop) or larger (the column-tile loop, which also holds the
  prologue's copies) has both. Its counts are static, nested loops' bodies counted once: an
  inner loop that nvcc keeps rolled (e.g. `#pragma unroll 1` over the K step's fragments) runs
  several times per step, so "per K step" is exact only when the K loop has no nested loop;
  the `nest` column says how many it has.

Exit status 2 when nvcc or nvdisasm is missing, 1 when a compile fails.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("affinity_cuda.cu", "cg_cuda.cu")
KERNELS = re.compile(r"\b(topk_tiles|spmm)<")  # the kNN tiles and the CG SpMM, by readable name
# As in CMakeLists.txt (target_compile_options of rext_kernels).
NVCC_FLAGS = ("-O3", "-Xptxas=-v", "--expt-relaxed-constexpr", "-std=c++17")
KINDS = ("HMMA", "LDSM", "LDS", "LD", "LDG", "LDGSTS", "FFMA", "DFMA")
PRODUCTS = ("HMMA", "FFMA", "DFMA")


def parse_ptxas(text: str) -> list[dict]:
    """One row per 'Compiling entry function' of a ptxas -v report."""
    rows, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'", line)
        if m:
            cur = {"name": m.group(1), "arch": m.group(2), "regs": 0, "smem": 0, "stack": 0,
                   "spill": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur["stack"], cur["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(sm.group(1)) if sm else 0
    return rows


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names (c++filt when present), without the namespaces every kernel shares."""
    if names and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        if out.returncode == 0 and len(out.stdout.splitlines()) == len(names):
            names = out.stdout.splitlines()
    return [re.sub(r"\(anonymous namespace\)::|rext::cuda::", "", n) for n in names]


def ours(name: str) -> bool:
    return name.startswith("_ZN4rext")


def print_ptxas(rows: list[dict]) -> None:
    named = list(zip(rows, demangle([r["name"] for r in rows])))
    own = [(r, n) for r, n in named if ours(r["name"])]
    other = [r for r, _ in named if not ours(r["name"])]
    print(f"ptxas: {len(own)} reclip_ext kernels, {len(other)} others (CUB / toolkit)")
    print(f"  {'arch':<6} {'regs':>4} {'smem B':>7} {'stack B':>7} {'spill B':>7}  kernel")
    for r, name in own:
        flag = "  <-- SPILLS" if r["spill"] else ""
        print(f"  {r['arch']:<6} {r['regs']:>4} {r['smem']:>7} {r['stack']:>7} {r['spill']:>7}  "
              f"{name[:110]}{flag}")
    print(f"  others: max {max((r['regs'] for r in other), default=0)} registers, "
          f"{sum(1 for r in other if r['spill'])} with spills")


# --- SASS -------------------------------------------------------------------------------------

_FUNC = re.compile(r"^\.text\.(\S+):")
_LABEL = re.compile(r"^(\.L\w+):")
_INSTR = re.compile(r"/\*[0-9a-f]+\*/\s+(?:(@!?U?P\w+)\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"`?\(\s*(\.L\w+)\s*\)")
_STOPS = ("EXIT", "RET", "BRX", "JMX", "KILL")  # no fall-through unless guarded


def parse_sass(text: str) -> dict[str, list[tuple[str, str, bool, list[str]]]]:
    """nvdisasm -c output -> {mangled function: [(opcode, target label, guarded, labels here)]}."""
    funcs, cur, labels = {}, None, []
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur, labels = funcs.setdefault(m.group(1), []), []
            continue
        m = _LABEL.match(line)
        if m:
            labels.append(m.group(1))
            continue
        m = _INSTR.search(line)
        # `@!PT` guards an instruction that never runs (nvcc pads cp.async groups with such LDS).
        if m and cur is not None and m.group(1) != "@!PT":
            opcode, operands = m.group(2), m.group(3)
            t = _TARGET.search(operands) if opcode.startswith(("BRA", "JMP")) else None
            # A branch is conditional when guarded or when it takes a predicate / divergence
            # operand before its target (BRA !P0, `(...)  BRA.DIV UR4, `(...)).
            cond = bool(m.group(1)) or (t is not None and "," in operands[:t.start()])
            cur.append((opcode, t.group(1) if t else "", cond, labels))
            labels = []
    return funcs


def loops(code: list[tuple[str, str, bool, list[str]]]) -> list[set[int]]:
    """Natural loops of one function, each the set of its instruction indices."""
    where = {lab: i for i, (_, _, _, labs) in enumerate(code) for lab in labs}
    jumps = [bool(t) or op.split(".")[0] in _STOPS for op, t, _, _ in code]
    starts = sorted({0, *where.values(), *(i + 1 for i, j in enumerate(jumps) if j)} - {len(code)})
    bounds = list(zip(starts, starts[1:] + [len(code)]))
    block_of = {i: b for b, (lo, hi) in enumerate(bounds) for i in range(lo, hi)}
    succ = []
    for b, (_, hi) in enumerate(bounds):
        _, target, cond, _ = code[hi - 1]
        succ.append([block_of[where[target]]] if target in where else [])
        if (cond or not jumps[hi - 1]) and hi < len(code):
            succ[-1].append(b + 1)
    # Dominators (Cooper, Harvey & Kennedy) over the blocks reachable from the entry.
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:
        nxt = next((x for x in stack[-1][1] if x not in seen), None)
        if nxt is None:
            order.append(stack.pop()[0])
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    order.reverse()
    rpo = {b: n for n, b in enumerate(order)}
    preds = {b: [a for a in order if b in succ[a]] for b in order}
    idom, changed = {0: 0}, True
    while changed:
        changed = False
        for b in order[1:]:
            new = None
            for p in (p for p in preds[b] if p in idom):
                while new is not None and p != new:
                    while rpo[p] > rpo[new]:
                        p = idom[p]
                    while rpo[new] > rpo[p]:
                        new = idom[new]
                new = p
            if idom.get(b) != new:
                idom[b], changed = new, True

    def dominates(h: int, b: int) -> bool:
        while b not in (h, 0):
            b = idom[b]
        return b == h

    bodies: dict[int, set[int]] = {}
    for b in order:
        for h in succ[b]:
            if dominates(h, b):  # back edge b -> h: h plus whatever reaches b avoiding h
                body, work = bodies.setdefault(h, {h}), [b]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(preds[x])
    return [{i for b in body for i in range(*bounds[b])} for body in bodies.values()]


def counts(code, body: set[int]) -> dict[str, int]:
    c = dict.fromkeys(("instr",) + KINDS, 0)
    c["instr"] = len(body)
    for i in body:
        kind = code[i][0].split(".")[0]
        if kind in c:
            c[kind] += 1
    return c


def hot_loops(code) -> dict[str, dict]:
    """The inner and the K-step loop of one function (see the module docstring)."""
    found = [(body, counts(code, body)) for body in loops(code)]
    out = {}
    inner = [(b, c) for b, c in found if not any(o < b for o, _ in found)]
    if inner:
        out["inner"] = max((c for _, c in inner),
                           key=lambda c: (sum(c[k] for k in PRODUCTS), c["LDG"], c["instr"]))
    kloops = [(b, c) for b, c in found if c["LDGSTS"] and any(c[k] for k in PRODUCTS)]
    if kloops:
        body, c = min(kloops, key=lambda bc: len(bc[0]))
        out["K step"] = dict(c, nest=sum(1 for o, _ in found if o < body))
    return out


def find_nvdisasm() -> str | None:
    """$NVDISASM, PATH, next to nvcc, then pip's nvidia-cuda-nvdisasm (nvidia/cu*/bin)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("NVDISASM"), shutil.which("nvdisasm"),
                  nvcc and str(Path(nvcc).resolve().parent / "nvdisasm")]
    try:
        import nvidia  # namespace package of NVIDIA's pip wheels
        candidates += sorted(p for d in nvidia.__path__ for p in glob.glob(f"{d}/cu*/bin/nvdisasm"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def compile_cubin(root: Path, source: str, arch: str, tmp: str) -> tuple[str, str]:
    """nvcc -cubin of one source: (cubin path, ptxas -v report). CalledProcessError on failure."""
    cubin = os.path.join(tmp, source.replace(".cu", ".cubin"))
    out = subprocess.run(["nvcc", *NVCC_FLAGS, f"-I{root / 'csrc'}", "-cubin", f"-arch={arch}",
                          "-o", cubin, str(root / "csrc" / "cuda" / source)],
                         capture_output=True, text=True)
    if out.returncode:
        raise subprocess.CalledProcessError(out.returncode, out.args, out.stdout, out.stderr)
    return cubin, out.stdout + out.stderr


def sass_report(root: Path, arch: str, nvdisasm: str) -> list[dict]:
    """Per kNN tile / SpMM kernel: its ptxas -v row (regs, static smem, spills), readable name
    ("kernel") and hot loops ("loops": {"inner": counts, "K step": counts})."""
    with tempfile.TemporaryDirectory(prefix="rext-sass-") as tmp:
        with concurrent.futures.ThreadPoolExecutor(len(SOURCES)) as pool:
            built = list(pool.map(lambda s: compile_cubin(root, s, arch, tmp), SOURCES))
        rows, funcs = [], {}
        for cubin, report in built:
            rows += [r for r in parse_ptxas(report) if ours(r["name"])]
            funcs.update(parse_sass(subprocess.run([nvdisasm, "-c", cubin], capture_output=True,
                                                   text=True, check=True).stdout))
    for r, name in zip(rows, demangle([r["name"] for r in rows])):
        m = re.match(r"(?:void )?(\w+<.*>)\(", name)  # drop the parameter list
        r["kernel"] = m.group(1) if m else name
    return [dict(r, loops=hot_loops(funcs.get(r["name"], [])))
            for r in rows if KERNELS.search(r["kernel"])]


def print_sass(rows: list[dict]) -> None:
    cols = ("instr",) + KINDS
    print(f"{'kernel':<41} {'regs':>4} {'smem':>5} {'spill':>5} {'loop':<6} "
          + " ".join(f"{k:>6}" for k in cols) + f" {'i/HMMA':>6} {'nest':>4}")
    for r in rows:
        for which, c in r["loops"].items() or [("-", {})]:
            per = f"{c['instr'] / c['HMMA']:.1f}" if c.get("HMMA") else "-"
            print(f"{r['kernel'][:41]:<41} {r['regs']:>4} {r['smem']:>5} {r['spill']:>5} "
                  f"{which:<6} "
                  + " ".join(f"{c.get(k, '-'):>6}" for k in cols)
                  + f" {per:>6} {c.get('nest', ''):>4}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", nargs="?", help="a build log with ptxas -v output")
    ap.add_argument("--sass", action="store_true", help="compile and disassemble the kernels")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--root", type=Path, default=REPO, help="checkout whose csrc/ is compiled")
    ap.add_argument("--json", type=Path, help="also write the --sass rows here")
    args = ap.parse_args(argv)
    if not args.sass:
        if args.log is None or not os.path.isfile(args.log):
            ap.error(f"log {args.log}: give a build log (a file), or --sass")
        rows = parse_ptxas(open(args.log, errors="replace").read())
        if rows:
            print_ptxas(rows)
        return 0 if rows else 1
    if not (args.root / "csrc" / "cuda" / SOURCES[0]).is_file():
        ap.error(f"--root {args.root}: no csrc/cuda/{SOURCES[0]} there")
    nvdisasm = find_nvdisasm()
    if shutil.which("nvcc") is None or nvdisasm is None:
        print("--sass needs nvcc on PATH and nvdisasm ($NVDISASM, PATH, the CUDA toolkit's bin/, "
              "or `pip install nvidia-cuda-nvdisasm`)", file=sys.stderr)
        return 2
    try:
        rows = sass_report(args.root.resolve(), args.arch, nvdisasm)
    except subprocess.CalledProcessError as e:
        print(f"{' '.join(e.cmd)} failed:\n{e.stdout or ''}{e.stderr or ''}", file=sys.stderr)
        return 1
    print(f"SASS of {args.root.resolve()} for {args.arch} (nvdisasm {nvdisasm})")
    print_sass(rows)
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "root": str(args.root.resolve()),
                                         "kernels": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
