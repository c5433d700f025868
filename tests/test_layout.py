"""The Python layer's shape (docs/design.md, "The Python layer"): every module of python/reclip
imports only modules below it in one order, so there are no import cycles and no upward
imports, and no module outgrows one job."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "python" / "reclip"

#: every module, each after all the modules it imports (imports inside functions count too)
ORDER = [
    "errors", "optional", "device", "distributed", "progress", "checkpoint", "projection",
    "prompts", "metrics", "trainable",
    "data", "labels", "folders", "emoji", "pseudo_labels", "resolve", "sources", "cut_text", "build", "config",
    "models", "features", "runner",
    "methods.base", "methods.reclip", "methods.shot", "methods", "runs", "adapt",
    "demo", "arguments", "cli", "__main__", "__init__",
]
MAX_LINES = 600
MAX_CLASS_LINES = 300


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The package modules that module `name` imports with relative imports."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                found.add(".".join([*base, node.module.split(".")[0]]))
            else:
                found.update(".".join([*base, alias.name]) for alias in node.names)
    return found - {name}


def test_every_module_is_placed():
    assert sorted(_modules()) == sorted(ORDER), "add the new module to ORDER (and design.md)"


@pytest.mark.parametrize("name", ORDER)
def test_imports_point_down(name):
    path = _modules()[name]
    upward = {m for m in _imports(name, path) if m in ORDER
              and ORDER.index(m) >= ORDER.index(name)}
    assert not upward, f"{name} imports {sorted(upward)}, which come after it"


@pytest.mark.parametrize("name", ORDER)
def test_modules_and_classes_stay_small(name):
    path = _modules()[name]
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES, f"{name}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{name}.{node.name}: {size} lines"


@pytest.mark.parametrize("path", sorted((ROOT.parents[1] / "reclip_ext").glob("*.py")),
                         ids=lambda p: p.name)
def test_engine_modules_stay_small(path):
    """The engine's Python face too: where arrays live, argument checks, the ops, the
    distributed op, each under the same limit."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"reclip_ext/{path.name}: {lines} lines"
