"""CPU smoke tests of benchmarks/pipeline_bench.py: with the tiny test model on a 64-image JPEG
folder, without and with loader workers, the script runs as device_check.sh runs it (python -P,
a fresh process) and reports every stage of the pipeline and of the floor. No timing is
asserted beyond being measured (positive)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

HERE = Path(__file__).resolve().parent
TINY = HERE.parent / "tests" / "assets" / "tiny-vit.json"
# batches of 16 so that every loop has batches after its warm-up one
SMOKE = ["--device", "cpu", "--model", str(TINY), "--n", "64", "--epochs", "1",
         "--encode-batch-size", "16", "--batch-size", "16", "--floor-batches", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jpeg-cache")


@pytest.mark.parametrize("workers", [0, 2])
def test_smoke_report(tmp_path, cache, workers):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-P", str(HERE / "pipeline_bench.py"), *SMOKE,
                           "--workers", str(workers), "--cache", str(cache), "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=HERE.parent, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["environment"]["workers"] == workers
    folder = report["folder"]
    assert folder["n"] == 64 and Path(folder["path"]).parent == cache
    assert sum(1 for _ in Path(folder["path"]).rglob("*.jpg")) == 64
    assert report["scan_s"] > 0
    assert report["loader_cost"]["decode_ms"] > 0 and report["loader_cost"]["preprocess_ms"] > 0
    for key in ("encode_img_s", "v_step_img_s", "t_step_img_s"):
        assert report["floor"][key] > 0, key
    p = report["pipeline"]
    # fit: one frozen pass (whose features also give the untrained V side its first labels) +
    # one scoring the trained model (the folder's labels are known); both sides' pseudo
    # labels; one checkpoint
    assert len(p["encode_passes_img_s"]) == 2 and all(v > 0 for v in p["encode_passes_img_s"])
    for key in ("encode_img_s", "v_step_img_s", "v_compute_img_s", "t_step_img_s", "fit_s",
                "peak_rss_mib", "checkpoint_bytes"):
        assert p[key] > 0, key
    assert len(p["pseudo_s"]) == 2 and all(s > 0 for s in p["pseudo_s"])
    assert len(p["checkpoint_s"]) == 1 and p["checkpoint_s"][0] > 0
    assert p["v_steps"] == p["t_steps"] == 4 and p["trained"] == 64  # epoch 0: all agree
    assert 0 <= p["v_wait_fraction"] < 1
    for key in ("encode", "v_step", "t_step"):
        assert report["ratios"][key] > 0, key
    assert "encode img/s" in proc.stdout and "ReCLIP-V step img/s" in proc.stdout
