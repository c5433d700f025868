"""The inductive protocol through the command line: ``reclip demo --export-split`` writes a
target's fixed split as image folders, ``reclip adapt --inductive`` adapts on the train side
and ``reclip eval`` scores the disjoint test side."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("open_clip")
pytest.importorskip("matplotlib")  # the printed-digits target's faces

from reclip import sources  # noqa: E402

pytestmark = pytest.mark.subprocess

TINY_VIT = str(Path(__file__).resolve().parent / "assets" / "tiny-vit.json")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "reclip", *args], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{args}\n{r.stderr}"
    return r


def test_export_adapt_inductive_then_eval_on_the_test_side(tmp_path):
    cli(tmp_path, "demo", "--target", "printed-digits", "--export-split", "split")
    _, labels = sources.load_target("printed-digits")
    train, test = sources.target_split(labels)
    for side, index in (("train", train), ("test", test)):
        files = sorted((tmp_path / "split" / side).glob("*/*.png"))
        # every image of the side, once, in the folder of its class
        assert sorted(int(f.stem) for f in files) == sorted(index.tolist())
        assert all(sources.DIGIT_NAMES.index(f.parent.name) == labels[int(f.stem)] for f in files)
    assert (tmp_path / "split" / "classes.txt").read_text().split() == sources.DIGIT_NAMES

    cli(tmp_path, "adapt", "--model", TINY_VIT, "--data", "split/train", "--classes",
        "split/classes.txt", "--templates", "split/templates.txt", "--inductive", "--out", "run",
        "--epochs", "1", "--seed", "3", "--workers", "0", "--quiet")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["images"] == len(train) and "reclip_accuracy" not in report
    assert not (tmp_path / "run" / "predictions.tsv").exists()

    line = cli(tmp_path, "eval", "--run", "run", "--data", "split/test", "--workers", "0").stdout
    acc = float(re.match(r"accuracy (\S+) ECE \S+ \((\d+) images\)", line).group(1))
    # the same run's predictions through the Python API, scored here
    import reclip
    from reclip.data import image_set

    clf = reclip.ReCLIP.load(tmp_path / "run", device="cpu", workers=0)
    data = image_set(str(tmp_path / "split" / "test"))
    pred = clf.predict(data)
    truth = np.array([sources.DIGIT_NAMES.index(Path(p).parent.name) for p in data.paths])
    assert len(pred) == len(test)
    assert acc == pytest.approx(float((pred == truth).mean()), abs=5e-5)
