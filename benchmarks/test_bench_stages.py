"""reclip_ext against the scipy and torch recipes, stage by stage, on the same data.

Groups are "<case> | <stage>", so ``pytest benchmarks --benchmark-only`` prints the recipes of one
stage side by side (add ``--benchmark-group-by=group`` to keep that order with other options).
Each stage gets the previous stage's output of the same recipe, computed once per session. The
solve and total benchmarks also check the labels against reclip_ext's, so the smoke run
(``--benchmark-disable``) doubles as an agreement check.
"""
from __future__ import annotations

import numpy as np
import pytest

import recipes

# "case" is parametrised over conftest.CASES. sgemm-* are the similarity FLOPs alone (the floor).
KNN = ("reclip_ext", "scipy-ref", "torch-dense-chunked", "sgemm-numpy", "sgemm-torch")
NORMALIZE = ("reclip_ext", "scipy-ref", "torch-dense-chunked")
SOLVE = ("reclip_ext", "scipy-ref", "scipy-batched", "torch-dense-chunked")
TOTAL = SOLVE
MIN_AGREEMENT = 0.999  # float32 ties may flip a few labels


def _needs(recipe: str) -> None:
    if recipe in ("torch-dense-chunked", "sgemm-torch"):
        pytest.importorskip("torch")


def _agreement(labels, reference) -> float:
    return float(np.mean(np.asarray(labels) == reference))


@pytest.mark.parametrize("recipe", KNN)
def test_knn(benchmark, workloads, case, recipe):
    _needs(recipe)
    wl = workloads(case)
    benchmark.group = f"{case} | knn"
    if recipe.startswith("sgemm-"):  # at the dimension the baselines get
        text, images = wl.inputs("scipy-ref")
        x = recipes.stack_normalised(text, images)
        run = recipes.chunked_similarity(x, wl.params.chunk, recipe[6:], wl.params.threads)
        benchmark.extra_info["dim"] = int(x.shape[1])
        benchmark(run)
        return
    text, images = wl.inputs(recipe)
    benchmark.extra_info["dim"] = int(text.shape[1])
    r = wl.recipe(recipe)
    idx, w = benchmark(r.knn, text, images)
    assert tuple(idx.shape) == (len(text) + len(images), wl.params.k)
    assert tuple(w.shape) == tuple(idx.shape)


@pytest.mark.parametrize("recipe", NORMALIZE)
def test_normalize(benchmark, workloads, case, recipe):
    _needs(recipe)
    wl = workloads(case)
    graph = wl.graph(recipe)
    benchmark.group = f"{case} | normalize"
    w = benchmark(wl.recipe(recipe).normalize, graph)
    n_nodes = len(wl.truth) + wl.m
    assert tuple(w.shape) == (n_nodes, n_nodes)


@pytest.mark.parametrize("recipe", SOLVE)
def test_solve(benchmark, workloads, case, recipe):
    _needs(recipe)
    wl = workloads(case)
    w = wl.w(recipe)
    benchmark.group = f"{case} | solve"
    labels, info = benchmark(wl.recipe(recipe).solve, w, wl.m)
    agree = _agreement(labels, wl.reference_labels())
    benchmark.extra_info.update(agreement=agree, accuracy=_agreement(labels, wl.truth), **info)
    assert agree >= MIN_AGREEMENT


@pytest.mark.parametrize("recipe", TOTAL)
def test_total(benchmark, workloads, case, recipe):
    """End to end; for reclip_ext that is label_propagate."""
    _needs(recipe)
    wl = workloads(case)
    text, images = wl.inputs(recipe)
    r = wl.recipe(recipe)
    benchmark.group = f"{case} | total"
    if recipe == "reclip_ext":
        labels = np.asarray(benchmark(r.propagate, text, images).labels)
    else:
        labels = benchmark(recipes.Recipe.run, r, text, images).labels
    agree = _agreement(labels, wl.reference_labels())
    benchmark.extra_info.update(agreement=agree, accuracy=_agreement(labels, wl.truth))
    assert agree >= MIN_AGREEMENT
