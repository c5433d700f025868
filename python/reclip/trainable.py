"""Which parameters train: every norm layer's weight and bias of one tower (ReCLIP's choice),
or SHOT's choice for its visual copy; everything else is frozen. One policy, used by the
runner, the benchmarks and the tests alike.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_visual(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` of `model` belongs to its image tower: open_clip's ``visual.*``,
    or what the model's own ``visual_prefixes`` name (:class:`reclip.folders.HFCLIP`). The
    rest is the text side."""
    return name.startswith(tuple(getattr(model, "visual_prefixes", ("visual.",))))


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Weight and bias of every LayerNorm and the affine weight and bias of every BatchNorm.

    LayerNorms are found by ``isinstance(m, nn.LayerNorm)`` (so open_clip's ``LayerNorm`` /
    ``LayerNormFp32`` and HuggingFace's ``LayerNorm`` count); BatchNorms by
    ``isinstance(m, _BatchNorm)``. Keys are qualified parameter names, in module order; a
    parameter shared between modules appears once.
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        if not isinstance(mod, (nn.LayerNorm, _BatchNorm)):
            continue
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter) and id(p) not in seen:
                seen.add(id(p))
                out[f"{mod_name}.{pname}" if mod_name else pname] = p
    return out


def freeze_except_norms(module: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze every parameter but the norm ones (:func:`norm_parameters`); return those."""
    params = norm_parameters(module)
    keep = {id(p) for p in params.values()}
    for p in module.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def tower_params(model: nn.Module, *, visual: bool) -> dict[str, nn.Parameter]:
    """Freeze everything, then unfreeze the norm layers of one tower (visual or text)."""
    norms = freeze_except_norms(model)
    keep = {k: p for k, p in norms.items() if is_visual(model, k) == visual}
    for k, p in norms.items():
        p.requires_grad_(k in keep)
    if not keep:
        raise ValueError(f"the model's {'visual' if visual else 'text'} tower has no norm layers to tune")
    return keep


def shot_params(model: nn.Module, which: str) -> dict[str, nn.Parameter]:
    """Freeze everything but what SHOT trains in `model`: the whole visual tower ("encoder":
    SHOT adapts its entire feature extractor and keeps only the classifier fixed, and here the
    classifier is the class embeddings) or its norm layers ("norms", ReCLIP-V's choice: far
    fewer parameters, a smaller checkpoint, and less room to drift)."""
    if which == "norms":
        return tower_params(model, visual=True)
    keep = {k: p for k, p in model.named_parameters() if is_visual(model, k)}
    for k, p in model.named_parameters():
        p.requires_grad_(k in keep)
    if not keep:
        raise ValueError("the model has no visual tower parameters to tune")
    return keep


def optimizer(params: dict[str, nn.Parameter], config) -> torch.optim.SGD:
    """The run's optimiser over `params`: SGD with `config`'s learning rate in force (see
    Config.learning_rate), momentum and weight decay."""
    return torch.optim.SGD(list(params.values()), lr=config.learning_rate,
                           momentum=config.momentum, weight_decay=config.weight_decay)
