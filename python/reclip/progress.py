"""Progress on long work, off unless asked for: tqdm bars on a terminal; in a file or a pipe
(a log, CI), plain lines at most every LOG_EVERY seconds instead, since a bar's carriage
returns and cursor codes would fill it."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from .errors import say

T = TypeVar("T")

#: seconds between two progress lines when stderr is not a terminal
LOG_EVERY = 30.0


def bar(items: Iterable[T], enabled: bool, desc: str, *, leave: bool = True) -> Iterable[T]:
    """`items`, shown as progress named `desc` when `enabled`: a tqdm bar on a terminal, else
    plain lines (`leave`: also one when the work is done)."""
    if not enabled:
        return items
    if not sys.stderr.isatty():
        return _lines(items, desc, leave)
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=leave)


def _lines(items: Iterable[T], desc: str, last: bool) -> Iterator[T]:
    total = len(items) if hasattr(items, "__len__") else None
    of = f"/{total}" if total is not None else ""
    start = shown = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - shown >= LOG_EVERY:
            say(f"{desc}: {done}{of} ({now - start:.0f} s)")
            shown = now
    if last:
        say(f"{desc}: {done}{of} done ({time.monotonic() - start:.0f} s)")
