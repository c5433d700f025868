"""Smoke tests of the benchmark harness itself: the P2 shortcut is exact, compare.py runs (in
process and with one spawn child per recipe) and writes a complete JSON report."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import compare
import recipes
import synthetic

recipes.import_reclip_ext()  # at collection: an editable install's rebuild hook needs real fds


def test_p2_coordinates_give_the_same_cosines():
    data = synthetic.clip_like(500, 10, 96, seed=3)
    proj = synthetic.p2_projection(data.text, data.images)
    assert proj.basis.shape == (96, 9)  # r = m - 1
    assert np.allclose(proj.basis.T @ proj.basis, np.eye(9), atol=1e-5)
    assert synthetic.projection_check(proj) < 1e-5
    assert np.allclose(np.linalg.norm(proj.images_r, axis=1), 1, atol=1e-5)


def test_drop_self_handles_duplicates():
    idx = np.array([[0, 1, 2], [0, 1, 2], [0, 1, 3], [1, 0, 2]])
    sim = np.arange(12, dtype=np.float32).reshape(4, 3)
    out, s = recipes._drop_self(idx, sim, 2)
    assert out.tolist() == [[1, 2], [0, 2], [0, 1], [1, 0]]
    assert s.tolist() == [[1, 2], [3, 5], [6, 7], [9, 10]]


def _check_report(path, names):
    report = json.loads(path.read_text())
    assert report["environment"]["simd_level"]
    assert report["environment"]["threads"] == report["config"]["threads"]
    assert report["data"]["projection_max_cos_diff"] < 1e-5
    assert not report["failed"]
    for name in names:
        r = report["results"][name]
        assert set(r["times"]) == {"knn", "normalize", "solve", "total"}
        assert r["agreement"] >= 0.99 and 0 <= r["accuracy"] <= 1
        assert r["peak_rss"] >= 0
        assert "labels" not in r
    assert report["results"]["reclip_ext"]["dim"] == report["data"]["r"]
    return report


def test_compare_in_process(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = compare.main(["--n", "400", "--m", "5", "--d", "32", "--project", "--in-process",
                       "--min-agreement", "0.99", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "N x N float32" in text and "P2 check" in text
    names = ["reclip_ext", "scipy-ref", "scipy-batched"]
    if importlib.util.find_spec("torch") is not None:
        names.append("torch-dense-chunked")
    report = _check_report(out, names)
    floors = [k for k in report["results"] if k.startswith("sgemm-floor@")]
    assert sorted(floors) == ["sgemm-floor@32", "sgemm-floor@4"]  # d for baselines, r for rext


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compare_spawn_children(tmp_path):
    out = tmp_path / "report.json"
    rc = compare.main(["--n", "300", "--m", "4", "--d", "16", "--project",
                       "--recipes", "reclip_ext,scipy-ref", "--json", str(out)])
    assert rc == 0
    report = _check_report(out, ["reclip_ext", "scipy-ref"])
    assert report["results"]["reclip_ext"]["peak_method"] in ("VmHWM", "ru_maxrss")


def test_busy_load_runs_and_stops_also_on_error():
    with pytest.raises(KeyError):
        with compare.busy_load(2) as procs:
            time.sleep(0.2)
            assert len(procs) == 2 and all(p.poll() is None for p in procs)
            raise KeyError("a failing measurement")
    assert all(p.poll() is not None for p in procs)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_busy_load_ends_with_a_killed_benchmark(tmp_path):
    """A benchmark killed outright runs no finally clause; its busy processes see their parent
    gone and exit by themselves."""
    script = ("import os, sys, time\nsys.path.insert(0, sys.argv[1])\nimport compare\n"
              "with compare.busy_load(2) as procs:\n"
              "    print(*(p.pid for p in procs), flush=True)\n    time.sleep(0.2)\n"
              "    os._exit(0)\n")
    run = subprocess.run([sys.executable, "-c", script, os.path.dirname(compare.__file__)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_load_option_is_checked_and_reported(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--load", "-1"])
    out = tmp_path / "report.json"
    rc = compare.main(["--n", "200", "--m", "3", "--d", "8", "--in-process", "--load", "1",
                       "--recipes", "reclip_ext", "--json", str(out)])
    assert rc == 0
    assert "--load 1 (busy-loop processes beside it)" in capsys.readouterr().out
    assert json.loads(out.read_text())["config"]["load"] == 1
