"""How long listing an ImageNet-sized folder takes: reclip's folder scan vs torchvision's.

    python benchmarks/scan_bench.py                                  # 1000 x 1281 = 1.28M files
    python benchmarks/scan_bench.py --classes 100 --per-class 500 --repeat 5
    python benchmarks/scan_bench.py --clean                          # then delete the tree

The tree (``<classes>`` folders named like WordNet ids, each with ``<per-class>`` empty files
named like ``n01440764_10026.JPEG``) is built once under the temp folder and reused by later
runs: only the listing is measured, no image is opened, so empty files are as good as real
ones. A run reports, per scanner, the fastest and the median of ``--repeat`` scans, each after
one untimed scan so that both see the same warm directory cache.

Scanners: ``reclip`` is ``reclip.data.folder_image_set`` (paths, labels and classes: what every
command does before anything else); ``torchvision`` is ``datasets.folder.find_classes`` +
``make_dataset`` with the same extensions (``allow_empty=True``, as reclip keeps an empty class).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

DONE = ".complete"  # written last: a tree without it was interrupted and is rebuilt


def build_tree(root: str, classes: int, per_class: int) -> float:
    """Create the tree unless it is already complete; returns the seconds spent."""
    if os.path.exists(os.path.join(root, DONE)):
        return 0.0
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    flags = os.O_CREAT | os.O_WRONLY | os.O_EXCL
    for k in range(classes):
        wnid = f"n{1440764 + 7 * k:08d}"
        folder = os.path.join(root, wnid)
        os.mkdir(folder)
        for i in range(per_class):
            os.close(os.open(os.path.join(folder, f"{wnid}_{10026 + 3 * i}.JPEG"), flags, 0o644))
    os.close(os.open(os.path.join(root, DONE), flags, 0o644))
    return time.perf_counter() - start


def scan_reclip(root: str) -> int:
    from reclip.data import folder_image_set

    return len(folder_image_set(root))


def scan_torchvision(root: str) -> int:
    from torchvision.datasets.folder import find_classes, make_dataset

    from reclip.data import IMAGE_EXTENSIONS

    _, class_to_idx = find_classes(root)
    return len(make_dataset(root, class_to_idx, extensions=IMAGE_EXTENSIONS, allow_empty=True))


SCANNERS = {"reclip": scan_reclip, "torchvision": scan_torchvision}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--scanners", default=",".join(SCANNERS), help="comma-separated: reclip,torchvision")
    p.add_argument("--root", help="where the tree is (default: a folder in the temp folder, "
                                  "named after the sizes)")
    p.add_argument("--clean", action="store_true", help="delete the tree after the run")
    args = p.parse_args(argv)

    root = args.root or os.path.join(tempfile.gettempdir(),
                                     f"reclip-scan-bench-{args.classes}x{args.per_class}")
    built = build_tree(root, args.classes, args.per_class)
    files = args.classes * args.per_class
    print(f"tree: {root}: {args.classes} folders x {args.per_class} files = {files:,} files"
          + (f" (built in {built:.1f} s)" if built else " (cached)"))
    try:
        for name in args.scanners.split(","):
            scan = SCANNERS[name]
            found = scan(root)  # untimed: imports, and the same warm directory cache for each
            if found != files:
                raise SystemExit(f"{name}: found {found} files, expected {files}")
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                scan(root)
                times.append(time.perf_counter() - start)
            print(f"{name:12s} {files:,} files: best {min(times):.2f} s, "
                  f"median {statistics.median(times):.2f} s ({args.repeat} scans)")
    finally:
        if args.clean:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
