"""How a caught exception reads inside one of our own one-line error messages, and how
reclip's own warnings read on the command line."""
from __future__ import annotations

import contextlib
import re
import sys
import warnings

#: longer causes (a torch unpickling failure explains itself for a screen) are cut here, so
#: that the message that quotes them stays readable on one terminal line or two
MAX_CAUSE = 300

#: terminal control sequences (colour, bold), which some libraries put in their messages
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class ReclipWarning(UserWarning):
    """A warning about what a user gave reclip (a very large image, more workers than cores),
    meant for that user: its message names the file or the setting."""


def say(line: str, file=None) -> None:
    """Writes `line` and its newline to stderr (or `file`) in one write. torchrun's ranks share
    one stderr, and with PYTHONUNBUFFERED print() writes the text and the newline separately,
    so two ranks' lines could run into each other; one short write to a pipe never does."""
    out = file or sys.stderr
    out.write(line + "\n")
    out.flush()


def one_line(exc: BaseException) -> str:
    """`exc` as ``"TypeName: message"`` on one line: without terminal control sequences, its
    whitespace (newlines included) collapsed, cut to MAX_CAUSE characters; the type name alone
    when the message is empty."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_CAUSE else text[:MAX_CAUSE - 3] + "..."


@contextlib.contextmanager
def warnings_as_lines(prefix: str):
    """Within the block, a ReclipWarning prints as the one line ``prefix + message`` on
    stderr, instead of Python's two (the warning's source file and line, then the code line
    that warned), which mean nothing to a user; other warnings print as before. Worker
    processes forked inside the block print theirs the same way."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ReclipWarning):
            say(prefix + " ".join(str(message).split()), file)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
