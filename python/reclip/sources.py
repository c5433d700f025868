"""Real digit images available offline: the source domain of the ``reclip-digits`` model and its
default target.

- **OpenCV's ``digits.png``** (the source domain): 5000 handwritten digits, a 2000x1000 grayscale
  image of 50 rows x 100 columns of 20x20 cells, white digits on black, 5 rows per class (rows
  0-4 are digit 0, rows 5-9 digit 1, ...). It ships in the Debian package ``opencv-doc``;
  :func:`find_opencv_digits` locates it, :func:`load_opencv_digits` cuts it into cells and
  :func:`split_indices` makes the seeded, stratified held-out split.
- **scikit-learn's ``digits``** (a target domain): 1797 8x8 UCI digits by other writers, values
  0..16, white on black; :func:`load_sklearn_digits` returns them as uint8 0..255.

Both come as uint8 arrays ``[N, H, W]`` (white on black) and int64 labels 0..9; a model's own
``preprocess`` turns :func:`to_pil` of one image into its input (resizing it to the model's
resolution), so every domain goes through the same pipeline.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .optional import require

__all__ = [
    "DIGIT_NAMES",
    "OPENCV_DIGITS_ENV",
    "find_opencv_digits",
    "load_opencv_digits",
    "load_sklearn_digits",
    "split_indices",
    "to_pil",
]

#: class names of the digit models, index = digit
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

#: environment variable naming the ``digits.png`` file (or a folder holding it)
OPENCV_DIGITS_ENV = "RECLIP_OPENCV_DIGITS"

_DEB_PATH = Path("usr/share/doc/opencv-doc/examples/data/digits.png")
#: where the file is looked for when neither an argument nor the variable names it
_KNOWN_ROOTS = ("/tmp/opencv-doc", "~/opencv-doc", "/opt/opencv-doc", "/")
_OTHER_PLACES = ("/usr/share/opencv4/samples/data/digits.png",
                 "/usr/share/opencv/samples/data/digits.png")

_HOW_TO_GET = ("cd /tmp && apt-get download opencv-doc && dpkg-deb -x opencv-doc_*.deb /tmp/opencv-doc "
               f"(or set {OPENCV_DIGITS_ENV}=/path/to/digits.png)")

_ROWS, _COLS, _CELL = 50, 100, 20


def _candidates(path: Union[str, "os.PathLike[str]", Path]) -> list[Path]:
    p = Path(os.path.expanduser(os.fspath(path)))
    return [p, p / "digits.png", p / _DEB_PATH] if p.is_dir() else [p]


def find_opencv_digits(path: Union[str, "os.PathLike[str]", None] = None) -> Path:
    """Path of OpenCV's ``digits.png``.

    Looked for at ``path`` (a file, or a folder holding ``digits.png`` or the extracted Debian
    package), else at ``$RECLIP_OPENCV_DIGITS``, else in the usual extraction folders
    (``/tmp/opencv-doc``, ``~/opencv-doc``, ``/opt/opencv-doc``, the system's own
    ``/usr/share/doc/opencv-doc``). A one-line FileNotFoundError says how to get it.
    """
    if path is not None:
        where = [path]
    elif os.environ.get(OPENCV_DIGITS_ENV):
        where = [os.environ[OPENCV_DIGITS_ENV]]
    else:
        where = [Path(os.path.expanduser(r)) / _DEB_PATH for r in _KNOWN_ROOTS] + list(_OTHER_PLACES)
    for w in where:
        for c in _candidates(w):
            if c.is_file():
                return c
    named = os.fspath(where[0]) if len(where) == 1 else "/tmp/opencv-doc/" + str(_DEB_PATH)
    raise FileNotFoundError(f"OpenCV digits.png not found ({named}); get it with: {_HOW_TO_GET}")


def load_opencv_digits(path: Union[str, "os.PathLike[str]", None] = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5000 digits of ``digits.png``: uint8 images ``[5000, 20, 20]`` (white on black) and
    int64 labels ``[5000]``, in row-major cell order (500 of each digit, ascending).

    ``path`` as for :func:`find_opencv_digits`. ValueError (one line) if the file is not a
    2000x1000 image.
    """
    file = find_opencv_digits(path)
    try:
        with Image.open(file) as im:
            im.load()
            a = np.asarray(im.convert("L"), dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise ValueError(f"{file}: cannot read image ({type(e).__name__}: {e})") from None
    if a.shape != (_ROWS * _CELL, _COLS * _CELL):
        raise ValueError(f"{file}: expected a 2000x1000 image of 20x20 digit cells, "
                         f"got {a.shape[1]}x{a.shape[0]}")
    cells = a.reshape(_ROWS, _CELL, _COLS, _CELL).transpose(0, 2, 1, 3).reshape(-1, _CELL, _CELL)
    labels = np.repeat(np.arange(_ROWS) // (_ROWS // 10), _COLS).astype(np.int64)
    return np.ascontiguousarray(cells), labels


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797, no download): uint8 images ``[1797, 8, 8]``
    (0..16 scaled to 0..255, white on black) and int64 labels."""
    d = require("sklearn.datasets", "scikit-learn's digits").load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, d.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: (train indices, test indices), each sorted; per class,
    ``round(test_fraction * count)`` items go to the test side."""
    labels = np.asarray(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_pil(image: np.ndarray) -> Image.Image:
    """A uint8 ``[H, W]`` digit as a grayscale PIL image (for a model's ``preprocess``)."""
    a = np.asarray(image)
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W] image, got {a.dtype} {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))
