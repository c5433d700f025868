"""The result drivers (table1.py, emoji_scale.py) end to end on tiny inputs, and their argument
checks: a driver that only runs for an hour must not first fail on a typo, nor rot unseen."""
from __future__ import annotations

import json

import numpy as np
import pytest

import emoji_scale
import table1
from reclip import emoji, sources


@pytest.mark.parametrize("main, argv, flag", [
    (table1.main, ["--protocols", "both"], "--protocols"),
    (table1.main, ["--targets", "sklearn-digits,nope"], "--targets"),
    (table1.main, ["--shot-lrs", "0"], "--shot-lrs"),
    (table1.main, ["--seeds", "a"], "--seeds"),
    (table1.main, ["--epochs", "-1"], "--epochs"),
    (emoji_scale.main, ["--points", "100x0"], "--points"),
    (emoji_scale.main, ["--points", "50x10"], "--points"),
    (emoji_scale.main, ["--points", "1066"], "--points"),
    (emoji_scale.main, ["--steps", "0"], "--steps"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_drivers_refuse_bad_arguments(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert flag in capsys.readouterr().err


def test_table1_on_a_tiny_digits_target(tmp_path):
    """Both protocols, ReCLIP and SHOT for one epoch on 3 images per class: the table's
    zero-shot cell is the model's own prediction accuracy on the same images."""
    import reclip
    from reclip.demo import preprocessed

    out = tmp_path / "t1"
    assert table1.main(["--targets", "sklearn-digits", "--seeds", "0", "--epochs", "1",
                        "--iterations", "2", "--per-class", "3", "--shot-lrs", "1e-6",
                        "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())["targets"]["sklearn-digits"]
    assert result["images"] == 30 and result["train"] + result["test"] == 30
    target = sources.target("sklearn-digits")
    raw, labels = target.load()
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:3] for c in range(10)]))
    loaded = reclip.load_model(target.model)
    zero_shot = reclip.ReCLIP(loaded, target.classnames(), list(target.templates),
                              reclip.Config(max_epochs=0))
    truth = labels[keep]
    accuracy = float((zero_shot.predict(preprocessed(raw[keep], loaded)) == truth).mean())
    assert result["zero_shot"]["transductive"]["accuracy"] == pytest.approx(accuracy)
    for protocol in table1.PROTOCOLS:
        for method in ("ReCLIP", "SHOT lr 1e-06"):
            run = result["runs"][protocol][method]["0"]
            assert [c["epoch"] for c in run["curve"]] == [1]
            assert run["final"] == run["peak"] == run["curve"][0]
            assert 0 <= run["final"]["accuracy"] <= 1 and 0 <= run["final"]["ece"] <= 1
    md = out.with_suffix(".md").read_text()
    assert "| method | transductive | inductive |" in md and "| CLIP zero-shot |" in md


def _has_symbola() -> bool:
    try:
        emoji.find("symbola")
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_symbola(), reason="fonts-symbola is not installed")
@pytest.mark.parametrize("cli", [False, True], ids=["stages", "reclip-adapt"])
def test_emoji_scale_one_tiny_point(cli, tmp_path):
    """One render of each of the 100 classes, one step per side: in-process stages, or
    `reclip adapt` on the renders as an image folder (its report's counts)."""
    out = tmp_path / "scale"
    argv = ["--points", "100x1", "--steps", "1", "--out", str(out)]
    assert emoji_scale.main(argv + (["--cli", str(tmp_path / "work")] if cli else [])) == 0
    (point,) = json.loads(out.with_suffix(".json").read_text())["points"]
    assert (point["classes"], point["images"]) == (100, 100)
    if cli:
        stages = point["stages"]
        assert stages["text_steps"] == stages["visual_steps"] == 1
        # the frozen pass, the visual copy after its step, and the final prediction
        assert stages["encode_images"] == 3 * 100 and point["wall_seconds"] > 0
    else:
        assert point["step_seconds"]["T"] > 0 and point["step_seconds"]["V"] > 0
        assert set(point["seconds"]) == set(emoji_scale.STAGES)
        assert all(0 <= a <= 1 for a in point["pseudo_label_accuracy"].values())
    assert "| 100 | 100 |" in out.with_suffix(".md").read_text()
