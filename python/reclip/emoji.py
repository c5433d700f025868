"""Emoji artwork: a many-class benchmark with real visual domains, offline.

Four designers draw the same named concepts, each in its own style, so two of them are two
genuine visual domains over one label set, and the labels are meaningful English ("dog face",
"umbrella") that a text tower embeds with real semantic structure:

- **Noto Color Emoji** (Debian ``fonts-noto-color-emoji``): colour artwork; the source domain
  of the ``reclip-emoji`` model.
- **Symbola** (Debian ``fonts-symbola``): monochrome line art; a target.
- **EmojiOne** (Debian ``ruby-gemojione``, its ``assets/png/<HEX>.png``; artwork CC BY 4.0 by
  EmojiOne): flat colour artwork in another hand; a target.
- **Twemoji** (npm ``@twemoji/svg`` 15.0.0, MIT; SVGs rasterised by ``rsvg-convert`` from
  Debian ``librsvg2-bin``): the validation design on which training choices may be scored.
  It is never a target, and only the training script needs it.

The class set is every single-code-point emoji of Unicode category So at or above U+2000 that
all of Noto, Symbola and EmojiOne draw: 1066 of them (:func:`compute_classes` derives it from
the installed artwork; :func:`classes` reads the copy shipped beside the model). A class name is
exactly ``unicodedata.name(chr(c)).lower()``. :data:`SMALL` is a fixed seeded subset of 100.

:func:`render` draws seeded, jittered renders of any of the four designs (scale, rotation,
shift and background colour drawn per image), as uint8 RGB ``[n, size, size, 3]``: the same
arrays for the same seed and package versions.
"""
from __future__ import annotations

import functools
import glob
import io
import os
import shutil
import subprocess
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

__all__ = ["CLASS_FILE", "DESIGNS", "ROOT_ENV", "SMALL", "TWEMOJI_ENV", "classes",
           "class_names", "compute_classes", "find", "glyph", "render", "small_classes"]

#: folder that Debian packages were extracted into with ``dpkg-deb -x`` (default: the system)
ROOT_ENV = "RECLIP_EMOJI_ROOT"
#: folder holding Twemoji's SVGs (the ``package/`` folder of ``npm pack @twemoji/svg@15.0.0``)
TWEMOJI_ENV = "RECLIP_TWEMOJI"

#: design -> (package that brings it, its path under the root, how to get it)
DESIGNS = {
    "noto": ("fonts-noto-color-emoji", "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
             "apt-get install fonts-noto-color-emoji"),
    "symbola": ("fonts-symbola", "usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf",
                "apt-get install fonts-symbola"),
    "emojione": ("ruby-gemojione", "usr/share/rubygems-integration/all/gems/gemojione-*/assets/png",
                 "apt-get install ruby-gemojione"),
    "twemoji": ("@twemoji/svg", "",
                f"npm pack @twemoji/svg@15.0.0 && tar xzf twemoji-svg-15.0.0.tgz && "
                f"export {TWEMOJI_ENV}=$PWD/package"),
}

#: the class file shipped with the model: ``HEX<TAB>name`` per line, by code point
CLASS_FILE = "reclip-emoji-classes.tsv"
#: how many classes the small configuration has, and the seed that picks them
SMALL, _SMALL_SEED = 100, 0

#: Noto Color Emoji is a bitmap font with one strike, 109 px
_NOTO_PX = 109


def find(design: str) -> Path:
    """The installed artwork of `design` (a font file, or a folder of images).

    Debian packages are looked for under ``$RECLIP_EMOJI_ROOT`` (default ``/``), Twemoji in
    ``$RECLIP_TWEMOJI``. A missing one is a one-line FileNotFoundError naming the package and
    how to get it.
    """
    if design not in DESIGNS:
        raise ValueError(f"design: unknown emoji design {design!r}; choose from {', '.join(DESIGNS)}")
    package, rel, how = DESIGNS[design]
    if design == "twemoji":
        where = os.environ.get(TWEMOJI_ENV, "")
        if where and (Path(where) / "1f436.svg").is_file():
            if shutil.which("rsvg-convert") is None:
                raise FileNotFoundError("rsvg-convert not found (needed to rasterise Twemoji's "
                                        "SVGs): apt-get install librsvg2-bin")
            return Path(where)
        raise FileNotFoundError(f"{package} not found (${TWEMOJI_ENV}={where or '(unset)'}); "
                                f"get it with: {how}")
    root = os.environ.get(ROOT_ENV) or "/"
    hits = sorted(glob.glob(os.path.join(root, rel)))
    if not hits:
        raise FileNotFoundError(f"{package} is not installed ({os.path.join(root, rel)} not found); "
                                f"get it with: {how} (or dpkg-deb -x its .deb into a folder and set "
                                f"{ROOT_ENV})")
    return Path(hits[-1])


def _emojione_codes(folder: Path) -> set[int]:
    return {int(p.stem, 16) for p in folder.glob("*.png") if "-" not in p.stem}


def compute_classes() -> list[int]:
    """The class set, derived from the installed artwork: code points >= U+2000 of category So
    that Noto, Symbola and EmojiOne all draw, ascending. Needs fontTools (matplotlib brings it)."""
    from .optional import require

    ttlib = require("fontTools.ttLib", "reading the emoji fonts' character maps")
    drawn = _emojione_codes(find("emojione"))
    for design in ("noto", "symbola"):
        with ttlib.TTFont(str(find(design)), lazy=True) as font:
            drawn &= set(font.getBestCmap())
    return sorted(c for c in drawn if c >= 0x2000 and unicodedata.category(chr(c)) == "So")


def class_names(codes: Sequence[int]) -> list[str]:
    """The class name of each code point: its Unicode name, lower case."""
    return [unicodedata.name(chr(c)).lower() for c in codes]


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[int, ...]:
    text = resources.files("reclip").joinpath("weights", CLASS_FILE).read_text(encoding="utf-8")
    return tuple(int(line.split("\t")[0], 16) for line in text.splitlines() if line.strip())


def classes() -> list[int]:
    """The 1066 code points of the ``reclip-emoji`` model, in its class order (ascending)."""
    return list(_shipped())


def small_classes() -> list[int]:
    """The fixed subset of :data:`SMALL` classes (seeded; ascending code points)."""
    every = _shipped()
    pick = np.random.default_rng(_SMALL_SEED).choice(len(every), SMALL, replace=False)
    return [every[i] for i in sorted(pick)]


def _crop(rgba: Image.Image) -> Image.Image:
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise ValueError("empty glyph")
    return rgba.crop(box)


@functools.lru_cache(maxsize=4)
def _font(design: str):
    from PIL import ImageFont

    return ImageFont.truetype(str(find(design)), _NOTO_PX if design == "noto" else 96)


def glyph(design: str, code: int) -> Image.Image:
    """`design`'s drawing of the code point as an RGBA image cropped to its ink (about 100 px
    across; Symbola's ink is black on transparent)."""
    from PIL import ImageDraw

    if design in ("noto", "symbola"):
        canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        draw = ImageDraw.Draw(canvas)
        if design == "noto":
            draw.text((80, 80), chr(code), font=_font(design), anchor="mm", embedded_color=True)
        else:
            draw.text((80, 80), chr(code), font=_font(design), anchor="mm", fill=(0, 0, 0, 255))
        return _crop(canvas)
    if design == "emojione":
        with Image.open(find(design) / f"{code:04X}.png") as im:
            return _crop(im.convert("RGBA"))
    folder = find(design)
    svg = next((p for p in (folder / f"{code:x}.svg", folder / f"{code:x}-fe0f.svg") if p.is_file()),
               None)
    if svg is None:
        raise FileNotFoundError(f"{folder}: Twemoji has no drawing of U+{code:04X}")
    png = subprocess.run(["rsvg-convert", "-w", "128", "-h", "128", str(svg)], check=True,
                         capture_output=True).stdout
    with Image.open(io.BytesIO(png)) as im:
        return _crop(im.convert("RGBA"))


def render(design: str, codes: Optional[Sequence[int]] = None, per_class: int = 30, *,
           seed: int = 0, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Seeded jittered renders: uint8 RGB images ``[len(codes) * per_class, size, size, 3]`` and
    int64 labels (the index into `codes`, default :func:`classes`), class by class.

    Each image draws the glyph with its longer side at 55..85% of `size`, turned by up to 15
    degrees either way, shifted by up to 8% of `size`, over a solid light background whose
    channels are each 175..255. The draws come from `seed` alone, so the same arrays come out
    for the same seed (and package versions).
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8, got {size!r}")
    find(design)  # a missing package is named before any work, whatever is cached
    codes = classes() if codes is None else list(codes)
    rng = np.random.default_rng(seed)
    images = np.empty((len(codes) * per_class, size, size, 3), dtype=np.uint8)
    for c, code in enumerate(codes):
        art = glyph(design, code)
        for j in range(per_class):
            scale, angle = rng.uniform(0.55, 0.85), rng.uniform(-15.0, 15.0)
            shift = rng.uniform(-0.08, 0.08, size=2) * size
            background = tuple(int(v) for v in rng.integers(175, 256, size=3))
            f = scale * size / max(art.size)
            small = art.resize((max(1, round(art.width * f)), max(1, round(art.height * f))),
                               Image.LANCZOS)
            small = small.rotate(angle, resample=Image.BICUBIC, expand=True)
            canvas = Image.new("RGB", (size, size), background)
            corner = (int(round((size - small.width) / 2 + shift[0])),
                      int(round((size - small.height) / 2 + shift[1])))
            canvas.paste(small.convert("RGB"), corner, small.getchannel("A"))
            images[c * per_class + j] = np.asarray(canvas)
    return images, np.repeat(np.arange(len(codes), dtype=np.int64), per_class)
