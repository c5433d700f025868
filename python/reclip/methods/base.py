"""What every method shares: its run, and the visual copy's features between epochs."""
from __future__ import annotations

from typing import Any

import torch


class Method:
    """A method working on the state of `clf` (a reclip.ReCLIP)."""

    name = ""

    def __init__(self, clf) -> None:
        self.clf = clf
        # (image set, the visual copy's features of it) after the last epoch's steps: scoring
        # the trained model needs them, and they are the next epoch's first pass, since nothing
        # trains in between
        self._kept: tuple[Any, torch.Tensor] | None = None

    def forget(self) -> None:
        """Drop the kept features (n x d on the device) once fit is done with them."""
        self._kept = None

    def visual_features(self, data, loaders: dict, frozen: torch.Tensor) -> torch.Tensor:
        """The visual copy's features of `data` now: those kept after the last epoch's steps;
        before any step, the frozen tower's `frozen` (the same weights give the same
        features, and a pass over n images is the costliest stage of a short run); or a new
        pass."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] is data:
            return kept[1]
        if self.untrained():
            return frozen
        return self.clf.features.images(self.clf.visual_copy, data, loaders["encode"])

    def untrained(self) -> bool:
        """Whether the visual copy's image tower is still the frozen one: every parameter that
        trains equals the text copy's (nothing else of them ever differs)."""
        base = dict(self.clf.text_copy.named_parameters())
        return all(torch.equal(p, base[name]) for name, p in self.clf.visual_params.items())

    def trained_features(self, data, loaders: dict) -> torch.Tensor:
        """The visual copy's features of `data` after this epoch's steps, kept for the next
        epoch."""
        feats = self.clf.features.images(self.clf.visual_copy, data, loaders["encode"])
        self._kept = (data, feats)
        return feats
