"""Class names and prompt templates.

Presets: the class names and prompt templates of the 22 benchmarks of the ReCLIP paper ship as
JSON data files in ``reclip/presets/`` (``{"name", "classnames", "templates"}``), read through
``importlib.resources`` so they work from an installed wheel as well as from a source tree.
Label index ``i`` of a dataset's canonical label order is ``classnames[i]``.

Custom lists come from plain text files, one entry per line (``read_classnames``,
``read_templates``). A template holds exactly one ``{}``, replaced by the class name.

Every error is one line that names the offending file (and line), so a command-line front end
can print it as is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from importlib import resources

PRESETS: tuple[str, ...] = (
    "aid", "birdsnap", "caltech101", "cifar10", "cifar100", "country211", "dtd", "eurosat",
    "fer2013", "fgvc_aircraft", "flowers102", "food101", "gtsrb", "imagenet", "mnist",
    "oxford_pets", "pcam", "resisc45", "sst2", "stanford_cars", "stl10", "sun397",
)
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

_PLACEHOLDER = "{}"


_ALIASES = {
    "pets": "oxford_pets", "oxfordiiitpet": "oxford_pets", "oxfordpet": "oxford_pets",
    "cars": "stanford_cars", "fgvc": "fgvc_aircraft", "aircraft": "fgvc_aircraft",
    "flowers": "flowers102", "oxfordflowers102": "flowers102", "food": "food101",
    "renderedsst2": "sst2", "patchcamelyon": "pcam", "fer": "fer2013", "caltech": "caltech101",
    "describabletextures": "dtd", "sun": "sun397", "imagenet1k": "imagenet", "nwpuresisc45": "resisc45",
}


def _preset_key(name: str) -> str | None:
    """The preset a user-typed name refers to: case, '-', '_', ' ' and '.' are ignored."""
    squashed = "".join(ch for ch in str(name).lower() if ch.isalnum())
    for p in PRESETS:
        if p.replace("_", "") == squashed:
            return p
    return _ALIASES.get(squashed)


def load_preset(name: str) -> tuple[list[str], list[str]]:
    """(classnames, templates) of a benchmark preset, e.g. ``load_preset("cifar10")``.

    Case and separators are ignored ("CIFAR-10", "FGVC Aircraft"); a few common aliases are
    accepted ("pets", "cars", "flowers", ...). Raises ValueError listing the valid names.
    """
    key = _preset_key(name)
    if key is None:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    ref = resources.files(__package__).joinpath("presets").joinpath(f"{key}.json")
    try:
        data = json.loads(ref.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"preset {key!r}: data file presets/{key}.json is missing from the installed package") from None
    classnames = check_classnames(data["classnames"], source=f"preset {key!r}")
    templates = check_templates(data["templates"], source=f"preset {key!r}")
    return classnames, templates


def check_classnames(classnames: Iterable[str], source: str = "class names") -> list[str]:
    """Validate a class-name list (non-empty, strings, no blanks, no duplicates); returns a stripped copy."""
    if isinstance(classnames, (str, bytes)):
        raise TypeError(f"{source}: expected a list of class names, got a single string")
    names = []
    seen: dict[str, int] = {}
    for i, c in enumerate(classnames):
        if not isinstance(c, str):
            raise TypeError(f"{source}: class name {i} is {type(c).__name__}, not str")
        c = c.strip()
        if not c:
            raise ValueError(f"{source}: class name {i} is blank")
        if c in seen:
            raise ValueError(f"{source}: duplicate class name {c!r} (entries {seen[c]} and {i})")
        seen[c] = i
        names.append(c)
    if not names:
        raise ValueError(f"{source}: no class names")
    return names


def check_templates(templates: Iterable[str] | None, source: str = "templates") -> list[str]:
    """Validate templates (non-empty, each with exactly one ``{}``); None gives DEFAULT_TEMPLATES."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, (str, bytes)):
        raise TypeError(f"{source}: expected a list of templates, got a single string")
    out = []
    for i, t in enumerate(templates):
        if not isinstance(t, str):
            raise TypeError(f"{source}: template {i} is {type(t).__name__}, not str")
        n = t.count(_PLACEHOLDER)
        if n != 1:
            raise ValueError(f"{source}: template {i} {t!r} must contain exactly one '{{}}' (found {n})")
        out.append(t)
    if not out:
        raise ValueError(f"{source}: no templates")
    return out


def _read_lines(path: str | os.PathLike, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank, non-comment lines of a UTF-8 text file."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise ValueError(f"{p}: is a folder, not a {what} file")
    try:
        with open(p, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: {what} file not found") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: not a UTF-8 text file (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read {what} file ({e.strerror or e})") from None
    lines = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            lines.append((n, s))
    return lines


def read_classnames(path: str | os.PathLike) -> list[str]:
    """Class names from a text file: one per line, stripped; blank lines and ``#`` comment lines skipped.

    Line order is label order. Errors (one line, naming the file): FileNotFoundError for a missing
    file, ValueError for an empty file ("...: no class names") or a repeated name.
    """
    lines = _read_lines(path, "class-name")
    p = os.fspath(path)
    if not lines:
        raise ValueError(f"{p}: no class names")
    return _unique(lines, p, "class name")


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a text file: one per line, each with exactly one ``{}``.

    Blank lines and ``#`` comment lines are skipped; surrounding whitespace is stripped.
    Errors (one line, naming the file and line): FileNotFoundError, ValueError for an empty
    file, a template without exactly one ``{}``, or a repeated template.
    """
    lines = _read_lines(path, "template")
    p = os.fspath(path)
    if not lines:
        raise ValueError(f"{p}: no templates")
    for n, t in lines:
        k = t.count(_PLACEHOLDER)
        if k != 1:
            raise ValueError(f"{p}: line {n}: template {t!r} must contain exactly one '{{}}' (found {k})")
    return _unique(lines, p, "template")


def _unique(lines: list[tuple[int, str]], p: str, what: str) -> list[str]:
    """The entries of (line number, text) pairs; ValueError naming both lines of a repeat."""
    seen: dict[str, int] = {}
    for n, text in lines:
        if text in seen:
            raise ValueError(f"{p}: line {n}: duplicate {what} {text!r} (first on line {seen[text]})")
        seen[text] = n
    return [text for _, text in lines]


def format_prompts(classnames: Sequence[str], templates: Sequence[str] | None = None) -> list[list[str]]:
    """Prompts per class: ``out[i][j] = templates[j]`` with ``{}`` replaced by ``classnames[i]``.

    Plain substitution (not ``str.format``), so braces in class names or elsewhere in a template
    are kept literally. ``templates=None`` uses DEFAULT_TEMPLATES.
    """
    names = check_classnames(classnames)
    temps = check_templates(templates)
    return [[t.replace(_PLACEHOLDER, c) for t in temps] for c in names]
