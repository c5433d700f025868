"""Which class each image of a folder set is: its folder, mapped onto a class list by name (the
class name, or an id such as ImageNet's ``n01440764``), and, where folders match no class, which
ones and what they probably meant.
"""
from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np

from .data import ImageSet


def class_labels(data: ImageSet, classnames: Sequence[str],
                 folders: Sequence[str] | None = None) -> np.ndarray:
    """The labels of ``data`` as indices into ``classnames``; -1 for every item when unknown.

    An ImageFolder set is mapped by folder name: the folder ``folders[i]`` (an id such as
    ImageNet's ``n01440764``) or, when those ids do not name every folder, the folder named
    ``classnames[i]`` holds class ``i``. Only folders holding images count. When neither names
    every one of them, no label is known: the set's own labels number its sorted folders, not
    the classes, so any accuracy computed from them would be wrong. Other sets keep their
    labels (class indices already, or -1).
    """
    labels = data.labels
    if data.root is None or data.classes is None:
        return labels.copy()
    used = np.unique(labels[labels >= 0])
    for names in (folders, classnames):
        if names is None:
            continue
        position = {name: i for i, name in enumerate(names)}
        if all(data.classes[k] in position for k in used):
            remap = np.full(len(data.classes), -1, np.int64)
            remap[used] = [position[data.classes[k]] for k in used]
            return np.where(labels >= 0, remap[np.clip(labels, 0, None)], -1)
    return np.full(len(data), -1, np.int64)


def unmatched_folders(data: ImageSet, classnames: Sequence[str],
                      folders: Sequence[str] | None = None) -> list[tuple[str, str | None]]:
    """Why ``class_labels`` knows no label: the folders (holding images) of an ImageFolder set
    that are not among the names it maps by, each with the name it probably meant (see
    ``closest_name``) or None. The names are the folder ids when more folders are named by an
    id than by a class, else the class names. Empty when every folder maps, or when the set
    has no class folders."""
    if data.root is None or data.classes is None:
        return []
    labels = data.labels
    used = [data.classes[k] for k in np.unique(labels[labels >= 0])]
    names = list(classnames)
    if folders is not None and (sum(u in set(folders) for u in used)
                                > sum(u in set(names) for u in used)):
        names = list(folders)
    known = set(names)
    return [(u, closest_name(u, names)) for u in used if u not in known]


def _words(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def closest_name(name: str, names: Sequence[str]) -> str | None:
    """The entry of `names` that `name` probably meant: the same words up to case, underscores,
    hyphens and spacing (great_white_shark for "great white shark"), else the closest spelling
    (difflib's, a similarity of at least 0.6: sevn for seven, cta for cat); None when
    nothing is close."""
    by_words: dict[str, str] = {}
    for n in names:
        by_words.setdefault(_words(n), n)
    if _words(name) in by_words:
        return by_words[_words(name)]
    close = difflib.get_close_matches(_words(name), list(by_words), n=1, cutoff=0.6)
    return by_words[close[0]] if close else None


def describe_unmatched(data: ImageSet, classnames: Sequence[str],
                       folders: Sequence[str] | None = None, shown: int = 5) -> str | None:
    """One line naming the folders of ``unmatched_folders`` (the first `shown`, with their
    likely names), or None when there are none."""
    unmatched = unmatched_folders(data, classnames, folders)
    if not unmatched:
        return None
    total = len(np.unique(data.labels[data.labels >= 0]))
    parts = [f"{name!r}" + (f" (did you mean {guess!r}?)" if guess else "")
             for name, guess in unmatched[:shown]]
    more = f" and {len(unmatched) - shown} more" if len(unmatched) > shown else ""
    n = len(unmatched)
    return (f"{n} of its {total} folders match{'es' if n == 1 else ''} no class: "
            f"{', '.join(parts)}{more}")
