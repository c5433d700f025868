"""What a run may never do, end to end: save a broken model, compute on something other than
what the user gave, or change what it computes without saying so.

- divergence: a non-finite loss or weight stops the run with one line naming the epoch, the
  step, the side and the learning rate; no checkpoint holds a non-finite tensor, and
  ``--resume --allow-changes --lr SMALLER`` continues from the last good one;
- ``--resume`` refuses other result-changing settings, other data and another model, before
  the zero-shot pass; ``--allow-changes`` records what changed;
- what is read is what was given (16-bit images, an empty ``--out``, a missing
  ``--pretrained``, a non-empty export folder);
- environment errors (a full disk) are one line, and the last checkpoint stays loadable;
- one writer per run directory, and a SIGKILL frees it;
- SIGTERM and Ctrl-C stop with one line saying where ``--resume`` continues, and the resumed
  run equals an uninterrupted one; under torchrun too, SIGTERM to its agent stops every rank.

The CLI runs in subprocesses as in test_cli.py (its helpers and fixture images), with the
temporary workspace as working directory; a few cases that must patch the process (a full
disk) call ``reclip.cli.main`` in this process.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_cli import (CLASS_COUNTS, CLASSES, ENV, KILL_COUNTS, KILL_SEED, KILL_SIZE,
                      TIMEOUT, TINY_VIT, adapt_args, cli, ok, read_json, write_images)

PIL = pytest.importorskip("PIL.Image")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


pytestmark = pytest.mark.subprocess


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("safety")
    write_images(ws / "data", CLASS_COUNTS)
    (ws / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))
    return ws


def one_line_error(r: subprocess.CompletedProcess, *mentions: str) -> str:
    """The one stderr line of a command that failed with exit 2 (after any progress lines of
    the run: those start with "reclip:" or "epoch ")."""
    assert r.returncode == 2, f"exit {r.returncode}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines()
              if not ln.startswith(("reclip: ", "epoch "))]
    assert len(errors) == 1 and errors[0].startswith("reclip adapt: error: "), r.stderr
    for text in mentions:
        assert text in errors[0], errors[0]
    return errors[0]


def tensors_of(run: Path) -> dict[str, np.ndarray]:
    return safetensors_numpy.load_file(run / read_json(run / "run.json")["tensors"])


def run_files(run: Path) -> list[str]:
    """The files of a run directory but its lock file (which stays, unlocked)."""
    return sorted(p.name for p in run.iterdir() if p.name != ".reclip-lock")


def all_finite(run: Path) -> bool:
    return all(np.isfinite(v).all() for v in tensors_of(run).values()
               if np.issubdtype(v.dtype, np.floating))


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("method,side", [("reclip", "side V"), ("shot", "side SHOT")])
def test_divergence_names_the_step_and_saves_nothing(ws, method, side):
    """Five steps an epoch at lr 1e6: a loss is non-finite within the first epoch (for ReCLIP,
    the visual side's); the line names epoch, step, side and learning rate, and no run is
    written."""
    out = f"run_diverged_{method}"
    r = cli(ws, *adapt_args("data", out, "--epochs", "3", "--lr", "1e6", "--batch-size", "8",
                            *(["--method", "shot"] if method == "shot" else [])))
    one_line_error(r, "epoch 1", "step ", side, "1e+06", "--lr")
    assert not (ws / out / "run.json").exists()


def test_divergence_after_an_epochs_last_step_keeps_the_last_checkpoint(ws):
    """lr 1e8 at one step an epoch: the weights break in an epoch's last step, which no loss
    shows, so the check of the parameters before the checkpoint must catch it. The last
    checkpoint stays: finite, and the only tensor file."""
    out = ws / "run_broken_weights"
    r = cli(ws, *adapt_args("data", out.name, "--epochs", "5", "--lr", "1e8"))
    meta = read_json(out / "run.json")
    saved = meta["epoch"]
    assert 1 <= saved < 5
    one_line_error(r, f"epoch {saved + 1}, after its last step", "non-finite", "1e+08", "--lr")
    assert all_finite(out)
    assert run_files(out) == sorted(["run.json", meta["tensors"]])


def test_divergence_keeps_the_last_checkpoint_and_resume_recovers(ws):
    """One good epoch, then a resume at lr 1e6 diverges: the epoch-1 checkpoint is left as it
    was, and a lower learning rate continues it; run.json records the change and the epoch
    it took effect from."""
    out = ws / "run_recover"
    ok(cli(ws, *adapt_args("data", out.name, "--epochs", "1")))
    saved = (out / "run.json").read_text(), tensors_of(out)
    r = cli(ws, *adapt_args("data", out.name, "--epochs", "3", "--resume", "--allow-changes",
                            "--lr", "1e6", "--batch-size", "8"))
    one_line_error(r, "epoch 2, step ", "side ", "1e+06", "--lr")
    assert (out / "run.json").read_text() == saved[0]
    assert all(np.array_equal(v, saved[1][k]) for k, v in tensors_of(out).items())

    ok(cli(ws, *adapt_args("data", out.name, "--epochs", "3", "--resume", "--allow-changes",
                           "--lr", "1e-4")))
    meta = read_json(out / "run.json")
    assert meta["epoch"] == 3 and all_finite(out)
    assert meta["config"]["lr"] == 1e-4
    assert meta["changes"] == [{"epoch": 1, "setting": "lr", "flag": "--lr", "was": 1e-3,
                                "now": 1e-4}]
    assert read_json(out / "report.json")["changes"] == meta["changes"]


def test_api_raises_floating_point_error_and_save_refuses(tmp_path):
    torch = pytest.importorskip("torch")
    from reclip.adapt import Config, ReCLIP
    from reclip.models import load_model

    torch.manual_seed(0)
    loaded = load_model(TINY_VIT)
    images = torch.rand(24, 3, 32, 32)
    clf = ReCLIP(loaded, CLASSES, config=Config(lr=1e6, batch_size=4, max_epochs=2,
                                                device="cpu", workers=0))
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+ of 6, side [TV]"):
        clf.fit(images, out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()
    with pytest.raises(FloatingPointError, match="non-finite"):
        clf.save(tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()


@pytest.mark.parametrize("break_it, what", [
    (lambda ln: ln.weight.data.fill_(float("inf")), "class embeddings are not finite"),
    # every prompt's embedding the same vector: rank 1, which P2 cannot project
    (lambda ln: (ln.weight.data.zero_(), ln.bias.data.fill_(0.5)), "class embeddings collapsed")])
def test_text_weights_that_break_the_class_embeddings_are_divergence(tmp_path, break_it, what):
    """Weights that pass the check after an epoch (finite) can still break the next epoch's
    class embeddings: that is the run diverging, named as such, not a failed SVD."""
    torch = pytest.importorskip("torch")
    from reclip.adapt import Config, ReCLIP
    from reclip.models import load_model

    torch.manual_seed(0)
    clf = ReCLIP(load_model(TINY_VIT), CLASSES, config=Config(max_epochs=2, device="cpu",
                                                              workers=0))
    break_it(clf.text_copy.ln_final)
    with pytest.raises(FloatingPointError, match=f"epoch 1, at its start: the text copy's {what}"):
        clf.fit(torch.rand(24, 3, 32, 32), out_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()


# ----------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def one_epoch(ws) -> Path:
    """A one-epoch run of `data` with the default settings (copied by each test that resumes
    it, so that none changes what another sees)."""
    ok(cli(ws, *adapt_args("data", "run_one_epoch", "--epochs", "1")))
    return ws / "run_one_epoch"


def copy_run(one_epoch: Path, name: str) -> Path:
    shutil.copytree(one_epoch, one_epoch.parent / name)
    return one_epoch.parent / name


def test_resume_with_changed_settings_is_refused_listing_them(ws, one_epoch):
    run = copy_run(one_epoch, "run_changed")
    before = (run / "run.json").read_text()
    r = cli(ws, *adapt_args("data", run.name, "--epochs", "3", "--resume", "--lr", "0.5",
                            "--batch-size", "8", "--projection", "P1", "--no-label-sharing"))
    line = one_line_error(r, run.name, "--lr 0.001 (given 0.5)", "--batch-size 64 (given 8)",
                          "--projection P2 (given P1)", "--no-label-sharing True (given False)",
                          "--allow-changes")
    assert "--epochs" not in line
    assert "zero-shot" not in r.stderr  # refused before the zero-shot pass
    assert (run / "run.json").read_text() == before


def test_resume_may_extend_and_change_how_it_runs(ws, one_epoch):
    """--epochs, --iterations, --workers, --amp, --skip-bad-images and --quiet are no
    change of what the run computes."""
    run = copy_run(one_epoch, "run_extended")
    ok(cli(ws, *adapt_args("data", run.name, "--epochs", "2", "--iterations", "100", "--resume",
                           "--workers", "0", "--amp", "off", "--skip-bad-images")))
    meta = read_json(run / "run.json")
    assert meta["epoch"] == 2 and "changes" not in meta


def test_resume_with_other_data_or_model_is_refused_before_the_zero_shot_pass(ws, one_epoch):
    run = copy_run(one_epoch, "run_other_input")
    before = (run / "run.json").read_text()
    fewer = ws / "fewer"
    shutil.copytree(ws / "data", fewer)
    (fewer / "cat" / "000.png").unlink()
    r = cli(ws, *adapt_args(str(fewer), run.name, "--epochs", "2", "--resume"))
    one_line_error(r, "other data", "36 images", "35 images", "--data")
    assert "zero-shot" not in r.stderr
    model = ["--model", "reclip-digits"]
    argv = adapt_args("data", run.name, "--epochs", "2", "--resume")
    argv[argv.index("--model") : argv.index("--model") + 2] = model
    r = cli(ws, *argv)
    line = one_line_error(r, "model", "reclip-digits")
    assert line.endswith("--pretrained")  # the whole line, not cut off
    assert "zero-shot" not in r.stderr
    assert (run / "run.json").read_text() == before
    # the same files under another root are the same data
    moved = ws / "moved" / "images"
    shutil.copytree(ws / "data", moved)
    ok(cli(ws, *adapt_args(str(moved), run.name, "--epochs", "2", "--resume")))
    assert read_json(run / "run.json")["epoch"] == 2


# ------------------------------------------------------------------------ what a run reads


def test_wide_modes_are_scaled_not_clipped(tmp_path):
    """A 16-bit gradient PNG (I;16) and its 8-bit twin decode to the same 8-bit RGB; I and F
    images are scaled by their range."""
    from reclip.data import load_image, to_rgb

    ramp = np.arange(256, dtype=np.uint16).reshape(16, 16)
    PIL.fromarray(ramp * 257).save(tmp_path / "g16.png")
    PIL.fromarray(ramp.astype(np.uint8)).save(tmp_path / "g8.png")
    assert PIL.open(tmp_path / "g16.png").mode == "I;16"
    wide, narrow = (np.asarray(load_image(tmp_path / f)) for f in ("g16.png", "g8.png"))
    assert np.array_equal(wide, narrow) and np.array_equal(wide[..., 0], ramp)
    floats = PIL.fromarray(np.linspace(0, 1, 5, dtype=np.float32)[None])
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 64, 128, 191, 255]
    ints = PIL.fromarray(np.array([[-70000, 0, 70000]], dtype=np.int32))
    assert np.asarray(to_rgb(ints))[0, :, 1].tolist() == [0, 128, 255]


def test_16_bit_png_and_its_8_bit_twin_get_the_same_prediction(ws, one_epoch):
    twins = {8: ws / "twins8", 16: ws / "twins16"}
    for name in CLASS_COUNTS:
        for folder in twins.values():
            (folder / name).mkdir(parents=True)
        for path in sorted((ws / "data" / name).glob("*.png")):
            grey = np.asarray(PIL.open(path).convert("L"))
            PIL.fromarray(grey).save(twins[8] / name / path.name)
            PIL.fromarray(grey.astype(np.uint16) * 257).save(twins[16] / name / path.name)
    got = {bits: [line.split("\t")[1] for line in ok(cli(
        ws, "predict", "--run", one_epoch.name, "--data", folder.name)).stdout.splitlines()]
        for bits, folder in twins.items()}
    assert len(set(got[8])) > 1, "fixture: one class for every image proves nothing"
    assert got[16] == got[8]


@pytest.mark.parametrize("command,argv,mentions", [
    ("adapt", adapt_args("data", ""), "--out: empty"),
    ("adapt", adapt_args("data", "  "), "--out: empty"),
    ("adapt", adapt_args("data", "."), "current directory"),
    ("adapt", adapt_args("data", "../safety0/."), "current directory"),
    ("adapt", ["adapt", "--model", "ViT-B-32", "--data", "data", "--classes", "classes.txt",
               "--out", "run_random"], "--pretrained"),
    ("demo", ["demo", "--export-split", "data"], "not empty"),
], ids=["out-empty", "out-blank", "out-cwd", "out-cwd-by-another-path", "no-pretrained",
        "export-into-non-empty"])
def test_what_would_write_or_read_the_wrong_thing_is_refused(ws, command, argv, mentions):
    argv = [a.replace("safety0", ws.name) for a in argv]
    (ws / "report.json").write_text("the user's\n")
    r = cli(ws, *argv)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"reclip {command}: error: "), r.stderr
    assert mentions in lines[0], lines[0]
    assert (ws / "report.json").read_text() == "the user's\n"
    assert not (ws / "run_random").exists() and not (ws / "data" / "train").exists()


def test_pretrained_none_is_a_recorded_random_model(tmp_path):
    """--pretrained none reaches load_model as no weights at all (the spec records null)."""
    from argparse import Namespace

    from reclip.cli import _pretrained

    assert _pretrained(Namespace(model="ViT-B-32", pretrained="none")) is None
    assert _pretrained(Namespace(model=TINY_VIT, pretrained=None)) is None
    with pytest.raises(ValueError, match="^--pretrained: ViT-B-32"):
        _pretrained(Namespace(model="ViT-B-32", pretrained=None))


# ----------------------------------------------------------------------------- environment


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EDQUOT])
def test_full_disk_is_one_line_and_keeps_the_checkpoint(ws, one_epoch, monkeypatch, capsys,
                                                        code):
    """Mounting a small file system needs privileges: `open` is patched to fail as a full
    disk (or a read-only / quota-bound one) does for every file written into the run. The
    error is one line naming the file and the reason; the run's previous checkpoint stays
    intact and loadable, and no partial file is left."""
    import builtins

    from reclip import cli as reclip_cli
    from reclip.adapt import ReCLIP

    run = copy_run(one_epoch, f"run_full_{code}")
    before = {p: (run / p).read_bytes() for p in run_files(run)}
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode and str(run) in os.path.abspath(os.fspath(file)):
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    argv = adapt_args(str(ws / "data"), str(run), "--epochs", "2", "--resume", "--workers", "0",
                      classes=str(ws / "classes.txt"))
    assert reclip_cli.main(argv) == 2
    monkeypatch.setattr(builtins, "open", real_open)
    errors = [ln for ln in capsys.readouterr().err.splitlines()
              if not ln.startswith(("reclip: ", "epoch "))]
    assert len(errors) == 1, errors
    assert errors[0] == (f"reclip adapt: error: {run / 'tensors-1.safetensors'}: "
                         f"{os.strerror(code)}"), errors[0]
    assert {p: (run / p).read_bytes() for p in run_files(run)} == before
    assert ReCLIP.load(run, device="cpu").epoch == 1


# ------------------------------------------------------------------------------ one writer


def test_second_writer_is_refused_and_sigkill_frees_the_lock(ws):
    import socket

    run = ws / "run_locked"
    args = adapt_args("data", run.name, "--epochs", "100000")
    first = subprocess.Popen([sys.executable, "-m", "reclip.cli", *args], cwd=ws, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "run.json").exists():  # it holds the lock and is training
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = cli(ws, *adapt_args("data", run.name, "--epochs", "1", "--resume"))
        one_line_error(second, run.name, f"PID {first.pid} ", socket.gethostname())
        assert "zero-shot" not in second.stderr
        assert first.poll() is None  # the refusal left the live run alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    ok(cli(ws, *adapt_args("data", run.name, "--epochs", "1", "--resume")))


# ------------------------------------------------------------------------------ preemption


def _stopped_by(ws: Path, sig: int, name: str) -> tuple[subprocess.Popen, str, dict]:
    """Start a run, send it `sig` once its first checkpoint exists; (process, stderr, the
    run.json it left)."""
    run = ws / name
    args = adapt_args("killdata", name, "--epochs", "6", seed=KILL_SEED)
    proc = subprocess.Popen([sys.executable, "-m", "reclip.cli", *args], cwd=ws, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "run.json").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, err, read_json(run / "run.json")


def test_sigterm_and_ctrl_c_stop_cleanly_and_resume_equals_uninterrupted(ws):
    write_images(ws / "killdata", KILL_COUNTS, size=KILL_SIZE, seed=1)
    reference = ok(cli(ws, *adapt_args("killdata", "run_uninterrupted", "--epochs", "6",
                                       seed=KILL_SEED)))
    assert reference.returncode == 0
    want = (ws / "run_uninterrupted" / "predictions.tsv").read_text()
    for sig, code, what in ((signal.SIGTERM, 143, "terminated"),
                            (signal.SIGINT, 130, "interrupted")):
        name = f"run_stopped_{code}"
        proc, err, meta = _stopped_by(ws, sig, name)
        assert proc.returncode == code, err
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"reclip adapt: {what}"), err
        if meta["epoch"] < 6:  # stopped mid-run: the line says where --resume continues
            assert f"--resume continues {name} from epoch {meta['epoch'] + 1}" in last, last
            assert not (ws / name / "predictions.tsv").exists()
        assert [p for p in run_files(ws / name) if not p.endswith((".tsv", ".json"))] \
            == [meta["tensors"]]
        ok(cli(ws, *adapt_args("killdata", name, "--epochs", "6", "--resume", seed=KILL_SEED)))
        assert (ws / name / "predictions.tsv").read_text() == want
        assert read_json(ws / name / "report.json")["history"] == \
            read_json(ws / "run_uninterrupted" / "report.json")["history"]


# ------------------------------------------------------------------------ under torchrun


def test_a_line_is_one_write():
    """torchrun's ranks share one stderr, unbuffered under PYTHONUNBUFFERED: a line written in
    two pieces (print's text, then its newline) can run into another rank's line."""
    from reclip.errors import say

    class Pipe:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

    pipe = Pipe()
    say("reclip adapt (rank 1 of 2): error: training diverged", pipe)
    assert pipe.writes == ["reclip adapt (rank 1 of 2): error: training diverged\n"]


def test_divergence_stops_every_rank_with_the_same_line(ws):
    """Two gloo ranks: both stop with the same line (each naming its rank), no rank hangs,
    and nothing is saved."""
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    argv = adapt_args("data", "run_diverged_2", "--epochs", "3", "--lr", "1e6", "--batch-size",
                      "8", "--device", "cpu", "--workers", "0")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "reclip", *argv], cwd=ws, env=ENV,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode != 0
    lines = {}
    for line in r.stderr.splitlines():
        for rank in (0, 1):
            prefix = f"reclip adapt (rank {rank} of 2): error: "
            if line.startswith(prefix):
                lines[rank] = line[len(prefix):]
    assert set(lines) <= {0, 1} and 0 in lines, r.stderr
    assert all(text == lines[0] for text in lines.values()), lines
    assert "epoch 1, step " in lines[0] and "side V" in lines[0] and "1e+06" in lines[0]
    # torchrun's agent prints its own traceback (ChildFailedError); no rank's shows
    assert "FloatingPointError" not in r.stderr and "LinAlgError" not in r.stderr, r.stderr
    assert not (ws / "run_diverged_2" / "run.json").exists()


def test_a_user_error_under_torchrun_is_one_line(ws):
    """A user error found before the ranks join (here a missing image folder) is said once, by
    local rank 0, without a rank number and before any process group forms; no rank prints a
    traceback (torchrun's agent adds only its own failure summary)."""
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    argv = adapt_args("no-such-folder", "run_missing_2", "--device", "cpu", "--workers", "0")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "reclip", *argv], cwd=ws, env=ENV,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("reclip adapt")]
    assert len(ours) == 1 and ours[0].startswith("reclip adapt: error: "), r.stderr
    assert "no-such-folder" in ours[0]
    # at most torchrun's own traceback of its ChildFailedError; none of a rank
    assert r.stderr.count("Traceback (most recent call last)") <= 1, r.stderr
    assert not (ws / "run_missing_2").exists()


def _torchrun(ws: Path, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "reclip", *argv], cwd=ws, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigterm_to_torchrun_stops_every_rank_and_resume_equals_uninterrupted(ws):
    """SIGTERM to torchrun's agent (a scheduler preempting the job): the agent passes it on to
    both gloo ranks (they run in sessions of their own, so nothing else reaches them), the
    group exits promptly without a rank's traceback, rank 0 says where --resume continues,
    and the resumed 2-rank run equals an uninterrupted one."""
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")

    def argv(name: str, *extra: str) -> list[str]:
        return adapt_args("data", name, "--epochs", "6", "--batch-size", "8", "--device",
                          "cpu", "--workers", "0", *extra, seed=KILL_SEED)

    def finished(proc: subprocess.Popen) -> None:
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0 and "Traceback" not in err, err

    reference = ws / "run_uninterrupted_2"
    finished(_torchrun(ws, argv(reference.name)))

    run = ws / "run_sigterm_2"
    proc = _torchrun(ws, argv(run.name))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "run.json").exists():  # epoch 1 is saved
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.002)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the agent gives its workers 30 s after its SIGTERM before it SIGKILLs them: well under
    # that, the ranks stopped on their own (a rank stuck in a collective would take all 30)
    assert took < 20, (took, err)
    # the agent's exit status is torchrun's, not a rank's: it re-raises the signal as its
    # own SignalException (exit 1 here); only "not a success" is torchrun's promise
    assert proc.returncode != 0, err
    # the one traceback allowed is that agent's; none comes from a rank (reclip's frames, a
    # collective failing because the other rank left, the _Terminated itself)
    blocks = err.split("Traceback (most recent call last):")[1:]
    assert all("SignalException" in b and "torch/distributed/run.py" in b for b in blocks), err
    assert "/reclip/" not in err and "_Terminated" not in err and "RuntimeError" not in err, err
    meta = read_json(run / "run.json")
    assert 1 <= meta["epoch"] < 6, meta["epoch"]
    said = [ln for ln in err.splitlines() if ln.startswith("reclip adapt")]
    assert said == [f"reclip adapt: terminated (SIGTERM); --resume continues {run.name} from "
                    f"epoch {meta['epoch'] + 1} (epoch {meta['epoch']} is saved)"], err
    # an intact checkpoint: one tensors file, the one run.json names, loadable and finite
    assert [p for p in run_files(run) if not p.endswith((".tsv", ".json"))] == [meta["tensors"]]
    assert all_finite(run)
    assert not (run / "predictions.tsv").exists()

    finished(_torchrun(ws, argv(run.name, "--resume")))
    assert (run / "predictions.tsv").read_text() == \
        (reference / "predictions.tsv").read_text()
    assert read_json(run / "report.json")["history"] == \
        read_json(reference / "report.json")["history"]
    want, got = tensors_of(reference), tensors_of(run)
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
