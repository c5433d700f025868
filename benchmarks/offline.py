"""Set-up shared by the scripts that run the reclip pipeline (the benchmarks here and the
source-model trainers in training/); imported before reclip.

- No network: the model's text tower is a local package, and nothing may reach a model hub.
- Passive OpenMP waits: torch's and reclip_ext's thread pools share the cores, and a pool that
  spins while waiting starves the other.
- Run from a source tree without an install, the tree's ``python/`` joins the path.
"""
import importlib.util
import os
import sys
from pathlib import Path

#: the repository root
ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if importlib.util.find_spec("reclip") is None:
    sys.path.insert(0, str(ROOT / "python"))
