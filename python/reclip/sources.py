"""Real images available offline: the source domains and the targets of the shipped models.

- **OpenCV's ``digits.png``** (the source domain): 5000 handwritten digits, a 2000x1000 grayscale
  image of 50 rows x 100 columns of 20x20 cells, white digits on black, 5 rows per class (rows
  0-4 are digit 0, rows 5-9 digit 1, ...). It ships in the Debian package ``opencv-doc``;
  :func:`find_opencv_digits` locates it, :func:`load_opencv_digits` cuts it into cells and
  :func:`split_indices` makes the seeded, stratified held-out split.
- **scikit-learn's ``digits``** (a target domain): 1797 8x8 UCI digits by other writers, values
  0..16, white on black; :func:`load_sklearn_digits` returns them as uint8 0..255.
- **Printed digits** (a target domain): the ten digits typeset in the 21 text faces that ship
  with matplotlib (DejaVu Sans, Sans Mono and Serif, STIX General and five Computer Modern
  faces, each in its weights and slants), rendered white on black into 20x20 cells with a
  seeded jitter of size, angle and position; :func:`render_printed_digits`. Typeset glyphs
  against a model that only saw handwriting: the printed-vs-handwritten shift of the digit
  adaptation benchmarks (synthetic digits to street numbers), built from fonts every install
  of the demo extra has, so the same images come out everywhere.

:data:`TARGETS` names the real targets ReCLIP is evaluated on, each with its class names and
the shipped model it belongs to: the three digit targets of ``reclip-digits`` and the four
emoji targets of ``reclip-emoji`` (Symbola's line art and EmojiOne's artwork, at the 100-class
subset and at all 1066 classes; see :mod:`reclip.emoji`). :func:`load_target` loads one and
:func:`target_split` gives each its fixed train / test split for the inductive protocol.

The digits come as uint8 arrays ``[N, H, W]`` (white on black) and int64 labels 0..9, the
emoji as uint8 RGB ``[N, H, W, 3]``; a model's own ``preprocess`` turns :func:`to_pil` of one
image into its input (resizing it to the model's resolution), so every domain goes through the
same pipeline.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
from PIL import Image

from .errors import one_line
from .optional import require

__all__ = [
    "DIGIT_NAMES",
    "DIGIT_TEMPLATES",
    "EMOJI_TEMPLATES",
    "OPENCV_DIGITS_ENV",
    "find_opencv_digits",
    "load_opencv_digits",
    "load_sklearn_digits",
    "load_target",
    "render_printed_digits",
    "split_indices",
    "Target",
    "TARGETS",
    "target",
    "target_split",
    "to_pil",
]

#: class names of the digit models, index = digit
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: the prompts ``reclip-digits`` was trained with, and its targets are adapted with
DIGIT_TEMPLATES = ["a photo of the number {}.", "a handwritten digit {}.", "the digit {}"]
#: the prompts of ``reclip-emoji``. A class name is a Unicode character name ("dog face",
#: "black right-pointing double triangle"), which says what is drawn but not that it is a small
#: drawing; each template says so in other words, so that the mean of the three leans on the
#: name rather than on one phrasing.
EMOJI_TEMPLATES = ["an emoji of {}.", "a {} icon.", "a small drawing of {}."]

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
        raise ValueError(f"{file}: cannot read image ({one_line(e)})") from None
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
    """A uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB) image as a PIL image (for a model's
    ``preprocess``)."""
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"expected a uint8 [H, W] or [H, W, 3] image, got {a.dtype} {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a))


#: matplotlib's bundled text faces (file stems under mpl-data/fonts/ttf) that have digits; its
#: STIX size-variant and math-symbol files hold no ordinary digits and are left out
PRINTED_FACES = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmb10", "cmss10", "cmti10", "cmtt10",
)


def render_printed_digits(per_face: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Typeset digits: uint8 images ``[21 * 10 * per_face, 20, 20]`` (white on black) and int64
    labels, face by face, digit by digit.

    Each glyph is drawn at 44..63 pt, turned by up to 12 degrees either way, cropped to its ink,
    scaled so its longer side is 13..17 px (the size of the source's handwritten digits in
    their 20x20 cells) and centred with up to one pixel of shift. ``seed`` fixes the jitter.
    """
    from PIL import ImageDraw, ImageFont

    if isinstance(per_face, bool) or not isinstance(per_face, int) or per_face < 1:
        raise ValueError(f"per_face must be a positive integer, got {per_face!r}")
    faces = Path(require("matplotlib", "the printed-digits target").get_data_path()) / "fonts" / "ttf"
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for face in PRINTED_FACES:
        for digit in range(10):
            for _ in range(per_face):
                font = ImageFont.truetype(str(faces / f"{face}.ttf"), int(rng.integers(44, 64)))
                canvas = Image.new("L", (80, 80), 0)
                ImageDraw.Draw(canvas).text((40, 40), str(digit), fill=255, font=font, anchor="mm")
                canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR)
                ink = np.asarray(canvas)
                rows, cols = np.flatnonzero(ink.max(1)), np.flatnonzero(ink.max(0))
                glyph = Image.fromarray(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
                scale = float(rng.uniform(13, 17)) / max(glyph.size)
                glyph = glyph.resize((max(1, round(glyph.width * scale)),
                                      max(1, round(glyph.height * scale))), Image.LANCZOS)
                cell = Image.new("L", (_CELL, _CELL), 0)
                shift = rng.integers(-1, 2, size=2)
                cell.paste(glyph, ((_CELL - glyph.width) // 2 + int(shift[0]),
                                   (_CELL - glyph.height) // 2 + int(shift[1])))
                images.append(np.asarray(cell))
                labels.append(digit)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _opencv_lowres() -> tuple[np.ndarray, np.ndarray]:
    """The OpenCV digits held out from the source model's training (the 20% test side of
    ``split_indices(labels, 0.2, seed=0)``), box-downsampled from 20x20 to 8x8 and quantised to
    17 grey levels: the source's writers at scikit-learn's resolution and quantisation."""
    images, labels = load_opencv_digits()
    _, held_out = split_indices(labels, 0.2, seed=0)
    small = np.stack([np.asarray(Image.fromarray(a).resize((8, 8), Image.BOX))
                      for a in images[held_out]]).astype(np.float64)
    levels = np.rint(small / 255.0 * 16.0) * (255.0 / 16.0)
    return levels.astype(np.uint8), labels[held_out]


@dataclass(frozen=True)
class Target:
    """A real target domain: its images, its class names, and the shipped model (with the
    prompts it was trained with) that is adapted to it."""

    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    """() -> uint8 images ``[N, H, W]`` or ``[N, H, W, 3]`` and int64 labels"""
    classnames: Callable[[], list[str]]
    model: str
    templates: tuple[str, ...]


def _emoji_target(design: str, small: bool) -> Target:
    """A design's seeded renders, 30 per class, of the 100-class subset or of all 1066."""
    from . import emoji

    def codes() -> list[int]:
        return emoji.small_classes() if small else emoji.classes()

    return Target(lambda: emoji.render(design, codes(), per_class=EMOJI_RENDERS, seed=0),
                  lambda: emoji.class_names(codes()), "reclip-emoji", tuple(EMOJI_TEMPLATES))


#: renders per class of each emoji target
EMOJI_RENDERS = 30

_DIGITS = {"classnames": lambda: list(DIGIT_NAMES), "model": "reclip-digits",
           "templates": tuple(DIGIT_TEMPLATES)}
#: the real targets of the shipped models: name -> Target
TARGETS = {
    "sklearn-digits": Target(load_sklearn_digits, **_DIGITS),
    "opencv-lowres": Target(_opencv_lowres, **_DIGITS),
    "printed-digits": Target(render_printed_digits, **_DIGITS),
    "symbola-100": _emoji_target("symbola", small=True),
    "emojione-100": _emoji_target("emojione", small=True),
    "symbola-1066": _emoji_target("symbola", small=False),
    "emojione-1066": _emoji_target("emojione", small=False),
}

#: the inductive protocol's split of every target: this share of each class is the test side
TEST_FRACTION = 0.3


def target(name: str) -> Target:
    """The target `name` (one of :data:`TARGETS`); ValueError naming the choices otherwise."""
    if name not in TARGETS:
        raise ValueError(f"target: unknown target {name!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[name]


def load_target(name: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (``[N, H, W]`` white on black for the digits, ``[N, H, W, 3]`` RGB for the
    emoji) and int64 labels of the target `name` (one of :data:`TARGETS`)."""
    return target(name).load()


def target_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed train / test split of a target for the inductive protocol: (train indices,
    test indices), stratified, ``TEST_FRACTION`` of each class on the test side, seed 0 for
    every target, whatever seed the adaptation runs with."""
    return split_indices(labels, TEST_FRACTION, seed=0)
