"""Scores of a model's class probabilities against known labels (numpy only, no torch)."""
from __future__ import annotations

import numpy as np


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (Guo et al., 2017).

    `probs` is (n, m) class probabilities (e.g. a softmax), `labels` the n true classes. Each
    image's confidence is its largest probability and its prediction that class (the first one
    on a tie, as ``argmax``). Confidences fall into `bins` equal-width bins over (0, 1]:
    bin b holds (b / bins, (b + 1) / bins], with the edges computed as ``k / bins`` in float64.
    So a confidence exactly on an inner edge belongs to the lower bin, and a confidence of
    exactly 1.0 to the last one. Then

        ECE = sum over bins B of |B| / n * |accuracy(B) - mean confidence(B)|

    (empty bins add nothing), computed in float64: 0 for a perfectly calibrated model, at most 1.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs: expected a non-empty (n, m) array, got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels: expected shape ({probs.shape[0]},), got {labels.shape}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # the inner edges: side="left" puts a value equal to an edge below it, and every value
    # above the last inner edge (1.0 included) in the last bin
    which = np.searchsorted(np.arange(1, bins) / bins, confidence, side="left")
    # |B| / n * |acc(B) - conf(B)| = |sum over B of (correct - confidence)| / n: one sum per
    # bin, 0 for an empty one
    gap = np.bincount(which, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(confidence))
