"""benchmarks/device_check.sh in its dry run (REXT_CHECK_DRY_RUN=1): every stage's command is
replaced by a sleep under the same time limit, so that stage selection, the time budget, the
sanitizer probe, the output-file limit and the rerun line are checked without a GPU, in
seconds. A stand-in compute-sanitizer gives the probe its answers."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.subprocess

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"
#: the device tool returns at most this many files from $OUT
MAX_RETURNED = 8
STAGES = ["build", "tests", "bench", "sanitize", "pipeline"]


def fake_sanitizer(folder: Path, output: str, code: int) -> Path:
    path = folder / "compute-sanitizer"
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' {output!r}\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def dry_run(tmp_path: Path, **knobs: str):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REXT_CHECK_")}
    env.update(OUT=str(out), PYTHON=sys.executable, REXT_CHECK_DRY_RUN="1",
               TMPDIR=str(tmp_path), **knobs)
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    files = sorted(p.name for p in out.iterdir())
    summary = json.loads((out / "device_check.json").read_text())
    return proc, files, summary


def status(summary) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in summary["stages"]}


def test_all_stages_in_order_within_the_file_limit(tmp_path):
    proc, files, summary = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert [s["stage"] for s in summary["stages"]] == STAGES
    assert status(summary) == {"build": "passed", "tests": "passed", "bench": "passed",
                               "sanitize": "skipped", "pipeline": "passed"}
    assert summary["budget_s"] == 420 and summary["dry_run"] is True
    # the default caps; the stages ran in order of value, each command printed
    assert [s["limit_s"] for s in summary["stages"]] == [150, 60, 120, 75, 60]
    log = (tmp_path / "out" / "device_check.log").read_text()
    order = [log.index(f"] {name}") for name in STAGES]
    assert order == sorted(order)
    assert "-m cuda" in log and "--n 100000,1280000" in log and "--baselines-max-n 100000" in log
    assert len(files) <= MAX_RETURNED
    assert files == sorted(["device_check.log", "device_check.json", "tests-junit.xml",
                            "device_bench.json", "pipeline_bench.json", "logs.tar.gz"])
    assert summary["rerun"] is None and "RERUN: nothing to rerun" in proc.stdout


def test_knobs_select_stages_and_the_probe_skips_an_unsupported_device(tmp_path):
    exe = fake_sanitizer(tmp_path, "========= Error: Device not supported", 1)
    proc, files, summary = dry_run(tmp_path, REXT_CHECK_SKIP_TESTS="1",
                                   REXT_CHECK_SKIP_PIPELINE="1", REXT_CHECK_SANITIZER=str(exe))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert status(summary) == {"build": "passed", "tests": "skipped (knob)", "bench": "passed",
                               "sanitize": "skipped", "pipeline": "skipped (knob)"}
    assert "tests-junit.xml" not in files and "pipeline_bench.json" not in files
    assert "Device not supported" in summary["sanitizer"]["probe"]
    assert summary["sanitizer"]["memcheck"].startswith("SKIPPED (the probe says")
    # the skipped stages keep nothing back: the bench gets its whole cap
    assert {s["stage"]: s["limit_s"] for s in summary["stages"]}["bench"] == 120


def test_a_probe_that_passes_runs_both_tools(tmp_path):
    exe = fake_sanitizer(tmp_path, "probe ok", 0)
    proc, _files, summary = dry_run(tmp_path, REXT_CHECK_SANITIZER=str(exe),
                                    REXT_CHECK_SKIP_BENCH="1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert status(summary)["sanitize"] == "passed"
    assert summary["sanitizer"]["probe"].startswith("ok")
    assert summary["sanitizer"]["memcheck"] == summary["sanitizer"]["racecheck"] == "PASS (dry run)"
    log = (tmp_path / "out" / "device_check.log").read_text()
    assert "--kernel-name kns=rext::cuda" in log


def test_budget_limits_and_the_rerun_line(tmp_path):
    """A 32 s budget (17 s for the stages), stages of 4 s and a tests cap of 1 s: the tests time
    out at ~5 s, the bench gets the ~12 s left and ends at ~9 s, which leaves the sanitizer and
    the pipeline under 10 s: no time. The rerun line repeats exactly those three (2 s of slack
    either way for a loaded machine)."""
    exe = fake_sanitizer(tmp_path, "probe ok", 0)
    proc, files, summary = dry_run(tmp_path, REXT_CHECK_BUDGET_S="32", REXT_CHECK_DRY_SLEEP_S="4",
                                   REXT_CHECK_TESTS_S="1", REXT_CHECK_SANITIZER=str(exe))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert status(summary) == {"build": "passed", "tests": "TIMED OUT", "bench": "passed",
                               "sanitize": "no time", "pipeline": "no time"}
    limits = {s["stage"]: s["limit_s"] for s in summary["stages"]}
    assert limits["tests"] == 1 and 10 <= limits["bench"] <= 32 - 15 - 5
    assert summary["elapsed_s"] <= 32
    rerun = summary["rerun"]
    assert rerun.endswith("bash benchmarks/device_check.sh")
    assert "REXT_CHECK_SKIP_BENCH=1" in rerun
    for knob in ("REXT_CHECK_SKIP_TESTS", "REXT_CHECK_SKIP_SANITIZE", "REXT_CHECK_SKIP_PIPELINE"):
        assert knob not in rerun
    assert f"RERUN: {rerun}" in proc.stdout
    assert "tests-junit.xml" not in files and len(files) <= MAX_RETURNED
