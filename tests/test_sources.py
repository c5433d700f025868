"""The real targets of the shipped digits model (reclip.sources): what they hold and their
fixed inductive splits."""
from __future__ import annotations

import numpy as np
import pytest

from reclip import sources

pytest.importorskip("PIL")


def test_printed_digits_are_balanced_cells_of_ink():
    pytest.importorskip("matplotlib")
    images, labels = sources.render_printed_digits(per_face=2)
    faces = len(sources.PRINTED_FACES)
    assert images.shape == (faces * 10 * 2, 20, 20) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), np.full(10, faces * 2))
    # every glyph landed inside its cell: ink present, a black frame row/column left somewhere
    ink = images > 64
    assert ink.any(axis=(1, 2)).all()
    spans = [(np.ptp(np.flatnonzero(a.any(1))) + 1, np.ptp(np.flatnonzero(a.any(0))) + 1) for a in ink]
    assert max(max(s) for s in spans) <= 18
    # the same seed gives the same images; another seed other jitter
    again, _ = sources.render_printed_digits(per_face=2)
    other, _ = sources.render_printed_digits(per_face=2, seed=1)
    assert np.array_equal(images, again) and not np.array_equal(images, other)


@pytest.mark.parametrize("per_face", [0, -1, 2.5, True])
def test_printed_digits_refuse_a_bad_count(per_face):
    with pytest.raises(ValueError, match="per_face must be a positive integer"):
        sources.render_printed_digits(per_face=per_face)


def test_target_split_is_fixed_disjoint_and_stratified():
    labels = np.repeat(np.arange(4), [10, 20, 7, 13])
    train, test = sources.target_split(labels)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    counts = np.bincount(labels[test], minlength=4)
    assert np.array_equal(counts, np.rint(sources.TEST_FRACTION * np.bincount(labels)))
    again = sources.target_split(labels)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_unknown_target_names_the_argument():
    with pytest.raises(ValueError, match="target: unknown target 'mnist'"):
        sources.load_target("mnist")


def test_sklearn_target_is_scikit_learns_digits():
    pytest.importorskip("sklearn")
    images, labels = sources.load_target("sklearn-digits")
    assert images.shape == (1797, 8, 8) and len(labels) == 1797


def test_opencv_lowres_target_is_the_held_out_fifth_at_8x8():
    try:
        sources.find_opencv_digits()
    except FileNotFoundError:
        pytest.skip("OpenCV digits.png is not installed")
    images, labels = sources.load_target("opencv-lowres")
    assert images.shape == (1000, 8, 8)
    assert np.array_equal(np.bincount(labels), np.full(10, 100))
    # 17 grey levels: multiples of 255/16, truncated to uint8
    assert set(np.unique(images)) <= set((np.arange(17) * 255 / 16).astype(np.uint8))
    assert len(np.unique(images)) > 8
