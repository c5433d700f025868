"""The build tells the truth about itself, and the documented examples run."""
from __future__ import annotations

import doctest
from pathlib import Path

import pytest

import reclip_ext
import reclip_ext.ops


pytestmark = pytest.mark.subprocess


def test_built_with_cuda_is_bool():
    assert isinstance(reclip_ext.built_with_cuda(), bool)


def test_cuda_device_count():
    count = reclip_ext.cuda_device_count()
    assert isinstance(count, int) and count >= 0


def test_no_cuda_device_on_this_machine():
    """This CPU-only test machine has no GPU (nor driver): the count must be 0, not an
    exception, even when the build contains the CUDA kernels."""
    import shutil

    import pytest

    if shutil.which("nvidia-smi") is not None:
        pytest.skip("this machine may have a GPU")
    assert reclip_ext.cuda_device_count() == 0


def test_simd_level():
    assert reclip_ext.simd_level() in {"avx2", "generic"}


def test_simd_level_follows_env(monkeypatch):
    monkeypatch.setenv("REXT_SIMD", "generic")
    assert reclip_ext.simd_level() == "generic"


def test_version():
    assert isinstance(reclip_ext.__version__, str) and reclip_ext.__version__
    parts = reclip_ext.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])


def test_one_version_everywhere():
    """The compiled module, both packages and (when installed) the distribution metadata carry
    the number from reclip_ext/_version.py: a mismatch means a stale build."""
    import importlib.metadata

    import reclip

    assert reclip_ext._core.__version__ == reclip_ext.__version__ == reclip.__version__
    try:
        installed = importlib.metadata.version("reclip")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("reclip is not installed (the source tree is on the path)")
    assert installed == reclip_ext.__version__


def test_typed_packages_ship_py_typed():
    import reclip

    for package in (reclip_ext, reclip):
        assert (Path(package.__file__).parent / "py.typed").is_file(), package.__name__


def test_public_api():
    for name in reclip_ext.__all__:
        assert hasattr(reclip_ext, name), name
    for name in ("knn_affinity", "sym_normalize", "cg_solve", "label_propagate"):
        fn = getattr(reclip_ext, name)
        assert fn.__doc__ and "Args:" in fn.__doc__ and "Example" in fn.__doc__, name


def test_doctests_ops():
    result = doctest.testmod(reclip_ext.ops, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_doctests_package():
    result = doctest.testmod(reclip_ext, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_import_needs_only_numpy():
    """reclip_ext (distributed included) imports with torch unavailable, and the distributed
    function says what it needs when called."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, reclip_ext, reclip_ext.distributed\n"
        "assert 'torch' not in sys.modules\n"
        "x = np.eye(3, dtype=np.float32)\n"
        "assert reclip_ext.knn_affinity(x, 1, rows=(1, 3))[0].shape == (2, 1)\n"
        "try:\n"
        "    reclip_ext.distributed.label_propagate(x, x)\n"
        "except ImportError as err:\n"
        "    assert 'needs torch' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
