"""The SHOT baseline (Config(method="shot")): its pseudo labels and loss against float64 numpy
re-implementations written from the formulas in docs/mathematics.md, what it trains, and that
it runs, saves, loads and resumes on the ReCLIP runner unchanged."""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import reclip  # noqa: E402
from reclip import adapt, methods  # noqa: E402
from reclip.trainable import norm_parameters  # noqa: E402

CLASSES = ["red square", "green circle", "blue triangle"]
TEMPLATES = ["a photo of a {}.", "a {}."]
# the tiny random ViT hardly moves at SHOT's paper lr (1e-6): tests that need training to
# show use a larger one
LR = 1e-2


def _shot(tiny, **config) -> reclip.ReCLIP:
    torch.manual_seed(0)
    return reclip.ReCLIP(tiny, CLASSES, TEMPLATES,
                         reclip.Config(**{"method": "shot", "max_epochs": 2, "lr": LR,
                                          "batch_size": 8, **config}))


# ---------------------------------------------------------------------------------- references


def reference_labels(feats: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64, by the formulas: x = [f, 1] / |[f, 1]|; round 1 centroids c_k = sum_i d_ik x_i /
    sum_i d_ik with d = softmax(logits), over the classes some image is predicted as; round 2
    centroids the mean x of each round-1 class; each round labels by the smallest cosine
    distance 1 - x.c / (|x| |c|). Returns the labels and, per image, the gap between its two
    smallest round-2 distances."""
    x = np.hstack([feats, np.ones((len(feats), 1))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = np.exp(logits - logits.max(1, keepdims=True))
    d /= d.sum(1, keepdims=True)

    def distances(centroids: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), len(centroids)))
        for i in range(len(x)):
            for k in range(len(centroids)):
                c = centroids[k]
                out[i, k] = 1 - x[i] @ c / (np.linalg.norm(x[i]) * np.linalg.norm(c))
        return out

    m = logits.shape[1]
    members = np.unique(logits.argmax(1))
    first = distances(np.stack([(d[:, k] @ x) / d[:, k].sum() for k in members]))
    first = members[first.argmin(1)]
    members = np.unique(first)
    dist = distances(np.stack([x[first == k].mean(0) for k in members]))
    second = members[dist.argmin(1)]
    gap = np.sort(dist, axis=1)[:, 1] - np.sort(dist, axis=1)[:, 0] if len(members) > 1 \
        else np.full(len(x), np.inf)
    assert second.max() < m
    return second, gap


def reference_loss(logits: np.ndarray, pseudo: np.ndarray, beta: float) -> float:
    """float64: mean_i H(p_i) + sum_k pbar_k log pbar_k + beta * mean_i -log p_i[pseudo_i]."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = np.mean([-sum(v * np.log(v) for v in row if v > 0) for row in p])
    pbar = p.mean(0)
    diversity = sum(v * np.log(v) for v in pbar if v > 0)
    ce = np.mean([-np.log(p[i, pseudo[i]]) for i in range(len(p))])
    return entropy + diversity + beta * ce


def _clustered(seed: int, n: int, m: int, d: int, *, unit: bool = True):
    """Features around m random directions and zero-shot-like logits of m class embeddings
    near (not at) those directions."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((m, d))
    truth = rng.integers(0, m, n)
    feats = centres[truth] + 1.2 * rng.standard_normal((n, d))
    nodes = centres + 1.0 * rng.standard_normal((m, d))
    nodes /= np.linalg.norm(nodes, axis=1, keepdims=True)
    if unit:
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats, 100.0 * feats @ nodes.T / np.linalg.norm(feats, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- pseudo labels


@pytest.mark.parametrize("seed,n,m,d,unit", [(0, 300, 5, 16, True), (1, 500, 12, 32, True),
                                             (2, 200, 4, 8, False)])
def test_pseudo_labels_match_float64_reference(seed, n, m, d, unit):
    feats, logits = _clustered(seed, n, m, d, unit=unit)
    want, gap = reference_labels(feats, logits)
    got = adapt.shot_pseudo_labels(torch.from_numpy(feats).float(),
                                   torch.from_numpy(logits).float())
    assert got.dtype == np.int64 and got.shape == (n,)
    clear = gap > 1e-4  # float32 may break a near-tie the other way
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got[clear], want[clear])
    # the clustering is not the classifier's argmax (else this test could not tell them apart)
    assert (want != logits.argmax(1)).sum() >= 3


def test_pseudo_labels_without_the_constant_coordinate_differ():
    """The appended 1 matters on this data: the same two rounds on the plain unit features give
    other labels, so the reference comparison above checks that it is there."""
    feats, logits = _clustered(3, 400, 6, 16)
    with_one, _ = reference_labels(feats, logits)
    d = np.exp(logits - logits.max(1, keepdims=True))
    d /= d.sum(1, keepdims=True)
    members = np.unique(logits.argmax(1))
    c = np.stack([d[:, k] @ feats for k in members])
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    first = members[(feats @ c.T).argmax(1)]
    members = np.unique(first)
    c = np.stack([feats[first == k].mean(0) for k in members])
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    without = members[(feats @ c.T).argmax(1)]
    assert (with_one != without).any()
    got = adapt.shot_pseudo_labels(torch.from_numpy(feats).float(), torch.from_numpy(logits).float())
    assert (got == with_one).mean() > (got == without).mean()


def test_pseudo_labels_with_empty_classes_stay_finite():
    """A class no image is predicted as, and one that loses every image in the first round,
    never become centroids (0 / 0) and never labels."""
    rng = np.random.default_rng(4)
    feats = rng.standard_normal((60, 8))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    logits = np.full((60, 5), -50.0)
    logits[:, 0] = 100 * feats[:, 0]
    logits[:, 1] = 100 * -feats[:, 0]
    logits[:, 2] = 100 * feats[:, 0] + 1e-3  # predicted by about half, same direction as 0
    logits[:, 4] = -1e4  # softmax weight underflows to exactly 0 in float32
    got = adapt.shot_pseudo_labels(torch.from_numpy(feats).float(), torch.from_numpy(logits).float())
    want, gap = reference_labels(feats, logits)
    assert set(got) <= {0, 1, 2} and not {3, 4} & set(got)
    np.testing.assert_array_equal(got[gap > 1e-4], want[gap > 1e-4])


# ---------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_loss_matches_numpy(scale):
    rng = np.random.default_rng(int(scale))
    logits = scale * rng.standard_normal((16, 7))
    pseudo = rng.integers(0, 7, 16)
    for beta in (0.0, 0.3, 2.0):
        got = adapt.shot_loss(torch.from_numpy(logits), torch.from_numpy(pseudo), beta)
        assert float(got) == pytest.approx(reference_loss(logits, pseudo, beta), rel=1e-5, abs=1e-6)


def test_loss_gradient_is_finite_when_probabilities_underflow():
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, -1e4, 0.0]], requires_grad=True)
    loss = adapt.shot_loss(logits, torch.tensor([0, 0]), 0.3)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # one-hot predictions on one class: no entropy, no cross-entropy, pbar = (1, 0, 0): 0
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------- what trains


def test_config():
    c = reclip.Config(method="shot")
    assert c.learning_rate == 1e-6 and c.sides == "visual" and c.shot_beta == 0.3
    assert reclip.Config().learning_rate == 1e-3
    assert reclip.Config(method="shot", lr=1e-4).learning_rate == 1e-4
    for bad, match in ((dict(method="tent"), "method"), (dict(shot_params="all"), "shot_params"),
                       (dict(method="shot", sides="text"), "sides"), (dict(lr=0.0), "lr"),
                       (dict(lr=-1e-3), "lr"), (dict(shot_beta=-0.1), "shot_beta")):
        with pytest.raises(ValueError, match=match):
            reclip.Config(**bad)


@pytest.mark.parametrize("which", ["encoder", "norms"])
def test_what_trains(tiny, colour_images, which):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    clf = _shot(tiny, shot_params=which, max_epochs=1)
    visual = {k for k, _ in tiny.model.named_parameters() if k.startswith("visual.")}
    norms = {k for k in norm_parameters(tiny.model) if k.startswith("visual.")}
    assert set(clf.visual_params) == (visual if which == "encoder" else norms)
    assert clf.text_params == {} and clf.runner.optimizers["text"] is None
    assert {k for k, p in clf.visual_copy.named_parameters() if p.requires_grad} == set(clf.visual_params)
    assert not any(p.requires_grad for p in clf.text_copy.parameters())
    assert clf.runner.optimizers["visual"].param_groups[0]["lr"] == LR
    clf.fit(colour_images)
    changed = {k for k, v in clf.visual_copy.state_dict().items() if not torch.equal(v, before[k])}
    # every trained tensor moves (weight decay alone moves any non-zero one), nothing else does
    assert changed == set(clf.visual_params)
    assert all(torch.equal(v, before[k]) for k, v in clf.text_copy.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in tiny.model.state_dict().items())


def test_fit_keeps_the_zero_shot_classifier(tiny, colour_images):
    labels = np.arange(len(colour_images)) % 3
    clf = _shot(tiny, max_epochs=2)
    zero_shot = clf.zero_shot_logits(colour_images)
    nodes = clf.nodes_v.clone()
    clf.fit(colour_images, labels=labels)
    assert torch.equal(clf.nodes_v, nodes) and torch.equal(clf.centres, nodes)
    assert clf.epoch == 2 and clf.iterations == 2 * 3
    # SHOT's model: the adapted visual features against the frozen class embeddings
    feats = torch.nn.functional.normalize(clf.visual_copy.encode_image(colour_images), dim=-1)
    torch.testing.assert_close(clf.logits(colour_images), 100.0 * feats @ nodes.T, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(clf.logits(colour_images), zero_shot, atol=1e-2)
    # the history: each epoch's loss and accuracies, the model scored after the epoch
    h = clf.history
    assert [e.trained for e in h] == [24, 24] and all(e.loss_visual is not None for e in h)
    one = _shot(tiny, max_epochs=1).fit(colour_images)
    assert h[0].accuracy["combined"] == float((one.predict(colour_images) == labels).mean())
    assert h[1].accuracy["combined"] == float((clf.predict(colour_images) == labels).mean())
    assert 0 <= h[1].accuracy["pseudo_shot"] <= 1


def test_step_is_sgd_on_the_shot_loss(tiny, colour_images, monkeypatch):
    """The first step of plain SGD moves the visual parameters by -lr x the gradient of
    shot_loss on the epoch's first batch (seeded permutation) with that batch's pseudo labels,
    which come from the whole set's features and zero-shot logits; all computed here
    independently of the runner. The pseudo labels are replaced by varied ones (the tiny
    random model's own would be one class), so a batch paired with other images' labels shows."""
    clf = _shot(tiny, max_iterations=1, momentum=0.0, weight_decay=0.0)
    model = copy.deepcopy(clf.visual_copy)
    nodes = clf.nodes_v
    pseudo = np.random.default_rng(0).integers(0, 3, len(colour_images))
    seen = []
    monkeypatch.setattr(methods.shot, "shot_pseudo_labels",
                        lambda f, z: seen.append((f, z)) or pseudo)
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.encode_image(colour_images), dim=-1)
    g = torch.Generator().manual_seed(0 * 100_003 + 0)
    first = torch.randperm(len(colour_images), generator=g)[:8]
    f = torch.nn.functional.normalize(model.encode_image(colour_images[first]), dim=-1)
    loss = adapt.shot_loss(100.0 * f @ nodes.T, torch.as_tensor(pseudo)[first], 0.3)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[k] for k in clf.visual_params])
    clf.fit(colour_images)
    assert clf.iterations == 1 and len(seen) == 1
    torch.testing.assert_close(seen[0][0], feats, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0][1], 100.0 * feats @ nodes.T, atol=1e-3, rtol=1e-5)
    for (k, p), grad in zip(clf.visual_params.items(), grads):
        torch.testing.assert_close(p.detach(), params[k].detach() - LR * grad, rtol=1e-4, atol=1e-7)
    assert any(grad.abs().max() > 0 for grad in grads)


# ---------------------------------------------------------------------------------- persistence


def test_save_load_round_trip_and_momentum(tiny, colour_images, tmp_path):
    clf = _shot(tiny).fit(colour_images)
    clf.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["config"]["method"] == "shot"
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "run" / meta["tensors"])
    assert not any(k.startswith(("text.", "momentum.text.")) for k in tensors)
    assert {f"momentum.visual.{k}" for k in clf.visual_params} <= tensors.keys()
    back = reclip.ReCLIP.load(tmp_path / "run")
    assert back.config.method == "shot" and back.text_params == {}
    assert torch.equal(back.logits(colour_images), clf.logits(colour_images))
    assert (back.predict(colour_images) == clf.predict(colour_images)).all()
    for k, p in back.visual_params.items():
        assert torch.equal(back.runner.optimizers["visual"].state[p]["momentum_buffer"],
                           clf.runner.optimizers["visual"].state[clf.visual_params[k]]["momentum_buffer"])


def test_resume_equals_uninterrupted(tiny, colour_images, tmp_path):
    full = _shot(tiny, max_epochs=3).fit(colour_images)
    _shot(tiny, max_epochs=1).fit(colour_images, out_dir=tmp_path / "run")
    torch.manual_seed(123)
    again = _shot(tiny, max_epochs=3).fit(colour_images, out_dir=tmp_path / "run", resume=True)
    assert again.epoch == 3
    assert torch.equal(again.logits(colour_images), full.logits(colour_images))
    one = _shot(tiny, max_epochs=1).fit(colour_images)
    assert not torch.equal(one.logits(colour_images), full.logits(colour_images))  # training moved it


def test_a_run_continues_only_with_its_method(tiny, colour_images, tmp_path):
    _shot(tiny, max_epochs=1).fit(colour_images, out_dir=tmp_path / "run")
    for config, match in ((reclip.Config(max_epochs=2), "method 'shot'"),
                          (reclip.Config(method="shot", shot_params="norms", max_epochs=2),
                           "shot_params")):
        other = reclip.ReCLIP(tiny, CLASSES, TEMPLATES, config)
        with pytest.raises(ValueError, match=match):
            other.fit(colour_images, out_dir=tmp_path / "run", resume=True)


def test_old_runs_with_a_stored_lr_load(tiny, colour_images, tmp_path):
    """Runs saved before `method` existed store lr 0.001 and no SHOT keys: ReCLIP runs."""
    torch.manual_seed(0)
    clf = reclip.ReCLIP(tiny, CLASSES, TEMPLATES, reclip.Config(max_epochs=1)).fit(colour_images)
    clf.save(tmp_path / "run")
    path = tmp_path / "run" / "run.json"
    meta = json.loads(path.read_text())
    for key in ("method", "shot_beta", "shot_params"):
        meta["config"].pop(key)
    meta["config"]["lr"] = 0.001
    path.write_text(json.dumps(meta))
    back = reclip.ReCLIP.load(tmp_path / "run")
    assert back.config.method == "reclip" and back.config.learning_rate == 0.001
    assert torch.equal(back.logits(colour_images), clf.logits(colour_images))
