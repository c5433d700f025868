"""The ``reclip`` command: adapt a CLIP model to a folder of images, then predict or evaluate.

    reclip demo    [--out DIR]                             # the embedded default, offline
    reclip adapt   --model NAME|CONFIG.json [--pretrained PATH] --data DIR
                   (--classes FILE [--templates FILE] | --preset NAME) --out RUN [--resume]
                   [--method reclip|shot] [--lr LR] ...
    reclip predict --run RUN --data DIR [--out FILE]      # path<TAB>class per image
    reclip eval    --run RUN --data DIR                   # ImageFolder labels -> accuracy

--model is also a model folder (transformers or open_clip, a hub-cache snapshot or entry) or
ORG/NAME in the local HuggingFace cache. A run records its base model (the path given, the
format, the sha256 of the weights); predict and eval reload it from there, or from a new place
given with --model / --pretrained, which must hold the same weights.

Class folders are named by the class, or by an id that --classes (lines folder<TAB>class
name) or --preset (ImageNet's WordNet ids) maps to a class; the run keeps that mapping for eval.
A layout that neither names gets no accuracy at all.

adapt --method shot runs the SHOT baseline instead of ReCLIP (reclip.adapt): the flags of one
method (--projection, --sides, --no-label-sharing, --visual-loss, --lp-precision for ReCLIP;
--shot-beta, --shot-params for SHOT) are refused with the other. --lr overrides the method's
paper learning rate. report.json names the method ("method") and keys the final model's scores
by it: reclip_accuracy / reclip_ece, or shot_accuracy / shot_ece; final_accuracy and the peak
keys below are the same for both.

With known labels, adapt's report.json also holds the expected calibration error (15 bins) of
the zero-shot and the final softmax (zero_shot_ece, reclip_ece), and, unless --inductive,
final_accuracy (= reclip_accuracy), peak_accuracy and peak_epoch: the best combined-model
accuracy of the run. "epoch k" always means the model after k epochs of training, as predict
would use it: epoch 0 is zero-shot CLIP, the line "epoch k" scores the model after epoch k, and
the last one is the final model. Choosing the peak needs the labels (peak_uses_labels, note).
eval prints the ECE too.

Images are checked by the first pass over them (decoded in the DataLoader's workers, once):
an unreadable image stops adapt, predict and eval there, before any training step; with
--skip-bad-images it is left out instead (one warning line; adapt's report.json lists it).
An image of more than --max-image-pixels pixels (default: Pillow's limit; 0: none) is
unreadable, one above half of it gets a warning line.

--device (auto: CUDA when available), --amp (auto: bf16 on CUDA, off on the CPU), --workers
(at most the usable cores) and --lp-precision are checked first, before any model loads.

Under torchrun (``torchrun --nproc_per_node=N -m reclip adapt ...``) adapt runs data-parallel
on torch.distributed (see reclip.distributed): rank 0 prints, writes the checkpoints,
predictions.tsv and report.json; an error line of another rank names the rank. predict and
eval run in one process.

Every user error (a missing file, an empty folder, a class list that does not match a
checkpoint) ends with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

from .arguments import check_method_flags, check_runtime, parser
from .errors import say
from .optional import MissingExtra

# Only the types reclip raises for what a user gave it: a TypeError or KeyError is a bug in
# reclip (or a library), whose traceback must show.
# MissingExtra: an optional package (the demo's) is not installed; its message names the extra.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, MemoryError,
               FloatingPointError,
               PermissionError, MissingExtra)
PEAK_NOTE = ("peak_accuracy and peak_epoch pick the best epoch by the target labels (an oracle "
             "choice, as in the paper's Table 1), which no user without labels can reproduce; "
             "final_accuracy is the model this run saved")


def _images(args):
    """The images of --data, listed; the first pass over them checks them (see the module
    docstring), after which ``_warn_skipped`` reports what --skip-bad-images left out."""
    from .data import image_set

    data = image_set(args.data)
    if args.max_image_pixels is not None:
        data.max_pixels = args.max_image_pixels
    return data.check_in_first_pass(skip_bad=args.skip_bad_images)


def _warn_skipped(data) -> None:
    if data.skipped:
        n = len(data.skipped)
        _say(f"reclip: warning: skipped {n} unreadable image{'s' if n > 1 else ''} "
             f"(first: {data.skipped[0]})")


def _class_lists(args) -> tuple[list[str], list[str] | None, list[str] | None]:
    """(class names, templates, the folder of each class or None) of --preset or --classes."""
    from . import prompts

    if args.preset:
        if args.classes or args.templates:
            raise ValueError("--preset: give either --preset or --classes/--templates, not both")
        return (*prompts.load_preset(args.preset), prompts.preset_folders(args.preset))
    if not args.classes:
        raise ValueError("--classes: required (or --preset)")
    classnames, folders = prompts.read_classes(args.classes)
    templates = prompts.read_templates(args.templates) if args.templates else None
    return classnames, templates, folders


def _say(text: str) -> None:
    """A message of the run, from one process only: rank 0 of a distributed run."""
    from .distributed import current

    # before the ranks join every process is "main": then local rank 0 alone speaks
    if current().main and _torchrun_local_rank() == 0:
        say(text)


def _scores(logits, labels: np.ndarray) -> tuple[np.ndarray, float | None, float | None]:
    """The predictions of `logits` (n x m, a torch tensor) with their accuracy and the
    expected calibration error of their softmax; both None unless every label is known."""
    from .adapt import predictions, scores

    if not (len(labels) and (labels >= 0).all()):
        return predictions(logits), None, None
    return scores(logits, labels)


def _peak(history, zero_shot: float, final: float, epochs: int) -> tuple[float, int]:
    """The best combined-model accuracy of a run and how many epochs its model had trained:
    zero-shot (epoch 0), the model after each epoch (history[e] scores the model after epoch
    e + 1, as the line "epoch e+1" does) and the final model (`epochs` epochs, the saved run).
    The first of equal accuracies wins."""
    scored = [(h.accuracy["combined"], h.epoch + 1) for h in history if "combined" in h.accuracy]
    return max([(zero_shot, 0), *scored, (final, epochs)], key=lambda item: item[0])


def _check_output(path: str, flag: str, *, folder: bool) -> None:
    """Refuse an output path that could only fail once the work is done: called before any
    model loads, so a mistyped --out costs nothing. An empty name (an unset variable) and, for
    a folder, the current directory are refused: they would write the run's files among the
    user's own."""
    if not path.strip():
        raise ValueError(f"{flag}: empty; name the {'folder' if folder else 'file'} to write")
    p = Path(path)
    if folder and p.resolve() == Path.cwd().resolve():
        raise ValueError(f"{flag}: {path} is the current directory; name a folder of its own")
    if p.exists() and p.is_dir() != folder:
        raise ValueError(f"{flag}: {path} is a {'file' if folder else 'folder'}; "
                         f"expected {'a folder' if folder else 'a file name'}")
    # the nearest existing folder is where the output (or the folders above it) gets created
    base = p if folder and p.exists() else p.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{flag}: {base} is a file, so {path} cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag}: cannot write in {base}")


#: the lock file of the run this process writes (see _lock_run), closed by main at the end
_LOCKS: list = []


def _lock_run(out: str) -> None:
    """One writer per run directory: this process holds the run's lock for the rest of its
    life (under torchrun rank 0 holds it, and every rank stops if it cannot)."""
    from . import checkpoint
    from .distributed import current

    world = current()
    refused = None
    if world.main:
        try:
            _LOCKS.append(checkpoint.lock(out, "--out"))
        except FileExistsError as err:
            refused = str(err)
    refused = next((r for r in world.gather_objects(refused) if r), None)
    if refused:
        raise FileExistsError(refused)


def _pretrained(args) -> str | None:
    """--pretrained as load_model takes it. An open_clip architecture name without it would
    train randomly initialised towers as if they were CLIP: refused, unless 'none' asks for
    exactly that (the run then records its random base weights and "pretrained": null)."""
    from .models import is_architecture_name

    if args.pretrained is not None and args.pretrained.strip().lower() == "none":
        return None
    if args.pretrained is None and is_architecture_name(args.model):
        raise ValueError(f"--pretrained: {args.model} is an open_clip architecture, whose "
                         "weights come from a local file: give it with --pretrained PATH (or "
                         "--pretrained none for a randomly initialised model)")
    return args.pretrained


def _write_predictions(data, pred: np.ndarray, classnames: list[str], out: str | None) -> None:
    names = data.paths or [str(i) for i in range(len(pred))]
    lines = "".join(f"{p}\t{classnames[c]}\n" for p, c in zip(names, pred))
    if out is None:
        sys.stdout.write(lines)
    else:
        from .checkpoint import write_text

        write_text(out, lines)


def _adapt_inputs(args) -> dict:
    """What adapt checks and reads before any process group forms: flags, files, the class
    lists, --out and the image folder's listing, and the Config. Under torchrun every process
    meets the same user error here, before it joins the others (see main)."""
    from .config import Config
    from .labels import describe_unmatched
    from .prompts import check_run_classes

    check_method_flags(args)
    if args.allow_changes and not args.resume:
        raise ValueError("--allow-changes: only with --resume (it continues a run under other "
                         "settings)")
    pretrained = _pretrained(args)
    classnames, templates, folders = _class_lists(args)
    check_run_classes(classnames)
    _check_output(args.out, "--out", folder=True)
    # a flag not given (None) leaves the Config default: the paper's, or the method's
    given = {"projection": args.projection, "sides": args.sides, "visual_loss": args.visual_loss,
             "lp_precision": args.lp_precision, "max_epochs": args.epochs,
             "max_iterations": args.iterations, "batch_size": args.batch_size, "lr": args.lr,
             "shot_beta": args.shot_beta, "shot_params": args.shot_params,
             "pseudo_labels": args.pseudo_labels, "k": args.k, "alpha": args.alpha,
             "weight": args.weight}
    config = Config(method=args.method, seed=args.seed, label_sharing=not args.no_label_sharing,
                    device=args.device, amp=args.amp, workers=args.workers,
                    **{k: v for k, v in given.items() if v is not None})
    data = _images(args)
    unmatched = describe_unmatched(data, classnames, folders)
    if unmatched:  # said now, not after a run that then reports no accuracy
        _say(f"reclip: warning: --data {args.data}: {unmatched}; so no accuracy is reported")
    return {"pretrained": pretrained, "classnames": classnames, "templates": templates,
            "folders": folders, "config": config, "data": data}


def adapt(args, inputs: dict | None = None) -> int:
    import torch

    from . import adapt as adapt_mod
    from . import checkpoint
    from .checkpoint import write_json
    from .labels import class_labels
    from .models import check_same_base, load_model, model_spec
    from .prompts import DEFAULT_TEMPLATES

    start = time.time()
    inputs = inputs or _adapt_inputs(args)
    pretrained, classnames, templates, folders, data = (
        inputs[k] for k in ("pretrained", "classnames", "templates", "folders", "data"))
    # --device may have become this rank's device since (distributed.setup)
    config = dataclasses.replace(inputs["config"], device=args.device)
    _lock_run(args.out)
    # refused before any real work (no model is built, no image read), as is a mismatched
    # --resume
    if not args.resume:
        adapt_mod.check_new_run(args.out, "--out", "--resume")
    meta = checkpoint.read_meta(args.out) if args.resume and checkpoint.exists(args.out) else None
    if meta is not None:
        # the classes, the method, the settings, the data, and the model as far as its spec
        # tells without building it (models.model_spec: its weights are not hashed here)
        adapt_mod.check_meta(meta, args.out, classnames)
        adapt_mod.check_method(meta, args.out, config.method, config.shot_params)
        adapt_mod.check_resume(meta, args.out, config, templates or DEFAULT_TEMPLATES,
                               len(classnames), adapt_mod.data_fingerprint(data),
                               model_spec(args.model, pretrained),
                               allow_changes=args.allow_changes)
    # after the run's own checks: another class list is the plainer error of a resume
    config.check_graph(len(classnames), len(data))
    torch.manual_seed(args.seed)  # a config without weights starts from a seeded random init
    loaded = load_model(args.model, pretrained)
    if meta is not None:  # then the base weights by their sha256, still before any image pass
        check_same_base(meta["model"], loaded.spec, args.out)
    data = data.with_transform(loaded.preprocess)
    clf = adapt_mod.ReCLIP(loaded, classnames, templates, config, folders=folders)
    zs_logits = clf.zero_shot_logits(data)  # the first pass: it checks the images
    _warn_skipped(data)
    labels = class_labels(data, classnames, folders)
    _, zs_acc, zs_ece = _scores(zs_logits, labels)
    del zs_logits  # n x m on the device, through all of training otherwise
    _say(f"reclip: {len(data)} images, {len(classnames)} classes"
         + (f", zero-shot accuracy {zs_acc:.4f}" if zs_acc is not None else ""))

    def log(e):
        acc = " ".join(f"{k} {v:.4f}" for k, v in e.accuracy.items())
        loss = " ".join(f"{k} {v:.4f}" for k, v in (("loss_T", e.loss_text), ("loss_V", e.loss_visual))
                        if v is not None)
        _say(" ".join(part for part in (f"epoch {e.epoch + 1}: agreement {e.agreement:.3f} "
                                        f"trained {e.trained}", loss, acc) if part))

    # the same labels as the zero-shot and final accuracies: all -1 (no accuracy) when unknown
    main = clf.world.main
    clf.fit(data, out_dir=args.out, resume=args.resume, allow_changes=args.allow_changes,
            labels=labels, progress=not args.quiet and main, log=log)
    report = {"command": "adapt", "method": config.method, "images": len(data),
              "classes": len(classnames), "config": dataclasses.asdict(config),
              "learning_rate": config.learning_rate, "epochs": clf.epoch,
              "iterations": clf.iterations, "zero_shot_accuracy": zs_acc,
              **({"zero_shot_ece": zs_ece} if zs_ece is not None else {}),
              "skipped_images": {"count": len(data.skipped), "paths": data.skipped},
              "history": [dataclasses.asdict(h) for h in clf.history]}
    if clf.changes:
        report["changes"] = clf.changes
    if not args.inductive:
        pred, acc, ece = _scores(clf.logits(data), labels)
        report[f"{config.method}_accuracy"] = acc  # reclip_accuracy or shot_accuracy
        if main:
            _write_predictions(data, pred, classnames, str(Path(args.out) / "predictions.tsv"))
        if acc is not None:
            peak, peak_epoch = _peak(clf.history, zs_acc, acc, clf.epoch)
            report |= {f"{config.method}_ece": ece, "final_accuracy": acc, "peak_accuracy": peak,
                       "peak_epoch": peak_epoch, "peak_uses_labels": True, "note": PEAK_NOTE}
            _say(f"reclip: accuracy {acc:.4f} (zero-shot {zs_acc:.4f})")
    if clf.world.active:  # a collective: every rank hands its numbers to the report
        report["distributed"] = clf.world.report()
    else:  # wall seconds of each stage, summed over the epochs
        report["stages"] = {k: round(v, 3) if isinstance(v, float) else v
                            for k, v in clf.world.work.items()}
    report["world_size"] = clf.world.size
    report["seconds"] = round(time.time() - start, 2)
    if main:
        write_json(Path(args.out) / "report.json", report)
    _say(f"reclip: {clf.epoch} epoch{'s' if clf.epoch != 1 else ''} ({clf.iterations} "
         f"iterations) in {report['seconds']:.0f} s; run and report.json in {args.out}"
         + ("" if args.inductive else ", predictions in predictions.tsv"))
    clf.world.barrier()  # no rank leaves (and tears the group down) before the report exists
    return 0


def _load_run(args):
    from .adapt import ReCLIP

    data = _images(args)
    clf = ReCLIP.load(args.run, device=args.device, amp=args.amp, workers=args.workers,
                      model=args.model, pretrained=args.pretrained)
    return clf, data.with_transform(clf.loaded.preprocess)


def predict(args) -> int:
    if args.out is not None:
        _check_output(args.out, "--out", folder=False)
    clf, data = _load_run(args)
    pred = clf.predict(data)
    _warn_skipped(data)
    _write_predictions(data, pred, clf.classnames, args.out)
    return 0


def evaluate(args) -> int:
    from .labels import class_labels, describe_unmatched

    clf, data = _load_run(args)
    if (class_labels(data, clf.classnames, clf.folders) < 0).any():  # before the images' pass
        ids = f" or its folder ids ({', '.join(clf.folders[:3])}, ...)" if clf.folders else ""
        unmatched = describe_unmatched(data, clf.classnames, clf.folders)
        raise ValueError(f"--data: {args.data} needs an ImageFolder layout whose folders are "
                         f"among the run's classes ({', '.join(clf.classnames[:5])}, ...){ids}"
                         + (f"; {unmatched}" if unmatched else ""))
    logits = clf.logits(data)
    _warn_skipped(data)
    _, acc, ece = _scores(logits, class_labels(data, clf.classnames, clf.folders))
    print(f"accuracy {acc:.4f} ECE {ece:.4f} ({len(data)} images)")
    return 0


def demo(args) -> int:
    from .demo import run_demo
    from .sources import TARGETS

    if args.export_split:
        from .demo import export_split

        _check_output(args.export_split, "--export-split", folder=True)
        counts = export_split(args.target, args.export_split)
        model = args.model or TARGETS[args.target].model
        where = Path(args.export_split)
        _say(f"wrote {counts['train']} train and {counts['test']} test images of {args.target} "
             f"to {where / 'train'} and {where / 'test'}; for example:\n"
             f"  reclip adapt --model {model} --data {where / 'train'} --classes "
             f"{where / 'classes.txt'} --templates {where / 'templates.txt'} --inductive --out run\n"
             f"  reclip eval --run run --data {where / 'test'}")
        return 0
    _check_output(args.out, "--out", folder=True)
    run_demo(args.out, model=args.model, epochs=args.epochs, plots=not args.no_plots, say=_say,
             device=args.device, amp=args.amp, lp_precision=args.lp_precision,
             target=args.target, iterations=args.iterations)
    return 0


def _join_torchrun(args) -> None:
    """Under torchrun with more than one process, join its process group (adapt only):
    --device then becomes this rank's device (see reclip.distributed.setup)."""
    from . import distributed

    size = distributed.requested_world()[0]
    if size <= 1:
        return
    if args.command != "adapt":
        raise ValueError(f"{args.command}: runs in one process; start it without torchrun "
                         f"(WORLD_SIZE is {size})")
    args.device = distributed.setup(args.device, "--device")


#: seconds a process that met a user error before joining the others waits for torchrun to
#: stop it (see main)
_QUIET_WAIT = 60.0


def _torchrun_local_rank() -> int:
    """This process's local rank under torchrun with several processes, else 0."""
    from . import distributed

    try:
        size, _, local = distributed.requested_world()
    except ValueError:
        return 0
    return local if size > 1 else 0


class _Terminated(BaseException):
    """SIGTERM (a cluster's preemption) as an exception, so that a run stops as on Ctrl-C:
    a checkpoint being written is removed unfinished, the last one stays the run's state."""


def _terminate(signum, frame) -> None:
    raise _Terminated


def _resume_note(args) -> str:
    """Where --resume continues an adapt run that stopped now (nothing for other commands)."""
    from . import checkpoint

    if args.command != "adapt":
        return ""
    try:
        epoch = checkpoint.read_meta(args.out)["epoch"]
    except (OSError, ValueError, KeyError):
        return f"; no epoch of {args.out} was saved: --resume starts it from the beginning"
    return f"; --resume continues {args.out} from epoch {epoch + 1} (epoch {epoch} is saved)"


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    from . import distributed
    from .errors import warnings_as_lines

    args = parser().parse_args(argv)
    handler, finished = None, False
    if threading.current_thread() is threading.main_thread():
        handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        commands = {"demo": demo, "adapt": adapt, "predict": predict, "eval": evaluate}
        with warnings_as_lines("reclip: warning: "):
            check_runtime(args)
            inputs = _adapt_inputs(args) if args.command == "adapt" else None
            _join_torchrun(args)
            code = adapt(args, inputs) if inputs is not None else commands[args.command](args)
            finished = True
            return code
    except USER_ERRORS as err:
        # one line, all of it: a message cut at its first line can stop mid-sentence
        message = " ".join(str(err).split()) or type(err).__name__
        world = distributed.current()
        if not world.active and _torchrun_local_rank() > 0:
            # before the process group formed: every process of a node met the same error,
            # and local rank 0 says it in one line. torchrun stops the others as soon as one
            # process ends, so this one waits to be stopped rather than end first and cut
            # local rank 0 off before it has said anything
            # (if it is not stopped, local rank 0 did not meet the error: say it after all)
            try:
                time.sleep(_QUIET_WAIT)
            except (_Terminated, KeyboardInterrupt):
                return 2
            say(f"reclip {args.command} (local rank {_torchrun_local_rank()}): error: {message}")
            return 2
        # every rank that fails says so: an error only one rank meets (a file missing on
        # one node) must not go unexplained
        rank = f" (rank {world.rank} of {world.size})" if world.active else ""
        say(f"reclip {args.command}{rank}: error: {message}")
        return 2
    except OSError as err:
        if err.errno is None:  # no system call failed: a library's own error, a bug to show
            raise
        # the environment (a full disk, a read-only or quota-bound file system, a file
        # without permission): the path and the system's reason say all of it
        where = f"{err.filename}: " if err.filename is not None else ""
        say(f"reclip {args.command}: error: {where}{err.strerror or err}")
        return 2
    except (KeyboardInterrupt, _Terminated) as stop:
        # shells report a process ended by signal N as 128 + N: SIGINT 130, SIGTERM 143
        what, code = (("terminated (SIGTERM)", 143) if isinstance(stop, _Terminated)
                      else ("interrupted", 130))
        if distributed.current().main:
            say(f"reclip {args.command}: {what}{_resume_note(args)}")
        return code
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
        while _LOCKS:
            _LOCKS.pop().close()
        # only ranks that all finished meet at a barrier: after an error they may not
        distributed.shutdown(barrier=finished)


if __name__ == "__main__":
    sys.exit(main())
