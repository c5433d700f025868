"""ReCLIP: source-free domain adaptation of CLIP models (Hu et al., WACV 2024).

The pipeline on top of the compiled label-propagation engine ``reclip_ext``: projection of
the embedding space (``projection``), pseudo labels (``pseudo_labels``), LayerNorm
self-training of a text and a visual copy of the model with label sharing (``adapt``),
checkpoints (``checkpoint``), model loading without network access (``models``), prompts
and benchmark presets (``prompts``), image inputs (``data``) and the ``reclip`` command
(``cli``).

>>> import reclip                                                      # doctest: +SKIP
>>> model = reclip.load_model("tests/assets/tiny-vit.json")            # doctest: +SKIP
>>> clf = reclip.ReCLIP(model, ["cat", "dog"]).fit("images/")          # doctest: +SKIP
>>> clf.predict("images/")                                             # doctest: +SKIP
"""
from .adapt import Config, EpochLog, ReCLIP
from .models import LoadedModel, load_model
from .prompts import PRESETS, load_preset

__version__ = "0.1.0"

__all__ = ["Config", "EpochLog", "LoadedModel", "PRESETS", "ReCLIP", "load_model", "load_preset"]
