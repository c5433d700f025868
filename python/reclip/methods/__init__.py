"""Adaptation methods: what an epoch computes and what a step's loss is. The runner
(reclip.runner) runs the steps; ReCLIP (reclip.adapt) holds the state they work on.

A method is a :class:`Method` with ``trainable(text_copy, visual_copy)`` (the parameters each
copy trains) and ``epoch(data, frozen, epoch, batch, truth, loaders)`` (one epoch, returning its
EpochLog), made by :func:`method_for` from ``Config.method``.
"""
from __future__ import annotations

from .base import Method
from .reclip import ReCLIPMethod
from .shot import SHOT, shot_loss, shot_pseudo_labels

__all__ = ["Method", "ReCLIPMethod", "SHOT", "method_for", "shot_loss", "shot_pseudo_labels"]


def method_for(clf):
    """The method object of a ReCLIP run, from its Config.method."""
    return {"reclip": ReCLIPMethod, "shot": SHOT}[clf.config.method](clf)
