"""The ``reclip`` command line, end to end, on tiny image folders and a tiny random ViT.

Every command runs in a subprocess (``python -m reclip.cli``) with the temporary workspace as
its working directory (never the repository root, whose source tree would shadow the
installed ``reclip_ext``), offline, single-threaded. Without ``--pretrained`` the CLI seeds
torch with ``--seed`` before building the model and the run stores the random base weights,
so every run here is reproducible.

Each CLI process spends most of its time (seconds) importing torch, open_clip, torchvision and
transformers, so the module fixture ``jobs`` starts the commands of all selected tests at once
on a small thread pool (one subprocess per worker) and the tests only check the results;
commands that depend on each other run in order inside one job.

Fixture data: an ImageFolder of three classes (oriented sinusoid gratings of a class-specific
period and colour, plus noise) with unequal counts (10 / 12 / 14), so that a wrong
folder-name -> class mapping changes the accuracy; the classes file lists them in another
order than sorted. The seeds are chosen so that training really moves the predictions
(non-zero losses, T / V disagreement), which keeps the resume tests from being vacuous.

The adapt, report, resume, SIGKILL and bad-input tests run for both methods (``--method
reclip`` and ``--method shot``): the jobs of a method other than ReCLIP are keyed and their
runs named with a suffix (``job_key``). SHOT runs at a larger learning rate than its paper's
1e-6, which would leave the tiny random ViT's predictions where they are.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

PIL = pytest.importorskip("PIL.Image")
# the CLI imports these in its own processes; here only check that they are installed
# (importing open_clip would cost the test process seconds for nothing)
for _module in ("torch", "open_clip", "safetensors"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed", allow_module_level=True)

pytestmark = pytest.mark.subprocess

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_VIT = str(ASSETS / "tiny-vit.json")

CLASS_COUNTS = {"cat": 10, "dog": 12, "ship": 14}  # folder name -> images (sorted folder order)
CLASSES = ["ship", "cat", "dog"]  # the classes file: deliberately not in sorted order
# the same images in folders named by an id: sorted, the ids give a third order (dog, ship, cat)
ID_FOLDERS = {"cat": "n0300", "dog": "n0100", "ship": "n0200"}
RENAMED_COUNTS = {"cat": 10, "hound": 12, "ship": 14}  # the same images, "dog" is no class
SEED = 5  # main / resume runs: training changes predictions between epochs 1 and 3
KILL_SEED = 7
KILL_EPOCHS = 6
KILL_COUNTS = {"cat": 30, "dog": 32, "ship": 34}  # bigger images too: ~0.2 s per epoch
KILL_SIZE = 160
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_PER_CLASS = 8
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TIMEOUT = 300
NOTES = "a file of the user's that --out must not replace\n"
PEAK_KEYS = ("final_accuracy", "peak_accuracy", "peak_epoch", "peak_uses_labels", "note")
SOMEBAD_BROKEN = ["cat/empty.png", "dog/notes.jpg", "dog/truncated.jpg"]  # in sorted order
# SHOT's learning rate here: its predictions on `data` move in each of the first 3 epochs
# (larger ones collapse them to one class after an epoch, making epoch 1 equal epoch 3)
SHOT_LR = "0.003"
# method -> adapt's extra arguments
METHODS = {"reclip": [], "shot": ["--method", "shot", "--lr", SHOT_LR]}
# the jobs run once per method (the others only for ReCLIP)
PER_METHOD = ("main", "resume", "kill", "kill_ref", "eval")


# ----------------------------------------------------------------------------------- helpers


def write_images(folder: Path, counts: dict[str, int] | None, *, n_flat: int = 0, size: int = 32,
                 seed: int = 0) -> None:
    """Class sub-folders with counts[c] PNGs each (or n_flat PNGs directly inside)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] * (32 / size)
    colours = np.array([[1, 0.2, 0.2], [0.2, 1, 0.2], [0.2, 0.2, 1]])

    def image(k: int) -> np.ndarray:
        angle = rng.uniform(0, np.pi)
        wave = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * np.pi / [2, 4, 8][k])
        a = 128 + 110 * wave[..., None] * colours[k] + rng.normal(0, 30, (size, size, 3))
        return np.clip(a, 0, 255).astype(np.uint8)

    folder.mkdir(parents=True, exist_ok=True)
    if counts is None:
        for i in range(n_flat):
            PIL.fromarray(image(i % 3)).save(folder / f"img{i:03d}.png")
        return
    for k, (name, n) in enumerate(counts.items()):
        (folder / name).mkdir(exist_ok=True)
        for i in range(n):
            PIL.fromarray(image(k)).save(folder / name / f"{i:03d}.png")


def write_digits(folder: Path, per_class: int) -> None:
    """An ImageFolder zero/ .. nine/ of scikit-learn's 8x8 digits (the first per_class each)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c, name in enumerate(DIGIT_NAMES):
        (folder / name).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == c)[:per_class]:
            pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
            PIL.fromarray(pixels).save(folder / name / f"{i:04d}.png")


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reclip.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)


def adapt_args(data: str, out: str, *extra: str, classes: str = "classes.txt",
               seed: int = SEED) -> list[str]:
    return ["adapt", "--model", TINY_VIT, "--data", data, "--classes", classes, "--out", out,
            "--seed", str(seed), "--quiet", *extra]


def job_key(name: str, method: str = "reclip") -> str:
    """The job (and run directory) `name` of `method`: ReCLIP's keep the plain name."""
    return name if method == "reclip" or name not in PER_METHOD else f"{name}_{method}"


def run_dir(name: str, method: str = "reclip") -> str:
    """The run directory `name` of `method`: run_<name>, suffixed for other methods."""
    return f"run_{name}" if method == "reclip" else f"run_{name}_{method}"


def bad_key(case: str, method: str) -> str:
    """The job of bad-input `case` run with `method`."""
    return case if method == "reclip" else f"{case}_{method}"


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{r.args}\nexit {r.returncode}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


def parse_predictions(text: str) -> list[tuple[str, str]]:
    rows = []
    for line in text.splitlines():
        path, sep, name = line.partition("\t")
        assert sep and path and name and "\t" not in name, f"bad prediction line {line!r}"
        rows.append((path, name))
    return rows


def expected_paths(root: str, counts: dict[str, int]) -> list[str]:
    return sorted(os.path.join(root, c, f"{i:03d}.png") for c, n in counts.items() for i in range(n))


def accuracy_of(rows: list[tuple[str, str]]) -> float:
    """Accuracy of `path<TAB>class` rows against the class folder each path lies in."""
    return float(np.mean([Path(p).parent.name == name for p, name in rows]))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def parse_eval(text: str) -> tuple[float, float, int]:
    """(accuracy, ECE, images) of eval's one line "accuracy A ECE E (N images)"."""
    words = text.strip().split()
    assert len(words) == 6 and words[0] == "accuracy" and words[2] == "ECE", text
    assert words[4].startswith("(") and words[5] == "images)", text
    return float(words[1]), float(words[3]), int(words[4][1:])


# ----------------------------------------------------------------------------------- the jobs


def _main_run(ws: Path, method: str = "reclip"):
    return cli(ws, *adapt_args("data", run_dir("main", method), "--epochs", "3",
                               *METHODS[method]))


def _resume_chain(ws: Path, method: str = "reclip"):
    run = run_dir("resume", method)
    first = cli(ws, *adapt_args("data", run, "--epochs", "1", *METHODS[method]))
    after_first = None
    if first.returncode == 0:
        after_first = {"run": read_json(ws / run / "run.json"),
                       "predictions": (ws / run / "predictions.tsv").read_text()}
    second = cli(ws, *adapt_args("data", run, "--epochs", "3", "--resume", *METHODS[method]))
    return first, after_first, second


def _inductive_chain(ws: Path):
    adapt = cli(ws, *adapt_args("data", "run_inductive", "--epochs", "2", "--inductive"))
    predict = cli(ws, "predict", "--run", "run_inductive", "--data", "other")
    return adapt, predict


def _kill_chain(ws: Path, method: str = "reclip"):
    """Start a 6-epoch run, SIGKILL it once its first checkpoint exists, keep a copy of that
    checkpoint, resume the run."""
    name = run_dir("killed", method)
    run = ws / name
    args = adapt_args("killdata", name, "--epochs", str(KILL_EPOCHS), *METHODS[method],
                      seed=KILL_SEED)
    with open(ws / f"{name}.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "reclip.cli", *args], cwd=ws, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + TIMEOUT
        try:
            while not (run / "run.json").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
            alive = proc.poll() is None
            if alive:
                os.kill(proc.pid, signal.SIGKILL)
            returncode = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if (run / "run.json").exists():
        shutil.copytree(run, ws / f"{name}_at_kill")
    state = {"alive_at_kill": alive, "returncode": returncode,
             "stderr": (ws / f"{name}.stderr").read_text(),
             "run_json": read_json(run / "run.json") if (run / "run.json").exists() else None,
             "finished_files": sorted(p.name for p in run.glob("*")
                                      if p.name in ("predictions.tsv", "report.json"))}
    resumed = cli(ws, *adapt_args("killdata", name, "--epochs", str(KILL_EPOCHS), "--resume",
                                  *METHODS[method], seed=KILL_SEED))
    return state, resumed


def _kill_reference(ws: Path, method: str = "reclip"):
    return cli(ws, *adapt_args("killdata", run_dir("kill_ref", method), "--epochs",
                               str(KILL_EPOCHS), *METHODS[method], seed=KILL_SEED))


def _ids_chain(ws: Path):
    """adapt on id-named folders with a folder<TAB>class file, then eval on them (the run holds
    the mapping) and on the same images in class-name folders."""
    adapt = cli(ws, *adapt_args("iddata", "run_ids", "--epochs", "2", classes="classes.tsv"))
    return (adapt, cli(ws, "eval", "--run", "run_ids", "--data", "iddata"),
            cli(ws, "eval", "--run", "run_ids", "--data", "data"))


def _zero_epochs_chain(ws: Path):
    adapt = cli(ws, *adapt_args("data", "run_zero", "--epochs", "0"))
    return adapt, cli(ws, "predict", "--run", "run_zero", "--data", "data")


def _skip_bad_chain(ws: Path):
    # k 4: label propagation's graph here has 3 class nodes and 6 readable images
    adapt = cli(ws, *adapt_args("somebad", "run_skip", "--epochs", "1", "--skip-bad-images",
                                "--k", "4"))
    flags = ["--run", "run_skip", "--data", "somebad", "--skip-bad-images"]
    return adapt, cli(ws, "predict", *flags), cli(ws, "eval", *flags)


def _mismatch(ws: Path):
    """--resume into a copy of run_main with the same classes in another order."""
    shutil.copytree(ws / "run_main", ws / "run_mismatch", ignore=shutil.ignore_patterns("*.tsv"))
    before = (ws / "run_mismatch" / "run.json").read_text()
    r = cli(ws, *adapt_args("flat", "run_mismatch", "--epochs", "4", "--resume",
                            classes="reordered.txt"))
    return r, before, (ws / "run_mismatch" / "run.json").read_text()


def _edit_json(path: Path, edit) -> None:
    meta = read_json(path)
    edit(meta)
    path.write_text(json.dumps(meta))


def _bigger_model(meta: dict) -> None:
    meta["model"]["model"]["embed_dim"] *= 2


def _corrupt_tensors(run: Path) -> None:
    tensors = run / read_json(run / "run.json")["tensors"]
    tensors.write_bytes(tensors.read_bytes()[:100])


# run directories a user may hand to predict that do not hold a usable run: case -> how a
# copy of run_main is spoiled (each error line must name the run)
RUN_EDITS = {
    "run-json-not-an-object": lambda run: (run / "run.json").write_text("[1, 2]\n"),
    "run-json-lacks-tensors": lambda run: _edit_json(run / "run.json",
                                                     lambda m: m.pop("tensors")),
    "run-json-lacks-history": lambda run: _edit_json(run / "run.json",
                                                     lambda m: m.pop("history")),
    "run-classnames-not-strings": lambda run: _edit_json(
        run / "run.json", lambda m: m.update(classnames=[1, 2, 3])),
    "run-config-wrong-type": lambda run: _edit_json(
        run / "run.json", lambda m: m["config"].update(k="twenty")),
    "run-of-another-model": lambda run: _edit_json(run / "run.json", _bigger_model),
    "run-model-not-a-model": lambda run: _edit_json(
        run / "run.json", lambda m: m["model"].update(model=5)),
    "run-tensor-file-truncated": _corrupt_tensors,
    "run-folders-not-strings": lambda run: _edit_json(
        run / "run.json", lambda m: m.update(folders=[1, 2, 3])),
    "run-folders-too-few": lambda run: _edit_json(
        run / "run.json", lambda m: m.update(folders=["n0100", "n0200"])),
}


def _spoiled_run(ws: Path, case: str):
    shutil.copytree(ws / "run_main", ws / case, ignore=shutil.ignore_patterns("*.tsv"))
    RUN_EDITS[case](ws / case)
    return cli(ws, "predict", "--run", case, "--data", "data")


def _digits_chain(ws: Path):
    """A user's first workflow with the shipped model on an ImageFolder of real digits."""
    adapt = cli(ws, "adapt", "--model", "reclip-digits", "--data", "digits", "--classes",
                "digit-names.txt", "--out", "run_digits", "--epochs", "1", "--quiet")
    return adapt, cli(ws, "eval", "--run", "run_digits", "--data", "digits")


def _help(ws: Path):
    script = Path(sys.executable).with_name("reclip")  # the console script, when installed
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "reclip.cli"]
    return subprocess.run([*argv, "--help"], cwd=ws, env=ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)


# (id, command, arguments, text the error line must name)
BAD_INPUTS = [
    ("missing-classes-file", "adapt", adapt_args("data", "r_bad", classes="no-such-classes.txt"),
     "no-such-classes.txt"),
    ("empty-classes-file", "adapt", adapt_args("data", "r_bad", classes="empty.txt"), "empty.txt"),
    ("one-class", "adapt", adapt_args("data", "r_bad", classes="one.txt"), None),
    ("empty-image-folder", "adapt", adapt_args("emptydir", "r_bad"), "emptydir"),
    ("missing-image-folder", "adapt", adapt_args("no-such-dir", "r_bad"), "no-such-dir"),
    ("unreadable-image", "adapt", adapt_args("baddata", "r_bad", "--k", "4"), "garbage.png"),
    ("missing-pretrained", "adapt",
     adapt_args("data", "r_bad", "--pretrained", "no-such-weights.safetensors"),
     "no-such-weights.safetensors"),
    ("unknown-model", "adapt",
     ["adapt", "--model", "No-Such-Model-42", "--data", "data", "--classes", "classes.txt",
      "--out", "r_bad", "--quiet"], "No-Such-Model-42"),
    ("run-is-not-a-run", "predict", ["predict", "--run", "notrun", "--data", "data"], "notrun"),
    ("eval-flat-folder", "eval", ["eval", "--run", "run_main", "--data", "flat"], None),
    ("eval-unmapped-folder", "eval", ["eval", "--run", "run_main", "--data", "renamed"],
     "--data: renamed"),
    ("classes-file-mixed-columns", "adapt", adapt_args("data", "r_bad", classes="mixed.tsv"),
     "mixed.tsv: line 2:"),
    # an unknown model / a folder that is no run: the --out error must come first, before any
    # model or run is loaded
    ("unreadable-images-not-skipped", "adapt", adapt_args("somebad", "r_bad", "--k", "4"),
     "empty.png"),
    ("out-is-a-file", "adapt",
     ["adapt", "--model", "No-Such-Model-42", "--data", "data", "--classes", "classes.txt",
      "--out", "notes.txt", "--quiet"], "--out"),
    ("out-below-a-file", "adapt", adapt_args("data", "notes.txt/run"), "--out"),
    ("epochs-negative", "adapt", adapt_args("data", "r_bad", "--epochs", "-1"), "--epochs"),
    ("iterations-zero", "adapt", adapt_args("data", "r_bad", "--iterations", "0"), "--iterations"),
    ("batch-size-zero", "adapt", adapt_args("data", "r_bad", "--batch-size", "0"), "--batch-size"),
    ("batch-size-negative", "adapt", adapt_args("data", "r_bad", "--batch-size", "-3"),
     "--batch-size"),
    # a second run into a finished one: refused before anything loads, so the old run stays
    ("out-holds-a-run", "adapt", adapt_args("data", "run_main"), "--resume"),
    ("predict-out-is-a-folder", "predict",
     ["predict", "--run", "notrun", "--data", "data", "--out", "emptydir"], "--out"),
]
# adapt with a flag of the other method (every one is checked in process by
# test_flags_of_the_other_method_are_refused), or a bad method or learning rate
METHOD_INPUTS = [
    ("shot-with-sides", "adapt", adapt_args("data", "r_bad", "--method", "shot", "--sides",
                                            "visual"), "--sides"),
    ("shot-with-no-label-sharing", "adapt",
     adapt_args("data", "r_bad", "--method", "shot", "--no-label-sharing"), "--no-label-sharing"),
    ("reclip-with-shot-beta", "adapt", adapt_args("data", "r_bad", "--shot-beta", "0.5"),
     "--shot-beta"),
    ("method-unknown", "adapt", adapt_args("data", "r_bad", "--method", "tent"), "--method"),
    ("lr-zero", "adapt", adapt_args("data", "r_bad", "--lr", "0"), "--lr"),
]
# (id, command, arguments, text, method): every case of BAD_INPUTS, and its adapt cases once
# more with --method shot
def _as_shot(argv: list[str]) -> list[str]:
    """`argv` for the SHOT baseline: without --k (the size of ReCLIP's graph, which SHOT has
    not and refuses)."""
    out = list(argv)
    if "--k" in out:
        del out[out.index("--k"):out.index("--k") + 2]
    return [*out, *METHODS["shot"]]


BAD_CASES = [(case, command, argv, mentions, "reclip")
             for case, command, argv, mentions in BAD_INPUTS + METHOD_INPUTS] + [
    (case, command, _as_shot(argv), mentions, "shot")
    for case, command, argv, mentions in BAD_INPUTS if command == "adapt"]

# Every job: key -> (function of the workspace, the job whose run it reads or None). In
# submission order: the longest chains first, a run before anything that reads it.
JOBS = {
    **{job_key(name, method): (lambda ws, fn=fn, method=method: fn(ws, method), None)
       for method in METHODS
       for name, fn in (("kill", _kill_chain), ("main", _main_run),
                        ("kill_ref", _kill_reference), ("resume", _resume_chain))},
    "inductive": (_inductive_chain, None),
    "zero_epochs": (_zero_epochs_chain, None),
    "ids": (_ids_chain, None),
    "renamed": (lambda ws: cli(ws, *adapt_args("renamed", "run_renamed", "--epochs", "2")), None),
    "skip_bad": (_skip_bad_chain, None),
    "visual_only": (lambda ws: cli(ws, *adapt_args("data", "run_visual", "--epochs", "1",
                                                   "--sides", "visual", "--inductive")), None),
    "by_prediction": (lambda ws: cli(ws, *adapt_args("data", "run_prediction", "--epochs", "1",
                                                     "--pseudo-labels", "prediction")), None),
    "lp_flags": (lambda ws: cli(ws, *adapt_args("data", "run_lp_flags", "--epochs", "1",
                                                "--inductive", "--k", "5", "--alpha", "0.9",
                                                "--weight", "relu")), None),
    "predict_stdout": (lambda ws: cli(ws, "predict", "--run", "run_main", "--data", "data"),
                       "main"),
    "predict_file": (lambda ws: cli(ws, "predict", "--run", "run_main", "--data", "data",
                                    "--out", "pred.tsv"), "main"),
    **{job_key("eval", method): (lambda ws, method=method: cli(
        ws, "eval", "--run", run_dir("main", method), "--data", "data"), job_key("main", method))
       for method in METHODS},
    "mismatch": (_mismatch, "main"),
    "preset": (lambda ws: cli(ws, "adapt", "--model", TINY_VIT, "--data", "data", "--preset",
                              "cifar10", "--out", "run_preset", "--epochs", "2", "--quiet"), None),
    # each case writes its own folder: adapt locks its --out, so cases running at once on one
    # folder would refuse each other
    **{bad_key(case, method): ((lambda ws, argv=argv, key=bad_key(case, method): cli(
        ws, *[f"r_bad_{key}" if a == "r_bad" else a for a in argv])),
                               "main" if "run_main" in argv else None)
       for case, _, argv, _, method in BAD_CASES},
    **{case: ((lambda ws, case=case: _spoiled_run(ws, case)), "main") for case in RUN_EDITS},
    "digits": (_digits_chain, None),
    "help": (_help, None),
    "adapt_help": (lambda ws: cli(ws, "adapt", "--help"), None),
    "module_help": (lambda ws: subprocess.run([sys.executable, "-m", "reclip", "--help"], cwd=ws,
                                              env=ENV, capture_output=True, text=True,
                                              timeout=TIMEOUT), None),
}

# test -> the jobs it reads (test_bad_input_is_one_line_error: the job named by its case; a
# test with a `method` parameter: that method's jobs, see job_key)
TEST_JOBS = {
    "test_adapt_writes_run_report_and_predictions": ["main"],
    "test_predict_matches_adapt_and_is_stable": ["predict_stdout", "predict_file"],
    "test_eval_accuracy_uses_folder_names_not_folder_order": ["predict_stdout", "eval"],
    "test_report_calibration_and_peak_epoch": ["main", "eval", "renamed"],
    "test_preset_cifar10": ["preset"],
    "test_inductive_then_predict_other_folder": ["inductive"],
    "test_zero_epochs_saves_the_zero_shot_model": ["zero_epochs"],
    "test_folders_named_by_id": ["ids"],
    "test_unmapped_folders_report_no_accuracy": ["renamed"],
    "test_skip_bad_images": ["skip_bad"],
    "test_visual_side_only_run_is_saved": ["visual_only"],
    "test_pseudo_labels_from_predictions_are_recorded": ["by_prediction", "main"],
    "test_label_propagation_flags_are_used_and_recorded": ["lp_flags", "main"],
    "test_resume_equals_uninterrupted": ["main", "resume"],
    "test_sigkill_mid_run_then_resume_equals_uninterrupted": ["kill", "kill_ref"],
    "test_resume_with_other_class_list_is_refused": ["mismatch"],
    "test_resume_with_the_other_method_is_refused": ["main_shot"],
    "test_out_naming_a_file_leaves_it_alone": ["out-is-a-file"],
    "test_help": ["help", "adapt_help", "module_help"],
    "test_shipped_digits_model_on_a_digit_folder": ["digits"],
}


class Jobs:
    """The CLI commands of the selected tests, running concurrently (one subprocess per worker)."""

    def __init__(self, ws: Path, wanted: set[str]):
        self.ws = ws
        self.pool = ThreadPoolExecutor(max_workers=3)
        self.futures = {}
        wanted = wanted | {JOBS[k][1] for k in wanted if JOBS[k][1]}
        for key, (fn, reads) in JOBS.items():  # dict order = submission order
            if key in wanted:
                self.futures[key] = (self.pool.submit(self._after, reads, ws, fn) if reads
                                     else self.pool.submit(fn, ws))

    def _after(self, reads: str, ws: Path, fn):
        # the run a job reads was submitted before it, so it is running or done when this
        # starts: waiting for it cannot deadlock the pool.
        self.futures[reads].result()
        return fn(ws)

    def result(self, key):
        return self.futures[key].result(timeout=4 * TIMEOUT)


def _make_workspace(ws: Path) -> None:
    write_images(ws / "data", CLASS_COUNTS)
    write_images(ws / "killdata", KILL_COUNTS, size=KILL_SIZE, seed=1)
    write_images(ws / "other", None, n_flat=5, seed=2)
    write_images(ws / "flat", None, n_flat=4, seed=3)
    write_images(ws / "iddata", {ID_FOLDERS[c]: n for c, n in CLASS_COUNTS.items()})
    write_images(ws / "renamed", RENAMED_COUNTS)
    write_images(ws / "baddata", {"cat": 3, "dog": 3}, seed=4)
    (ws / "baddata" / "dog" / "garbage.png").write_bytes(b"this is not a PNG file\n" * 8)
    write_images(ws / "somebad", {"cat": 3, "dog": 3}, seed=6)
    (ws / "somebad" / "cat" / "empty.png").write_bytes(b"")
    jpeg = ws / "somebad" / "dog" / "truncated.jpg"
    PIL.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[:300])
    (ws / "somebad" / "dog" / "notes.jpg").write_text("not a JPEG\n")
    (ws / "emptydir").mkdir()
    (ws / "notrun").mkdir()
    (ws / "notrun" / "readme.txt").write_text("not a run\n")
    (ws / "notes.txt").write_text(NOTES)
    (ws / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))
    (ws / "classes.tsv").write_text("".join(f"{ID_FOLDERS[c]}\t{c}\n" for c in CLASSES))
    (ws / "mixed.tsv").write_text("n0200\tship\ncat\nn0100\tdog\n")
    (ws / "reordered.txt").write_text("".join(c + "\n" for c in sorted(CLASSES)))
    (ws / "empty.txt").write_text("")
    (ws / "one.txt").write_text("cat\n")
    write_digits(ws / "digits", DIGITS_PER_CLASS)
    (ws / "digit-names.txt").write_text("".join(c + "\n" for c in DIGIT_NAMES))


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    """Starts, at once, the jobs of every selected test of this module."""
    wanted = set()
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            callspec = getattr(item, "callspec", None)
            params = callspec.params if callspec else {}
            method = params.get("method", "reclip")
            if "case" in params:
                wanted.add(bad_key(params["case"], method) if "command" in params
                           else params["case"])
            else:
                wanted.update(job_key(k, method) for k in TEST_JOBS.get(item.originalname, []))
    ws = tmp_path_factory.mktemp("cli")
    _make_workspace(ws)
    j = Jobs(ws, wanted)
    yield j
    j.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------- 1. adapt


@pytest.mark.parametrize("method", METHODS)
def test_adapt_writes_run_report_and_predictions(jobs, method):
    ws = jobs.ws
    r = ok(jobs.result(job_key("main", method)))
    run = ws / run_dir("main", method)
    meta = read_json(run / "run.json")
    assert meta["classnames"] == CLASSES
    assert meta["epoch"] == 3 and meta["config"]["method"] == method

    report = read_json(run / "report.json")
    accuracy = f"{method}_accuracy"  # reclip_accuracy or shot_accuracy
    assert {"zero_shot_accuracy", accuracy, "history"} <= report.keys()
    assert report["method"] == method and not {"reclip_accuracy", "shot_accuracy"} - {accuracy} \
        & report.keys()
    assert report["learning_rate"] == (1e-3 if method == "reclip" else float(SHOT_LR))
    assert len(report["history"]) == 3
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]
    fractions = [report["zero_shot_accuracy"], report[accuracy]]
    for h in report["history"]:
        fractions.append(h["agreement"])
        fractions.extend(h["accuracy"].values())
    assert all(isinstance(f, float) and 0.0 <= f <= 1.0 for f in fractions), fractions
    # the fixture really trains (otherwise the resume tests below would prove nothing)
    if method == "reclip":
        assert any((h["loss_text"] or 0) > 0 for h in report["history"]), report["history"]
    else:  # SHOT trains only the visual side; its loss can be negative (the diversity term)
        assert all(h["loss_text"] is None and h["loss_visual"] != 0 for h in report["history"])
        assert all({"pseudo_shot", "combined"} == h["accuracy"].keys() for h in report["history"])

    # the stages' clocks count what the epochs did: every image trained on, whole passes encoded
    stages, n = report["stages"], sum(CLASS_COUNTS.values())
    assert stages["train_images"] == sum(h["trained"] for h in report["history"]) > 0
    assert stages["encode_images"] % n == 0 and stages["encode_images"] >= 3 * n
    assert all(stages[k] > 0 for k in ("encode_seconds", "train_seconds"))
    # each of ReCLIP's sides times its own steps, one per iteration (SHOT has neither)
    sides = ("text", "visual") if method == "reclip" else ()
    for side in ("text", "visual"):
        steps, seconds = stages[f"{side}_steps"], stages[f"{side}_step_seconds"]
        assert (steps, seconds > 0) == ((report["iterations"], True) if side in sides
                                        else (0, False))
    if sides:
        assert stages["text_step_seconds"] + stages["visual_step_seconds"] <= stages["train_seconds"]

    rows = parse_predictions((run / "predictions.tsv").read_text())
    assert [p for p, _ in rows] == expected_paths("data", CLASS_COUNTS)
    assert {name for _, name in rows} <= set(CLASSES)
    assert report[accuracy] == pytest.approx(accuracy_of(rows))

    epoch_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in epoch_lines] == ["epoch 1", "epoch 2", "epoch 3"], r.stderr
    assert all("agreement" in ln for ln in epoch_lines)


# ----------------------------------------------------------------------------------- 2. predict


def test_predict_matches_adapt_and_is_stable(jobs):
    ws = jobs.ws
    ok(jobs.result("main"))
    stdout = ok(jobs.result("predict_stdout")).stdout
    to_file = ok(jobs.result("predict_file"))
    assert to_file.stdout == ""
    written = (ws / "pred.tsv").read_text()
    rows = parse_predictions(stdout)
    assert [p for p, _ in rows] == expected_paths("data", CLASS_COUNTS)  # one line each, sorted
    assert written == stdout  # two invocations agree
    assert stdout == (ws / "run_main" / "predictions.tsv").read_text()  # transductive = predict


# ----------------------------------------------------------------------------------- 3. eval


def test_eval_accuracy_uses_folder_names_not_folder_order(jobs):
    ok(jobs.result("main"))
    rows = parse_predictions(ok(jobs.result("predict_stdout")).stdout)
    out = ok(jobs.result("eval")).stdout
    reported, _, images = parse_eval(out)
    expected = accuracy_of(rows)
    assert reported == pytest.approx(expected, abs=5e-5), (out, expected)
    assert images == len(rows), out
    # The classes file is not in sorted order and the class sizes differ, so mapping folder
    # i to classes[i] would give another accuracy: the comparison above can tell them apart.
    sorted_folders = sorted(CLASS_COUNTS)
    wrong = float(np.mean([CLASSES[sorted_folders.index(Path(p).parent.name)] == name
                           for p, name in rows]))
    assert abs(wrong - expected) > 1e-3, "fixture cannot distinguish the folder mapping"


@pytest.mark.parametrize("method", METHODS)
def test_report_calibration_and_peak_epoch(jobs, method):
    """With labels, report.json holds both ECEs and the oracle peak of the per-epoch combined
    accuracies and the final one; eval's ECE on the adaptation images is the report's."""
    ok(jobs.result(job_key("main", method)))
    report = read_json(jobs.ws / run_dir("main", method) / "report.json")
    for key in ("zero_shot_ece", f"{method}_ece"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0, report[key]
    final = report["final_accuracy"]
    assert final == report[f"{method}_accuracy"]
    # epoch 0 is the zero-shot model; the lines "epoch 1..3" score the models after 1, 2, 3
    # epochs, the last of which is the final model
    scored = [report["zero_shot_accuracy"]] + [h["accuracy"]["combined"]
                                                for h in report["history"]]
    assert len(scored) == 4 and scored[-1] == final
    assert report["peak_accuracy"] == max(scored) >= final
    assert report["peak_epoch"] == scored.index(max(scored))  # the first of equal ones
    assert report["peak_uses_labels"] is True
    assert isinstance(report["note"], str) and "oracle" in report["note"]
    assert "\n" not in report["note"]

    accuracy, ece, _ = parse_eval(ok(jobs.result(job_key("eval", method))).stdout)
    assert accuracy == pytest.approx(final, abs=5e-5)
    assert ece == pytest.approx(report[f"{method}_ece"], abs=5e-5)
    if method == "shot":
        return

    # folders that are not all classes: no labels, so no ECE and no peak
    renamed = read_json(jobs.ws / "run_renamed" / "report.json")
    assert not {"zero_shot_ece", "reclip_ece", *PEAK_KEYS} & renamed.keys(), renamed.keys()


def test_folders_named_by_id(jobs):
    """Folders named by an id, mapped by a folder<TAB>class file: zero-shot, per-epoch and final
    accuracies use the mapping, the run keeps it, and eval needs no file."""
    ws = jobs.ws
    adapt, eval_ids, eval_names = jobs.result("ids")
    ok(adapt)
    meta = read_json(ws / "run_ids" / "run.json")
    assert meta["classnames"] == CLASSES and meta["folders"] == [ID_FOLDERS[c] for c in CLASSES]
    rows = parse_predictions((ws / "run_ids" / "predictions.tsv").read_text())
    assert [p for p, _ in rows] == expected_paths("iddata", {ID_FOLDERS[c]: n
                                                             for c, n in CLASS_COUNTS.items()})
    class_of = {i: c for c, i in ID_FOLDERS.items()}
    expected = float(np.mean([class_of[Path(p).parent.name] == name for p, name in rows]))
    # folder index i taken as class i would give another number: the check can tell them apart
    ids = sorted(ID_FOLDERS.values())
    wrong = float(np.mean([CLASSES[ids.index(Path(p).parent.name)] == name for p, name in rows]))
    assert abs(wrong - expected) > 1e-3, "fixture cannot distinguish the folder mapping"

    report = read_json(ws / "run_ids" / "report.json")
    assert report["reclip_accuracy"] == pytest.approx(expected)
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0
    assert len(report["history"]) == 2
    for h in report["history"]:
        assert {"pseudo_text", "pseudo_visual", "combined"} <= h["accuracy"].keys(), h
    epoch_lines = [ln for ln in adapt.stderr.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("combined" in ln for ln in epoch_lines), adapt.stderr
    assert "zero-shot accuracy" in adapt.stderr and "reclip: accuracy" in adapt.stderr

    by_ids = parse_eval(ok(eval_ids).stdout)
    assert by_ids[0] == pytest.approx(expected, abs=5e-5) and by_ids[2] == len(rows)
    assert by_ids[1] == pytest.approx(report["reclip_ece"], abs=5e-5)
    # class-name folders of the same images: the same scores
    assert ok(eval_names).stdout == ok(eval_ids).stdout


def test_unmapped_folders_report_no_accuracy(jobs):
    """One folder that is no class (nor an id): nothing can be scored, so no accuracy is
    reported anywhere, rather than one computed from the sorted folder indices."""
    ws = jobs.ws
    adapt = ok(jobs.result("renamed"))
    # the one line that says why (see test_misspelt_folders_are_named) is the only one that
    # mentions accuracy
    said = [ln for ln in adapt.stderr.splitlines() if "accuracy" in ln]
    assert len(said) == 1 and "warning" in said[0] and "'hound'" in said[0], adapt.stderr
    epoch_lines = [ln for ln in adapt.stderr.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all("agreement" in ln for ln in epoch_lines), adapt.stderr
    assert not any(key in adapt.stderr for key in ("pseudo_text", "pseudo_visual", "combined"))
    # without accuracies the run still ends with a summary, and no line ends in spaces
    last = adapt.stderr.splitlines()[-1]
    assert last.startswith("reclip: 2 epochs (") and "run_renamed" in last, adapt.stderr
    assert all(ln == ln.rstrip() for ln in adapt.stderr.splitlines()), adapt.stderr
    report = read_json(ws / "run_renamed" / "report.json")
    assert report["zero_shot_accuracy"] is None and report["reclip_accuracy"] is None
    assert len(report["history"]) == 2 and all(h["accuracy"] == {} for h in report["history"])
    assert all(h["accuracy"] == {} for h in read_json(ws / "run_renamed" / "run.json")["history"])
    assert "folders" not in read_json(ws / "run_renamed" / "run.json")


def test_misspelt_folders_are_named(tmp_path, capsys):
    """A folder that is no class is named, with the class it probably meant: adapt says in one
    warning line, before any model loads, that no accuracy can be reported because of it; eval
    refuses the folder with the same names."""
    from reclip import cli as reclip_cli

    write_images(tmp_path / "good", CLASS_COUNTS)
    write_images(tmp_path / "typo", {"cat": 7, "Dog": 7, "shp": 7})
    (tmp_path / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))
    classes = str(tmp_path / "classes.txt")
    run = str(tmp_path / "run")
    assert reclip_cli.main(adapt_args(str(tmp_path / "good"), run, "--epochs", "0",
                                      classes=classes)) == 0
    err = capsys.readouterr().err
    assert "warning" not in err and "zero-shot accuracy" in err, err

    assert reclip_cli.main(adapt_args(str(tmp_path / "typo"), str(tmp_path / "run2"), "--epochs",
                                      "0", classes=classes)) == 0
    err = capsys.readouterr().err.splitlines()
    warnings = [ln for ln in err if "warning" in ln]
    assert warnings == [f"reclip: warning: --data {tmp_path / 'typo'}: 2 of its 3 folders match no "
                        "class: 'Dog' (did you mean 'dog'?), 'shp' (did you mean 'ship'?); so no "
                        "accuracy is reported"], err
    assert err.index(warnings[0]) == 0  # said first, before the run's own lines
    assert not any("accuracy" in ln for ln in err[1:]), err

    assert reclip_cli.main(["eval", "--run", run, "--data", str(tmp_path / "typo")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"reclip eval: error: --data: {tmp_path / 'typo'} "), err
    assert err[0].endswith("2 of its 3 folders match no class: 'Dog' (did you mean 'dog'?), "
                           "'shp' (did you mean 'ship'?)"), err


def test_large_images_and_many_workers_say_one_line_each(tmp_path, capsys):
    """--max-image-pixels: above it an image is refused in one line naming the file and the
    flag; above half of it the first pass warns in one line naming the file; 0 lifts it.
    --workers beyond the usable cores is capped with one warning line, and torch's own
    paragraph about too many workers never comes."""
    import warnings

    from reclip import cli as reclip_cli

    write_images(tmp_path / "data", CLASS_COUNTS)  # 32 x 32 = 1024 pixels each
    PIL.new("RGB", (40, 40)).save(tmp_path / "data" / "cat" / "large.png")
    PIL.new("RGB", (60, 60)).save(tmp_path / "data" / "ship" / "huge.png")
    (tmp_path / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))

    def adapt(out, *flags):
        return reclip_cli.main(adapt_args(str(tmp_path / "data"), str(tmp_path / out), "--epochs",
                                          "0", *flags, classes=str(tmp_path / "classes.txt")))

    assert adapt("r1", "--max-image-pixels", "3000", "--workers", "0") == 2
    large, huge = tmp_path / "data" / "cat" / "large.png", tmp_path / "data" / "ship" / "huge.png"
    assert capsys.readouterr().err.splitlines() == [
        f"reclip: warning: {large}: a large image (40x40 = 1600 pixels), slow to decode; images "
        "above 3000 pixels are refused (--max-image-pixels)",
        f"reclip adapt: error: {huge}: cannot read image: 60x60 = 3600 pixels, more than the "
        "limit of 3000 pixels (raise it with --max-image-pixels, 0 for no limit)"]

    cores = len(os.sched_getaffinity(0))
    with warnings.catch_warnings(record=True) as caught:  # what reaches Python's own display
        warnings.simplefilter("always")
        assert adapt("r2", "--max-image-pixels", "0", "--workers", "1000") == 0
    err = capsys.readouterr().err.splitlines()
    assert [ln for ln in err if "warning" in ln] == [
        f"reclip: warning: --workers: 1000 is more than the usable cores ({cores}); using {cores}"]
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def test_class_lists_carry_the_folders(tmp_path):
    """--preset imagenet and a folder<TAB>class file give the folder of each class; class-name
    lists give none."""
    from argparse import Namespace

    from reclip.cli import _class_lists

    def lists(**kw):
        return _class_lists(Namespace(**{"preset": None, "classes": None, "templates": None, **kw}))

    names, templates, folders = lists(preset="imagenet")
    assert len(names) == len(folders) == 1000 and len(templates) > 1
    assert (names[0], folders[0]) == ("tench", "n01440764")
    assert lists(preset="cifar10")[2] is None
    tsv = tmp_path / "c.tsv"
    tsv.write_text("n2\tship\nn3\tcat\n")
    assert lists(classes=str(tsv)) == (["ship", "cat"], None, ["n2", "n3"])
    txt = tmp_path / "c.txt"
    txt.write_text("ship\ncat\n")
    assert lists(classes=str(txt)) == (["ship", "cat"], None, None)


# ----------------------------------------------------------------------------------- 4. preset


def test_preset_cifar10(jobs):
    ws = jobs.ws
    ok(jobs.result("preset"))
    meta = read_json(ws / "run_preset" / "run.json")
    assert meta["classnames"] == CIFAR10
    assert len(meta["templates"]) > 1
    rows = parse_predictions((ws / "run_preset" / "predictions.tsv").read_text())
    assert [p for p, _ in rows] == expected_paths("data", CLASS_COUNTS)
    assert {name for _, name in rows} <= set(CIFAR10)
    report = read_json(ws / "run_preset" / "report.json")
    assert len(report["history"]) == 2
    # every folder (cat, dog, ship) is a CIFAR-10 class, so the accuracy is known, and it is
    # that of the written predictions under the folder-name -> preset-class mapping
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0
    assert report["reclip_accuracy"] == pytest.approx(accuracy_of(rows))


# ----------------------------------------------------------------------------------- 5. inductive


def test_inductive_then_predict_other_folder(jobs):
    ws = jobs.ws
    adapt, predict = jobs.result("inductive")
    ok(adapt)
    run = ws / "run_inductive"
    assert (run / "run.json").is_file()
    assert not (run / "predictions.tsv").exists()
    report = read_json(run / "report.json")
    assert "reclip_accuracy" not in report
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0
    assert 0.0 <= report["zero_shot_ece"] <= 1.0
    # no final model was scored, so there is nothing to compare a peak with
    assert "reclip_ece" not in report and not set(PEAK_KEYS) & report.keys()
    assert len(report["history"]) == 2
    rows = parse_predictions(ok(predict).stdout)
    assert [p for p, _ in rows] == [os.path.join("other", f"img{i:03d}.png") for i in range(5)]
    assert {name for _, name in rows} <= set(CLASSES)


def test_zero_epochs_saves_the_zero_shot_model(jobs):
    """--epochs 0: a complete run of the unadapted model, which predict can load."""
    ws = jobs.ws
    adapt, predict = jobs.result("zero_epochs")
    ok(adapt)
    assert not [ln for ln in adapt.stderr.splitlines() if ln.startswith("epoch ")], adapt.stderr
    run = ws / "run_zero"
    assert read_json(run / "run.json")["epoch"] == 0
    report = read_json(run / "report.json")
    assert report["epochs"] == 0 and report["iterations"] == 0 and report["history"] == []
    # before any training both sides score with the original class embeddings: zero-shot CLIP
    assert report["reclip_accuracy"] == report["zero_shot_accuracy"]
    assert report["reclip_ece"] == pytest.approx(report["zero_shot_ece"], abs=1e-6)
    assert (report["peak_accuracy"], report["peak_epoch"]) == (report["final_accuracy"], 0)
    written = (run / "predictions.tsv").read_text()
    rows = parse_predictions(written)
    assert [p for p, _ in rows] == expected_paths("data", CLASS_COUNTS)
    assert report["reclip_accuracy"] == pytest.approx(accuracy_of(rows))
    assert ok(predict).stdout == written


def test_visual_side_only_run_is_saved(jobs):
    """ReCLIP-V never rebuilds the T side's projection: the saved run must still be writable."""
    ok(jobs.result("visual_only"))
    meta = read_json(jobs.ws / "run_visual" / "run.json")
    assert meta["epoch"] == 1 and meta["config"]["sides"] == "visual"


def test_pseudo_labels_from_predictions_are_recorded(jobs):
    """--pseudo-labels picks the labels' source whatever the class count (auto would propagate
    for 3 classes), and the run and its report say which one trained it."""
    ok(jobs.result("by_prediction"))
    meta = read_json(jobs.ws / "run_prediction" / "run.json")
    report = read_json(jobs.ws / "run_prediction" / "report.json")
    assert meta["config"]["pseudo_labels"] == report["config"]["pseudo_labels"] == "prediction"
    assert read_json(jobs.ws / "run_main" / "run.json")["config"]["pseudo_labels"] == "auto"


def test_label_propagation_flags_are_used_and_recorded(jobs):
    """--k, --alpha and --weight reach the run's Config and run.json; without them the run has
    the engine's defaults (reclip_ext.DEFAULTS)."""
    import reclip_ext

    ok(jobs.result("lp_flags"))
    config = read_json(jobs.ws / "run_lp_flags" / "run.json")["config"]
    assert (config["k"], config["alpha"], config["weight"]) == (5, 0.9, "relu")
    default = read_json(jobs.ws / "run_main" / "run.json")["config"]
    lp = reclip_ext.DEFAULTS
    assert (default["k"], default["alpha"], default["weight"]) == (lp.k, lp.alpha, lp.weight)


def test_k_too_large_for_the_graph_is_refused(jobs, capsys):
    """A k the graph cannot hold is a one-line error naming --k and the largest k that fits,
    before any model is built; it is never clamped silently."""
    from reclip import cli as reclip_cli

    data = jobs.ws / "data"
    images = sum(1 for p in data.rglob("*") if p.is_file())
    argv = adapt_args(str(data), str(jobs.ws / "run_k_too_large"), "--k", "100000",
                      classes=str(jobs.ws / "classes.txt"))
    assert reclip_cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("reclip adapt: error: k: "), err
    assert f"at most {3 + images - 1}" in err[0]
    assert not (jobs.ws / "run_k_too_large" / "run.json").exists()


def test_skip_bad_images(jobs):
    """--skip-bad-images: the broken files (empty PNG, truncated JPEG, text named .jpg) are left
    out with one warning line, listed in report.json, and absent from the predictions."""
    ws = jobs.ws
    adapt, predict, evaluated = jobs.result("skip_bad")
    broken = [os.path.join("somebad", *name.split("/")) for name in SOMEBAD_BROKEN]
    for r in (adapt, predict, evaluated):
        warnings = [ln for ln in ok(r).stderr.splitlines() if "skipped" in ln]
        assert len(warnings) == 1 and "warning: skipped 3 unreadable images" in warnings[0], r.stderr
        assert broken[0] in warnings[0]
    report = read_json(ws / "run_skip" / "report.json")
    assert report["skipped_images"] == {"count": 3, "paths": broken}
    assert report["images"] == 6
    written = (ws / "run_skip" / "predictions.tsv").read_text()
    assert [p for p, _ in parse_predictions(written)] == expected_paths("somebad",
                                                                        {"cat": 3, "dog": 3})
    assert predict.stdout == written
    assert parse_eval(evaluated.stdout)[2] == 6, evaluated.stdout


# ----------------------------------------------------------------------------------- 6. resume


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(jobs, method):
    ws = jobs.ws
    ok(jobs.result(job_key("main", method)))
    first, after_first, second = jobs.result(job_key("resume", method))
    ok(first)
    ok(second)
    assert after_first["run"]["epoch"] == 1
    main_run, resume_run = ws / run_dir("main", method), ws / run_dir("resume", method)
    reference = (main_run / "predictions.tsv").read_text()
    # after one epoch the predictions still differ, so equality below is earned by resuming
    assert after_first["predictions"] != reference, "fixture: epoch 1 already equals epoch 3"
    assert (resume_run / "predictions.tsv").read_text() == reference
    assert read_json(resume_run / "run.json")["epoch"] == 3
    report = read_json(resume_run / "report.json")
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]
    main = read_json(main_run / "report.json")
    assert report["history"] == main["history"]
    # the peak ranges over the whole run, the epochs before the resume included
    assert {k: report[k] for k in PEAK_KEYS} == {k: main[k] for k in PEAK_KEYS}
    assert [ln.split(":")[0] for ln in second.stderr.splitlines() if ln.startswith("epoch ")] \
        == ["epoch 2", "epoch 3"], second.stderr


# ----------------------------------------------------------------------------------- 7. SIGKILL


def _visual_tensors(run: Path) -> dict[str, np.ndarray]:
    """The trained visual tensors of a run (safetensors' numpy reader: no torch here)."""
    from safetensors.numpy import load_file

    tensors = load_file(run / read_json(run / "run.json")["tensors"])
    return {k: v for k, v in tensors.items() if k.startswith("visual.")}


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_mid_run_then_resume_equals_uninterrupted(jobs, method):
    ws = jobs.ws
    state, resumed = jobs.result(job_key("kill", method))
    reference = ok(jobs.result(job_key("kill_ref", method)))
    killed, ref = ws / run_dir("killed", method), ws / run_dir("kill_ref", method)
    assert state["alive_at_kill"], f"run ended before it could be killed:\n{state['stderr']}"
    assert state["returncode"] == -signal.SIGKILL
    assert state["run_json"] is not None, "killed before the first checkpoint"
    assert 1 <= state["run_json"]["epoch"] < KILL_EPOCHS, state["run_json"]["epoch"]
    assert state["finished_files"] == []  # it never got to the end
    ok(resumed)
    assert read_json(killed / "run.json")["epoch"] == KILL_EPOCHS
    ref_report = read_json(ref / "report.json")
    loss = "loss_text" if method == "reclip" else "loss_visual"
    assert any(abs(h[loss] or 0) > 0 for h in ref_report["history"])
    assert len(ref_report["history"]) == KILL_EPOCHS
    got = (killed / "predictions.tsv").read_text()
    want = (ref / "predictions.tsv").read_text()
    assert len(want.splitlines()) == sum(KILL_COUNTS.values())
    assert got == want
    assert read_json(killed / "report.json")["history"] == ref_report["history"]
    # the trained weights: moved after the checkpoint the kill left, equal to the reference's
    at_kill, final = _visual_tensors(Path(f"{killed}_at_kill")), _visual_tensors(killed)
    assert final.keys() == at_kill.keys() == _visual_tensors(ref).keys()
    assert any(not np.array_equal(at_kill[k], final[k]) for k in final)
    assert all(np.array_equal(v, _visual_tensors(ref)[k]) for k, v in final.items())
    assert reference.returncode == 0


# ----------------------------------------------------------------------------------- 8. bad inputs


def _assert_one_line_error(r: subprocess.CompletedProcess, command: str, mentions: str | None):
    assert r.returncode == 2, f"exit {r.returncode}\nstderr:\n{r.stderr}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith(f"reclip {command}: error: "), lines[0]
    if mentions is not None:
        assert mentions in lines[0], lines[0]


@pytest.mark.parametrize("case,command,argv,mentions,method", BAD_CASES,
                         ids=[bad_key(c[0], c[4]) for c in BAD_CASES])
def test_bad_input_is_one_line_error(jobs, case, command, argv, mentions, method):
    _assert_one_line_error(jobs.result(bad_key(case, method)), command, mentions)
    assert not (jobs.ws / f"r_bad_{bad_key(case, method)}" / "run.json").exists()


def test_flags_of_the_other_method_are_refused(capsys, tmp_path):
    """Each flag of one method, given with the other, is a one-line error naming it, before
    anything is read or loaded (the classes file does not even exist)."""
    from reclip import arguments
    from reclip import cli as reclip_cli

    values = {"--projection": ["P1"], "--sides": ["visual"], "--no-label-sharing": [],
              "--visual-loss": ["mean"], "--lp-precision": ["exact"], "--shot-beta": ["0.5"],
              "--shot-params": ["norms"], "--pseudo-labels": ["prediction"], "--k": ["5"],
              "--alpha": ["0.9"], "--weight": ["relu"]}
    assert values.keys() == arguments.METHOD_FLAGS.keys()
    for flag, (_, method) in arguments.METHOD_FLAGS.items():
        other = "shot" if method == "reclip" else "reclip"
        argv = ["adapt", "--model", TINY_VIT, "--data", str(tmp_path), "--classes", "none.txt",
                "--out", str(tmp_path / "run"), "--method", other, flag, *values[flag]]
        assert reclip_cli.main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"reclip adapt: error: {flag}: "), err


@pytest.mark.parametrize("case", RUN_EDITS)
def test_spoiled_run_is_one_line_error(jobs, case):
    _assert_one_line_error(jobs.result(case), "predict", case)


def test_internal_type_or_key_error_shows_its_traceback(monkeypatch, tmp_path):
    """TypeError and KeyError inside reclip are bugs: main() must not turn them into a one-line
    user error (a ValueError from the same place is one, the control)."""
    from reclip import cli as reclip_cli
    from reclip import prompts

    argv = ["adapt", "--model", TINY_VIT, "--data", str(tmp_path), "--classes", "c.txt",
            "--out", str(tmp_path / "run"), "--quiet"]
    for error in (TypeError("a bug"), KeyError("a bug")):
        def raise_(path, error=error):
            raise error
        monkeypatch.setattr(prompts, "read_classes", raise_)
        with pytest.raises(type(error), match="a bug"):
            reclip_cli.main(argv)

    def user_error(path):
        raise ValueError(f"{path}: no class names")
    monkeypatch.setattr(prompts, "read_classes", user_error)
    assert reclip_cli.main(argv) == 2


def test_out_naming_a_file_leaves_it_alone(jobs):
    _assert_one_line_error(jobs.result("out-is-a-file"), "adapt", "notes.txt")
    assert (jobs.ws / "notes.txt").read_text() == NOTES


def test_resume_with_the_other_method_is_refused(jobs, capsys):
    """--resume of a SHOT run without --method shot: one line naming the run and the method,
    before any model loads, and the run is left alone."""
    from reclip import cli as reclip_cli

    ok(jobs.result("main_shot"))
    run = jobs.ws / "run_method_mismatch"
    shutil.copytree(jobs.ws / run_dir("main", "shot"), run)
    before = (run / "run.json").read_text()
    argv = adapt_args(str(jobs.ws / "data"), str(run), "--epochs", "4", "--resume",
                      classes=str(jobs.ws / "classes.txt"))
    assert reclip_cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(run) in err[0] and "--method shot" in err[0], err
    assert (run / "run.json").read_text() == before


def test_resume_with_other_class_list_is_refused(jobs):
    ok(jobs.result("main"))
    r, before, after = jobs.result("mismatch")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert after == before  # the checkpoint is left alone
    _assert_one_line_error(r, "adapt", "run_mismatch")


# ----------------------------------------------------------------------------------- 9. help


def test_help(jobs):
    top = jobs.result("help")
    assert top.returncode == 0, top.stderr
    assert "usage:" in top.stdout and all(c in top.stdout for c in ("adapt", "predict", "eval"))
    assert jobs.result("module_help").stdout == top.stdout  # python -m reclip: the same CLI
    sub = jobs.result("adapt_help")
    assert sub.returncode == 0, sub.stderr
    assert all(opt in sub.stdout for opt in ("--model", "--data", "--classes", "--out",
                                            "--resume", "--inductive", "--preset"))


def _usage_error(capsys, argv: list[str]) -> str:
    """The one stderr line of a usage error of main(argv) (argparse exits with status 2)."""
    from reclip import cli as reclip_cli

    with pytest.raises(SystemExit) as stop:
        reclip_cli.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_flag_is_named_by_its_sub_command(capsys, tmp_path):
    """An unknown flag of a sub-command is reported by that sub-command, with its own help."""
    argv = adapt_args(str(tmp_path), str(tmp_path / "run"), "--epohcs", "1")
    assert _usage_error(capsys, argv) == ("reclip adapt: error: unrecognized arguments: --epohcs 1 "
                                          "(see reclip adapt --help)")
    line = _usage_error(capsys, ["eval", "--run", "r", "--data", "d", "--bogus"])
    assert line == "reclip eval: error: unrecognized arguments: --bogus (see reclip eval --help)"


@pytest.mark.parametrize("command,prefix", [("adapt", "--epoch"), ("adapt", "--worker"),
                                            ("adapt", "--pretrain"), ("predict", "--worker"),
                                            ("demo", "--iter")])
def test_abbreviated_flags_are_refused(capsys, tmp_path, command, prefix):
    """A prefix of a flag is no flag: argparse's abbreviations are off in every sub-command."""
    argv = {"adapt": adapt_args(str(tmp_path), str(tmp_path / "run")),
            "predict": ["predict", "--run", "r", "--data", "d"], "demo": ["demo"]}[command]
    line = _usage_error(capsys, [*argv, prefix, "1"])
    assert line.startswith(f"reclip {command}: error: unrecognized arguments: {prefix} 1"), line
    assert not (tmp_path / "run").exists()


def test_version(capsys):
    import reclip
    from reclip import cli as reclip_cli

    with pytest.raises(SystemExit) as stop:
        reclip_cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"reclip {reclip.__version__}\n"


# ----------------------------------------------------------------------------------- 8. digits


def test_shipped_digits_model_on_a_digit_folder(jobs):
    """`reclip adapt --model reclip-digits` then `reclip eval` on real digit images 0-9."""
    adapt, evaluated = jobs.result("digits")
    ok(adapt)
    report = read_json(jobs.ws / "run_digits" / "report.json")
    # The shipped model recognises these digits far above chance (0.1) before adapting.
    assert 0.3 < report["zero_shot_accuracy"] <= 1.0, report["zero_shot_accuracy"]
    rows = parse_predictions((jobs.ws / "run_digits" / "predictions.tsv").read_text())
    assert len(rows) == 10 * DIGITS_PER_CLASS
    assert report["reclip_accuracy"] == pytest.approx(accuracy_of(rows))
    accuracy, ece, images = parse_eval(ok(evaluated).stdout)
    assert accuracy == pytest.approx(accuracy_of(rows), abs=5e-5) and images == len(rows)
    assert ece == pytest.approx(report["reclip_ece"], abs=5e-5)
