"""How a caught exception reads inside one of our own one-line error messages."""
from __future__ import annotations

import re

#: longer causes (a torch unpickling failure explains itself for a screen) are cut here, so
#: that the message that quotes them stays readable on one terminal line or two
MAX_CAUSE = 300


#: terminal control sequences (colour, bold), which some libraries put in their messages
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def one_line(exc: BaseException) -> str:
    """`exc` as ``"TypeName: message"`` on one line: without terminal control sequences, its
    whitespace (newlines included) collapsed, cut to MAX_CAUSE characters; the type name alone
    when the message is empty."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= MAX_CAUSE else text[:MAX_CAUSE - 3] + "..."
