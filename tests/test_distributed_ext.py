"""reclip_ext.distributed.label_propagate over two gloo ranks on the CPU.

One pool of two spawned worker processes (one process group, started once for the module)
runs every check; each check is a module-level function ``check_*(rank, world, ...)`` run on
both ranks at once, whose return values (or raised errors) come back to the test. The data
are tie-free Gaussian clusters with an odd number of images, so the graph, and with one CPU
thread the whole solve, must equal the single-process results exactly.
"""
from __future__ import annotations

import multiprocessing
import queue

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch builds without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import reclip_ext  # noqa: E402
import reclip_ext.distributed  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]

WORLD = 2
TIMEOUT_S = 120  # per check, for both ranks: a hang fails the test instead of blocking it
M, D, N_IMAGES = 4, 16, 31


def make_data(dtype=np.float32, seed=0):
    """(text (M, D), images (N_IMAGES, D)): images scattered around the classes."""
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((M, D))
    labels = rng.integers(0, M, N_IMAGES)
    images = text[labels] + 0.8 * rng.standard_normal((N_IMAGES, D))
    return text.astype(dtype), images.astype(dtype)


def shard(images, sizes, rank):
    start = sum(sizes[:rank])
    return images[start : start + sizes[rank]]


# --------------------------------------------------------------------------------------------
# what each rank runs


def check_label_propagate(rank, world, sizes, kind, dtype, kwargs):
    text, images = make_data(dtype)
    mine = shard(images, sizes, rank)
    if kind == "torch":
        text, mine = torch.from_numpy(text), torch.from_numpy(mine.copy())
    res = reclip_ext.distributed.label_propagate(text, mine, threads=1, **kwargs)
    assert type(res) is reclip_ext.LabelPropagation
    kinds = {type(a).__module__.split(".")[0] for a in res}
    return kinds, tuple(np.asarray(a) for a in res)


def check_knn_blocks(rank, world, sizes, k):
    text, images = make_data(np.float64, seed=1)
    x = np.concatenate([text, images])
    start = 0 if rank == 0 else M + sum(sizes[:rank])
    stop = M + sum(sizes[: rank + 1])
    return reclip_ext.knn_affinity(x, k, rows=(start, stop), normalize=True, threads=1)


def check_refused(rank, world, case):
    text, images = make_data(np.float32)
    mine = shard(images, [15, 16], rank)
    kwargs = dict(k=5)
    if case == "columns" and rank == 1:  # consistent on rank 1, not with rank 0
        text = np.concatenate([text, text[:, :1]], axis=1)
        mine = np.concatenate([mine, mine[:, :1]], axis=1)
    elif case == "dtype" and rank == 1:
        text, mine = text.astype(np.float64), mine.astype(np.float64)
    elif case == "text" and rank == 1:
        text = text[:3]
    elif case == "alpha" and rank == 1:
        kwargs["alpha"] = 1.5
    elif case == "k":
        kwargs["k"] = M + N_IMAGES
    elif case == "empty":
        mine = mine[:0]
    elif case == "not a matrix" and rank == 0:
        mine = mine[0]
    elif case == "zero row" and rank == 1:
        mine = mine.copy()
        mine[4] = 0
    elif case == "nan" and rank == 1:
        mine = mine.copy()
        mine[7, 2] = np.nan
    elif case == "spmm" and rank == 1:
        kwargs["spmm"] = "cuSPARSE"
    elif case == "cusparse on cpu" and rank == 0:
        kwargs["spmm"] = "cusparse"
    try:
        reclip_ext.distributed.label_propagate(text, mine, threads=1, **kwargs)
    except Exception as err:  # noqa: BLE001 - the error itself is the result
        return type(err).__name__, str(err)
    return None


def _worker(rank, world, store_path, tasks, results):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        while (task := tasks.get()) is not None:
            name, args = task
            try:
                results.put((rank, True, globals()[name](rank, world, *args)))
            except Exception as err:  # noqa: BLE001 - reported to the test
                results.put((rank, False, f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """run(name, *args) -> [rank 0's result, rank 1's result]."""
    ctx = multiprocessing.get_context("spawn")
    store = str(tmp_path_factory.mktemp("gloo") / "store")
    tasks = [ctx.Queue() for _ in range(WORLD)]
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, store, tasks[r], results), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()

    def run(name, *args):
        for q in tasks:
            q.put((name, args))
        got = {}
        try:
            for _ in range(WORLD):
                rank, ok, value = results.get(timeout=TIMEOUT_S)
                assert ok, f"rank {rank}: {value}"
                got[rank] = value
        except queue.Empty:
            pytest.fail(f"{name}{args}: ranks {sorted(set(range(WORLD)) - set(got))} did not "
                        f"answer within {TIMEOUT_S} s (a rank blocked in a collective?)")
        return [got[r] for r in range(WORLD)]

    yield run
    for q in tasks:
        q.put(None)
    for p in procs:
        p.join(timeout=20)
        if p.is_alive():
            p.terminate()


# --------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("sizes", [[15, 16], [0, 31], [31, 0]], ids=lambda s: "-".join(map(str, s)))
def test_knn_blocks_of_the_ranks_are_the_whole_graph(ranks, sizes):
    k = 6
    blocks = ranks("check_knn_blocks", sizes, k)
    text, images = make_data(np.float64, seed=1)
    whole = reclip_ext.knn_affinity(np.concatenate([text, images]), k, normalize=True,
                                    threads=1)
    assert blocks[0][0].shape == (M + sizes[0], k) and blocks[1][0].shape == (sizes[1], k)
    for got, want in zip(zip(*blocks), whole):
        np.testing.assert_array_equal(np.concatenate(got), want)


CASES = [
    ([15, 16], "numpy", np.float32, dict(k=5)),
    ([0, 31], "torch", np.float32, dict(k=5, weight="shift", gamma=3.0)),
    ([31, 0], "numpy", np.float64, dict(k=7, alpha=0.9)),
    ([10, 21], "torch", np.float64, dict(k=4, max_iter=5, normalize=False)),
]


@pytest.mark.parametrize("sizes,kind,dtype,kwargs", CASES,
                         ids=[f"{'-'.join(map(str, c[0]))}-{c[1]}-{np.dtype(c[2]).name}"
                              for c in CASES])
def test_labels_equal_the_single_process_call(ranks, sizes, kind, dtype, kwargs):
    results = ranks("check_label_propagate", sizes, kind, dtype, kwargs)
    text, images = make_data(dtype)
    want = reclip_ext.label_propagate(text, images, threads=1, **kwargs)
    for rank, (kinds, res) in enumerate(results):
        assert kinds == {kind}, (rank, kinds)
        assert res[0].shape == (sizes[rank],) and res[1].shape == (sizes[rank], M)
        assert res[0].dtype == np.int64 and res[1].dtype == dtype and res[2].dtype == dtype
        # one solve, the same per-class summary on every rank
        np.testing.assert_array_equal(res[3], want.iterations)
        np.testing.assert_array_equal(res[4], want.residuals)
    for field, name in enumerate(("labels", "scores", "confidence")):
        got = np.concatenate([res[field] for _, res in results])
        np.testing.assert_array_equal(got, np.asarray(want[field]), err_msg=name)


REFUSED = [
    ("columns", "ValueError", r"^images_shard: has 17 columns on rank 1 but 16 on rank 0"),
    ("dtype", "TypeError", r"^images_shard: dtype float64 on rank 1 differs from float32"),
    ("text", "ValueError", r"^text: shape \(3, 16\) on rank 1 differs"),
    ("alpha", "ValueError", r"^alpha must be in \[0, 1\), got 1.5"),
    ("k", "ValueError", r"^k must be < N = 35"),
    ("empty", "ValueError", r"^images_shard: every rank's shard is empty"),
    ("not a matrix", "ValueError", r"^images_shard: expected a 2-D array"),
    # bad values are named by the rank's own array and row, not by the gathered set's
    ("zero row", "ValueError", r"^images_shard: row 4 is all zeros .* \(on rank 1\)$"),
    ("nan", "ValueError", r"^images_shard: contains NaN or Inf \(on rank 1\)$"),
    ("spmm", "ValueError", r"^spmm must be one of \('kernel', 'cusparse'\), got 'cuSPARSE'"),
    ("cusparse on cpu", "ValueError", r"^spmm: 'cusparse' runs on CUDA only"),
]


@pytest.mark.parametrize("case,error,pattern", REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_input_raises_on_every_rank(ranks, case, error, pattern):
    import re

    results = ranks("check_refused", case)
    for rank, got in enumerate(results):
        assert got is not None, f"rank {rank} did not raise"
        assert got[0] == error and re.search(pattern, got[1]), (rank, got)
    # the group is still usable afterwards: no rank was left inside a collective
    assert ranks("check_refused", "none") == [None, None]


def test_no_process_group_names_group():
    assert not dist.is_initialized()
    text, images = make_data()
    with pytest.raises(RuntimeError, match=r"^group: no torch.distributed process group"):
        reclip_ext.distributed.label_propagate(text, images)


# --------------------------------------------------------------------------------------------
# NCCL on CUDA tensors: one rank per GPU, so a one-GPU machine runs a group of one, which still
# takes every collective and the CUDA query-block search through NCCL


NCCL_SCRIPT = """
import os, sys, tempfile
import numpy as np, torch, torch.distributed as dist
import reclip_ext, reclip_ext.distributed
store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                        device_id=torch.device("cuda:0"))
rng = np.random.default_rng(0)
text = rng.standard_normal((4, 16))
images = text[rng.integers(0, 4, 31)] + 0.8 * rng.standard_normal((31, 16))
t = torch.tensor(text, dtype=torch.float32, device="cuda")
v = torch.tensor(images, dtype=torch.float32, device="cuda")
got = reclip_ext.distributed.label_propagate(t, v, k=5)
want = reclip_ext.label_propagate(t, v, k=5)
assert got.labels.is_cuda, "results come back on the caller's device"
assert torch.equal(got.labels, want.labels), (got.labels, want.labels)
torch.testing.assert_close(got.scores, want.scores)
if reclip_ext.built_with_cusparse():  # the CG's other SpMM, forwarded to rank 0's solve
    alt = reclip_ext.distributed.label_propagate(t, v, k=5, spmm="cusparse")
    assert torch.equal(alt.labels, want.labels), (alt.labels, want.labels)
    torch.testing.assert_close(alt.scores, want.scores, rtol=1e-4, atol=1e-5)
dist.destroy_process_group()
print("nccl ok")
"""


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and dist.is_nccl_available()),
                    reason="no CUDA device (or no NCCL)")
def test_nccl_group_of_one_matches_label_propagate(tmp_path):
    import subprocess
    import sys

    # -P and a cwd elsewhere: from the checkout, the source tree's reclip_ext (no _core) would
    # shadow the installed build
    r = subprocess.run([sys.executable, "-P", "-c", NCCL_SCRIPT], capture_output=True, text=True,
                       timeout=TIMEOUT_S, cwd=tmp_path)
    assert r.returncode == 0 and "nccl ok" in r.stdout, r.stderr[-3000:]
