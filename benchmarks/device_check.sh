#!/usr/bin/env bash
# The one script to run on a GPU machine (no network needed; torch, cupy, nvcc, cmake, pybind11
# and scikit-build-core are there, open_clip need not be). Run from anywhere in the repository:
#
#   OUT=/some/folder bash benchmarks/device_check.sh
#
# benchmarks/README.md ("GPU") describes it in full: the stages in order of value (build, tests,
# bench, sanitize, pipeline), each under its cap with time kept back for the later ones, the whole
# within REXT_CHECK_BUDGET_S (420 s, so that a second, shorter run fits in the same machine
# window); the at most 6 files in $OUT (the device tool returns only a few); the exit status
# (0 all passed; 1 build or import check; 2 tests; 4 a sanitizer run; 3 a benchmark; 2 wins over
# 4 over 3; a stage skipped for want of its tool or by its knob is not a failure) and the RERUN
# line that repeats just the stages that failed, timed out or had no time.
#
# Knobs (environment): PYTHON (python3), REXT_CHECK_VENV (/tmp/rext-device-venv),
# REXT_CHECK_BUDGET_S, REXT_CHECK_{BUILD,TESTS,BENCH,SANITIZE,PIPELINE}_S (caps in s),
# REXT_CHECK_SKIP_{TESTS,BENCH,SANITIZE,PIPELINE}=1, REXT_CHECK_PYTEST_ARGS,
# REXT_CHECK_BENCH_ARGS, REXT_CHECK_PIPELINE_ARGS (extra arguments, e.g. "-x", "--quick"),
# REXT_CHECK_WHEELS (.device-wheels), REXT_CHECK_SANITIZER (the compute-sanitizer to use),
# REXT_CHECK_SANITIZER_FILTER (kns=rext::cuda: the kernels it instruments),
# CMAKE_CUDA_ARCHITECTURES (90), REXT_WITH_CUDA (ON);
# REXT_CHECK_DEVICE=cpu: the real stages on a machine without a GPU (no sanitizer; both
# benchmarks in their CPU smoke modes);
# REXT_CHECK_DRY_RUN=1 (also chosen when no GPU is visible and REXT_CHECK_DEVICE is not cpu):
# every stage's command is printed and replaced by `sleep REXT_CHECK_DRY_SLEEP_S` (0) under the
# same time limit, writing placeholder outputs; the sanitizer's lookup and probe run for real (a
# stand-in tool can be given with REXT_CHECK_SANITIZER).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/device-check-out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
VENV=${REXT_CHECK_VENV:-/tmp/rext-device-venv}
DEVICE=${REXT_CHECK_DEVICE:-cuda}
DRY=${REXT_CHECK_DRY_RUN:-0}
DRY_SLEEP_S=${REXT_CHECK_DRY_SLEEP_S:-0}
BUDGET_S=${REXT_CHECK_BUDGET_S:-420}
MARGIN_S=15  # after the last stage: a timeout's kill grace (10 s) and the summary
WHEELS=${REXT_CHECK_WHEELS:-$ROOT/.device-wheels}
FILTER=${REXT_CHECK_SANITIZER_FILTER:-kns=rext::cuda}
STAGES=(build tests bench sanitize pipeline)
declare -A CAP=([build]=${REXT_CHECK_BUILD_S:-150} [tests]=${REXT_CHECK_TESTS_S:-60}
                [bench]=${REXT_CHECK_BENCH_S:-120} [sanitize]=${REXT_CHECK_SANITIZE_S:-75}
                [pipeline]=${REXT_CHECK_PIPELINE_S:-60})
declare -A KEEP=([build]=0 [tests]=45 [bench]=100 [sanitize]=45 [pipeline]=0)
declare -A KNOB=([tests]=REXT_CHECK_SKIP_TESTS [bench]=REXT_CHECK_SKIP_BENCH
                 [sanitize]=REXT_CHECK_SKIP_SANITIZE [pipeline]=REXT_CHECK_SKIP_PIPELINE)
# test files with no CUDA case, whose imports (open_clip, the CLI) would only cost time
IGNORED_TESTS=(tests/test_pipeline.py tests/test_cli.py tests/test_models.py tests/test_data.py
               tests/test_prompts.py tests/test_digits_model.py tests/test_shot.py
               tests/test_inductive.py tests/test_distributed.py)
OUTPUTS=(device_check.log device_check.json tests-junit.xml device_bench.json
         pipeline_bench.json logs.tar.gz)
MAX_FILES=${#OUTPUTS[@]}

DRY_WHY=
if [[ $DRY != 1 && $DEVICE == cuda ]] && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1 \
   && ! nvidia-smi -L >/dev/null 2>&1; then
  DRY=1
  DRY_WHY="no GPU visible (no /dev/nvidia*, no nvidia-smi -L), so a dry run" \
"(REXT_CHECK_DEVICE=cpu runs the stages for real on the CPU)"
fi
# the venv's python runs the stages; a dry run builds no venv
VPY=$VENV/bin/python
[[ $DRY == 1 ]] && VPY=$PY
for f in "${OUTPUTS[@]}"; do rm -f "${OUT:?}/$f"; done  # a previous run's, in a reused $OUT
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/rext-check-logs.XXXXXX") || exit 1  # tarred at the end

deadline=$((SECONDS + BUDGET_S - MARGIN_S))
declare -A STATUS=() TOOK=() LIMIT=() NOTE=() SAN=()

step() { printf '\n== [%s UTC, %d s] %s\n' "$(date -u +%H:%M:%S)" "$SECONDS" "$*"; }

# limit_for STAGE: its cap, or less so that the later stages that will run keep their share;
# when that would leave it under 10 s, what is left of the budget (up to its cap): the earlier
# stage is worth more, and the later ones then find no time
limit_for() {
  local later=0 keep=0 name c left=$((deadline - SECONDS))
  for name in "${STAGES[@]}"; do
    if ((later)) && ! skipped_by_knob "$name"; then keep=$((keep + KEEP[$name])); fi
    [[ $name == "$1" ]] && later=1
  done
  c=$((left - keep))
  ((c < 10)) && c=$left
  ((c > CAP[$1])) && c=${CAP[$1]}
  echo "$c"
}

skipped_by_knob() { [[ -n ${KNOB[$1]:-} && ${!KNOB[$1]:-0} == 1 ]]; }

# run LIMIT LOG OUTPUTS -- COMMAND...: COMMAND under `timeout LIMIT`, output to LOG; in a dry
# run the command is printed and `sleep DRY_SLEEP_S` stands in, writing placeholder OUTPUTS
# (space-separated paths) when it ends in time. Returns the exit status (124/137: timed out).
run() {
  local limit=$1 log=$2 outputs=$3 rc f
  shift 4
  if [[ $DRY == 1 ]]; then
    echo "dry run: would run: $*" >>"$log"
    timeout -k 2 "$limit" sleep "$DRY_SLEEP_S" >>"$log" 2>&1
    rc=$?
    if ((rc == 0)); then
      for f in $outputs; do
        case $f in
          *.xml) echo '<testsuite name="dry-run" tests="0" failures="0" errors="0" skipped="0"/>' >"$f" ;;
          *) echo '{"dry_run": true}' >"$f" ;;
        esac
      done
    fi
    return "$rc"
  fi
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
}

# outcome STAGE RC LIMIT [NOTE]: the stage's status from its exit status
outcome() {
  local name=$1 rc=$2 limit=$3
  if ((rc == 0)); then STATUS[$name]=passed
  elif ((rc == 124 || rc == 137)); then STATUS[$name]="TIMED OUT"; NOTE[$name]="after $limit s"
  else STATUS[$name]=FAILED; NOTE[$name]=${4:-"exit $rc"}
  fi
}

machine() {
  step "machine"
  date -u
  uname -srm
  echo "repo: $ROOT ($(git -C "$ROOT" log -1 --format='%h %s' 2>/dev/null || echo 'no git'))"
  echo "cpus: $(nproc); budget ${BUDGET_S} s; dry run: $DRY; device: $DEVICE"
  if [[ -d /usr/local/cuda/bin && ":$PATH:" != *":/usr/local/cuda/bin:"* ]]; then
    export PATH=$PATH:/usr/local/cuda/bin
  fi
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -n 1; else echo "nvcc: not found"; fi
  [[ $DRY == 1 ]] && return 0
  timeout 60 "$PY" - <<'PY' || echo "version probe failed ($?)"
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "cupy", "numpy", "scikit_build_core", "pybind11", "pytest", "open_clip"):
    try:
        print(f"  {name} {getattr(importlib.import_module(name), '__version__', '?')}")
    except Exception as err:
        print(f"  {name}: not importable ({type(err).__name__})")
PY
}

build() {
  local limit log=$LOGS/build.log t0=$SECONDS rc site
  limit=$(limit_for build)
  step "build (REXT_WITH_CUDA=${REXT_WITH_CUDA:-ON}, sm ${CMAKE_CUDA_ARCHITECTURES:-90}) into $VENV, limit ${limit} s"
  LIMIT[build]=$limit
  if [[ $DRY == 1 ]]; then
    run "$limit" "$log" "" -- pip install --no-build-isolation --no-deps --no-index "$ROOT"
    rc=$?
  else
    rm -rf "$VENV"
    # A venv made from a venv's python does not see that venv's packages through
    # --system-site-packages alone: add the parent's site folders by a .pth.
    "$PY" -m venv --without-pip --system-site-packages "$VENV" &&
      site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") &&
      "$PY" -c "import site, sys; open(sys.argv[1], 'w').writelines(f'import site; site.addsitedir({d!r})\n' for d in site.getsitepackages())" \
        "$site/_rext_parent_site.pth" &&
      "$VENV/bin/python" -c "import torch, pip, scikit_build_core, pybind11" >>"$log" 2>&1
    rc=$?
    if ((rc == 0)); then
      REXT_WITH_CUDA=${REXT_WITH_CUDA:-ON} CMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90} \
      CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        run "$((limit - (SECONDS - t0)))" "$log" "" -- "$VENV/bin/python" -m pip install -v \
          --no-build-isolation --no-deps --no-index --no-cache-dir -Cbuild-dir=build/device "$ROOT"
      rc=$?
    else
      echo "the venv does not see torch / pip / scikit-build-core / pybind11" >>"$log"
    fi
    if ((rc == 0)); then
      grep -E "reclip_ext: CUDA" "$log" | sed 's/^ *//' | sort -u
      "$PY" "$ROOT/benchmarks/ptxas_table.py" "$log" || echo "(no ptxas resource report parsed)"
      import_check >>"$log" 2>&1
      rc=$?
      ((rc == 0)) || NOTE[build]="import check failed (see build.log)"
    fi
  fi
  TOOK[build]=$((SECONDS - t0))
  outcome build "$rc" "$limit" "${NOTE[build]:-pip failed (see build.log)}"
  ((rc == 0)) || tail -n 40 "$log"
  return "$rc"
}

# The installed build, not the source tree: -P and cwd / keep the checkout off sys.path.
import_check() {
  (cd / && "$VENV/bin/python" -P - "$DEVICE" "$VENV" "${REXT_WITH_CUDA:-ON}") <<'PY'
import os, sys
import reclip_ext
device, venv, with_cuda = sys.argv[1:4]
count = reclip_ext.cuda_device_count()
print("reclip_ext", reclip_ext.__version__, "from", os.path.dirname(reclip_ext.__file__),
      "| built_with_cuda:", reclip_ext.built_with_cuda(), "| built_with_cusparse:",
      reclip_ext.built_with_cusparse(), "| cuda devices:", count)
if reclip_ext.built_with_cuda() and not reclip_ext.built_with_cusparse():
    print("note: no cusparse.h was found (set REXT_CUSPARSE_INCLUDE): the spmm='cusparse' tests "
          "are skipped and the bench times the kernel SpMM alone")
if not os.path.realpath(reclip_ext.__file__).startswith(os.path.realpath(venv) + os.sep):
    sys.exit(f"IMPORT CHECK FAILED: reclip_ext came from {reclip_ext.__file__}, not {venv}")
if with_cuda.upper() != "OFF" and not reclip_ext.built_with_cuda():
    sys.exit("IMPORT CHECK FAILED: the CUDA half was not compiled")
if device == "cuda" and count < 1:
    sys.exit("IMPORT CHECK FAILED: cuda_device_count() == 0 on a machine that should have a GPU")
PY
}

tests() {
  local limit log=$LOGS/tests.log t0=$SECONDS rc ignores=() extra=() f
  limit=$(limit_for tests)
  step "tests: pytest -m cuda (REXT_SYNC=1), limit ${limit} s"
  LIMIT[tests]=$limit
  for f in "${IGNORED_TESTS[@]}"; do ignores+=("--ignore=$f"); done
  # shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
  extra=(${REXT_CHECK_PYTEST_ARGS:-})
  REXT_SYNC=1 run "$limit" "$log" "$OUT/tests-junit.xml" -- "$VPY" -P -m pytest \
    tests -m cuda "${ignores[@]}" -q -rfEs -p no:cacheprovider --durations=10 \
    --junitxml="$OUT/tests-junit.xml" -o junit_family=xunit2 "${extra[@]}"
  rc=$?
  TOOK[tests]=$((SECONDS - t0))
  tail -n 30 "$log"
  outcome tests "$rc" "$limit" "see tests.log"
  if [[ $DRY != 1 && $DEVICE == cuda ]] && grep -qE "SKIPPED.*no CUDA" "$log"; then
    echo "WARNING: CUDA cases skipped for want of a device on a machine that has one"
  fi
  return "$rc"
}

bench() {
  local limit log=$LOGS/bench.log t0=$SECONDS rc args=()
  limit=$(limit_for bench)
  step "bench: device_bench.py, limit ${limit} s"
  LIMIT[bench]=$limit
  if [[ $DEVICE == cpu ]]; then
    args=(--device cpu --n 2000 --m 10 --d 64)
  else
    args=(--n 100000,1280000 --m 1000 --d 768 --precisions bf16 --baselines-max-n 100000
          --largest-first)
  fi
  # shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
  args+=(${REXT_CHECK_BENCH_ARGS:-})
  # its own budget ends 20 s before the limit; the JSON is rewritten after every case
  PYTHONUNBUFFERED=1 run "$limit" "$log" "$OUT/device_bench.json" -- "$VPY" -P \
    benchmarks/device_bench.py --budget-s "$((limit > 40 ? limit - 20 : limit / 2))" \
    --json "$OUT/device_bench.json" "${args[@]}"
  rc=$?
  TOOK[bench]=$((SECONDS - t0))
  tail -n 40 "$log"
  outcome bench "$rc" "$limit" "see the errors in device_bench.json"
  return "$rc"
}

# sanitize: probe, then memcheck and racecheck. 0 when both passed or the stage was skipped.
sanitize() {
  local limit log=$LOGS/sanitize-probe.log t0=$SECONDS rc exe end tool tlimit errors passed why=
  limit=$(limit_for sanitize)
  step "sanitize: compute-sanitizer (filter $FILTER), limit ${limit} s"
  LIMIT[sanitize]=$limit
  end=$((SECONDS + limit))
  exe=${REXT_CHECK_SANITIZER:-$(command -v compute-sanitizer || true)}
  [[ -z $exe && -x /usr/local/cuda/bin/compute-sanitizer ]] && exe=/usr/local/cuda/bin/compute-sanitizer
  if [[ $DEVICE != cuda ]]; then
    why="no CUDA device (REXT_CHECK_DEVICE=$DEVICE)"
  elif [[ -z $exe ]]; then
    why="compute-sanitizer not found on PATH or in /usr/local/cuda/bin"
  else
    # One tiny launch of one of our kernels: a host where the tool cannot work says so here in
    # about a second, instead of spending the stage's time limit.
    echo "probe: $exe --tool memcheck --kernel-name $FILTER python -c '<one knn_affinity call>'"
    timeout -k 5 30 "$exe" --tool memcheck --kernel-name "$FILTER" --error-exitcode 86 \
      "$VPY" -P -c "import torch, reclip_ext
reclip_ext.knn_affinity(torch.ones(4, 2, device='cuda'), 1)
torch.cuda.synchronize()
print('probe ok')" >"$log" 2>&1
    rc=$?
    if grep -qi "device not supported" "$log"; then
      why="the probe says: $(grep -m1 -i "device not supported" "$log" | sed 's/^[= ]*//')"
    elif ((rc == 86)); then
      why=
      SAN[probe]="FAIL (memcheck errors in one knn_affinity call)"
    elif ((rc != 0)) || ! grep -q "probe ok" "$log"; then
      why="the probe failed (exit $rc): $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)"
    fi
    SAN[probe]=${SAN[probe]:-${why:-"ok ($((SECONDS - t0)) s)"}}
    echo "probe: ${SAN[probe]}"
  fi
  if [[ -n $why ]]; then
    echo "SKIPPED: $why"
    SAN[memcheck]="SKIPPED ($why)"
    SAN[racecheck]="SKIPPED ($why)"
    STATUS[sanitize]=skipped
    NOTE[sanitize]=$why
    TOOK[sanitize]=$((SECONDS - t0))
    return 0
  fi
  if [[ ${SAN[probe]} == FAIL* ]]; then
    SAN[memcheck]="not run (the probe failed)"
    SAN[racecheck]="not run (the probe failed)"
    STATUS[sanitize]=FAILED
    NOTE[sanitize]=${SAN[probe]}
    TOOK[sanitize]=$((SECONDS - t0))
    tail -n 30 "$log"
    return 1
  fi
  for tool in memcheck racecheck; do
    # memcheck may take 60 % of what is left: it instruments every access of 40-odd cases
    tlimit=$((end - SECONDS))
    [[ $tool == memcheck ]] && tlimit=$((tlimit * 3 / 5))
    log=$LOGS/sanitize-$tool.log
    if ((tlimit < 10)); then
      SAN[$tool]="FAIL (no time left: ${tlimit} s)"
      echo "$tool: ${SAN[$tool]}"
      continue
    fi
    echo "-- $tool: limit ${tlimit} s"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run "$tlimit" "$log" "" -- "$exe" --tool "$tool" \
      --kernel-name "$FILTER" --error-exitcode 86 "$VPY" -P -m pytest \
      tests/test_cuda.py -m "cuda and sanitize" -q -rfEs -p no:cacheprovider
    rc=$?
    errors=$(grep -oE "ERROR SUMMARY: [0-9]+ error" "$log" | awk '{n += $3} END {print n + 0}')
    passed=$(grep -oE "[0-9]+ passed" "$log" | tail -n 1 | awk '{print $1 + 0}')
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|[0-9]+ (passed|failed)|^(FAILED|ERROR) " "$log" | tail -n 10
    if ((errors > 0)); then SAN[$tool]="FAIL ($errors sanitizer errors)"
    elif ((rc == 124 || rc == 137)); then SAN[$tool]="FAIL (timed out after ${tlimit} s)"
    elif ((rc != 0)); then SAN[$tool]="FAIL (exit $rc)"
    elif [[ $DRY == 1 ]]; then SAN[$tool]="PASS (dry run)"
    elif ! grep -q "ERROR SUMMARY" "$log"; then SAN[$tool]="FAIL (no ERROR SUMMARY: did it run?)"
    elif ((${passed:-0} == 0)); then SAN[$tool]="FAIL (no test passed)"
    else SAN[$tool]="PASS ($passed tests, 0 errors)"
    fi
    echo "$tool: ${SAN[$tool]}"
    [[ ${SAN[$tool]} == FAIL* ]] && tail -n 30 "$log"
  done
  TOOK[sanitize]=$((SECONDS - t0))
  if [[ ${SAN[memcheck]} == FAIL* || ${SAN[racecheck]} == FAIL* ]]; then
    STATUS[sanitize]=FAILED
    NOTE[sanitize]="memcheck ${SAN[memcheck]}; racecheck ${SAN[racecheck]}"
    return 1
  fi
  STATUS[sanitize]=passed
}

# open_clip_ready SECONDS: open_clip in the venv, from the wheels folder if need be; the reason
# on stdout and status 1 when it stays unavailable
open_clip_ready() {
  local t=$1 log=$LOGS/pipeline.log
  [[ $DRY == 1 ]] && return 0
  "$VPY" -c "import open_clip" 2>/dev/null && return 0
  if [[ ! -d $WHEELS ]]; then
    echo "open_clip is not installed and there is no wheels folder $WHEELS" \
         "(fill one with benchmarks/device_wheels.sh, or set REXT_CHECK_WHEELS)"
    return 1
  fi
  if ! PIP_DISABLE_PIP_VERSION_CHECK=1 timeout -k 5 "$t" "$VPY" -m pip install \
       --no-index --find-links "$WHEELS" open_clip_torch >>"$log" 2>&1 ||
     ! "$VPY" -c "import open_clip" >>"$log" 2>&1; then
    echo "open_clip could not be installed from $WHEELS (see pipeline.log)"
    return 1
  fi
}

pipeline() {
  local limit log=$LOGS/pipeline.log t0=$SECONDS rc why args=()
  limit=$(limit_for pipeline)
  step "pipeline: pipeline_bench.py, limit ${limit} s (open_clip install included)"
  LIMIT[pipeline]=$limit
  if ! why=$(open_clip_ready "$limit"); then
    echo "SKIPPED: $why"
    STATUS[pipeline]=skipped
    NOTE[pipeline]=$why
    TOOK[pipeline]=$((SECONDS - t0))
    return 0
  fi
  if [[ $DEVICE == cpu ]]; then
    args=(--device cpu --model tests/assets/tiny-vit.json --n 64 --encode-batch-size 16
          --batch-size 16 --workers 2)
  else
    args=(--device cuda --model ViT-B-32 --n 10000 --amp bf16)
  fi
  # shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
  args+=(${REXT_CHECK_PIPELINE_ARGS:-})
  # the JPEG folder goes to the machine's scratch space, not into the repository copy
  PYTHONUNBUFFERED=1 run "$((limit - (SECONDS - t0)))" "$log" "$OUT/pipeline_bench.json" -- \
    "$VPY" -P benchmarks/pipeline_bench.py --epochs 1 \
    --cache "${TMPDIR:-/tmp}/reclip-bench" --json "$OUT/pipeline_bench.json" "${args[@]}"
  rc=$?
  TOOK[pipeline]=$((SECONDS - t0))
  tail -n 25 "$log"
  outcome pipeline "$rc" "$limit" "see pipeline.log"
  return "$rc"
}

# rerun_command: the stages to repeat are those that failed, timed out or had no time; the
# others are skipped by their knobs (the build always runs: it is incremental on the same
# machine, and a fresh one has nothing built)
rerun_command() {
  local name knobs=() again=0
  for name in "${STAGES[@]:1}"; do
    case ${STATUS[$name]:-} in
      passed | skipped | "skipped (knob)") knobs+=("${KNOB[$name]}=1") ;;
      *) again=1 ;;
    esac
  done
  if [[ ${STATUS[build]:-} != passed ]]; then knobs=()
  elif ((again == 0)); then echo ""; return
  fi
  echo "${knobs[*]}${knobs[*]:+ }OUT=$OUT bash benchmarks/device_check.sh"
}

write_summary() {
  local name rows=()
  for name in "${STAGES[@]}"; do
    rows+=("$name	${STATUS[$name]:-not run}	${TOOK[$name]:-}	${LIMIT[$name]:-}	${NOTE[$name]:-}")
  done
  "$PY" - "$OUT/device_check.json" "$BUDGET_S" "$SECONDS" "$DRY" "$DEVICE" "$1" "$2" \
    "${SAN[probe]:-}" "${SAN[memcheck]:-}" "${SAN[racecheck]:-}" "${rows[@]}" <<'PY'
import json, os, sys
path, budget, elapsed, dry, device, code, rerun, probe, memcheck, racecheck, *rows = sys.argv[1:]
stages = []
for row in rows:
    name, status, took, limit, note = row.split("\t")
    stages.append({"stage": name, "status": status, "seconds": int(took) if took else None,
                   "limit_s": int(limit) if limit else None, "note": note or None})
out = {"budget_s": int(budget), "elapsed_s": int(elapsed), "dry_run": dry == "1",
       "device": device, "exit": int(code) if code else None, "stages": stages,
       "sanitizer": {"probe": probe or None, "memcheck": memcheck or None,
                     "racecheck": racecheck or None},
       "rerun": rerun or None}
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
os.replace(tmp, path)
PY
}

summary() {
  local code=$1 name rerun files
  step "summary"
  for name in "${STAGES[@]}"; do
    printf '  %-9s %-10s %6s of %-6s %s\n' "$name" "${STATUS[$name]:-not run}" \
      "${TOOK[$name]:+${TOOK[$name]} s}" "${LIMIT[$name]:+${LIMIT[$name]} s}" "${NOTE[$name]:-}"
  done
  for name in probe memcheck racecheck; do
    printf '    %-10s %s\n' "$name" "${SAN[$name]:-not run}"
  done
  if [[ -s $OUT/tests-junit.xml ]]; then
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
  rerun=$(rerun_command)
  write_summary "$code" "$rerun"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
  files=$(find "$OUT" -maxdepth 1 -type f | wc -l)
  echo "  total ${SECONDS} s of a ${BUDGET_S} s budget; ${files} files in $OUT (at most $MAX_FILES):"
  ls -l "$OUT" | tail -n +2
  ((files > MAX_FILES)) && echo "WARNING: $files files in $OUT, more than $MAX_FILES"
  echo "RESULT: $(for name in "${STAGES[@]}"; do printf '%s %s, ' "$name" "${STATUS[$name]:-not run}"; done)exit $code"
  if [[ -n $rerun ]]; then echo "RERUN: $rerun"; else echo "RERUN: nothing to rerun"; fi
}

main() {
  local final=0 name
  echo "device_check.sh: device=$DEVICE, dry run=$DRY, budget ${BUDGET_S} s, OUT=$OUT"
  [[ -n $DRY_WHY ]] && echo "$DRY_WHY"
  machine
  if (($(limit_for build) < (CAP[build] < 10 ? CAP[build] : 10))); then
    STATUS[build]="no time"
    NOTE[build]="a ${BUDGET_S} s budget leaves it under 10 s"
  fi
  if [[ -n ${STATUS[build]:-} ]] || ! build; then
    summary 1
    return 1
  fi
  for name in "${STAGES[@]:1}"; do
    if skipped_by_knob "$name"; then
      STATUS[$name]="skipped (knob)"
      NOTE[$name]="${KNOB[$name]}=1"
      continue
    fi
    if (($(limit_for "$name") < (CAP[$name] < 10 ? CAP[$name] : 10))); then
      step "$name: no time left ($(limit_for "$name") s)"
      STATUS[$name]="no time"
      NOTE[$name]="$(limit_for "$name") s left of the budget"
    fi
    if [[ -n ${STATUS[$name]:-} ]] || ! "$name"; then
      case $name in
        tests) final=2 ;;
        sanitize) ((final == 0 || final == 3)) && final=4 ;;
        *) ((final == 0)) && final=3 ;;
      esac
    fi
  done
  summary "$final"
  return "$final"
}

main "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
