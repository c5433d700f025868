"""Progress bars on long work (tqdm), off unless asked for."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def bar(items: Iterable[T], enabled: bool, desc: str, *, leave: bool = True) -> Iterable[T]:
    """`items`, shown as a progress bar named `desc` when `enabled`."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=leave)
