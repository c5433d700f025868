"""Class names and prompt templates.

Presets: the class names and prompt templates of the 22 benchmarks of the ReCLIP paper ship as
JSON data files in ``reclip/presets/`` (``{"name", "classnames", "templates"}``), read through
``importlib.resources`` so they work from an installed wheel as well as from a source tree.
Label index ``i`` of a dataset's canonical label order is ``classnames[i]``. A benchmark whose
images are stored in folders named by an id rather than by the class (ImageNet's WordNet ids,
``n01440764/``) also ships those ids as ``"folders"``: ``folders[i]`` holds class ``i``
(``preset_folders``).

Custom lists come from plain text files, one entry per line (``read_classes``,
``read_templates``). A class file may give each line as ``folder<TAB>class name`` instead.
A template holds exactly one ``{}``, replaced by the class name.

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
    key, data = _preset_data(name)
    classnames = check_classnames(data["classnames"], source=f"preset {key!r}")
    templates = check_templates(data["templates"], source=f"preset {key!r}")
    return classnames, templates


def preset_folders(name: str) -> list[str] | None:
    """The folder ids of a preset's classes in label order (ImageNet: ``n01440764``, ...), or
    None for a benchmark whose folders are not named by a canonical id."""
    key, data = _preset_data(name)
    if "folders" not in data:
        return None
    return check_folders(data["folders"], data["classnames"], source=f"preset {key!r}")


def _preset_data(name: str) -> tuple[str, dict]:
    key = _preset_key(name)
    if key is None:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    ref = resources.files(__package__).joinpath("presets").joinpath(f"{key}.json")
    try:
        return key, json.loads(ref.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"preset {key!r}: data file presets/{key}.json is missing from the installed package") from None


def check_classnames(classnames: Iterable[str], source: str = "class names", *,
                     what: str = "class name") -> list[str]:
    """Validate a class-name list (non-empty, strings, no blanks, no duplicates); returns a stripped copy.

    ``what`` names an entry in the messages (``check_folders`` checks folder names with it).
    """
    if isinstance(classnames, (str, bytes)):
        raise TypeError(f"{source}: expected a list of {what}s, got a single string")
    names = []
    seen: dict[str, int] = {}
    for i, c in enumerate(classnames):
        if not isinstance(c, str):
            raise TypeError(f"{source}: {what} {i} is {type(c).__name__}, not str")
        c = c.strip()
        if not c:
            raise ValueError(f"{source}: {what} {i} is blank")
        if c in seen:
            raise ValueError(f"{source}: duplicate {what} {c!r} (entries {seen[c]} and {i})")
        seen[c] = i
        names.append(c)
    if not names:
        raise ValueError(f"{source}: no {what}s")
    return names


def check_run_classes(classnames: Sequence[str]) -> None:
    """What a run needs of its class list: at least 2 classes, all different (ValueError naming
    classnames otherwise)."""
    if len(classnames) < 2:
        raise ValueError(f"classnames: need at least 2 classes, got {len(classnames)}")
    if len(set(classnames)) != len(classnames):
        raise ValueError("classnames: contains duplicates")


def check_folders(folders: Iterable[str], classnames: Sequence[str], source: str = "folders") -> list[str]:
    """Validate the folder names of the classes (``folders[i]`` holds ``classnames[i]``): one
    per class, strings, no blanks, no duplicates; returns a stripped copy."""
    names = check_classnames(folders, source, what="folder")
    if len(names) != len(classnames):
        raise ValueError(f"{source}: {len(names)} folders for {len(classnames)} classes")
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


def read_classes(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """(class names, their folders or None) from a class file.

    One class per line, in label order; blank lines and ``#`` comment lines skipped, entries
    stripped. A line is either the class name, or ``folder<TAB>class name`` for image folders
    named by an id rather than by the class (ImageNet's ``n01440764``): a file is one or the
    other, never a mix. Errors (one line, naming the file and line): FileNotFoundError for a
    missing file, ValueError for an empty file ("...: no class names"), a line of a tabbed file
    without exactly two non-empty fields, or a repeated name or folder.
    """
    lines = _read_lines(path, "class-name")
    p = os.fspath(path)
    if not lines:
        raise ValueError(f"{p}: no class names")
    if not any("\t" in text for _, text in lines):
        return _unique(lines, p, "class name"), None
    folders, names = [], []
    for n, text in lines:
        fields = [f.strip() for f in text.split("\t")]
        if len(fields) != 2 or not all(fields):
            raise ValueError(f"{p}: line {n}: expected 'folder<TAB>class name' (the file has tabs, "
                             f"so every line needs both fields and no other tab), got {text!r}")
        folders.append((n, fields[0]))
        names.append((n, fields[1]))
    return _unique(names, p, "class name"), _unique(folders, p, "folder")


def read_classnames(path: str | os.PathLike) -> list[str]:
    """The class names of a class file (``read_classes`` without the folders)."""
    return read_classes(path)[0]


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
