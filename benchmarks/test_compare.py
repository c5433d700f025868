"""Smoke tests of the benchmark harness itself: the P2 shortcut is exact, compare.py runs (in
process and with one spawn child per recipe) and writes a complete JSON report."""
from __future__ import annotations

import json

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
    try:
        import torch  # noqa: F401

        names.append("torch-dense-chunked")
    except ImportError:
        pass
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
