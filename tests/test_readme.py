"""README.md as a user reads it: its command-line reference matches the ``reclip`` parser.

- The reference section (between the cli-reference markers) is what tools/cli_reference.py
  renders from ``reclip.cli._parser()``; a second check reads its tables back and compares
  each command's flags, defaults and required flags with the parser's actions directly, and
  ``--help`` is checked to print every default.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
cli_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_reference)

# ----------------------------------------------------------------- the command-line reference


def _parser() -> argparse.ArgumentParser:
    pytest.importorskip("torch")  # reclip.cli's parser imports the pipeline's modules
    from reclip.cli import _parser

    return _parser()


def _commands(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _visible_flags(parser):
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def _default(action) -> str | None:
    """What the reference and --help must show as the flag's default (None: nothing)."""
    if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
        return None
    return str(action.default)


def test_cli_reference_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert cli_reference.section(readme) == cli_reference.render(_parser()), (
        f"README.md's command-line reference does not match reclip/cli.py: run "
        f"`{cli_reference.COMMAND}` and commit README.md")


def test_cli_reference_lists_every_flag_with_its_default():
    """Read the tables back, independently of the renderer: per command (and for reclip's own
    flags, before the first command), the flags listed are exactly the parser's visible ones,
    in order, each with its default or "required"."""
    section = cli_reference.section((ROOT / "README.md").read_text(encoding="utf-8"))
    parts = re.split(r"^### `reclip (\w+)`$", section, flags=re.M)
    tables = {"": parts[0], **dict(zip(parts[1::2], parts[2::2]))}
    parser = _parser()
    parsers = {"": parser, **_commands(parser)}
    assert list(tables) == list(parsers)
    for name, sub in parsers.items():
        listed = []
        for line in tables[name].splitlines():
            if line.startswith("| `"):
                flag, default = line.split(" | ")[:2]
                names = re.match(r"\| `((?:-[\w-]+(?:, )?)+)", flag).group(1)
                listed.append((names, default.strip()))
        expected = []
        for action in _visible_flags(sub):
            shown = _default(action)
            expected.append((", ".join(action.option_strings), "required" if action.required
                             else "" if shown is None else f"`{shown}`"))
        assert listed == expected, f"reclip {name}".strip()


def test_help_describes_every_flag_and_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no line wrapping inside a default
    parser = _parser()
    for name, sub in {"": parser, **_commands(parser)}.items():
        for action in _visible_flags(sub):
            flag = f"reclip {name} {action.option_strings[-1]}"
            assert action.help, f"{flag}: no help text"
            text = " ".join(sub._get_formatter()._format_action(action).split())
            default = _default(action)
            # a flag without one (None) says in words what leaving it out does
            assert default is None or f"(default: {default})" in text, f"{flag}: {text}"
