"""The CUDA kernels' resource usage from a build log with nvcc -Xptxas -v output.

    python benchmarks/ptxas_table.py BUILD_LOG

Prints registers, shared memory, stack and spills per reclip_ext kernel and architecture (the
toolkit's own kernels, e.g. CUB's, summarised in one line); exit status 1 when the log holds no
ptxas report. Used by .ci/run and benchmarks/device_check.sh.
"""
import re
import shutil
import subprocess
import sys


def main(log_path: str) -> int:
    text = open(log_path, errors="replace").read()
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
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(sm.group(1)) if sm else 0
    if not rows:
        return 1
    names = [r["name"] for r in rows]
    if shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        if out.returncode == 0 and len(out.stdout.splitlines()) == len(names):
            names = out.stdout.splitlines()
    own, other = [], []
    for r, name in zip(rows, names):
        name = re.sub(r"\(anonymous namespace\)::|rext::cuda::", "", name)
        (own if r["name"].startswith("_ZN4rext") else other).append((r, name))
    print(f"ptxas: {len(own)} reclip_ext kernels, {len(other)} others (CUB / toolkit)")
    print(f"  {'arch':<6} {'regs':>4} {'smem B':>7} {'stack B':>7} {'spill B':>7}  kernel")
    for r, name in own:
        flag = "  <-- SPILLS" if r["spill"] else ""
        print(f"  {r['arch']:<6} {r['regs']:>4} {r['smem']:>7} {r['stack']:>7} {r['spill']:>7}  "
              f"{name[:110]}{flag}")
    spilling = [name for r, name in other if r["spill"]]
    print(f"  others: max {max((r['regs'] for r, _ in other), default=0)} registers, "
          f"{len(spilling)} with spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
