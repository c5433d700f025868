"""pytest setup for the benchmarks: one thread count for every library, shared cached data.

    pytest benchmarks --benchmark-only        # side-by-side timings, grouped per case and stage
    pytest benchmarks --benchmark-disable     # each benchmark once: a quick smoke test

REXT_BENCH_THREADS sets the thread count (default: all usable cores). The directory is outside
the default test run (pyproject testpaths = ["tests"]).
"""
from __future__ import annotations

import functools
import os

import report

# Before numpy (and its BLAS) is imported by anything below.
_THREADS = int(os.environ.get("REXT_BENCH_THREADS", "0")) or report.usable_cores()
report.set_thread_env(_THREADS)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import recipes  # noqa: E402
import synthetic  # noqa: E402

# Modest sizes: every case runs once in a few seconds with --benchmark-disable.
CASES = {
    # name: (n images, m classes, d dims, P2 projection?)
    "n5000-m10-d64": (5000, 10, 64, False),
    "n5000-m100-d768": (5000, 100, 768, False),
    "n5000-m10-d768-P2": (5000, 10, 768, True),  # CIFAR-10-like: reclip_ext gets r = 9
}


class Workload:
    """Data of one case and the intermediate results of each recipe, computed once."""

    def __init__(self, name: str, threads: int) -> None:
        n, m, d, project = CASES[name]
        self.name, self.m = name, m
        self.params = recipes.Params(threads=threads)
        data = synthetic.clip_like(n, m, d, seed=0)
        self.truth = data.labels
        self.base = (data.text, data.images)
        self.reduced = self.base
        if project:
            proj = synthetic.p2_projection(data.text, data.images)
            self.base = (proj.text, proj.images)
            self.reduced = (proj.text_r, proj.images_r)

    @functools.cache
    def recipe(self, name: str) -> recipes.Recipe:
        return recipes.make(name, self.params)

    def inputs(self, name: str):
        """reclip_ext gets the r-dim coordinates under P2, everything else the d-dim rows."""
        return self.reduced if recipes.RECIPE_CLASSES[name].reduced_input else self.base

    @functools.cache
    def graph(self, name: str):
        if name == "scipy-batched":  # the same graph and W as scipy-ref
            return self.graph("scipy-ref")
        return self.recipe(name).knn(*self.inputs(name))

    @functools.cache
    def w(self, name: str):
        if name == "scipy-batched":
            return self.w("scipy-ref")
        return self.recipe(name).normalize(self.graph(name))

    @functools.cache
    def reference_labels(self) -> np.ndarray:
        """reclip_ext's labels (label_propagate), the yardstick for agreement."""
        return np.asarray(self.recipe("reclip_ext").propagate(*self.inputs("reclip_ext")).labels)


@pytest.fixture(scope="session")
def threads() -> int:
    recipes.configure_threads(_THREADS)
    return _THREADS


@pytest.fixture(scope="session")
def workloads(threads):
    return functools.cache(lambda name: Workload(name, threads))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", list(CASES))


def pytest_report_header(config):
    return f"reclip benchmarks: {_THREADS} threads for every recipe (REXT_BENCH_THREADS)"
