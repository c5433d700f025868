"""ReCLIP: source-free domain adaptation of CLIP models (Hu et al., WACV 2024).

The pipeline on top of the compiled label-propagation engine ``reclip_ext``: projection of
the embedding space (``projection``), pseudo labels (``pseudo_labels``), LayerNorm
self-training of a text and a visual copy of the model with label sharing, and the SHOT
baseline as ``Config(method="shot")`` (``adapt``),
checkpoints (``checkpoint``), model loading without network access (``models``), prompts
and benchmark presets (``prompts``), image inputs (``data``) and the ``reclip`` command
(``cli``).

>>> import reclip                                                      # doctest: +SKIP
>>> model = reclip.load_model("ViT-B-32", pretrained="ViT-B-32.pt")    # doctest: +SKIP
>>> clf = reclip.ReCLIP(model, ["cat", "dog"]).fit("images/")          # doctest: +SKIP
>>> clf.predict("images/")                                             # doctest: +SKIP
"""
import importlib

# name -> submodule. Imported on first use, so that a light submodule (reclip.checkpoint's JSON
# writer) imports on machines without torch or open_clip, such as a GPU box that only runs the benchmarks.
_EXPORTS = {"Config": "adapt", "EpochLog": "adapt", "ReCLIP": "adapt", "LoadedModel": "models",
            "load_model": "models", "PRESETS": "prompts", "load_preset": "prompts"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name == "__version__":  # one release number for both packages, kept in reclip_ext
        from reclip_ext._version import __version__

        return __version__
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'reclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
