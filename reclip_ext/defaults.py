"""ReCLIP's label-propagation settings, written once.

Every function of reclip_ext and reclip's ``Config`` take their defaults from here, so that
``reclip_ext.label_propagate(text, images)`` with no options gives exactly the pseudo labels of
the reclip pipeline (on the same coordinates).
"""
from typing import NamedTuple


class Defaults(NamedTuple):
    k: int = 20  #: neighbours of each node in the k-NN graph (the paper's value)
    alpha: float = 0.99  #: propagation strength in (I - alpha W) Z = Y
    #: edge weight f(s) of a cosine s: "shift" ((1 + s) / 2, the ReCLIP authors' code);
    #: "relu" (max(s, 0), Iscen et al.'s diffusion) is the other choice
    weight: str = "shift"
    gamma: float = 1.0  #: exponent of the edge weight
    max_iter: int = 20  #: conjugate-gradient iterations per class
    tol: float = 1e-6  #: relative residual at which a class's CG stops


DEFAULTS = Defaults()
