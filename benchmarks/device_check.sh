#!/usr/bin/env bash
# The one script to run on a GPU machine (no network needed; torch, cupy, nvcc, cmake, pybind11
# and scikit-build-core are there, open_clip need not be): build reclip_ext with its CUDA half
# for sm_90, run the test suite on the GPU, run its small CUDA cases again under
# compute-sanitizer (memcheck and racecheck), measure the ReCLIP pipeline against its
# model-time floor (benchmarks/pipeline_bench.py: ViT-B-32, random init, 50,000 JPEGs, bf16, one
# epoch), then benchmark label_propagate against the torch and ZLaP recipes
# (benchmarks/device_bench.py). Run from anywhere in the repository:
#
#   OUT=/some/folder bash benchmarks/device_check.sh
#
# Everything lands in $OUT (default ./device-check-out), ten files:
#   device_check.log   all output, step by step, with a summary at the end
#   build.log          pip -v of the build (cmake, nvcc, ptxas resource usage)
#   tests.log          pytest output;  tests-junit.xml  its JUnit report
#   sanitize-memcheck.log, sanitize-racecheck.log   compute-sanitizer + pytest output per tool
#   pipeline.log       open_clip install + pipeline_bench.py output;  pipeline_bench.json  its numbers
#   bench.log          device_bench.py output (the tables);  device_bench.json  all its numbers
#
# Time: the whole script stays under REXT_CHECK_BUDGET_S (default 540 s, i.e. 9 min on one
# H200, build included). Each step has its own cap below that, and while a step runs the later
# steps' guaranteed shares are kept back from it (the reserve helper), so a slow early step
# squeezes itself, never a later one below its share:
#   step        cap    guaranteed   why
#   build       150 s  150 s        nvcc for sm_90 on all cores; first, nothing to squeeze
#   tests       100 s  100 s        the CPU-side suite takes well under a minute, which leaves
#                                   the CUDA cases most of the cap
#   sanitizer    90 s   60 s        both tools, memcheck at most half of what the step gets; a
#                                   few dozen cases of a few tiles each
#   pipeline    120 s  120 s        the wheels install, building the 50,000-JPEG folder on all
#                                   cores (~10 s), two encode passes, 782 V + T steps, the floor,
#                                   a ~600 MB checkpoint: about 60-90 s expected; kept back in
#                                   full because a cut run writes no JSON
#   device_bench the rest, at most 300 s; 80 s kept back: its own --budget-s ends 25 s before
#                                   its cap, runs n ascending and skips what would overrun, and
#                                   its JSON is rewritten after every case, so a squeezed run still
#                                   leaves the small cases measured
# The guaranteed shares add up to 510 s; the other 30 s cover what no cap times (the machine
# probe, the venv, the import check, the kill grace of a timeout). A step that is skipped (its
# knob, or the sanitizer on REXT_CHECK_DEVICE=cpu) keeps nothing back. A failed build stops the
# script; failed tests, sanitizer runs or pipeline step are reported and the later steps still
# run.
#
# Sanitizer step: `pytest -m "cuda and sanitize" tests/test_cuda.py` under compute-sanitizer
# --tool memcheck, then --tool racecheck, with torch's caching allocator off so that every array
# is its own allocation (an overrun into a cached neighbour would go unseen). A tool FAILs on
# any "ERROR SUMMARY: N errors" with N > 0, a failed or empty pytest run, or its time cap; it is
# SKIPPED, with the reason, when there is no device (REXT_CHECK_DEVICE=cpu) or no
# compute-sanitizer (PATH, then /usr/local/cuda/bin).
#
# Pipeline step: needs open_clip, which the machine lacks: it is installed offline from the
# wheels folder REXT_CHECK_WHEELS (default .device-wheels in the repository, filled beforehand on
# a machine with network by benchmarks/device_wheels.sh); without them the step is skipped,
# saying why. The install counts against the step's cap.
#
# Exit status: 0 all passed; 1 build or import check failed; 2 tests failed or timed out;
# 4 a sanitizer run failed; 3 a benchmark (pipeline or device_bench) reported errors or timed
# out (2 wins over 4 over 3). A step skipped for want of its tool (compute-sanitizer, open_clip)
# is not a failure.
#
# Knobs (environment): PYTHON (python3), REXT_CHECK_VENV (/tmp/rext-device-venv),
# REXT_CHECK_BUDGET_S, REXT_CHECK_BUILD_S, REXT_CHECK_TESTS_S, REXT_CHECK_SANITIZE_S,
# REXT_CHECK_PIPELINE_S, REXT_CHECK_BENCH_S (caps in s), REXT_CHECK_PYTEST_ARGS (extra pytest
# arguments, e.g. "-x -k cuda"), REXT_CHECK_PIPELINE_ARGS (extra pipeline_bench.py arguments,
# e.g. "--n 20000"), REXT_CHECK_BENCH_ARGS (extra device_bench.py arguments, e.g. "--quick"),
# REXT_CHECK_WHEELS (the wheels folder), REXT_CHECK_SKIP_TESTS=1, REXT_CHECK_SKIP_SANITIZE=1,
# REXT_CHECK_SKIP_PIPELINE=1, REXT_CHECK_SKIP_BENCH=1, CMAKE_CUDA_ARCHITECTURES (90),
# REXT_WITH_CUDA (ON), and REXT_CHECK_DEVICE=cpu: a dry run of this script on a machine without
# a GPU (no device check, no sanitizer, both benchmarks in their CPU smoke modes: the pipeline
# with the tiny test model on 64 images).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/device-check-out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
VENV=${REXT_CHECK_VENV:-/tmp/rext-device-venv}
DEVICE=${REXT_CHECK_DEVICE:-cuda}
BUDGET_S=${REXT_CHECK_BUDGET_S:-540}
BUILD_S=${REXT_CHECK_BUILD_S:-150}
TESTS_S=${REXT_CHECK_TESTS_S:-100}
SANITIZE_S=${REXT_CHECK_SANITIZE_S:-90}
PIPELINE_S=${REXT_CHECK_PIPELINE_S:-120}
BENCH_S=${REXT_CHECK_BENCH_S:-300}
# Guaranteed shares, kept back for a step while the steps before it run (see reserve): the
# sanitizer still gets 30 s per tool from 60 s; the pipeline gets its whole cap, since a cut
# run leaves no JSON; device_bench gets its n = 100k cases from 80 s.
SANITIZE_MIN_S=60
PIPELINE_MIN_S=$PIPELINE_S
BENCH_MIN_S=80
WHEELS=${REXT_CHECK_WHEELS:-$ROOT/.device-wheels}
IGNORED_TESTS=(tests/test_pipeline.py tests/test_cli.py tests/test_models.py tests/test_data.py
               tests/test_prompts.py tests/test_digits_model.py tests/test_shot.py
               tests/test_inductive.py  # the pipeline (open_clip): minutes of CPU work
               tests/test_distributed.py)  # torchrun with gloo ranks: CPU only, a minute

deadline=$((SECONDS + BUDGET_S))
declare -A STATUS=()
declare -A TOOK=()
declare -A SANITIZER=()   # per tool: PASS, FAIL (why) or SKIPPED (why)

step() { printf '\n== [%s UTC, %d s] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }

# cap SECONDS [RESERVE]: SECONDS, or less so that RESERVE seconds stay before the deadline
cap() {
  local c=$1 r=$((deadline - SECONDS - ${2:-0}))
  ((r < c)) && c=$r
  ((c < 5)) && c=5
  echo "$c"
}

machine() {
  step "machine"
  date -u
  uname -srm
  if [[ -e $ROOT/.git ]]; then
    echo "repo: $ROOT ($(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo '?');" \
         "$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files)"
  else
    echo "repo: $ROOT (a copy without .git)"
  fi
  echo "cpus: $(nproc)"
  if [[ -d /usr/local/cuda/bin && ":$PATH:" != *":/usr/local/cuda/bin:"* ]]; then
    export PATH=$PATH:/usr/local/cuda/bin
  fi
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi || echo "nvidia-smi failed ($?)"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  cmake --version 2>/dev/null | head -n 1 || echo "cmake: not on PATH"
  echo "python: $(command -v "$PY")"
  timeout 60 "$PY" - <<'PY' || echo "version probe failed ($?)"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "cupy", "numpy", "scipy", "pybind11", "scikit_build_core", "cmake", "ninja",
             "pytest", "hypothesis", "pytest_benchmark", "open_clip"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"  {name}: not importable ({type(err).__name__})")
try:
    import torch
    print("  torch CUDA", torch.version.cuda, "| devices", torch.cuda.device_count(),
          "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")
except Exception as err:
    print("  torch probe failed:", err)
PY
}

# ended RC LIMIT WHAT [TIMEOUT_NOTE [FAILURE_NOTE]]: one line on how a step that did not succeed
# ended (its time cap: exit 124 from timeout, 137 after its kill) and what it left behind.
ended() {
  local rc=$1 limit=$2 what=$3
  if ((rc == 124 || rc == 137)); then
    echo "$what TIMED OUT after ${limit} s${4:+ ($4)}"
  elif ((rc != 0)); then
    echo "$what FAILED (exit $rc${5:+; $5})"
  fi
}

build() {
  step "build reclip_ext (REXT_WITH_CUDA=${REXT_WITH_CUDA:-ON}, CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90}) into $VENV"
  local t0=$SECONDS site
  rm -rf "$VENV"
  # A venv made from a venv's python (the machine's python3 is one) would not see that venv's
  # packages through --system-site-packages alone: add the parent's site folders by a .pth.
  if ! "$PY" -m venv --without-pip --system-site-packages "$VENV"; then
    echo "BUILD FAILED: could not create the venv"; return 1
  fi
  site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || return 1
  "$PY" - "$site/_rext_parent_site.pth" <<'PY' || return 1
import site, sys
dirs = [d for d in site.getsitepackages() if d]
with open(sys.argv[1], "w") as f:
    for d in dirs:
        f.write(f"import site; site.addsitedir({d!r})\n")
print("parent site-packages:", ", ".join(dirs))
PY
  if ! "$VENV/bin/python" -c "import torch, pip, scikit_build_core, pybind11" ; then
    echo "BUILD FAILED: the venv does not see torch / pip / scikit-build-core / pybind11"; return 1
  fi
  local limit
  limit=$(cap "$BUILD_S")
  echo "pip install --no-build-isolation --no-deps --no-index . (timeout ${limit} s, log $OUT/build.log)"
  REXT_WITH_CUDA=${REXT_WITH_CUDA:-ON} CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90} \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    timeout -k 10 "$limit" "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps \
      --no-index --no-cache-dir -Cbuild-dir=build/device "$ROOT" >"$OUT/build.log" 2>&1
  local rc=$?
  TOOK[build]=$((SECONDS - t0))
  if ((rc != 0)); then
    tail -n 80 "$OUT/build.log"
    ended "$rc" "$limit" BUILD "" "pip; see build.log"
    return 1
  fi
  grep -E "reclip_ext: CUDA" "$OUT/build.log" | sed 's/^ *//' | sort -u
  ptxas_table "$OUT/build.log"
  echo "built in ${TOOK[build]} s"
  # The installed build, not the source tree: -P keeps the working directory off sys.path.
  (cd / && "$VENV/bin/python" -P - "$DEVICE" "$VENV" "${REXT_WITH_CUDA:-ON}") <<'PY'
import os, sys
import reclip_ext
device, venv, with_cuda = sys.argv[1:4]
count = reclip_ext.cuda_device_count()
print("reclip_ext", reclip_ext.__version__, "from", os.path.dirname(reclip_ext.__file__),
      "| built_with_cuda:", reclip_ext.built_with_cuda(), "| cuda devices:", count,
      "| cpu kernels:", reclip_ext.simd_level())
if not os.path.realpath(reclip_ext.__file__).startswith(os.path.realpath(venv) + os.sep):
    sys.exit(f"IMPORT CHECK FAILED: reclip_ext came from {reclip_ext.__file__}, not {venv}")
if with_cuda.upper() != "OFF" and not reclip_ext.built_with_cuda():
    sys.exit("IMPORT CHECK FAILED: the CUDA half was not compiled")
if device == "cuda" and count < 1:
    sys.exit("IMPORT CHECK FAILED: cuda_device_count() == 0 on a machine that should have a GPU")
PY
}

# ptxas_table BUILD_LOG: the kernels' resource usage (benchmarks/ptxas_table.py).
ptxas_table() {
  "$PY" "$ROOT/benchmarks/ptxas_table.py" "$1" || echo "(no ptxas resource report parsed)"
}

tests() {
  step "tests (pytest tests; the reclip package's slower test files are left out, test_device.py runs)"
  local t0=$SECONDS limit rc ignores=() extra=()
  for f in "${IGNORED_TESTS[@]}"; do ignores+=("--ignore=$f"); done
  # The device tests of the pipeline (tests/test_device.py) need open_clip; without it they
  # skip, saying so, and the pipeline step later says why it cannot run.
  local why
  why=$(open_clip_ready 60) || echo "open_clip unavailable, its tests skip: $why"
  # shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
  extra=(${REXT_CHECK_PYTEST_ARGS:-})
  limit=$(cap "$TESTS_S" "$(reserve tests)")
  echo "timeout ${limit} s, log $OUT/tests.log"
  timeout -k 10 "$limit" "$VENV/bin/python" -P -m pytest tests "${ignores[@]}" -q -rfEs \
    -p no:cacheprovider --durations=15 --junitxml="$OUT/tests-junit.xml" -o junit_family=xunit2 \
    "${extra[@]}" >"$OUT/tests.log" 2>&1
  rc=$?
  TOOK[tests]=$((SECONDS - t0))
  tail -n 60 "$OUT/tests.log"
  echo
  ended "$rc" "$limit" TESTS "dots so far are in tests.log; no JUnit report" "see tests.log"
  local cuda_skips
  cuda_skips=$(grep -cE "SKIPPED.*(no CUDA|CUDA device)" "$OUT/tests.log")
  if [[ $DEVICE == cuda ]] && ((cuda_skips > 0)); then
    echo "WARNING: $cuda_skips skip lines mention a missing CUDA device on a machine that has one"
  fi
  return "$rc"
}

# reserve STEP: seconds kept back for the steps after STEP (each one's guaranteed share), in the
# order tests, sanitize, pipeline, bench; a step that will not run keeps nothing back.
reserve() {
  local r=0 later=0 name
  for name in tests sanitize pipeline bench; do
    if ((later)); then
      case $name in
        sanitize)
          # on REXT_CHECK_DEVICE=cpu the sanitizer skips at once
          [[ ${REXT_CHECK_SKIP_SANITIZE:-0} == 1 || $DEVICE != cuda ]] || r=$((r + SANITIZE_MIN_S)) ;;
        pipeline) [[ ${REXT_CHECK_SKIP_PIPELINE:-0} == 1 ]] || r=$((r + PIPELINE_MIN_S)) ;;
        bench) [[ ${REXT_CHECK_SKIP_BENCH:-0} == 1 ]] || r=$((r + BENCH_MIN_S)) ;;
      esac
    fi
    [[ $name == "$1" ]] && later=1
  done
  echo "$r"
}

# sanitize: the small CUDA cases under compute-sanitizer memcheck and racecheck. Returns 0 when
# every tool passed or the step was skipped, 1 when a tool failed.
sanitize() {
  step "compute-sanitizer memcheck and racecheck (pytest -m 'cuda and sanitize' tests/test_cuda.py)"
  local t0=$SECONDS tool exe end limit rc errors passed log why failed=0
  if [[ $DEVICE != cuda ]]; then
    why="no CUDA device to check: REXT_CHECK_DEVICE=$DEVICE"
  else
    exe=$(command -v compute-sanitizer || true)
    [[ -z $exe && -x /usr/local/cuda/bin/compute-sanitizer ]] && exe=/usr/local/cuda/bin/compute-sanitizer
    [[ -z $exe ]] && why="compute-sanitizer not found on PATH or in /usr/local/cuda/bin"
  fi
  if [[ -n ${why:-} ]]; then
    echo "SKIPPED: $why"
    SANITIZER[memcheck]="SKIPPED ($why)"
    SANITIZER[racecheck]="SKIPPED ($why)"
    TOOK[sanitize]=0
    return 0
  fi
  echo "$exe: $("$exe" --version 2>/dev/null | grep -m1 -iE 'version' || echo 'version ?')"
  limit=$(cap "$SANITIZE_S" "$(reserve sanitize)")
  end=$((SECONDS + limit))
  for tool in memcheck racecheck; do
    # memcheck may take half of the step's time, racecheck what is left
    limit=$((end - SECONDS))
    [[ $tool == memcheck ]] && limit=$((limit / 2))
    ((limit < 5)) && limit=5
    log=$OUT/sanitize-$tool.log
    echo "-- $tool: timeout ${limit} s, log $log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$limit" "$exe" --tool "$tool" \
      --error-exitcode 86 "$VENV/bin/python" -P -m pytest tests/test_cuda.py -m "cuda and sanitize" \
      -q -rfEs -p no:cacheprovider >"$log" 2>&1
    rc=$?
    errors=$(grep -oE "ERROR SUMMARY: [0-9]+ error" "$log" | awk '{n += $3} END {print n + 0}')
    passed=$(grep -oE "[0-9]+ passed" "$log" | tail -n 1 | awk '{print $1 + 0}')
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|[0-9]+ (passed|failed)|^(FAILED|ERROR) " "$log" | tail -n 15
    if ((errors > 0)); then
      SANITIZER[$tool]="FAIL ($errors sanitizer errors)"
    elif ((rc == 124 || rc == 137)); then
      SANITIZER[$tool]="FAIL (timed out after ${limit} s)"
    elif ((rc != 0)); then
      SANITIZER[$tool]="FAIL (exit $rc)"
    elif ! grep -q "ERROR SUMMARY" "$log"; then
      SANITIZER[$tool]="FAIL (no ERROR SUMMARY line: did the sanitizer run?)"
    elif ((${passed:-0} == 0)); then
      SANITIZER[$tool]="FAIL (no test passed: every case skipped or deselected)"
    else
      SANITIZER[$tool]="PASS ($passed tests, 0 errors)"
    fi
    echo "$tool: ${SANITIZER[$tool]}"
    if [[ ${SANITIZER[$tool]} == FAIL* ]]; then
      failed=1
      tail -n 40 "$log"
    fi
  done
  TOOK[sanitize]=$((SECONDS - t0))
  return "$failed"
}

# open_clip_ready [SECONDS]: open_clip for the pipeline step, from the wheels folder when the
# venv lacks it, the install given at most SECONDS (120); the reason on stdout and status 1
# when it stays unavailable
open_clip_ready() {
  local t=${1:-120}
  ((t > 120)) && t=120
  ((t < 5)) && t=5   # timeout 0 would mean no limit at all
  if "$VENV/bin/python" -c "import open_clip" 2>/dev/null; then return 0; fi
  if [[ ! -d $WHEELS ]]; then
    echo "open_clip is not installed and there is no wheels folder $WHEELS" \
         "(fill one with benchmarks/device_wheels.sh, or set REXT_CHECK_WHEELS)"
    return 1
  fi
  echo "pip install --no-index --find-links $WHEELS open_clip_torch (log $OUT/pipeline.log)"
  if ! PIP_DISABLE_PIP_VERSION_CHECK=1 timeout -k 10 "$t" "$VENV/bin/python" -m pip install \
       --no-index --find-links "$WHEELS" open_clip_torch >>"$OUT/pipeline.log" 2>&1; then
    tail -n 20 "$OUT/pipeline.log"
    echo "open_clip could not be installed from $WHEELS (see pipeline.log)"
    return 1
  fi
  if ! "$VENV/bin/python" -c "import open_clip" >>"$OUT/pipeline.log" 2>&1; then
    tail -n 5 "$OUT/pipeline.log"
    echo "open_clip was installed from $WHEELS but does not import (see pipeline.log)"
    return 1
  fi
}

pipeline() {
  step "pipeline (benchmarks/pipeline_bench.py: ReCLIP on a JPEG folder against the in-memory floor)"
  local t0=$SECONDS end limit rc why args=()
  : >"$OUT/pipeline.log"
  # The step's share is fixed before the install, so that a slow install comes out of the
  # pipeline's cap rather than out of device_bench's reserve.
  end=$((SECONDS + $(cap "$PIPELINE_S" "$(reserve pipeline)")))
  if ! why=$(open_clip_ready "$((end - SECONDS))"); then
    echo "$why"
    STATUS[pipeline]="skipped (no open_clip)"
    TOOK[pipeline]=$((SECONDS - t0))
    return 0
  fi
  [[ -n $why ]] && echo "$why"
  limit=$((end - SECONDS))
  ((limit < 5)) && limit=5
  if [[ $DEVICE == cpu ]]; then
    args=(--device cpu --model tests/assets/tiny-vit.json --n 64 --encode-batch-size 16
          --batch-size 16 --workers 2)
  else
    args=(--device cuda --model ViT-B-32 --n 50000 --amp bf16)
  fi
  # shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
  args+=(${REXT_CHECK_PIPELINE_ARGS:-})
  echo "timeout ${limit} s, log $OUT/pipeline.log"
  # the JPEG folder goes to the machine's scratch space, not into the repository copy
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$VENV/bin/python" -P benchmarks/pipeline_bench.py \
    --epochs 1 --cache "${TMPDIR:-/tmp}/reclip-bench" --json "$OUT/pipeline_bench.json" \
    "${args[@]}" 2>&1 | tee -a "$OUT/pipeline.log"
  rc=${PIPESTATUS[0]}
  TOOK[pipeline]=$((SECONDS - t0))
  ended "$rc" "$limit" "PIPELINE BENCHMARK" "no JSON: it is written at the end"
  STATUS[pipeline]=$([[ $rc == 0 ]] && echo ok || echo FAILED)
  return "$rc"
}

bench() {
  step "benchmark (benchmarks/device_bench.py)"
  local t0=$SECONDS limit rc args=()
  limit=$(cap "$BENCH_S")
  if [[ $DEVICE == cpu ]]; then args=(--device cpu --n 2000 --m 10 --d 64); fi
  # shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
  args+=(${REXT_CHECK_BENCH_ARGS:-})
  echo "timeout ${limit} s, --budget-s $((limit - 25)), log $OUT/bench.log"
  PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "$VENV/bin/python" -P benchmarks/device_bench.py \
    --budget-s "$((limit - 25))" --json "$OUT/device_bench.json" "${args[@]}" 2>&1 \
    | tee "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  TOOK[bench]=$((SECONDS - t0))
  ended "$rc" "$limit" BENCHMARK "device_bench.json holds the cases finished before" \
    "see the errors list in device_bench.json"
  return "$rc"
}

summary() {
  step "summary"
  local name
  for name in machine build tests sanitize pipeline bench; do
    printf '  %-8s %-28s %s\n' "$name" "${STATUS[$name]:-not run}" "${TOOK[$name]:+${TOOK[$name]} s}"
  done
  for name in memcheck racecheck; do
    printf '    %-10s %s\n' "$name" "${SANITIZER[$name]:-not run}"
  done
  if [[ -f $OUT/tests-junit.xml ]]; then
    "$PY" - "$OUT/tests-junit.xml" <<'PY' || true
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
get = lambda key: sum(int(s.get(key, 0)) for s in suites)
total, fail, err, skip = get("tests"), get("failures"), get("errors"), get("skipped")
print(f"  tests: {total - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped")
for case in root.iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        print(f"    FAILED {case.get('classname')}::{case.get('name')}")
PY
  fi
  echo "  total ${SECONDS} s of a ${BUDGET_S} s budget; files in $OUT:"
  ls -l "$OUT"
}

main() {
  local final=0
  echo "device_check.sh: device=$DEVICE, budget ${BUDGET_S} s, OUT=$OUT"
  machine
  STATUS[machine]="done"
  if build; then
    STATUS[build]=ok
  else
    STATUS[build]=FAILED
    TOOK[build]=${TOOK[build]:-$SECONDS}
    summary
    echo "RESULT: build failed"
    return 1
  fi
  if [[ ${REXT_CHECK_SKIP_TESTS:-0} == 1 ]]; then
    STATUS[tests]="skipped (REXT_CHECK_SKIP_TESTS)"
  elif tests; then
    STATUS[tests]=passed
  else
    STATUS[tests]=FAILED
    final=2
  fi
  if [[ ${REXT_CHECK_SKIP_SANITIZE:-0} == 1 ]]; then
    STATUS[sanitize]="skipped (REXT_CHECK_SKIP_SANITIZE)"
  elif sanitize; then
    if [[ ${SANITIZER[memcheck]} == SKIPPED* ]]; then STATUS[sanitize]=skipped; else STATUS[sanitize]=passed; fi
  else
    STATUS[sanitize]=FAILED
    ((final == 0)) && final=4
  fi
  if [[ ${REXT_CHECK_SKIP_PIPELINE:-0} == 1 ]]; then
    STATUS[pipeline]="skipped (REXT_CHECK_SKIP_PIPELINE)"
  elif ! pipeline; then
    ((final == 0)) && final=3
  fi
  if [[ ${REXT_CHECK_SKIP_BENCH:-0} == 1 ]]; then
    STATUS[bench]="skipped (REXT_CHECK_SKIP_BENCH)"
  elif bench; then
    STATUS[bench]=ok
  else
    STATUS[bench]=FAILED
    ((final == 0)) && final=3
  fi
  summary
  echo "RESULT: build ${STATUS[build]}, tests ${STATUS[tests]}, sanitizer ${STATUS[sanitize]}," \
       "pipeline ${STATUS[pipeline]}, benchmark ${STATUS[bench]} (exit $final)"
  return "$final"
}

main "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
