#!/usr/bin/env bash
# Download, on a machine with network access, the wheels that the reclip package needs on the
# GPU machine (Python 3.12, x86-64, no network; torch, torchvision, numpy and cupy already
# there) into one folder, for device_check.sh's pipeline step:
#
#   bash benchmarks/device_wheels.sh [DIR]          # DIR defaults to .device-wheels here
#
# pip resolves open_clip_torch for that platform (metadata only), then everything the
# resolution picked is downloaded except torch's own stack (torch, torchvision, triton,
# nvidia-*, numpy and torch-only dependencies), which a GPU machine with torch installed has at its own versions.
# Knobs: PYTHON (python3), OPEN_CLIP_SPEC (open_clip_torch==3.3.0, the version tested here).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR=${1:-.device-wheels}
PY=${PYTHON:-python3}
SPEC=${OPEN_CLIP_SPEC:-open_clip_torch==3.3.0}
PLATFORM=(--only-binary=:all: --implementation cp --python-version 3.12
          --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux_2_28_x86_64)
mkdir -p "$DIR"
report=$(mktemp)
target=$(mktemp -d)
trap 'rm -rf "$report" "$target"' EXIT

"$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" --target "$target" \
  "${PLATFORM[@]}" "$SPEC" safetensors tqdm pillow
mapfile -t wanted < <("$PY" - "$report" <<'PY'
import json, re, sys
# the target machine's own torch stack: never replaced from here
skip = {"torch", "torchvision", "triton", "numpy", "sympy", "mpmath", "networkx", "jinja2",
        "markupsafe", "setuptools"}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if name not in skip and not name.startswith("nvidia-"):
        print(f"{name}=={meta['version']}")
PY
)
echo "downloading ${#wanted[@]} wheels into $DIR: ${wanted[*]}"
"$PY" -m pip download --no-deps --quiet -d "$DIR" "${PLATFORM[@]}" "${wanted[@]}"
ls -1 "$DIR"
