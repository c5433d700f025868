"""The CUDA backend: kernels against the float64 reference and the CPU kernels.

Two halves. The first runs everywhere: the __host__ __device__ logic the GPU shares with the
CPU (top-k insert and re-sort with int32 lists, the weight, the overflow-safe sqrt(d_i d_j),
the CG scalar rules, the tensor-core tiles' lane roles) through _core._selftest_*; the
workspace-size functions; the `precision` and `spmm` arguments' validation, and loading
cuSPARSE (or its absence from the build); CUDA input on a CPU-only build and mixed devices
(simulated through _core). The second needs a device and is skipped visibly without one:
knn_affinity over dtype x precision x shape x forced tiles x k (lists of 32 or 64 in shared
memory, and beyond) x weight, ragged shapes with k = n - 1, two host threads at once,
sym_normalize (also with sort keys past 32 bits), cg_solve (also with columns stopping far
apart; each with both SpMMs, ours and cuSPARSE's) and label_propagate against the reference
and the CPU, torch streams, cupy inputs, device errors. Some device
cases have a CPU twin (the same body on CPU tensors), so that their data and comparisons run
everywhere; the cases marked `sanitize` also run under compute-sanitizer in
benchmarks/device_check.sh. A last part runs everywhere again: CPU torch tensors through the
public calls, which take the one array path of ops.py that CUDA arrays take.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import reclip_ext
import reference
from conftest import (NEEDS_CUDA, assert_knn_close, clip_like, random_points,
                      requires_torch)
from reclip_ext import _core

try:
    import torch
except ImportError:  # pragma: no cover - the CUDA cases are skipped without torch
    torch = None


# --------------------------------------------------------------------------------------------
# Shared __host__ __device__ logic, on the CPU


def _python_topk(vals, idx, k):
    order = sorted(range(len(vals)), key=lambda e: (-vals[e], idx[e]))[:k]
    out_v = [vals[e] for e in order] + [-math.inf] * (k - len(order))
    out_i = [idx[e] for e in order] + [-1] * (k - len(order))
    return out_v, out_i


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("k", [1, 3, 32, 65])
def test_selftest_topk_matches_sort(seed, k):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(0, 150))
    # few distinct values: many ties, which the smaller index must win
    vals = rng.integers(-4, 5, size=count).astype(np.float32).tolist()
    idx = rng.permutation(count).tolist()
    got_v, got_i = _core._selftest_topk(vals, idx, k)
    want_v, want_i = _python_topk(vals, idx, k)
    assert got_i == want_i
    assert got_v == want_v


@pytest.mark.parametrize("seed", range(10))
def test_selftest_topk_resort_after_rescore(seed):
    """The exact re-score perturbs the values of an ordered list; topk_sort restores the order
    under the same tie rule."""
    rng = np.random.default_rng(seed)
    k = 40
    vals = rng.standard_normal(200).astype(np.float32).tolist()
    idx = list(range(200))
    perturb = (rng.standard_normal(k) * 0.05).astype(np.float32)
    perturb[::7] = 0  # and some ties after rounding
    got_v, got_i = _core._selftest_topk(vals, idx, k, perturb.tolist())
    kept_v, kept_i = _python_topk(vals, idx, k)
    new_v = (np.float32(kept_v) + perturb).tolist()
    want_v, want_i = _python_topk(new_v, kept_i, k)
    assert got_i == want_i
    np.testing.assert_array_equal(np.float32(got_v), np.float32(want_v))


@pytest.mark.parametrize("weight", ["relu", "shift"])
@pytest.mark.parametrize("gamma", [1.0, 3.0, 0.5])
def test_selftest_weight(weight, gamma):
    for s in [-2.0, -1.0, -0.3, 0.0, 0.25, 0.999, 1.0, 3.0, -math.inf]:
        want = float(reference.weight_fn(np.array([s]), weight, gamma)[0]) if math.isfinite(s) else 0.0
        assert _core._selftest_weight(s, weight, gamma) == pytest.approx(want, rel=1e-15, abs=0)


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (2.0, 8.0), (3.0, 5.0), (1e300, 1e300),
                                 (1e-300, 1e-300), (1e308, 1e-308), (5e-324, 4.0),
                                 (1.7e308, 1.7e308)])
def test_selftest_sqrt_product(a, b):
    got = _core._selftest_sqrt_product(a, b)
    want = math.exp(0.5 * (math.log(a) + math.log(b)))
    assert math.isfinite(got) and got > 0
    assert got == pytest.approx(want, rel=1e-12)
    if math.isfinite(a * b) and a * b > 1e-300:
        assert got == pytest.approx(math.sqrt(a * b), rel=1e-15)


def test_selftest_cg_rules():
    # ||b||^2 = 4: active, step = rs / pq, then residual sqrt(1)/2 = 0.5 > tol: beta = 1/4
    r = _core._selftest_cg(4.0, 1.0, 2.0, 1, 1e-6)
    assert r["start_active"] and r["bnorm"] == 2.0 and r["step"] == 2.0 and r["step_active"]
    assert r["beta"] == 0.25 and r["active"] and r["iterations"] == 1 and r["residual"] == 0.5
    assert r["rs"] == 1.0
    # converged: residual 0.5 <= tol 0.6 stops the column with beta 0
    r = _core._selftest_cg(4.0, 1.0, 2.0, 3, 0.6)
    assert not r["active"] and r["beta"] == 0.0 and r["iterations"] == 3 and r["rs"] == 4.0
    # p.Ap <= 0 (p vanished): stops before the update, step 0, iterations not advanced
    r = _core._selftest_cg(4.0, 1.0, 0.0, 1, 1e-6)
    assert not r["step_active"] and r["step"] == 0.0 and r["iterations"] == 0
    # a zero right-hand side never runs and reports residual 0
    r = _core._selftest_cg(0.0, 0.0, 1.0, 1, 1e-6)
    assert not r["start_active"] and r["residual"] == 0.0 and r["iterations"] == 0


def _ldmatrix_x4(memory, addresses, esize):
    """ldmatrix.sync.aligned.m8n8.x4.b16 as the PTX ISA defines it: lanes 8i .. 8i + 7 give the
    row addresses of matrix i (8 rows of 16 bytes); lane t receives, from each matrix, the 4
    bytes at row t // 4, byte 4 (t % 4). memory[row][e] is the element at byte e * esize;
    returns per lane its 4 registers, each the tuple of elements its 4 bytes hold."""
    regs = []
    for t in range(32):
        lane_regs = []
        for i in range(4):
            row, col_bytes = addresses[8 * i + t // 4]
            first = (col_bytes + 4 * (t % 4)) // esize
            lane_regs.append(tuple(memory[row][first + e] for e in range(4 // esize)))
        regs.append(lane_regs)
    return regs


@pytest.mark.parametrize("esize", [2, 4], ids=["bf16", "tf32"])
def test_selftest_mma_layout_matches_the_ptx_fragments(esize):
    """The tensor-core tile loop's lane roles (core/mma_layout.h) against the fragment layouts
    of mma.sync m16n8k16.bf16 (2-byte values) and m16n8k8.tf32 (4-byte values): what each
    lane's ldmatrix.x4 receives must be the A fragment, and the B fragments of two n8 blocks,
    of one 32-byte K chunk; its accumulator entries must be where the D fragment puts them."""
    lanes = _core._selftest_mma_layout()
    assert len(lanes) == 32
    kc = 32 // esize  # values per 32-byte K chunk: 16 bf16 or 8 tf32
    # operands as 16 rows of one K chunk, K contiguous; each element names its (row, k)
    memory = [[(r, k) for k in range(kc)] for r in range(16)]
    for operand in (0, 1):
        addresses = [lane[operand] for lane in lanes]
        for i in range(4):  # ldmatrix: 8 distinct rows per matrix, 16-byte aligned pieces
            rows = [addresses[8 * i + j][0] for j in range(8)]
            assert len(set(rows)) == 8 and all(0 <= r < 16 for r in rows)
            assert all(addresses[8 * i + j][1] in (0, 16) for j in range(8))
        regs = _ldmatrix_x4(memory, addresses, esize)
        for t in range(32):
            g, tig = t // 4, t % 4
            per_reg = 4 // esize  # values per 32-bit register
            for j in range(4):
                if operand == 0:  # A: a_j at row g + 8 (j % 2), k from the chunk's half j // 2
                    want = [(g + 8 * (j % 2), per_reg * tig + (kc // 2) * (j // 2) + e)
                            for e in range(per_reg)]
                else:  # B: registers (0, 1) are b0, b1 of rows 0-7, (2, 3) those of rows 8-15
                    want = [(g + 8 * (j // 2), per_reg * tig + (kc // 2) * (j % 2) + e)
                            for e in range(per_reg)]
                assert list(regs[t][j]) == want, (operand, t, j)
    for t, lane in enumerate(lanes):  # D: c0, c1 at row g, c2, c3 at row g + 8; columns 2 tig + 0/1
        g, tig = t // 4, t % 4
        assert [tuple(rc) for rc in lane[2]] == [(g, 2 * tig), (g, 2 * tig + 1),
                                                 (g + 8, 2 * tig), (g + 8, 2 * tig + 1)]


# --------------------------------------------------------------------------------------------
# Workspace sizes


def test_knn_workspace_bytes():
    f = _core.knn_affinity_workspace_bytes
    base = f(1000, 64, 10, "float32", "exact")
    assert base >= (1000 + 128) * 64 * 4 + 1000 * 10 * 8
    assert f(2000, 64, 10, "float32", "exact") > base
    assert f(1000, 128, 10, "float32", "exact") > base
    assert f(1000, 64, 20, "float32", "exact") > base
    assert f(1000, 64, 10, "float32", "bf16") < base  # bf16 operand copy
    assert f(1000, 64, 10, "float32", "tf32") == base
    assert f(1000, 64, 10, "float64", "exact") > base
    # ImageNet scale fits in 64-bit arithmetic
    assert f(1_281_167, 768, 20, "float32", "bf16") > 1_281_167 * 768 * 2
    with pytest.raises(ValueError, match="precision"):
        f(10, 2, 1, "float32", "fp8")
    with pytest.raises(TypeError, match="dtype"):
        f(10, 2, 1, "int8", "exact")


def test_cg_workspace_bytes():
    f = _core.cg_solve_workspace_bytes
    assert f(100, 7, "float32") >= 3 * 100 * 7 * 4 + 6 * 7 * 8
    assert f(100, 7, "float64") > f(100, 7, "float32")
    with pytest.raises(ValueError):
        f(0, 7, "float32")


def test_normalize_workspace_bytes_needs_a_device():
    if not reclip_ext.built_with_cuda():
        with pytest.raises(RuntimeError, match="built without CUDA"):
            _core.sym_normalize_workspace_bytes(10, 3, "float32", 0)
    elif reclip_ext.cuda_device_count() == 0:
        with pytest.raises(RuntimeError, match="CUDA"):
            _core.sym_normalize_workspace_bytes(10, 3, "float32", 0)
    else:
        assert _core.sym_normalize_workspace_bytes(10, 3, "float32", 0) >= 2 * 10 * 3 * 24


# --------------------------------------------------------------------------------------------
# Argument validation that needs no device


X = random_points(12, 5, seed=1, dtype=np.float32)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_non_exact_precision_on_cpu_is_value_error(precision):
    with pytest.raises(ValueError, match=r"^precision"):
        reclip_ext.knn_affinity(X, 3, precision=precision)
    with pytest.raises(ValueError, match=r"^precision"):
        reclip_ext.knn_affinity(X.astype(np.float64), 3, precision=precision)
    with pytest.raises(ValueError, match=r"^precision"):
        reclip_ext.label_propagate(X[:3], X[3:], k=2, precision=precision)


@pytest.mark.parametrize("precision", ["fp8", "EXACT", None, 1])
def test_unknown_precision_is_value_error(precision):
    with pytest.raises(ValueError, match=r"^precision must be one of"):
        reclip_ext.knn_affinity(X, 3, precision=precision)


def test_exact_precision_on_cpu_is_the_default():
    a = reclip_ext.knn_affinity(X, 3)
    b = reclip_ext.knn_affinity(X, 3, precision="exact")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


W2 = reclip_ext.sym_normalize(np.array([[1], [0]]), np.ones((2, 1)))


@pytest.mark.parametrize("spmm", ["KERNEL", "cuSPARSE", "", None, 1])
def test_unknown_spmm_is_value_error(spmm):
    with pytest.raises(ValueError, match=r"^spmm must be one of \('kernel', 'cusparse'\)"):
        reclip_ext.cg_solve(W2, np.eye(2), spmm=spmm)
    with pytest.raises(ValueError, match=r"^spmm must be one of"):
        reclip_ext.label_propagate(X[:3], X[3:], k=2, spmm=spmm)


def test_cusparse_spmm_on_cpu_is_value_error():
    with pytest.raises(ValueError, match=r"^spmm: 'cusparse' runs on CUDA only"):
        reclip_ext.cg_solve(W2, np.eye(2), spmm="cusparse")
    with pytest.raises(ValueError, match=r"^spmm: 'cusparse' runs on CUDA only"):
        reclip_ext.label_propagate(X[:3], X[3:], k=2, spmm="cusparse")
    # the kernels' own check, behind the Python one
    def solve(spmm):
        arrays = [*W2, np.eye(2), np.empty((2, 2)), np.empty(2, np.int64), np.empty(2)]
        _core.cg_solve(*(a.__dlpack__() for a in arrays), alpha=0.5, max_iter=5, tol=0.0,
                       threads=1, stream=0, spmm=spmm)

    with pytest.raises(ValueError, match=r"^spmm: 'cusparse' runs on CUDA only"):
        solve("cusparse")
    with pytest.raises(ValueError, match=r"^spmm must be 'kernel' or 'cusparse'"):
        solve("cublas")
    got = reclip_ext.cg_solve(W2, np.eye(2), alpha=0.5, spmm="kernel")
    np.testing.assert_allclose(got.x, np.linalg.inv(np.eye(2) - 0.5 * W2.to_scipy().toarray()),
                               rtol=1e-6)


def test_cusparse_loading(tmp_path):
    """Without the path compiled in, asking for it is a RuntimeError that says so; with it, a
    library that cannot be opened is a RuntimeError naming what was tried (in a fresh process:
    the library, once opened, stays for the process)."""
    assert isinstance(reclip_ext.built_with_cusparse(), bool)
    if not reclip_ext.built_with_cusparse():
        with pytest.raises(RuntimeError, match=r"^spmm: 'cusparse' is not in this build"):
            _core.load_cusparse([])
        return
    code = ("import reclip_ext._core as c\n"
            "try:\n    c.load_cusparse(['/nonexistent/b/libcusparse.so.12'])\n"
            "except RuntimeError as e:\n    print('RuntimeError:', e)\n")
    for env, named in ((dict(REXT_CUSPARSE_LIBRARY="/nonexistent/a/libcusparse.so.12"),
                        ["/nonexistent/a/"]),
                       (dict(REXT_CUSPARSE_LIBRARY=""), ["libcusparse.so.12", "/nonexistent/b/"])):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **env}, cwd=tmp_path, check=True).stdout
        if not out.startswith("RuntimeError"):
            assert env["REXT_CUSPARSE_LIBRARY"] == ""  # only the soname may open (a machine
            continue                                   # with cuSPARSE on the loader's path)
        assert "could not load cuSPARSE" in out
        assert all(name in out for name in named), out


class FakeCudaArray:
    """Reports a CUDA device through __dlpack_device__; its data are never read here."""

    def __init__(self, a, device=0):
        self.a, self.device = a, device
        self.shape, self.dtype = a.shape, a.dtype

    def __dlpack__(self, **kwargs):
        return self.a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (2, self.device)


def test_cuda_input_on_cpu_only_build(monkeypatch):
    monkeypatch.setattr(_core, "built_with_cuda", lambda: False)
    with pytest.raises(RuntimeError, match=r"^reclip_ext was built without CUDA$"):
        reclip_ext.knn_affinity(FakeCudaArray(X), 3)
    with pytest.raises(RuntimeError, match=r"^reclip_ext was built without CUDA$"):
        reclip_ext.label_propagate(X[:3], FakeCudaArray(X[3:]), k=2)


def test_cuda_input_without_device(monkeypatch):
    monkeypatch.setattr(_core, "built_with_cuda", lambda: True)
    monkeypatch.setattr(_core, "cuda_device_count", lambda: 0)
    with pytest.raises(RuntimeError, match=r"no CUDA device"):
        reclip_ext.knn_affinity(FakeCudaArray(X), 3)


@pytest.mark.parametrize("case", ["cpu-cuda", "cuda0-cuda1"])
def test_mixed_devices_are_value_errors(monkeypatch, case):
    """Placement is decided before any data are touched, so a simulated device suffices."""
    monkeypatch.setattr(_core, "built_with_cuda", lambda: True)
    monkeypatch.setattr(_core, "cuda_device_count", lambda: 2)
    t = X[:3] if case == "cpu-cuda" else FakeCudaArray(X[:3], 0)
    v = FakeCudaArray(X[3:], 0 if case == "cpu-cuda" else 1)
    with pytest.raises(ValueError, match=r"^images: is on cuda:\d but text is on"):
        reclip_ext.label_propagate(t, v, k=2)
    with pytest.raises(ValueError, match=r"^x\[1\]: is on"):
        reclip_ext.knn_affinity((t, v), 2)
    idx = np.zeros((4, 2), np.int64)
    with pytest.raises(ValueError, match=r"^weights: is on"):
        reclip_ext.sym_normalize(idx if case == "cpu-cuda" else FakeCudaArray(idx, 0),
                                 FakeCudaArray(np.ones((4, 2)), 0 if case == "cpu-cuda" else 1))
    w = reclip_ext.sym_normalize(np.array([[1], [0]]), np.ones((2, 1)))
    with pytest.raises(ValueError, match=r"^W\.indptr: is on the CPU but rhs is on cuda"):
        reclip_ext.cg_solve(w, FakeCudaArray(np.eye(2)))


# --------------------------------------------------------------------------------------------
# On a device


def _cuda(a):
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


def _np(a):
    return a.detach().cpu().numpy() if torch is not None and isinstance(a, torch.Tensor) else np.asarray(a)


def _recall(idx, ref_idx):
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, ref_idx))
    return hits / ref_idx.size


#: a device case and its CPU twin: the same body through the one array path with CPU tensors,
#: so that its data, comparisons and thresholds also run (and can fail) where there is no GPU
ON_DEVICE_AND_CPU = [pytest.param("cuda", marks=NEEDS_CUDA, id="cuda"),
                     pytest.param("cpu", marks=requires_torch, id="cpu")]

NEEDS_CUSPARSE = pytest.mark.skipif(not reclip_ext.built_with_cusparse(),
                                    reason="built without cuSPARSE's header")

#: the CG cases: the CUDA CG with its own SpMM and with cuSPARSE's ("cuda-cusparse", also
#: checked against the kernel SpMM on the same device), and the CPU twin
CG_DEVICES = ON_DEVICE_AND_CPU + [
    pytest.param("cuda-cusparse", marks=[*NEEDS_CUDA, NEEDS_CUSPARSE], id="cuda-cusparse")]


def _on(dev, a):
    return _cuda(a) if dev.startswith("cuda") else torch.from_numpy(np.ascontiguousarray(a))


def _where(dev):
    """The torch device _on(dev, ...) puts arrays on."""
    if dev.startswith("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: small CUDA cases that benchmarks/device_check.sh also runs under compute-sanitizer (memcheck
#: and racecheck instrument every access: only shapes of a few tiles finish in its time cap)
SANITIZE = pytest.mark.sanitize


def _shape(n, d, k, *marks):
    return pytest.param((n, d, k), id=f"N{n}-d{d}-k{k}", marks=marks)


# k = 33 and 64: lists of 64 in shared memory (the large configuration; k <= 32 takes lists of
# 32, k > 64 global memory).
KNN_SHAPES = [_shape(2, 1, 1), _shape(7, 3, 6), _shape(130, 9, 10), _shape(300, 20, 7),
              _shape(257, 70, 65), _shape(200, 33, 100), _shape(150, 768, 5),
              _shape(40, 17, 33, SANITIZE), _shape(300, 70, 64)]


@pytest.mark.parametrize("weight", ["relu", "shift"])
@pytest.mark.parametrize("block_rows", [None, 5, 37], ids=lambda b: f"br{b}")
@pytest.mark.parametrize("shape", KNN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_knn_exact_matches_reference_and_cpu(_, dtype, shape, block_rows, weight):
    n, d, k = shape
    x = random_points(n, d, seed=n + d, dtype=dtype)
    opts = dict(weight=weight, gamma=3.0 if weight == "relu" else 1.0, normalize=True)
    idx, w = reclip_ext.knn_affinity(_cuda(x), k, block_rows=block_rows, **opts)
    assert idx.is_cuda and w.is_cuda and idx.dtype == torch.int64
    assert_knn_close(x, k, _np(idx), _np(w), **opts)
    cidx, cw = reclip_ext.knn_affinity(x, k, **opts)
    np.testing.assert_allclose(np.sort(_np(w), 1), np.sort(cw, 1),
                               rtol=1e-4 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_knn_exclude_self_and_raw_products(_, exclude_self):
    x = random_points(140, 12, seed=5, dtype=np.float32)
    idx, w = reclip_ext.knn_affinity(_cuda(x), 9, exclude_self=exclude_self, block_rows=16)
    assert_knn_close(x, 9, _np(idx), _np(w), exclude_self=exclude_self)


def _round_mantissa(x, drop: int):
    """float32 rounded to nearest-even with the low `drop` mantissa bits cleared: 13 = tf32,
    16 = bfloat16 (the operand rounding of the tensor-core modes)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + (1 << (drop - 1)) - 1 + ((u >> drop) & 1)) & (0xFFFFFFFF ^ ((1 << drop) - 1))
    return u.astype(np.uint32).view(np.float32)


def test_round_mantissa_emulation():
    x = np.float32([1.0, 1 + 2**-8, 1 + 3 * 2**-9, -2.5, 1 + 2**-11])
    np.testing.assert_array_equal(_round_mantissa(x, 16), [1.0, 1.0, 1 + 2**-7, -2.5, 1.0])
    assert _round_mantissa(x, 13)[4] == 1.0 and _round_mantissa(x, 13)[1] == x[1]


def _assert_tensor_core_knn(x, k, idx, w, precision, recall, *, exclude_self=True,
                            normalize=True):
    """A tf32 / bf16 result against the float64 reference: neighbour recall >= `recall`,
    near-complete agreement with the float64 neighbours of the rounded operands, valid distinct
    indices, and weights that are the exact similarities of the neighbours returned (the
    kernel re-scores them in float32), ranked."""
    idx, w = _np(idx), _np(w)
    n = len(x)
    ref = reference.ref_knn(x, k, exclude_self, normalize=normalize)
    assert _recall(idx, ref.indices) >= recall
    # against the float64 neighbours of the rounded operands, only the float32 accumulation
    # order differs: near-complete agreement
    scale = np.float32(1)
    if normalize:
        scale = (1 / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    rounded = _round_mantissa(x * scale, 13 if precision == "tf32" else 16)
    assert _recall(idx, reference.ref_knn(rounded, k, exclude_self).indices) >= 0.99
    assert idx.shape == (n, k) and ((idx >= 0) & (idx < n)).all()
    assert all(len(set(row.tolist())) == k for row in idx)
    if exclude_self:
        assert not (idx == np.arange(n)[:, None]).any()
    # weights are the exact (float32-rounded) similarities of the neighbours returned; a float32
    # dot product is off by a few ulps of the largest |similarity| (1 after normalising)
    exact = np.take_along_axis(ref.sim, idx, axis=1)
    atol = 2e-6 * max(1.0, float(np.abs(ref.sim).max()))
    np.testing.assert_allclose(w, np.maximum(exact, 0), atol=atol)
    assert (np.diff(w.astype(np.float64), axis=1) <= 0).all()
    assert (np.diff(exact, axis=1) <= atol).all()


#: the recall thresholds of the tensor-core precisions against float64
TENSOR_CORE_RECALL = [("tf32", 0.995), ("bf16", 0.97)]


# Recall thresholds sit below what the emulated operand rounding reaches on these data at every
# k here (tf32 >= 0.998, bf16 >= 0.985 against float64, measured on the CPU with
# _round_mantissa). k = 33 and 64 keep lists of 64 in shared memory, 70 in global memory.
@pytest.mark.parametrize("k", [5, 20, pytest.param(33, marks=SANITIZE), 64, 70])
@pytest.mark.parametrize("precision,recall", TENSOR_CORE_RECALL)
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_knn_tensor_cores_recall_and_exact_weights(_, precision, recall, k):
    text, images, _labels = clip_like(600, 10, 64, seed=3)
    x = np.concatenate([text, images]).astype(np.float32)
    idx, w = reclip_ext.knn_affinity(_cuda(x), k, normalize=True, precision=precision)
    _assert_tensor_core_knn(x, k, idx, w, precision, recall)


RAGGED = [pytest.param(n, d, id=f"N{n}-d{d}", marks=[SANITIZE] if n < 1000 else [])
          for n in (2, 129, 1000) for d in (1, 17, 70)]


@pytest.mark.parametrize("precision", ["exact", "tf32", "bf16"])
@pytest.mark.parametrize("n,d", RAGGED)
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_knn_ragged_shapes_all_but_one_neighbour(_, n, d, precision):
    """k = n - 1 with self included (raw products): every row keeps all rows but its least
    similar one. Row counts below, just above and far above a 128-row tile (one row in the last
    CTA at 129); dimensions that leave the 32-deep K step, and the tensor cores' 8- and 16-deep
    fragments, mostly padding; lists of 32 in shared memory (n = 2) or in global memory."""
    x = random_points(n, d, seed=10 * n + d, dtype=np.float32)
    k = n - 1
    xt = _cuda(x)
    idx, w = reclip_ext.knn_affinity(xt, k, exclude_self=False, precision=precision)
    assert idx.device == xt.device and w.device == xt.device
    if precision == "exact":
        assert_knn_close(x, k, _np(idx), _np(w), exclude_self=False)
    else:
        recall = dict(TENSOR_CORE_RECALL)[precision]
        _assert_tensor_core_knn(x, k, idx, w, precision, recall, exclude_self=False,
                                normalize=False)


@pytest.mark.parametrize("dev", ON_DEVICE_AND_CPU)
def test_knn_two_host_threads(dev):
    """Two host threads call knn_affinity on one device at once, k = 20 (lists of 32 in shared
    memory) and k = 40 (lists of 64, a larger dynamic shared-memory size), each on its own
    stream, many times, with a tensor-core precision in between on the GPU. The kernels'
    shared-memory limit is a per-device attribute: if one call could change it between the
    other's setting and launch, a launch would fail or read a wrong list size. Every result
    must equal the single-threaded one (the kernels are deterministic)."""
    x = random_points(600, 24, seed=12, dtype=np.float32)
    xt = _on(dev, x)
    ks = (20, 40)
    precisions = ("exact", "bf16") if dev == "cuda" else ("exact",)
    calls = 40 if dev == "cuda" else 6  # the CPU kernels take far longer per call
    start = threading.Barrier(len(ks))

    def worker(k):
        stream = torch.cuda.Stream(xt.device) if dev == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            start.wait(timeout=60)
            out = [reclip_ext.knn_affinity(xt, k, normalize=True, threads=1,
                                           precision=precisions[c % len(precisions)])
                   for c in range(calls)]
            if stream is not None:
                stream.synchronize()
            return [(_np(i), _np(w)) for i, w in out]

    with concurrent.futures.ThreadPoolExecutor(len(ks)) as pool:
        results = [f.result(timeout=300) for f in [pool.submit(worker, k) for k in ks]]
    for k, got in zip(ks, results):
        assert len(got) == calls
        want = {p: reclip_ext.knn_affinity(xt, k, normalize=True, threads=1, precision=p)
                for p in precisions}
        assert_knn_close(x, k, _np(want["exact"][0]), _np(want["exact"][1]), normalize=True)
        for c, (idx, w) in enumerate(got):
            p = precisions[c % len(precisions)]
            np.testing.assert_array_equal(idx, _np(want[p][0]), err_msg=f"k={k} call {c} ({p})")
            np.testing.assert_array_equal(w, _np(want[p][1]), err_msg=f"k={k} call {c} ({p})")


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_knn_stacked_and_strided_inputs(_):
    x = random_points(203, 40, seed=9, dtype=np.float32)
    want = reclip_ext.knn_affinity(_cuda(x), 6, normalize=True)
    t, v = _cuda(x[:13]), _cuda(x[13:])
    got = reclip_ext.knn_affinity((t, v), 6, normalize=True)
    np.testing.assert_array_equal(_np(got[0]), _np(want[0]))
    np.testing.assert_array_equal(_np(got[1]), _np(want[1]))
    wide = _cuda(np.repeat(x, 2, axis=0))[::2]  # row stride 2 d
    got = reclip_ext.knn_affinity(wide, 6, normalize=True)
    np.testing.assert_array_equal(_np(got[0]), _np(want[0]))
    cols = _cuda(x.T.copy()).T  # column-major view: copied to row-major by ops.py
    assert cols.stride() == (1, x.shape[0])
    got = reclip_ext.knn_affinity(cols, 6, normalize=True)
    np.testing.assert_array_equal(_np(got[0]), _np(want[0]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_knn_half_inputs(_, dtype):
    x = random_points(300, 20, seed=4, dtype=np.float32)
    xt = torch.from_numpy(x).to("cuda", getattr(torch, dtype))
    idx, w = reclip_ext.knn_affinity(xt, 6, normalize=True)
    assert w.dtype == xt.dtype and idx.dtype == torch.int64
    ref = reference.ref_knn(xt.float().cpu().numpy(), 6, normalize=True)
    np.testing.assert_allclose(np.sort(w.float().cpu().numpy(), 1), np.sort(ref.weights, 1),
                               atol=1e-2)


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_knn_on_a_side_stream(_):
    x = random_points(500, 48, seed=2, dtype=np.float32)
    want = reclip_ext.knn_affinity(x, 8, normalize=True)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        xt = _cuda(x)
        idx, w = reclip_ext.knn_affinity(xt, 8, normalize=True)
        # consumed on the same stream without an explicit synchronisation
        total = w.sum()
    side.synchronize()
    # neighbours up to near-ties (GPU and CPU sum the dot products in different orders)
    assert_knn_close(x, 8, _np(idx), _np(w), normalize=True)
    np.testing.assert_allclose(np.sort(_np(w), 1), np.sort(want[1], 1), rtol=1e-5, atol=1e-6)
    assert float(total) == pytest.approx(float(want[1].sum()), rel=1e-5)


#: GPU cycles of torch.cuda._sleep that keep a stream busy well past the host's next few
#: calls (about a second at H100/H200 clocks): stands for kernels still in flight
BUSY_CYCLES = 2_000_000_000


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_caller_tensor_from_another_stream_outlives_the_kernels(_):
    """A caller's tensor allocated on stream A, passed while stream B is current and freed right
    after: the caching allocator must not give its memory out again on A while B's work is
    still queued."""
    x = random_points(300, 24, seed=3, dtype=np.float32)
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(a):
        xt = _cuda(x)
    a.synchronize()
    freed = xt.data_ptr()
    with torch.cuda.stream(b):
        idx, w = reclip_ext.knn_affinity(xt, 6)
        torch.cuda._sleep(BUSY_CYCLES)  # B is still busy when the caller lets go of xt
        del xt
    with torch.cuda.stream(a):
        reuse = torch.full((300, 24), float("nan"), device="cuda")  # the same size, on A
    assert reuse.data_ptr() != freed, "xt's memory was reused on A while B could still read it"
    b.synchronize()
    assert_knn_close(x, 6, _np(idx), _np(w))


@pytest.mark.parametrize("sync", ["0", "1"])
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_rext_sync_waits_for_the_kernels(_, monkeypatch, sync):
    """REXT_SYNC=1: the op returns only when its stream's work is done (its kernels here made
    to run long by a sleep queued behind them); unset or 0 it returns at once."""
    real = _core.knn_affinity

    def slow(*args, **kwargs):
        real(*args, **kwargs)
        torch.cuda._sleep(BUSY_CYCLES)

    monkeypatch.setattr(_core, "knn_affinity", slow)
    monkeypatch.setenv("REXT_SYNC", sync)
    x = random_points(200, 16, seed=4, dtype=np.float32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        idx, w = reclip_ext.knn_affinity(_cuda(x), 5)
        done = side.query()
    assert done == (sync == "1")
    side.synchronize()
    assert_knn_close(x, 5, _np(idx), _np(w))


@SANITIZE
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", ["random", "duplicates", "zeros", "self-loops"])
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_normalize_matches_cpu(_, dtype, case):
    rng = np.random.default_rng(7)
    n, k = 97, 6
    idx = rng.integers(0, n, size=(n, k))
    w = rng.uniform(0.1, 1.0, size=(n, k)).astype(dtype)
    if case == "duplicates":
        idx[:, 1] = idx[:, 0]
    elif case == "zeros":
        w[::3] = 0
        w[5] = 0
    elif case == "random":
        idx = np.stack([rng.permutation(np.delete(np.arange(n), i))[:k] for i in range(n)])
    want = reclip_ext.sym_normalize(idx, w)
    got = reclip_ext.sym_normalize(_cuda(idx), _cuda(w))
    assert all(a.is_cuda for a in got)
    np.testing.assert_array_equal(_np(got.indptr), want.indptr)
    np.testing.assert_array_equal(_np(got.indices), want.indices)
    np.testing.assert_allclose(_np(got.data), want.data,
                               rtol=1e-6 if dtype == np.float32 else 1e-14)
    dense = reference.ref_sym_normalize(idx, w)
    got_dense = np.zeros((n, n))
    ptr, cols, data = _np(got.indptr), _np(got.indices), _np(got.data)
    for i in range(n):
        got_dense[i, cols[ptr[i]:ptr[i + 1]]] = data[ptr[i]:ptr[i + 1]]
    np.testing.assert_allclose(got_dense, dense, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dev", ON_DEVICE_AND_CPU)
def test_normalize_64_bit_sort_keys(dev):
    """The CUDA sort keys are i N + j with the sentinel N^2 for zero weights, sorted on the
    bits N^2 needs: past 65,536 nodes that is more than 32, and the rows above ~61,000 differ
    from the first ones only in bit 32 (a 32-bit sort would interleave them). Checked as a CSR
    (row-major strictly increasing keys, symmetric) and against the CPU and scipy."""
    n, k = 70_000, 3
    assert n * n > 2**32
    rng = np.random.default_rng(70)
    idx = rng.integers(0, n, size=(n, k))  # repeated pairs and self-loops included
    w = rng.uniform(0.1, 1.0, size=(n, k)).astype(np.float32)
    w[::7, 2] = 0
    want = reclip_ext.sym_normalize(idx, w)
    got = reclip_ext.sym_normalize(_on(dev, idx), _on(dev, w))
    assert all(a.device == _where(dev) for a in got)
    ptr, cols, data = (_np(a) for a in got)
    assert ptr.shape == (n + 1,) and ptr[0] == 0 and ptr[-1] == len(cols) == len(data)
    assert (np.diff(ptr) >= 0).all() and ((cols >= 0) & (cols < n)).all() and (data > 0).all()
    rows = np.repeat(np.arange(n), np.diff(ptr))
    keys = rows * n + cols
    assert (np.diff(keys) > 0).all()
    assert rows[-1] * n > 2**32  # entries whose keys need bit 32 are there
    transposed = np.argsort(cols * n + rows)
    np.testing.assert_array_equal((cols * n + rows)[transposed], keys)
    np.testing.assert_allclose(data[transposed], data, rtol=1e-6)
    np.testing.assert_array_equal(ptr, want.indptr)
    np.testing.assert_array_equal(cols, want.indices)
    np.testing.assert_allclose(data, want.data, rtol=1e-6)
    ref = reference.ref_sym_normalize_csr(idx, w)
    np.testing.assert_array_equal(ptr, ref.indptr)
    np.testing.assert_array_equal(cols, ref.indices)
    np.testing.assert_allclose(data, ref.data, rtol=1e-5)


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_normalize_device_errors(_):
    idx = _cuda(np.array([[1], [0]]))
    with pytest.raises(ValueError, match=r"^indices: entries must be in"):
        reclip_ext.sym_normalize(idx + 5, _cuda(np.ones((2, 1))))
    with pytest.raises(ValueError, match=r"^weights: entries must be >= 0"):
        reclip_ext.sym_normalize(idx, _cuda(-np.ones((2, 1))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("m", [1, 3, 33, 70])
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_cg_matches_cpu_and_reference(_, dtype, m):
    x = random_points(400, 16, seed=m, dtype=dtype)
    idx, w = reclip_ext.knn_affinity(x, 8, normalize=True)
    W = reclip_ext.sym_normalize(idx, w)
    rhs = np.random.default_rng(m).standard_normal((400, m)).astype(dtype)
    if m > 2:
        rhs[:, 1] = 0  # a zero column never runs
    tol = 1e-5 if dtype == np.float32 else 1e-10
    want = reclip_ext.cg_solve(W, rhs, alpha=0.9, max_iter=60, tol=tol)
    Wd = reclip_ext.Csr(*(_cuda(a) for a in W))
    got = reclip_ext.cg_solve(Wd, _cuda(rhs), alpha=0.9, max_iter=60, tol=tol)
    assert got.x.is_cuda and got.iterations.is_cuda and got.residuals.is_cuda
    its = _assert_cg_matches(got, want, W, rhs, 0.9, 60, tol)
    if m > 2:
        assert its[1] == 0 and _np(got.residuals)[1] == 0 and not _np(got.x)[:, 1].any()


def _assert_cg_matches(got, want, W, rhs, alpha, max_iter, tol):
    """A cg_solve result against the CPU's (`want`) and the direct float64 solve; returns the
    iteration counts."""
    assert got.iterations.dtype == torch.int64 and got.residuals.dtype == torch.float64
    its = _np(got.iterations)
    # a column's stopping iteration may move by one when its residual lands within rounding
    # of tol (the device sums in another order)
    assert np.abs(its - want.iterations).max() <= (1 if rhs.dtype == np.float64 else 2)
    ref = reference.ref_solve(W.to_scipy(), rhs.astype(np.float64), alpha)
    # (I - 0.9 W) has condition number <= 19: each column of x is within ~19 tol of its
    # solution, relative to that column's size
    atol = (1e-3 if rhs.dtype == np.float32 else 1e-8) * np.abs(ref).max(axis=0)
    x = _np(got.x).astype(np.float64)
    assert (np.abs(x - ref).max(axis=0) <= atol).all(), np.abs(x - ref).max(axis=0) / atol
    assert (np.abs(x - want.x).max(axis=0) <= atol).all(), np.abs(x - want.x).max(axis=0) / atol
    assert (_np(got.residuals)[its < max_iter] <= tol).all()
    return its


def _cg_on(dev, W, rhs, **kw):
    """cg_solve on `dev` (see CG_DEVICES); for cuSPARSE's SpMM, also checked against the
    kernel SpMM's solve on the same device."""
    Wd, b = reclip_ext.Csr(*(_on(dev, a) for a in W)), _on(dev, rhs)
    if dev != "cuda-cusparse":
        return reclip_ext.cg_solve(Wd, b, **kw)
    got = reclip_ext.cg_solve(Wd, b, spmm="cusparse", **kw)
    ours = reclip_ext.cg_solve(Wd, b, spmm="kernel", **kw)
    _assert_cg_matches(got, reclip_ext.CgResult(*(_np(a) for a in ours)), W, rhs, kw["alpha"],
                       kw["max_iter"], kw["tol"])
    return got


@SANITIZE
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("dev", CG_DEVICES)
def test_cg_columns_converging_apart(dev, dtype):
    """65 columns (two full 32-column chunks and one alone) stopping between iteration 1 and ~27:
    column j mixes c_j eigenvectors of W, and CG ends after at most c_j steps in exact
    arithmetic. The slow columns come first, so the last chunks go idle while the first runs
    on, each column with its own step, beta and stop."""
    n, m, alpha = 400, 65, 0.9
    x = random_points(n, 16, seed=m, dtype=dtype)
    idx, w = reclip_ext.knn_affinity(x, 8, normalize=True)
    W = reclip_ext.sym_normalize(idx, w)
    _vals, vecs = np.linalg.eigh(W.to_scipy().toarray().astype(np.float64))
    rng = np.random.default_rng(m)
    counts = np.maximum(np.unique(np.geomspace(1, n, m).astype(int))[::-1], 1)
    counts = np.concatenate([counts, np.ones(m - len(counts), int)])
    rhs = np.stack([vecs[:, rng.choice(n, c, replace=False)] @ rng.uniform(0.5, 1.5, c)
                    for c in counts], axis=1)
    # scales far apart: the stop rule is relative to each column's own ||b||
    rhs = (rhs * 10.0 ** rng.uniform(-2, 2, m)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    want = reclip_ext.cg_solve(W, rhs, alpha=alpha, max_iter=100, tol=tol)
    assert want.iterations[-1] == 1 and want.iterations.max() >= 12  # the spread is there
    got = _cg_on(dev, W, rhs, alpha=alpha, max_iter=100, tol=tol)
    assert got.x.device == got.iterations.device == got.residuals.device == _where(dev)
    its = _assert_cg_matches(got, want, W, rhs, alpha, 100, tol)
    if dtype == np.float64:
        # and the textbook float64 CG stops each column at the same step, up to one
        textbook = reference.ref_cg(W.to_scipy(), rhs, alpha, 100, tol)
        assert np.abs(its - textbook.iterations).max() <= 1


def _ragged_graph(n, seed):
    """A symmetric normalised graph whose rows hold from 0 to ~57 nonzeros: row i of a k = 60
    k-NN graph keeps (7 i) % 61 of its weights (sym_normalize drops the zeros), and every
    tenth node is cut out (its row and column: still symmetric, spectral radius still <= 1),
    so rows are empty, shorter than, as long as and longer than the SpMM's groups of 32."""
    import scipy.sparse

    x = random_points(n, 16, seed=seed, dtype=np.float64)
    idx, w = reclip_ext.knn_affinity(x, 60, normalize=True)
    keep = (7 * np.arange(n)) % 61
    w = np.where(np.arange(60)[None, :] < keep[:, None], w, 0.0)
    on = scipy.sparse.diags((np.arange(n) % 10 != 3).astype(np.float64))
    s = scipy.sparse.csr_array(on @ reclip_ext.sym_normalize(idx, w).to_scipy() @ on)
    s.eliminate_zeros()
    s.sort_indices()
    return reclip_ext.Csr(s.indptr.astype(np.int64), s.indices.astype(np.int64), s.data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("m", [1, 31, 32, pytest.param(33, marks=SANITIZE), 1000])
@pytest.mark.parametrize("dev", CG_DEVICES)
def test_cg_ragged_rows_and_column_counts(dev, m, dtype):
    """The SpMM's shapes: m around one 32-column piece and far past four of them (1, 2 and 4
    pieces per lane), rows of every length around its groups of 32 nonzeros, empty rows too;
    against the CPU and the float64 solve (and cuSPARSE's SpMM also against ours)."""
    n = 300
    Wd = _ragged_graph(n, seed=m)
    lengths = np.diff(Wd.indptr)
    assert lengths.min() == 0 and lengths.max() > 40 and {31, 32, 33} <= set(lengths.tolist())
    W = reclip_ext.Csr(Wd.indptr, Wd.indices, Wd.data.astype(dtype))
    rhs = np.random.default_rng(m).standard_normal((n, m)).astype(dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    want = reclip_ext.cg_solve(W, rhs, alpha=0.9, max_iter=80, tol=tol)
    got = _cg_on(dev, W, rhs, alpha=0.9, max_iter=80, tol=tol)
    assert got.x.device == _where(dev)
    _assert_cg_matches(got, want, W, rhs, 0.9, 80, tol)


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_cg_max_iter_zero(_):
    W = reclip_ext.sym_normalize(np.array([[1], [0]]), np.ones((2, 1)))
    got = reclip_ext.cg_solve(tuple(_cuda(a) for a in W), _cuda(np.eye(2)), max_iter=0)
    assert not _np(got.x).any() and (_np(got.iterations) == 0).all()
    np.testing.assert_array_equal(_np(got.residuals), [1.0, 1.0])


@pytest.mark.parametrize("spmm", ["kernel", pytest.param("cusparse", marks=NEEDS_CUSPARSE)])
@pytest.mark.parametrize("precision", ["exact", "tf32", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_label_propagate_matches_cpu(_, dtype, precision, spmm):
    if dtype == np.float64 and precision != "exact":
        pytest.skip("tensor-core precisions take float32")
    if spmm == "cusparse" and precision != "exact":
        pytest.skip("the SpMM is independent of the k-NN precision: exact suffices")
    text, images, labels = clip_like(800, 8, 32, seed=11, dtype=dtype)
    want = reclip_ext.label_propagate(text, images, k=10)
    got = reclip_ext.label_propagate(_cuda(text), _cuda(images), k=10, precision=precision,
                                     spmm=spmm)
    assert got.labels.is_cuda and got.scores.is_cuda and got.confidence.is_cuda
    agree = (_np(got.labels) == want.labels).mean()
    assert agree >= (1.0 if precision == "exact" else 0.98)
    if precision == "exact":
        np.testing.assert_allclose(_np(got.scores), want.scores,
                                   atol=1e-4 if dtype == np.float32 else 1e-9)
        np.testing.assert_allclose(_np(got.confidence), want.confidence, atol=1e-3)
    assert (_np(got.labels) == labels).mean() > 0.9


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_cupy_inputs(_):
    cupy = pytest.importorskip("cupy")
    text, images, _labels = clip_like(300, 5, 16, seed=1)
    got = reclip_ext.label_propagate(cupy.asarray(text), cupy.asarray(images), k=8)
    assert isinstance(got.labels, cupy.ndarray) and isinstance(got.scores, cupy.ndarray)
    want = reclip_ext.label_propagate(text, images, k=8)
    np.testing.assert_array_equal(cupy.asnumpy(got.labels), want.labels)
    idx, w = reclip_ext.knn_affinity(cupy.asarray(text), 2)
    assert isinstance(idx, cupy.ndarray) and idx.dtype == np.int64


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
def test_device_errors(_):
    x = _cuda(X)
    with pytest.raises(ValueError, match=r"^precision"):
        reclip_ext.knn_affinity(x.double(), 3, precision="bf16")
    with pytest.raises(ValueError, match=r"^images: is on the CPU"):
        reclip_ext.label_propagate(x[:3], X[3:], k=2)
    with pytest.raises(ValueError, match=r"^text: row 1 is all zeros"):
        t = x[:3].clone()
        t[1] = 0
        reclip_ext.label_propagate(t, x[3:], k=2)
    with pytest.raises(TypeError, match=r"^x: dtype"):
        reclip_ext.knn_affinity(x.int(), 3)
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match=r"^images: is on cuda:1"):
            reclip_ext.label_propagate(x[:3], x[3:].to("cuda:1"), k=2)


# --------------------------------------------------------------------------------------------
# The one array path, driven with CPU tensors through the public calls. Validation, layout,
# output allocation, the 2 N k slice and the read-out are the same code for CPU and CUDA
# arrays (only ops.py's small array namespace differs), so CPU torch tensors exercise it here
# and the device half above adds only what needs a GPU.


@requires_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_cpu_label_propagate(dtype):
    text, images, _labels = clip_like(300, 6, 16, seed=2, dtype=dtype)
    want = reclip_ext.label_propagate(text, images, k=7)
    got = reclip_ext.label_propagate(torch.from_numpy(text), torch.from_numpy(images), k=7)
    assert isinstance(got.labels, torch.Tensor) and got.labels.dtype == torch.int64
    assert got.scores.dtype == getattr(torch, np.dtype(dtype).name)
    np.testing.assert_array_equal(got.labels.numpy(), want.labels)
    np.testing.assert_allclose(got.scores.numpy(), want.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got.confidence.numpy(), want.confidence, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got.iterations.numpy(), want.iterations)


@requires_torch
def test_torch_cpu_knn_normalize_cg():
    x = random_points(90, 7, seed=3, dtype=np.float32)
    idx, w = reclip_ext.knn_affinity(torch.from_numpy(x), 5, normalize=True)
    widx, ww = reclip_ext.knn_affinity(x, 5, normalize=True)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    np.testing.assert_array_equal(idx.numpy(), widx)
    np.testing.assert_array_equal(w.numpy(), ww)
    # strided rows and column-major views go through the same layout step as on a GPU
    strided = torch.from_numpy(np.repeat(x, 2, axis=0))[::2]
    cols = torch.from_numpy(x.T.copy()).T
    for view in (strided, cols):
        vidx, vw = reclip_ext.knn_affinity(view, 5, normalize=True)
        np.testing.assert_array_equal(vidx.numpy(), widx)
        np.testing.assert_array_equal(vw.numpy(), ww)
    # half precision is computed in float32 on CUDA only; the CPU refuses it
    with pytest.raises(TypeError, match=r"^x: dtype must be float32 or float64"):
        reclip_ext.knn_affinity(torch.from_numpy(x).to(torch.bfloat16), 5)
    W = reclip_ext.sym_normalize(idx, w)
    Wn = reclip_ext.sym_normalize(widx, ww)
    for a, b in zip(W, Wn):
        assert isinstance(a, torch.Tensor)
        np.testing.assert_array_equal(a.numpy(), b)
    assert W.indices.untyped_storage().nbytes() == W.indices.numel() * 8  # sliced and copied
    rhs = np.random.default_rng(0).standard_normal((90, 3)).astype(np.float32)
    got = reclip_ext.cg_solve(W, torch.from_numpy(rhs), alpha=0.8)
    want = reclip_ext.cg_solve(Wn, rhs, alpha=0.8)
    assert got.iterations.dtype == torch.int64 and got.residuals.dtype == torch.float64
    np.testing.assert_array_equal(got.x.numpy(), want.x)
    np.testing.assert_array_equal(got.iterations.numpy(), want.iterations)


@requires_torch
def test_torch_cpu_kernel_calls(monkeypatch):
    """CPU arrays reach _core as DLPack capsules with stream 0, no workspace (the CPU kernels
    size their own scratch) and the validated thread count."""
    calls = []

    def spy(op, real):
        def call(*args, **kwargs):
            calls.append((op, args, kwargs))
            return real(*args, **kwargs)

        return call

    for op in ("knn_affinity", "sym_normalize", "cg_solve"):
        monkeypatch.setattr(_core, op, spy(op, getattr(_core, op)))
    text, images, _labels = clip_like(120, 4, 8, seed=5)
    got = reclip_ext.label_propagate(torch.from_numpy(text), torch.from_numpy(images), k=5,
                                     threads=2)
    assert isinstance(got.labels, torch.Tensor)
    assert [op for op, _, _ in calls] == ["knn_affinity", "sym_normalize", "cg_solve"]
    for op, args, kwargs in calls:
        assert kwargs["stream"] == 0 and kwargs["workspace"] is None and kwargs["threads"] == 2
        capsules = [*args[0], *args[1:]] if op == "knn_affinity" else list(args)
        assert capsules and all(type(c).__name__ == "PyCapsule" for c in capsules)


@requires_torch
def test_torch_cpu_errors():
    x = torch.from_numpy(X)
    with pytest.raises(TypeError, match=r"^x: dtype"):
        reclip_ext.knn_affinity(x.int(), 3)
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^x: contains NaN"):
        reclip_ext.knn_affinity(bad, 3)
    with pytest.raises(ValueError, match=r"^k must be"):
        reclip_ext.knn_affinity(x, 12)
    zero = x.clone()
    zero[4] = 0
    with pytest.raises(ValueError, match=r"^x: row 4 is all zeros"):
        reclip_ext.knn_affinity(zero, 3, normalize=True)
    with pytest.raises(ValueError, match=r"^precision"):
        reclip_ext.knn_affinity(x.double(), 3, precision="tf32")
    idx = torch.tensor([[1], [0]])
    with pytest.raises(ValueError, match=r"^indices: entries must be in"):
        reclip_ext.sym_normalize(idx + 3, torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"^weights: entries must be >= 0"):
        reclip_ext.sym_normalize(idx, -torch.ones(2, 1))
    with pytest.raises(TypeError, match=r"^indices: dtype"):
        reclip_ext.sym_normalize(idx.float(), torch.ones(2, 1))
    W = reclip_ext.sym_normalize(idx, torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"^W\.indptr"):
        reclip_ext.cg_solve((torch.tensor([0, 2, 1]), W.indices, W.data), torch.eye(2))
    with pytest.raises(TypeError, match=r"^W\.data: dtype"):
        reclip_ext.cg_solve(W, torch.eye(2, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^W: expected"):
        reclip_ext.cg_solve("W", torch.eye(2))
    with pytest.raises(ValueError, match=r"^text: needs at least 2 rows"):
        reclip_ext.label_propagate(x[:1], x[1:], k=2)


def test_selftest_cg_breakdown_and_floor():
    # p.Ap clearly negative for p != 0: not positive definite -> stops as broken
    r = _core._selftest_cg(4.0, 1.0, -0.5, 1, 1e-6, pp=1.0)
    assert not r["step_active"] and r["step_broken"] and r["step"] == 0.0
    # p.Ap at rounding level (|pq| << pp): the direction vanished -> stops, not broken
    r = _core._selftest_cg(4.0, 1.0, -1e-9, 1, 1e-6, pp=1.0)
    assert not r["step_active"] and not r["step_broken"]
    # overflowed p.Ap or ||r||^2: broken
    assert _core._selftest_cg(4.0, 1.0, math.inf, 1, 1e-6)["step_broken"]
    assert _core._selftest_cg(4.0, 1.0, math.nan, 1, 1e-6)["step_broken"]
    r = _core._selftest_cg(4.0, math.inf, 2.0, 1, 0.0)
    assert r["broken"] and not r["active"]
    # ||r||^2 below the floor: converged although tol = 0; above it: runs on
    r = _core._selftest_cg(4.0, 1e-80, 2.0, 5, 0.0, floor=1e-76)
    assert not r["active"] and not r["broken"] and r["iterations"] == 5 and r["beta"] == 0.0
    assert _core._selftest_cg(4.0, 1e-70, 2.0, 5, 0.0, floor=1e-76)["active"]
    # the floor: n tiny^2 for float32, the double floor for float64
    tiny32, tiny64 = float(np.finfo(np.float32).tiny), float(np.finfo(np.float64).tiny)
    assert _core._selftest_cg_floor(100, tiny32) == 100 * tiny32 * tiny32
    assert _core._selftest_cg_floor(100, tiny64) == tiny64 / float(np.finfo(np.float64).eps)
    # the scale puts the largest entry in [0.5, 1) by a power of two
    for bmax in (1e-300, 3e-30, 0.75, 1.0, 7.0, 1e30, 1.7e308):
        s = _core._selftest_cg_scale(bmax)
        assert 0.5 <= bmax * s < 1 and math.frexp(s)[0] == 0.5
    assert _core._selftest_cg_scale(0.0) == 1.0


@pytest.mark.parametrize("_", [pytest.param(0, marks=NEEDS_CUDA)], ids=["cuda"])
@pytest.mark.parametrize("precision", ["exact", "tf32", "bf16"])
def test_knn_overflow_is_refused_like_the_cpu(_, precision):
    """Unnormalised rows whose similarities or weights overflow float32 get the CPU's errors
    (the kernels raise guards the host reads back), and in-range data still passes."""
    rng = np.random.default_rng(7)
    big = (rng.standard_normal((300, 8)) * 1e20).astype(np.float32)
    with pytest.raises(ValueError, match=r"^x: row norms must be at most 9.22\d*e\+18"):
        reclip_ext.knn_affinity(_cuda(big), 3, precision=precision)
    cube = (rng.standard_normal((300, 8)) * 1e8).astype(np.float32)
    with pytest.raises(ValueError, match=r"^gamma: the weights .* must fit in float32"):
        reclip_ext.knn_affinity(_cuda(cube), 3, gamma=3.0, precision=precision)
    idx, w = reclip_ext.knn_affinity(_cuda(cube), 3, precision=precision)
    assert torch.isfinite(w).all()
    # Unit rows: a similarity a rounding above 1 overflows only for an enormous gamma, and
    # then it is refused as on the CPU, never returned as inf.
    unit = rng.standard_normal((50, 7)).astype(np.float32)
    try:
        w = reclip_ext.knn_affinity(_cuda(unit), 3, normalize=True, exclude_self=False,
                                    gamma=1e9, precision=precision)[1]
        assert torch.isfinite(w).all()
    except ValueError as err:
        assert str(err).startswith("gamma: the weights")
    # A call refused mid-stream leaves the device usable and the guards reset.
    ok = reclip_ext.knn_affinity(_cuda(cube * np.float32(1e-4)), 3, gamma=3.0, precision=precision)
    assert torch.isfinite(ok[1]).all()
