"""reclip.metrics.expected_calibration_error against a brute-force reference and cases whose
answer is known by hand."""
from __future__ import annotations

import numpy as np
import pytest

from reclip.metrics import expected_calibration_error as ece


def reference_ece(probs, labels, bins: int = 15) -> float:
    """Loops over images and bins, nothing vectorised: bin b is (b / bins, (b + 1) / bins],
    the first bin also taking a confidence of 0."""
    rows = [[float(p) for p in row] for row in np.asarray(probs)]
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = []
        for row, label in zip(rows, labels):
            best = 0
            for c in range(1, len(row)):
                if row[c] > row[best]:
                    best = c
            conf = row[best]
            if (lo < conf or b == 0) and conf <= hi:
                members.append((conf, best == int(label)))
        if members:
            acc = sum(1.0 for _, right in members if right) / len(members)
            mean_conf = sum(conf for conf, _ in members) / len(members)
            total += len(members) / len(rows) * abs(acc - mean_conf)
    return total


def softmax_batch(rng, n: int, m: int, temperature: float, dtype=np.float32):
    logits = rng.normal(0, temperature, (n, m))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).astype(dtype), rng.integers(0, m, n)


@pytest.mark.parametrize("n,m,temperature,bins", [(500, 3, 2.0, 15), (300, 10, 4.0, 15),
                                                  (200, 2, 0.5, 7), (50, 5, 10.0, 1)])
def test_matches_brute_force_reference(n, m, temperature, bins):
    rng = np.random.default_rng(n + m)
    probs, labels = softmax_batch(rng, n, m, temperature)
    # make about half the predictions right, so that accuracy and confidence both vary
    right = rng.random(n) < 0.5
    labels[right] = probs[right].argmax(1)
    got = ece(probs, labels, bins=bins)
    assert isinstance(got, float)
    assert got == pytest.approx(reference_ece(probs, labels, bins), abs=1e-12)


def test_perfectly_calibrated_is_about_zero():
    """Each prediction is right with probability equal to its confidence."""
    rng = np.random.default_rng(0)
    n = 200_000
    conf = rng.uniform(0.5, 1.0, n)
    probs = np.stack([conf, 1 - conf], axis=1)  # class 0 is predicted
    labels = np.where(rng.random(n) < conf, 0, 1)
    assert ece(probs, labels) < 0.01
    # the same data, always wrong: ECE = mean confidence = 0.75
    assert ece(probs, np.ones(n, int)) == pytest.approx(conf.mean(), abs=1e-12)


def test_confident_and_wrong_is_one():
    probs = np.eye(4)[[0, 1, 2, 3, 0]]
    assert ece(probs, np.array([1, 2, 3, 0, 2])) == 1.0
    assert ece(probs, np.array([0, 1, 2, 3, 0])) == 0.0  # confident and right


def test_confidence_one_is_in_the_last_bin():
    # one image at confidence 1.0 (wrong), one at 0.95 (right), 10 bins. Together in the last
    # bin: |0.5 - 0.975| = 0.475; were 1.0 in a bin of its own: 0.5 * 1 + 0.5 * 0.05 = 0.525
    probs = np.array([[1.0, 0.0], [0.95, 0.05]])
    labels = np.array([1, 0])
    assert ece(probs, labels, bins=10) == pytest.approx(0.475, abs=1e-12)


@pytest.mark.parametrize("edge,bins", [(0.5, 4), (0.3, 10), (2 / 15, 15), (7 / 15, 15)])
def test_confidence_on_an_inner_edge_is_in_the_lower_bin(edge, bins):
    # image A exactly on the edge between bins k-1 and k (right), image B inside bin k (wrong).
    # A in the lower bin: 0.5 * (1 - edge) + 0.5 * b; with B: |0.5 - (edge + b) / 2|
    b = edge + 0.5 / bins

    def row(top: float) -> list[float]:  # class 0 at `top`, the rest shared by 9 classes
        return [top] + [(1 - top) / 9] * 9

    probs = np.array([row(edge), row(b)])
    assert probs[0].max() == edge and probs.argmax(1).tolist() == [0, 0]
    labels = np.array([0, 1])
    want = 0.5 * (1 - edge) + 0.5 * b
    assert ece(probs, labels, bins=bins) == pytest.approx(want, abs=1e-12)
    assert ece(probs, labels, bins=bins) == pytest.approx(reference_ece(probs, labels, bins),
                                                          abs=1e-12)


def test_ties_predict_the_first_class():
    probs = np.array([[0.4, 0.4, 0.2]])
    assert ece(probs, np.array([0])) == pytest.approx(0.6)
    assert ece(probs, np.array([1])) == pytest.approx(0.4)


@pytest.mark.parametrize("probs,labels,bins", [
    (np.zeros((0, 3)), np.zeros(0, int), 15),
    (np.ones(3) / 3, np.zeros(1, int), 15),
    (np.ones((2, 3)) / 3, np.zeros(3, int), 15),
    (np.ones((2, 3)) / 3, np.zeros(2, int), 0),
])
def test_bad_input_is_a_value_error(probs, labels, bins):
    with pytest.raises(ValueError):
        ece(probs, labels, bins=bins)
