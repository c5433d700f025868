"""The ``reclip`` command line's grammar: the parser of every command, its argument types, and
the checks of flags that need no file or model (a method's flags given with the other method;
--device, --amp, --lp-precision). The commands themselves are reclip.cli's.
"""
from __future__ import annotations

import argparse

DESCRIPTION = ("The ``reclip`` command: adapt a CLIP model to a folder of images, then predict "
               "or evaluate.")

SKIP_HELP = "leave out unreadable images (one warning line) instead of stopping at the first"
WORKERS_HELP = "image-loading worker processes (default: one per usable core, at most 8)"


def shown_default(action: argparse.Action) -> str | None:
    """The default that --help (and README.md's reference, tools/cli_reference.py) shows for a
    flag, or None: a switch (False), a required flag, or a default of None, whose help says in
    words what leaving the flag out does (the method's value, one worker per core, ...)."""
    # by identity: a default of 0 is a value to show, though 0 == False
    if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
        return None
    return str(action.default)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to the help of every flag that has a default to show, so that
    no default is stated by hand in a help string and then goes stale."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if shown_default(action) is None or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other user error and every
    default in --help (sub-commands get this class too). Abbreviated flags are refused: a
    prefix such as --epoch would keep meaning --epochs only until a flag sharing it is added."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse collects a sub-command's unknown flags and reports them from the top
        # parser, which names "reclip" and its help: report them from the sub-command's own
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = next((a.choices for a in self._actions
                             if isinstance(a, argparse._SubParsersAction)), {})
            commands.get(getattr(parsed, "command", None), self).error(
                f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def _at_least(minimum: int):
    """An argparse type: an integer >= minimum, else a usage error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _float_at_least(minimum: float, *, inclusive: bool):
    """An argparse type: a finite float >= minimum (> minimum unless inclusive)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (value >= minimum if inclusive else value > minimum) or value == float("inf"):
            raise argparse.ArgumentTypeError(
                f"must be {'at least' if inclusive else 'above'} {minimum:g} and finite, "
                f"got {text}")
        return value
    return parse


_positive_float = _float_at_least(0, inclusive=False)
_non_negative_float = _float_at_least(0, inclusive=True)


def _below_one(text: str) -> float:
    """An argparse type: a float in [0, 1) (label propagation's alpha)."""
    value = _non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, got {text}")
    return value

#: adapt's flags that belong to one method: flag -> (its args attribute, the method); each
#: defaults to None (or False), so that giving it with the other method can be refused
METHOD_FLAGS = {"--projection": ("projection", "reclip"), "--sides": ("sides", "reclip"),
                "--no-label-sharing": ("no_label_sharing", "reclip"),
                "--visual-loss": ("visual_loss", "reclip"),
                "--lp-precision": ("lp_precision", "reclip"),
                "--pseudo-labels": ("pseudo_labels", "reclip"), "--k": ("k", "reclip"),
                "--alpha": ("alpha", "reclip"), "--weight": ("weight", "reclip"),
                "--shot-beta": ("shot_beta", "shot"), "--shot-params": ("shot_params", "shot")}


def check_method_flags(args) -> None:
    """A flag of one method given with the other is a user error, not silently ignored: SHOT
    has no label propagation, projection, text side or label sharing, and ReCLIP no SHOT loss."""
    for flag, (attr, method) in METHOD_FLAGS.items():
        if getattr(args, attr) not in (None, False) and args.method != method:
            raise ValueError(f"{flag}: only for --method {method} (this run is --method "
                             f"{args.method})")


def parser() -> argparse.ArgumentParser:
    import reclip_ext

    from . import __version__
    from .pseudo_labels import METHODS as PSEUDO_LABEL_METHODS
    from .sources import TARGETS

    p = _Parser(prog="reclip", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"reclip {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="adapt an embedded model to a real target (default: the "
                                    "digits model to scikit-learn's digits)")
    d.add_argument("--out", default="reclip-demo", help="folder for report.json and plots")
    d.add_argument("--epochs", type=_at_least(0), default=10, help="maximum epochs")
    d.add_argument("--iterations", type=_at_least(1),
                   help="maximum iterations (default: 5000); on a CPU a 1066-class target's "
                        "text step takes tens of seconds, so cap it there")
    d.add_argument("--model", help=argparse.SUPPRESS)  # default: the target's shipped model
    d.add_argument("--no-plots", action="store_true",
                   help="write report.json only (matplotlib is then not needed)")
    d.add_argument("--target", default="sklearn-digits", choices=tuple(TARGETS),
                   help="the target domain: a digits target (opencv-lowres needs OpenCV's "
                        "digits.png) or an emoji target of reclip-emoji (Symbola or EmojiOne "
                        "artwork, 100 or 1066 classes; needs their Debian packages); see "
                        "reclip.sources")
    d.add_argument("--export-split", metavar="DIR",
                   help="instead of the demo, write the target's fixed train/test split as "
                        "image folders (for reclip adapt --inductive, then reclip eval)")
    _runtime_flags(d, lp=True, workers=False)  # the demo's images are one in-memory tensor

    a = sub.add_parser("adapt", help="adapt a model to unlabelled images and save the run")
    a.add_argument("--model", required=True,
                   help="open_clip model name or model-config JSON, a transformers or open_clip "
                        "model folder (a hub-cache snapshot or models--ORG--NAME entry too), or "
                        "ORG/NAME in the local HuggingFace cache")
    a.add_argument("--pretrained", help="local weights file for --model (required with an "
                                        "open_clip architecture name; 'none': random weights)")
    a.add_argument("--data", required=True, help="image folder (ImageFolder layout or flat)")
    a.add_argument("--classes", help="class names, one per line (or folder<TAB>class name lines "
                                     "for folders named by an id)")
    a.add_argument("--templates", help="prompt templates with {}, one per line")
    a.add_argument("--preset", help="class names and templates of a benchmark (e.g. cifar10)")
    a.add_argument("--out", required=True, help="run directory to write")
    a.add_argument("--epochs", type=_at_least(0),
                   help="maximum epochs (default: 50); 0 saves the zero-shot model as the run")
    a.add_argument("--iterations", type=_at_least(1), help="maximum iterations (default: 5000)")
    a.add_argument("--batch-size", type=_at_least(1),
                   help="images per training step (default: 64, or 32 above 200 classes)")
    a.add_argument("--method", choices=("reclip", "shot"), default="reclip",
                   help="ReCLIP, or the SHOT baseline (the visual encoder trained on SHOT's "
                        "loss against the frozen zero-shot classifier)")
    a.add_argument("--lr", type=_positive_float,
                   help="SGD learning rate (default: the method's paper value, 1e-3 for "
                        "ReCLIP, 1e-6 for SHOT)")
    # The method's own flags default to None, so that one given for the other method is
    # refused rather than silently ignored (see check_method_flags).
    a.add_argument("--projection", choices=("P0", "P1", "P2"),
                   help="ReCLIP: none (P0), onto the class embeddings' span (P1), or that "
                        "span without its class-agnostic direction (P2, the default)")
    a.add_argument("--sides", choices=("both", "text", "visual"),
                   help="ReCLIP (both, the default), ReCLIP-T (text) or ReCLIP-V (visual)")
    a.add_argument("--no-label-sharing", action="store_true", help="ReCLIP: train each side "
                                                                   "on all of its pseudo labels")
    a.add_argument("--visual-loss", choices=("released", "mean"),
                   help="ReCLIP-V loss: as in the authors' released code (divided by the batch "
                        "size once more; the default), or the plain batch mean")
    a.add_argument("--shot-beta", type=_non_negative_float,
                   help="SHOT: weight of the pseudo-label cross-entropy (default: 0.3)")
    a.add_argument("--shot-params", choices=("encoder", "norms"),
                   help="SHOT: train the whole visual tower (encoder, the default) or only "
                        "its norm layers")
    a.add_argument("--pseudo-labels", choices=PSEUDO_LABEL_METHODS,
                   help="ReCLIP: label propagation, the model's own predictions, or auto (the "
                        "paper's rule and the default: propagation up to 500 classes, "
                        "predictions above)")
    lp = reclip_ext.DEFAULTS
    a.add_argument("--k", type=_at_least(1),
                   help=f"ReCLIP: neighbours of each node in label propagation's graph "
                        f"(default: {lp.k}; at most the classes + images - 1)")
    a.add_argument("--alpha", type=_below_one,
                   help=f"ReCLIP: label propagation's strength, in [0, 1) (default: {lp.alpha})")
    a.add_argument("--weight", choices=("shift", "relu"),
                   help=f"ReCLIP: edge weight of a cosine s in the graph: shift (1+s)/2, as in "
                        f"the authors' code, or relu max(s, 0) (default: {lp.weight})")
    a.add_argument("--seed", type=int, default=0,
                   help="seed of the training order and, for a model without weights, of its "
                        "random initialisation")
    a.add_argument("--resume", action="store_true",
                   help="continue the run in --out (without it, an --out that holds a run is "
                        "refused; a restartable torchrun job always passes it). The run keeps "
                        "its settings: only --epochs, --iterations, --device, --amp, "
                        "--workers, --lp-precision, --quiet and --skip-bad-images may differ")
    a.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue the run under other settings (e.g. a lower "
                        "--lr after it diverged); each change is recorded in run.json")
    a.add_argument("--inductive", action="store_true",
                   help="only adapt and save; do not predict the adaptation images")
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.add_argument("--skip-bad-images", action="store_true", help=SKIP_HELP)
    _runtime_flags(a, lp=True, lp_default=None)  # ReCLIP only; "exact" when not given

    for name, helptext in (("predict", "write the predicted class of every image"),
                           ("eval", "accuracy on an ImageFolder whose folders are class names "
                                    "or the run's folder ids")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--run", required=True, help="run directory written by reclip adapt")
        q.add_argument("--data", required=True, help="image folder")
        q.add_argument("--skip-bad-images", action="store_true", help=SKIP_HELP)
        q.add_argument("--model", help="where the run's base model is now, if it moved (checked "
                                       "against the weights hash the run records)")
        q.add_argument("--pretrained", help="where the run's base weights file is now, if it moved")
        _runtime_flags(q, lp=False)
        if name == "predict":
            q.add_argument("--out", help="output file (default: stdout)")
    return p


def _runtime_flags(p: argparse.ArgumentParser, *, lp: bool, workers: bool = True,
                   lp_default: str | None = "exact") -> None:
    from .data import MAX_PIXELS
    from .device import AMP_MODES, LP_PRECISIONS

    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="autocast of forward passes (auto: bf16 on CUDA, off on the CPU)")
    if workers:
        p.add_argument("--workers", type=_at_least(0), help=WORKERS_HELP)
        p.add_argument("--max-image-pixels", type=_at_least(0), metavar="N",
                       help="refuse an image of more than N pixels, as a likely decompression "
                            f"bomb (default: {MAX_PIXELS}, where Pillow itself refuses one; "
                            "0: no limit)")
    if lp:
        p.add_argument("--lp-precision", choices=LP_PRECISIONS, default=lp_default,
                       help="label propagation's k-NN operands (tf32, bf16: CUDA only)"
                            + ("" if lp_default else "; exact when not given"))


def check_runtime(args) -> None:
    """--device, --amp, --lp-precision and --workers, before anything else: a device that does
    not exist must not cost a model load."""
    from . import device as devices

    where = devices.resolve(args.device, "--device")
    devices.amp_dtype(args.amp, where, "--amp")
    if getattr(args, "lp_precision", None) is not None:
        devices.check_lp_precision(args.lp_precision, where, "--lp-precision")
    if getattr(args, "workers", None) is not None:  # capped once here, not warned per loader
        args.workers = devices.worker_count(args.workers, "--workers")
