"""Data-parallel ReCLIP under torchrun, two ranks on gloo (the CPU), against one process.

Every run is a subprocess started the way a user starts it (``python -m
torch.distributed.run --standalone --nproc_per_node=2 -m reclip adapt --device cpu ...``),
single-threaded, with ``--workers 0``, in a temporary workspace (never the repository root,
whose source tree would shadow the installed ``reclip_ext``). The data is a stratified subset
of scikit-learn's digits as PNGs in class-name folders, 151 images: n is odd, so the two
shards differ in size and the last training batch splits unevenly.

- ``distributed_worker.py`` (in-process API, once plainly and once under torchrun): sharded
  image passes equal the single-process pass, in dataset order, on both ranks; a deferred
  skip-bad-images check drops the same file on every rank; epoch 1's pseudo labels are
  identical; one epoch of DDP training (an uneven last batch split, a rank with an empty
  part, ReCLIP-T's chunked backward) gives the single-process parameters up to rounding.
- the CLI on the shipped reclip-digits model: the 2-rank run's predictions agree with one
  process on >= 99% of images, accuracy within 0.5 points, and training moved them.
- recovery: under ``--max-restarts=1`` one worker is SIGKILLed once the first checkpoint
  exists; torchrun restarts the group, ``--resume`` continues, and the predictions equal an
  uninterrupted 2-rank run's.

The CLI runs start together on a small thread pool (their time is mostly imports).
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

for _module in ("torch", "open_clip", "safetensors", "sklearn", "PIL"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed", allow_module_level=True)

import torch  # noqa: E402

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from reclip import distributed  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]

HERE = Path(__file__).resolve().parent
TINY_VIT = str(HERE / "assets" / "tiny-vit.json")
WORKER = str(HERE / "distributed_worker.py")
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PER_CLASS = 15  # and one more "zero": 151 images
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
TIMEOUT = 240
EPOCHS = 3
SEED = 3
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def write_digits(folder: Path) -> int:
    from PIL import Image

    from reclip.sources import load_sklearn_digits

    images, labels = load_sklearn_digits()
    n = 0
    for c, name in enumerate(NAMES):
        (folder / name).mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[: PER_CLASS + (c == 0)]:
            Image.fromarray(images[i]).save(folder / name / f"{i:04d}.png")
            n += 1
    return n


def adapt_args(out: str, *extra: str) -> list[str]:
    return ["-m", "reclip", "adapt", "--model", "reclip-digits", "--data", "digits",
            "--classes", "classes.txt", "--out", out, "--seed", str(SEED), "--epochs",
            str(EPOCHS), "--device", "cpu", "--workers", "0", "--quiet", *extra]


def run(ws: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ws, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{r.args}\nexit {r.returncode}\nstderr:\n{r.stderr[-4000:]}"
    return r


def predictions(run_dir: Path) -> list[str]:
    return (run_dir / "predictions.tsv").read_text().splitlines()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _kill_chain(ws: Path):
    """A 2-rank run under --max-restarts=1 (with --resume, as a restartable job is started);
    one worker (a child of the torchrun agent, not the agent) is SIGKILLed once the first
    checkpoint exists."""
    out = ws / "run_killed"
    argv = [*TORCHRUN, "--max-restarts=1", *adapt_args("run_killed", "--resume")]
    with open(ws / "killed.stderr", "w") as err:
        proc = subprocess.Popen(argv, cwd=ws, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + TIMEOUT
        killed = None
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                workers = _children(proc.pid)
                if (out / "run.json").exists() and len(workers) == 2:
                    epoch = json.loads((out / "run.json").read_text())["epoch"]
                    os.kill(workers[-1], signal.SIGKILL)
                    killed = epoch
                    break
                time.sleep(0.002)
            returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return killed, returncode, (ws / "killed.stderr").read_text()


def _worker_runs(ws: Path):
    single = run(ws, [sys.executable, WORKER, "w1", "digits", "somebad", TINY_VIT])
    pair = run(ws, [*TORCHRUN, WORKER, "w2", "digits", "somebad", TINY_VIT])
    return single, pair


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ddp")
    n = write_digits(ws / "digits")
    assert n % 2 == 1
    (ws / "classes.txt").write_text("".join(c + "\n" for c in NAMES))
    # the same digits with one unreadable file in the second rank's shard (sorted last)
    write_digits(ws / "somebad")
    (ws / "somebad" / "nine" / "zz-broken.png").write_bytes(b"not a PNG\n" * 4)
    return ws


@pytest.fixture(scope="module")
def jobs(ws):
    pool = ThreadPoolExecutor(max_workers=3)
    futures = {"kill": pool.submit(_kill_chain, ws),
               "pair": pool.submit(run, ws, [*TORCHRUN, *adapt_args("run_pair")]),
               "single": pool.submit(run, ws, [sys.executable, *adapt_args("run_single")]),
               "worker": pool.submit(_worker_runs, ws)}
    yield {k: f for k, f in futures.items()}
    pool.shutdown(wait=True, cancel_futures=True)


def result(jobs, key):
    return jobs[key].result(timeout=4 * TIMEOUT)


# ---------------------------------------------------------------------------------- unit


def test_shards_tile_the_items_without_overlap():
    for n in (0, 1, 2, 7, 151, 1000):
        for world in (1, 2, 3, 8):
            blocks = [distributed.shard(n, world, r) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_one_gpu_for_every_rank_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--device: 'cuda:1' names one GPU"):
        distributed.setup("cuda:1", "--device")
    monkeypatch.setenv("LOCAL_RANK", "2")  # a third process on a node of two GPUs
    with pytest.raises(ValueError, match="local rank 2 needs cuda:2"):
        distributed.setup("cuda", "--device")
    assert not distributed.current().active


def test_predict_under_torchrun_is_refused(monkeypatch):
    from argparse import Namespace

    from reclip import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="predict: runs in one process"):
        cli._join_torchrun(Namespace(command="predict", device="cpu"))


# ------------------------------------------------------------------------- in-process API


def test_sharded_passes_and_epoch_one_pseudo_labels(ws, jobs):
    single, pair = result(jobs, "worker")
    ok(single)
    ok(pair)
    ref = np.load(ws / "w1" / "rank0.npz")
    assert int(ref["world"]) == 1
    ranks = [np.load(ws / "w2" / f"rank{r}.npz") for r in range(2)]
    n = ref["feats"].shape[0]
    assert n == 151 and n % 2 == 1
    for got in ranks:
        assert int(got["world"]) == 2
        # all-gathered in dataset order: row i is item i's features, on every rank
        np.testing.assert_allclose(got["feats"], ref["feats"], rtol=0, atol=1e-5)
        # the unreadable file of rank 1's shard is dropped on both ranks alike
        assert list(got["skipped"]) == list(ref["skipped"]) and len(ref["skipped"]) == 1
        assert str(ref["skipped"][0]).endswith("zz-broken.png")
        assert int(got["kept"]) == int(ref["kept"]) == n
        np.testing.assert_allclose(got["bad_feats"], ref["bad_feats"], rtol=0, atol=1e-5)
        # label propagation with the k-NN rows searched by their ranks and one solve on rank
        # 0: the same labels as one process, on both ranks
        np.testing.assert_array_equal(got["pseudo_text"], ref["pseudo_text"])
        np.testing.assert_array_equal(got["pseudo_visual"], ref["pseudo_visual"])
        # predictions: rank 0's, broadcast
        np.testing.assert_array_equal(got["predicted"], ref["predicted"])
    np.testing.assert_array_equal(ranks[0]["feats"], ranks[1]["feats"])
    # one epoch of DDP training (uneven parts, an empty part, chunked text backward) takes the
    # single-process steps: the same parameters up to reduction order, on both ranks alike
    params = [k for k in ref.files if k.startswith("param.")]
    assert any(k.startswith("param.visual.") for k in params)
    for got in ranks:
        for k in params:
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=2e-6, err_msg=k)
    for k in params:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])
    # not vacuous: the norm layers start at weight 1, bias 0, and training moved them by far
    # more than the tolerance
    moved = max(float(np.abs(ref[k] - (1.0 if k.endswith("weight") else 0.0)).max())
                for k in params)
    assert moved > 1e-3, moved
    # SHOT under DDP (the whole visual tower; each step's batch-mean prediction summed over
    # the ranks through a differentiable all-reduce): the single-process steps too
    shot = [k for k in ref.files if k.startswith("shot.")]
    assert len(shot) > len([k for k in params if k.startswith("param.visual.")])
    for got in ranks:
        for k in shot:
            np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=2e-6, err_msg=k)
    for k in shot:
        np.testing.assert_array_equal(ranks[0][k], ranks[1][k])
    moved = max(float(np.abs(ref[k] - ref[k.replace("shot.", "shot_before.")]).max())
                for k in shot)
    assert moved > 1e-4, moved


# ------------------------------------------------------------------------------------ CLI


def test_two_ranks_match_one_process(ws, jobs):
    single = ok(result(jobs, "single"))
    pair = ok(result(jobs, "pair"))
    one, two = predictions(ws / "run_single"), predictions(ws / "run_pair")
    assert len(one) == len(two) == 151
    assert np.mean([a == b for a, b in zip(one, two)]) >= 0.99
    r1 = json.loads((ws / "run_single" / "report.json").read_text())
    r2 = json.loads((ws / "run_pair" / "report.json").read_text())
    assert abs(r1["reclip_accuracy"] - r2["reclip_accuracy"]) <= 0.005
    # not vacuous: training moved the predictions away from zero-shot CLIP's
    assert r1["reclip_accuracy"] != r1["zero_shot_accuracy"]
    assert all(h["loss_text"] > 0 and h["loss_visual"] > 0 for h in r2["history"])
    # epoch 1's pseudo labels are the same labels (broadcast from rank 0)
    for key in ("pseudo_text", "pseudo_visual", "pseudo_shared"):
        assert r1["history"][0]["accuracy"][key] == r2["history"][0]["accuracy"][key]
    assert r1["world_size"] == 1 and "distributed" not in r1
    assert r2["world_size"] == 2
    d = r2["distributed"]
    assert d["backend"] == "gloo" and [r["rank"] for r in d["ranks"]] == [0, 1]
    assert d["collective_seconds"] >= 0 and d["collective_calls"] > 0
    # each rank encoded its shard (76 / 75 items) of every pass, and trained on its parts
    assert sum(r["encode_images"] for r in d["ranks"]) % 151 == 0
    assert all(r["encode_images_per_s"] > 0 and r["train_images_per_s"] > 0 for r in d["ranks"])
    assert all(r["pseudo_label_seconds"] > 0 for r in d["ranks"])  # each rank searched its rows
    # only rank 0 speaks: one summary line, one line per epoch
    assert pair.stderr.count("reclip: 151 images") == 1
    assert pair.stderr.count("epoch 1:") == 1 == single.stderr.count("epoch 1:")


def test_sigkilled_rank_restarts_and_resumes(ws, jobs):
    killed, returncode, stderr = result(jobs, "kill")
    ok(result(jobs, "pair"))
    assert killed is not None and 1 <= killed < EPOCHS, (killed, stderr[-3000:])
    assert returncode == 0, stderr[-4000:]
    # the group ran twice: the restart reports the images again, then resumed
    assert stderr.count("reclip: 151 images") == 2, stderr[-4000:]
    meta = json.loads((ws / "run_killed" / "run.json").read_text())
    assert meta["epoch"] == EPOCHS
    assert predictions(ws / "run_killed") == predictions(ws / "run_pair")
