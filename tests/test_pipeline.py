"""The ReCLIP pipeline on a tiny open_clip model: projection maths, what trains, label sharing,
save/load and resume."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import reclip  # noqa: E402
from reclip import adapt, methods, projection  # noqa: E402
from reclip.methods import ReCLIPMethod  # noqa: E402
from reclip.trainable import norm_parameters  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
CLASSES = ["red square", "green circle", "blue triangle"]


def _fit(tiny, colour_images, **config):
    torch.manual_seed(0)
    clf = reclip.ReCLIP(tiny, CLASSES, ["a photo of a {}.", "a {}."],
                        reclip.Config(**{"max_epochs": 2, **config}))
    return clf.fit(colour_images)


# ---------------------------------------------------------------------------------- projection


def test_basis_matches_numpy_svd():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((5, 16))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    u_np = np.linalg.svd(t.T, full_matrices=False)[0]
    for mode, want in (("P1", u_np), ("P2", u_np[:, 1:])):
        u = projection.basis(torch.from_numpy(t), mode).numpy()
        # same subspace: equal projectors
        np.testing.assert_allclose(u @ u.T, want @ want.T, atol=1e-10)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-10)
    assert projection.basis(torch.from_numpy(t), "P0") is None


def test_p2_removes_first_direction_and_keeps_cosines():
    rng = np.random.default_rng(1)
    t = torch.from_numpy(rng.standard_normal((6, 32)))
    x = torch.from_numpy(rng.standard_normal((50, 32)))
    u = projection.basis(t, "P2")
    first = np.linalg.svd(t.numpy().T, full_matrices=False)[0][:, 0]
    p = projection.project(x, u).numpy()
    np.testing.assert_allclose(p @ first, 0, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1, atol=1e-12)
    # cosines in the r-dim coordinates equal those of the projected d-dim features
    c = projection.coordinates(x, u).numpy()
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    np.testing.assert_allclose(c @ c.T, p @ p.T, atol=1e-10)


def test_class_nodes_mean_of_normalised_templates():
    feats = torch.randn(3, 4, 8, dtype=torch.float64)
    nodes = projection.class_nodes(feats).double()
    unit = feats / feats.norm(dim=-1, keepdim=True)
    want = unit.mean(1) / unit.mean(1).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(nodes, want, atol=1e-6, rtol=0)


def test_many_classes_cap():
    t = torch.randn(600, 700, dtype=torch.float64)
    assert projection.basis(t, "P2").shape == (700, projection.MAX_COMPONENTS_MANY_CLASSES)


# ---------------------------------------------------------------------------------- training


def test_only_norm_parameters_of_each_tower_change(tiny, colour_images):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    clf = _fit(tiny, colour_images)
    norms = set(norm_parameters(tiny.model))
    for copy_, tower in ((clf.text_copy, "text"), (clf.visual_copy, "visual")):
        changed = {k for k, v in copy_.state_dict().items() if not torch.equal(v, before[k])}
        assert changed, f"{tower} copy did not train"
        assert changed <= norms, f"non-norm tensors changed: {sorted(changed - norms)[:5]}"
        assert all(k.startswith("visual.") == (tower == "visual") for k in changed)
    # the caller's model is untouched and the copies share no trainable tensors
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())
    ids_t = {id(p) for p in clf.text_params.values()}
    assert not ids_t & {id(p) for p in clf.visual_params.values()}


@pytest.mark.parametrize("sharing", [True, False])
def test_label_sharing_trains_on_agreeing_images(tiny, colour_images, monkeypatch, sharing):
    n = len(colour_images)
    text_labels = np.arange(n) % 3
    visual_labels = text_labels.copy()
    visual_labels[:5] = (visual_labels[:5] + 1) % 3  # 5 disagreements
    calls = iter([text_labels, visual_labels] * 10)  # T side first, then V, each epoch
    monkeypatch.setattr(methods.reclip, "pseudo_labels", lambda *a, **k: next(calls))
    seen_idx, seen_y = [], []
    original = ReCLIPMethod.step_visual

    def spy(self, x, y):
        # which images: the rows of the (distinct) image tensor that the batch holds
        seen_idx.extend(int((colour_images == row).flatten(1).all(1).nonzero()) for row in x)
        seen_y.extend(y.tolist())
        return original(self, x, y)

    monkeypatch.setattr(ReCLIPMethod, "step_visual", spy)
    clf = _fit(tiny, colour_images, max_epochs=1, label_sharing=sharing)
    entry = clf.history[0]
    assert entry.agreement == pytest.approx((n - 5) / n)
    expected = set(range(5, n)) if sharing else set(range(n))
    assert sorted(seen_idx) == sorted(expected)
    assert entry.trained == len(expected)
    # the target is the T side's label (equal to the V side's where they agree)
    assert all(y == text_labels[i] for i, y in zip(seen_idx, seen_y))


def test_iteration_cap_and_batch_default(tiny, colour_images):
    clf = _fit(tiny, colour_images, max_epochs=10, max_iterations=3, batch_size=8)
    assert clf.iterations == 3
    assert adapt.Config().batch_for(10) == 64 and adapt.Config().batch_for(201) == 32


def test_progress_bars_cover_encoding_and_training(tiny, colour_images, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: tqdm's bars
    torch.manual_seed(0)
    clf = reclip.ReCLIP(tiny, CLASSES, config=reclip.Config(max_epochs=1))
    clf.fit(colour_images, progress=True)
    bars = capsys.readouterr().err
    assert all(f"{desc}:" in bars for desc in ("epochs", "encode", "train")), bars
    assert "\r" in bars
    clf.predict(colour_images)  # after fit: no bars
    assert capsys.readouterr().err == ""


def test_progress_in_a_file_is_plain_lines(tiny, colour_images, capsys, monkeypatch):
    """Progress written to a file or a pipe (not a terminal) is whole lines, without tqdm's
    carriage returns and cursor codes, and without trailing spaces."""
    from reclip import progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # a line after every item
    torch.manual_seed(0)
    reclip.ReCLIP(tiny, CLASSES, config=reclip.Config(max_epochs=1)).fit(colour_images,
                                                                         progress=True)
    err = capsys.readouterr().err
    assert err and "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert all(line == line.rstrip() for line in lines)
    assert "epochs: 1/1 done" in " ".join(lines)
    assert any(line.startswith("encode: ") for line in lines)
    assert any(line.startswith("train: ") for line in lines)


def test_prediction_is_mean_of_both_sides(tiny, colour_images):
    clf = _fit(tiny, colour_images, max_epochs=1)
    both = clf.logits(colour_images)
    clf.config.sides = "text"
    t = clf.logits(colour_images)
    clf.config.sides = "visual"
    v = clf.logits(colour_images)
    clf.config.sides = "both"
    torch.testing.assert_close(both, (t + v) / 2)
    proba = clf.predict_proba(colour_images)
    np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
    assert (proba.argmax(1) == clf.predict(colour_images)).all()


def test_the_frozen_tower_encodes_one_image_set_once(tiny, colour_images):
    """The zero-shot pass, fit and prediction of one ImageSet share the T copy's features (its
    visual tower never trains) and give what separate encodings give."""
    from reclip.data import image_set

    data = image_set(colour_images)
    torch.manual_seed(0)
    clf = reclip.ReCLIP(tiny, CLASSES, ["a photo of a {}.", "a {}."], reclip.Config(max_epochs=2))
    calls = []
    original = clf.text_copy.encode_image
    clf.text_copy.encode_image = lambda x, **k: (calls.append(len(x)), original(x, **k))[1]
    zero_shot = clf.zero_shot_logits(data)
    logits = clf.fit(data).logits(data)
    assert sum(calls) == len(colour_images)  # one pass, not three
    ref = _fit(tiny, colour_images)  # a tensor: a new set, so new encodings, on every call
    torch.testing.assert_close(zero_shot, ref.zero_shot_logits(colour_images))
    torch.testing.assert_close(logits, ref.logits(colour_images))


def test_the_first_visual_pass_is_the_frozen_one(tiny, colour_images):
    """Before any step the visual copy's image tower is the frozen one, so the V side's first
    pseudo labels come from the frozen pass: the visual copy is encoded only after it trained
    (here to score the epoch), and the reuse is exact."""
    torch.manual_seed(0)
    clf = reclip.ReCLIP(tiny, CLASSES, ["a photo of a {}."], reclip.Config(max_epochs=1))
    frozen = clf.encode_images(colour_images, side="text")
    assert torch.equal(frozen, clf.encode_images(colour_images, side="visual"))
    seen, original = [], clf.features.images
    clf.features.images = lambda model, *a, **k: (seen.append(model), original(model, *a, **k))[1]
    clf.fit(colour_images, labels=np.arange(len(colour_images)) % 3)
    assert [m is clf.visual_copy for m in seen] == [False, True]
    assert not clf.method.untrained()  # one epoch of steps moved it
    # a fresh copy is untrained again, and so is a visual copy whose norms are set back
    for name, p in clf.visual_params.items():
        p.data.copy_(dict(clf.text_copy.named_parameters())[name])
    assert clf.method.untrained()


def test_zero_shot_is_unadapted_clip(tiny, colour_images):
    feats = torch.nn.functional.normalize(tiny.model.encode_image(colour_images), dim=-1)
    clf = _fit(tiny, colour_images, max_epochs=1)
    text = torch.nn.functional.normalize(
        tiny.model.encode_text(tiny.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
    text2 = torch.nn.functional.normalize(
        tiny.model.encode_text(tiny.tokenizer([f"a {c}." for c in CLASSES])), dim=-1)
    nodes = torch.nn.functional.normalize(text + text2, dim=-1)
    want = (feats @ nodes.T).argmax(1).numpy()
    assert (clf.zero_shot_predict(colour_images) == want).all()
    # the logits behind them (and behind report.json's zero-shot ECE): logit_scale x cosine
    torch.testing.assert_close(clf.zero_shot_logits(colour_images),
                               clf.config.logit_scale * feats @ nodes.T, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------- persistence


# ------------------------------------------------------------------------------ text features

# of very different lengths: each batch of a cut pass has padding to cut
PROMPTS = ["a.", "a photo of a red square.", "x", "a very long prompt about a blue triangle "
           "drawn on a green circle in a field", "a {}.", "green circle", "b b b b b b b b"]


def _widths_seen(model):
    """Record the token widths the model's encode_text is called with (the model is the seam)."""
    seen, encode = [], model.encode_text

    def spy(tokens, *args, **kwargs):
        seen.append(tokens.shape[1])
        return encode(tokens, *args, **kwargs)

    model.encode_text = spy
    return seen, lambda: vars(model).pop("encode_text")


@pytest.mark.parametrize("asset, cut", [("tiny-vit.json", True), ("tiny-minilm.json", True),
                                        ("tiny-vit.json", False)])
def test_text_features_are_the_uncut_ones_with_padding_cut(asset, cut):
    """Features equal one uncut batch's; a tower that takes shorter tokens gets them (open_clip's
    CLIP as reclip builds it, an attention-masked HF tower), one that refuses them does not
    (open_clip's own fixed-width CLIP text tower)."""
    torch.manual_seed(0)
    loaded = reclip.load_model(str(ASSETS / asset))
    if not cut:
        import open_clip

        loaded.model.__class__ = open_clip.model.CLIP  # the class open_clip builds
    tokens = loaded.tokenizer(PROMPTS)
    with torch.no_grad():
        reference = loaded.model.encode_text(tokens, normalize=True).double()  # one uncut batch
    features = reclip.features.Features(loaded.tokenizer, reference.shape[1],
                                        reclip.Config(encode_batch_size=3))
    seen, restore = _widths_seen(loaded.model)
    try:
        with torch.no_grad():
            got = features.text(loaded.model, PROMPTS)
    finally:
        restore()
    np.testing.assert_allclose(got.double().numpy(), reference.numpy(), atol=2e-6)
    if asset == "tiny-vit.json" and cut:  # at the full width, open_clip's own computation
        import open_clip

        with torch.no_grad():
            own = open_clip.model.CLIP.encode_text(loaded.model, tokens, normalize=True)
        assert torch.equal(own.double(), reference)
    # after the one check (an uncut and a cut batch, refused or not), every batch is cut
    # short, shortest prompts first; or none is
    passes = seen[2:]
    assert len(passes) == 3
    if cut:
        assert max(passes) < tokens.shape[1] and passes == sorted(passes)
    else:
        assert set(passes) == {tokens.shape[1]}


class _ReadsItsPadding(torch.nn.Module):
    """A text tower whose features depend on the last token position (padding included)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 4)

    def encode_text(self, tokens, normalize=False):
        x = self.embed(tokens).mean(1)  # a mean over every position, padding too
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def test_a_tower_that_reads_its_padding_is_never_cut():
    torch.manual_seed(0)
    model = _ReadsItsPadding()

    def tokenizer(texts):
        out = torch.zeros(len(texts), 16, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1 + ord(ch) % 98 for ch in text[:16]]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    features = reclip.features.Features(tokenizer, 4, reclip.Config(encode_batch_size=2))
    seen, restore = _widths_seen(model)
    try:
        with torch.no_grad():
            got = features.text(model, PROMPTS)
    finally:
        restore()
    with torch.no_grad():
        reference = model.encode_text(tokenizer(PROMPTS), normalize=True)
    np.testing.assert_allclose(got.numpy(), reference.numpy(), atol=1e-6)
    assert set(seen[2:]) == {16}


@pytest.mark.parametrize("asset", ["tiny-vit.json", "tiny-minilm.json"])
def test_text_step_gradient_in_cut_chunks_is_the_whole_graphs(asset):
    """ReCLIP-T's chunked step (length-sorted chunks, padding cut) leaves the gradient of one
    uncut graph over all prompts, computed here directly."""
    import copy

    torch.manual_seed(0)
    tiny = reclip.load_model(str(ASSETS / asset))
    classes = ["red square", "a green circle on a white background", "blue triangle", "dot",
               "a large yellow star with five points"]
    clf = reclip.ReCLIP(tiny, classes, ["a photo of a {}."], reclip.Config(encode_batch_size=2))
    reference = copy.deepcopy(clf.text_copy)
    feats = torch.nn.functional.normalize(torch.randn(6, clf.features.width), dim=1)
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    clf.method.step_text(feats, y)
    prompts = clf.prompts(first_only=True)
    text = reference.encode_text(tiny.tokenizer(prompts), normalize=True)
    loss = torch.nn.functional.cross_entropy(clf.config.logit_scale * feats @ text.T, y)
    loss.backward()
    expected = dict(reference.named_parameters())
    assert clf.text_params
    for name, p in clf.text_params.items():
        np.testing.assert_allclose(p.grad.numpy(), expected[name].grad.numpy(), atol=1e-5,
                                   rtol=1e-4, err_msg=name)


def test_save_load_round_trip_is_bit_exact(tiny, colour_images, tmp_path):
    clf = _fit(tiny, colour_images)
    clf.save(tmp_path / "run")
    back = reclip.ReCLIP.load(tmp_path / "run")
    assert back.classnames == CLASSES and back.epoch == clf.epoch
    assert torch.equal(back.logits(colour_images), clf.logits(colour_images))
    assert [h.agreement for h in back.history] == [h.agreement for h in clf.history]


def _counting_prompts(loaded, seen: list[str] | None = None):
    """`loaded` with a tokenizer that records the prompts it is given in `seen` (every text
    pass tokenizes first), and that record."""
    import dataclasses

    seen = [] if seen is None else seen

    def tokenizer(texts):
        seen.extend(texts)
        return loaded.tokenizer(texts)

    return dataclasses.replace(loaded, tokenizer=tokenizer), seen


def _spy_on_loading(monkeypatch) -> list[str]:
    """The prompts that every model ReCLIP.load builds from here on encodes."""
    seen: list[str] = []
    build = adapt.model_from_spec

    def spied(*args):
        return _counting_prompts(build(*args), seen)[0]

    monkeypatch.setattr(adapt, "model_from_spec", spied)
    return seen


def test_a_new_run_encodes_its_prompts_once_when_first_used(tiny, colour_images):
    """Building a run encodes nothing; its first use encodes every class's prompts once, into
    the original text encoder's class embeddings (the normalised mean over the templates)."""
    templates = ["a photo of a {}.", "a {}."]
    loaded, seen = _counting_prompts(tiny)
    clf = reclip.ReCLIP(loaded, CLASSES, templates)
    assert seen == []
    logits = clf.zero_shot_logits(colour_images)
    assert sorted(seen) == sorted(t.format(c) for c in CLASSES for t in templates)
    with torch.no_grad():
        per_template = [torch.nn.functional.normalize(tiny.model.encode_text(
            tiny.tokenizer([t.format(c) for c in CLASSES])), dim=-1) for t in templates]
        images = torch.nn.functional.normalize(tiny.model.encode_image(colour_images), dim=-1)
    nodes = torch.nn.functional.normalize(sum(per_template), dim=-1)
    torch.testing.assert_close(clf.nodes_v, nodes, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, clf.config.logit_scale * images @ nodes.T,
                               atol=1e-4, rtol=1e-5)
    clf.predict(colour_images)
    assert len(seen) == len(CLASSES) * len(templates)  # not again


def test_loading_a_run_encodes_no_prompt(tiny, colour_images, tmp_path, monkeypatch):
    """A run holds its class embeddings: loading it and predicting with it encode no prompt
    (at ImageNet's 1,000 classes x 80 templates that would be 80,000), and it predicts what
    the run it was saved from does."""
    clf = _fit(tiny, colour_images)
    clf.save(tmp_path / "run")
    seen = _spy_on_loading(monkeypatch)
    back = reclip.ReCLIP.load(tmp_path / "run")
    assert torch.equal(back.logits(colour_images), clf.logits(colour_images))
    assert torch.equal(back.zero_shot_logits(colour_images), clf.zero_shot_logits(colour_images))
    assert seen == []


def _edit_tensors(run: Path, edit) -> None:
    from reclip import checkpoint

    tensors, meta = checkpoint.read(run)
    edit(tensors)
    # without the file entries: write names its new tensor file itself
    checkpoint.write(run, tensors, {k: v for k, v in meta.items()
                                    if k not in ("format", "tensors")})


def test_a_run_without_its_original_class_embeddings_encodes_them(tiny, colour_images, tmp_path,
                                                                    monkeypatch):
    """The original class embeddings follow from the base model and the prompts, so a run
    without them still loads, by encoding every prompt; it then predicts as before."""
    clf = _fit(tiny, colour_images)
    clf.save(tmp_path / "run")
    _edit_tensors(tmp_path / "run", lambda t: t.pop("state.nodes_v"))
    seen = _spy_on_loading(monkeypatch)
    back = reclip.ReCLIP.load(tmp_path / "run")
    assert len(seen) == len(CLASSES) * 2
    assert torch.equal(back.nodes_v, clf.nodes_v)
    assert torch.equal(back.logits(colour_images), clf.logits(colour_images))
    assert torch.equal(back.zero_shot_logits(colour_images), clf.zero_shot_logits(colour_images))


@pytest.mark.parametrize("key", ["state.nodes_v", "state.nodes_t", "state.centres"])
def test_class_embeddings_of_another_shape_are_refused(tiny, colour_images, tmp_path, key):
    _fit(tiny, colour_images, max_epochs=1).save(tmp_path / "run")
    _edit_tensors(tmp_path / "run", lambda t: t.update({key: t[key][:2].clone()}))
    with pytest.raises(ValueError, match=rf"checkpoint {key} has shape \(2, \d+\), the model "
                                         rf"needs \(3, \d+\)"):
        reclip.ReCLIP.load(tmp_path / "run")


@pytest.mark.parametrize("key", ["state.nodes_t", "state.centres"])
def test_a_run_without_its_trained_class_state_is_refused(tiny, colour_images, tmp_path, key):
    """What training made of the class embeddings cannot be encoded again."""
    _fit(tiny, colour_images, max_epochs=1).save(tmp_path / "run")
    _edit_tensors(tmp_path / "run", lambda t: t.pop(key))
    with pytest.raises(ValueError, match=f"checkpoint lacks {key}"):
        reclip.ReCLIP.load(tmp_path / "run")


def test_resume_equals_uninterrupted(tiny, colour_images, tmp_path):
    full = _fit(tiny, colour_images, max_epochs=3)
    torch.manual_seed(0)
    part = reclip.ReCLIP(tiny, CLASSES, ["a photo of a {}.", "a {}."], reclip.Config(max_epochs=1))
    part.fit(colour_images, out_dir=tmp_path / "run")
    torch.manual_seed(123)  # resuming must not depend on the global RNG of the new process
    again = reclip.ReCLIP(tiny, CLASSES, ["a photo of a {}.", "a {}."], reclip.Config(max_epochs=3))
    again.fit(colour_images, out_dir=tmp_path / "run", resume=True)
    assert again.epoch == 3
    assert torch.equal(again.logits(colour_images), full.logits(colour_images))


def test_a_new_run_over_an_old_one_is_refused(tiny, colour_images, tmp_path):
    _fit(tiny, colour_images, max_epochs=1).save(tmp_path / "run")
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    again = reclip.ReCLIP(tiny, CLASSES, config=reclip.Config(max_epochs=1))
    with pytest.raises(FileExistsError, match="out_dir: .* already holds a run; pass resume=True"):
        again.fit(colour_images, out_dir=tmp_path / "run")
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before


def test_checkpoint_class_mismatch_is_refused(tiny, colour_images, tmp_path):
    _fit(tiny, colour_images, max_epochs=1).save(tmp_path / "run")
    other = reclip.ReCLIP(tiny, ["x", "y", "z"], config=reclip.Config(max_epochs=1))
    with pytest.raises(ValueError, match="do not match"):
        other.fit(colour_images, out_dir=tmp_path / "run", resume=True)


def test_checkpoint_files_are_plain_data(tiny, colour_images, tmp_path):
    _fit(tiny, colour_images, max_epochs=1).save(tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names[0] == "run.json" and names[1].endswith(".safetensors") and len(names) == 2


def test_visual_loss_released_is_the_mean_divided_by_the_batch(tiny, colour_images):
    """One plain SGD step of ReCLIP-V: the released code's loss moves the visual norms by
    exactly 1/batch of what the batch-mean cross-entropy does."""
    start = {k: p.detach().clone() for k, p in reclip.ReCLIP(tiny, CLASSES).visual_params.items()}
    moves = {}
    for loss in ("mean", "released"):
        clf = _fit(tiny, colour_images, sides="visual", max_iterations=1, batch_size=8, momentum=0.0,
                   weight_decay=0.0, visual_loss=loss)
        moves[loss] = torch.cat([(p.detach() - start[k]).flatten()
                                 for k, p in clf.visual_params.items()])
    assert moves["mean"].abs().max() > 0
    torch.testing.assert_close(moves["released"] * 8, moves["mean"], rtol=1e-4, atol=1e-7)


def test_config_errors():
    with pytest.raises(ValueError, match="visual_loss"):
        reclip.Config(visual_loss="sum")
    with pytest.raises(ValueError, match="projection"):
        reclip.Config(projection="P3")
    with pytest.raises(ValueError, match="alpha"):
        reclip.Config(alpha=1.0)
    with pytest.raises(ValueError, match="sides"):
        reclip.Config(sides="neither")
    with pytest.raises(ValueError, match="batch_size"):
        reclip.Config(batch_size=0)


def test_classnames_errors(tiny):
    with pytest.raises(ValueError, match="at least 2"):
        reclip.ReCLIP(tiny, ["only"])
    with pytest.raises(ValueError, match="duplicates"):
        reclip.ReCLIP(tiny, ["a", "a"])


@pytest.mark.slow
def test_demo_writes_report_and_plots(tmp_path):
    """`reclip demo` end to end with the shipped model, shortened to one epoch."""
    from reclip.demo import run_demo

    report = run_demo(tmp_path, epochs=1, say=lambda _: None)
    saved = __import__("json").loads((tmp_path / "report.json").read_text())
    for key in ("zero_shot_accuracy", "reclip_accuracy", "label_propagation_accuracy",
                "zero_shot_ece", "reclip_ece"):
        assert 0 <= saved[key] <= 1 and saved[key] == report[key]
    assert len(saved["per_epoch"]) == 1
    assert set(saved["similarity"]) == {"P0", "P1", "P2"}
    for name in saved["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_scores_image_folders_by_folder_name_or_id_only(tiny, colour_images, tmp_path):
    """Without `labels`, fit scores an ImageFolder through its folder names (the classes, or
    the ids in `folders`); a folder that is neither leaves every epoch unscored, rather than
    scored against the sorted folder indices. The run keeps `folders`."""
    from PIL import Image

    def folder(root, names):
        for i, x in enumerate(colour_images):
            (root / names[i % 3]).mkdir(parents=True, exist_ok=True)
            a = (x.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(a).save(root / names[i % 3] / f"{i:02d}.png")
        return root

    ids = ["n3", "n1", "n2"]  # sorted folders: n1, n2, n3 = classes 1, 2, 0
    renamed = ["red square", "green circle", "triangle"]  # sorted: green circle, red square, triangle

    def fit(root, folders=None):
        torch.manual_seed(0)
        clf = reclip.ReCLIP(tiny, CLASSES, ["a {}."], reclip.Config(max_epochs=1), folders=folders)
        return clf.fit(root)

    by_id = fit(folder(tmp_path / "ids", ids), folders=ids)
    by_name = fit(folder(tmp_path / "names", CLASSES))
    assert by_id.history[0].accuracy and by_id.history[0].accuracy == by_name.history[0].accuracy
    assert fit(folder(tmp_path / "renamed", renamed)).history[0].accuracy == {}
    assert fit(tmp_path / "ids").history[0].accuracy == {}  # ids, but no mapping
    by_id.save(tmp_path / "run")
    assert reclip.ReCLIP.load(tmp_path / "run").folders == ids
    with pytest.raises(ValueError, match="2 folders for 3 classes"):
        reclip.ReCLIP(tiny, CLASSES, folders=ids[:2])


def test_a_checkpoint_written_back_as_read_stays_readable(tmp_path):
    """Writing back what checkpoint.read returned (its metadata still names the old tensor
    file) gives a run whose run.json names the new file, not the one just replaced."""
    from reclip import checkpoint

    checkpoint.write(tmp_path / "run", {"w": torch.ones(3)}, {"epoch": 1})
    tensors, meta = checkpoint.read(tmp_path / "run")
    checkpoint.write(tmp_path / "run", {"w": tensors["w"] * 2}, meta)
    again, meta2 = checkpoint.read(tmp_path / "run")
    assert torch.equal(again["w"], torch.full((3,), 2.0)) and meta2["epoch"] == 1


@pytest.mark.parametrize("field,value", [("weight", "cosine"), ("pseudo_labels", "labels"),
                                         ("k", 0), ("alpha", 1.0)])
def test_config_names_a_bad_label_propagation_setting(field, value):
    with pytest.raises(ValueError, match=f"^{field}"):
        reclip.Config(**{field: value})


@pytest.mark.parametrize("flag,value", [("--alpha", "1"), ("--alpha", "-0.5"), ("--k", "0"),
                                        ("--weight", "cosine")])
def test_label_propagation_flags_refuse_bad_values(flag, value, capsys):
    from reclip import cli

    argv = ["adapt", "--model", "m", "--data", "d", "--classes", "c", "--out", "o", flag, value]
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("reclip adapt: error: ") and flag in err, err
