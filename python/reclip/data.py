"""Image inputs of the pipeline.

``image_set(source, transform)`` turns any supported source into an ``ImageSet``, a torch
Dataset whose items are ``(image, label, index)``: the image after ``transform``, the integer
label (-1 when unknown) and the item's position in the set (so shuffled batches can be mapped
back). Sources:

- a folder, ImageFolder layout (``root/<class>/<image>``: one sub-folder per class, labels in
  sorted sub-folder order, ``classes`` = the sub-folder names) or flat (images directly inside,
  labels -1). Only that one level is read; hidden files and folders are skipped, extensions are
  matched case-insensitively against IMAGE_EXTENSIONS, every order is sorted by name.
  ``reclip.labels.class_labels(data, classnames, folders)`` maps the folder labels onto a
  class list by folder name (the class name, or an id such as ImageNet's ``n01440764``).
- a torch.Tensor (N, C, H, W) of already-preprocessed images (``transform`` is not applied).
- a torch Dataset returning ``(image, label, ...)`` or ``image``; ``transform`` is applied to PIL
  images (and uint8 numpy arrays), tensors pass through.
- a DataLoader (its ``.dataset``), or an ImageSet (returned as is, or re-wrapped with ``transform``).

Files are opened when an item is loaded; an unreadable one raises ValueError naming it.
``ImageSet.check()`` opens every file up front, in this process; ``check(skip_bad=True)``
returns the set without the unreadable files instead, listed in its ``skipped``.
``check_in_first_pass()`` defers the same check to the first pass that loads every image
(``checking_batches``, decoded in the DataLoader's workers), so that each image is decoded once
per pass; the CLI does this. ``image_error(path)`` is the per-file decision behind all of them.

``array_image_set`` wraps in-memory uint8 arrays (N, H, W) or (N, H, W, 3) with their labels.

Errors are single-line messages naming the path.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate

from .errors import ReclipWarning, one_line

#: the most pixels an image may have, by default: where PIL itself refuses one (twice its
#: MAX_IMAGE_PIXELS, above which it warns); a larger one is more likely a decompression bomb
#: than a photo. ImageSet.max_pixels (the CLI's --max-image-pixels) sets another; 0: no limit
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

Transform = Callable[[Image.Image], Any]


# ----------------------------------------------------------------------------------------------
# helpers


def to_tensor(img: Image.Image) -> torch.Tensor:
    """Default transform: PIL image -> float32 tensor (C, H, W) in [0, 1]."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a.transpose(2, 0, 1).copy()).float().div_(255.0)


#: full scale of PIL's wider single-channel integer modes: 16-bit modes (I;16, its byte orders)
#: and I (32-bit signed), whose 16-bit PNGs and TIFFs hold 0 .. 65535
_FULL_SCALE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB, scaled by its range rather than clipped: PIL's own conversion of a
    16-bit, 32-bit or float image clips every value above 255, so a 16-bit photo turns white.
    Integer modes are divided by their full scale (65535 / 255 = 257 for 16 bits, so a 16-bit
    image made from an 8-bit one by x 257 comes back exactly); an I image with values outside
    0 .. 65535 and a float (F) image outside 0 .. 1 are scaled by their own minimum and
    maximum; an F image within 0 .. 1 is taken as intensities."""
    if img.mode not in _FULL_SCALE and img.mode != "F":
        return img.convert("RGB")
    a = np.asarray(img, dtype=np.float64)
    low, high = (0.0, 1.0) if img.mode == "F" else (0.0, float(_FULL_SCALE[img.mode]))
    if a.size and (a.min() < low or a.max() > high):
        low, high = float(a.min()), float(a.max())
    scaled = (a - low) * (255.0 / (high - low)) if high > low else np.zeros_like(a)
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8)).convert("RGB")


@contextlib.contextmanager
def _pil_limit(max_pixels: int | None):
    """PIL's own decompression-bomb check set to `max_pixels` (0 or None: off) and its warning
    silenced: load_image checks the image's size itself, with messages naming the file, and
    leaves PIL's check only what it cannot see (the frames of a GIF, as they are decoded)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, *,
               warn: bool = False) -> Image.Image:
    """Open and fully decode an image file as RGB (see to_rgb); ValueError naming the file if
    that fails, or if it has more than `max_pixels` pixels (0: no limit), which is checked
    before it is decoded. With `warn`, an image above half the limit gets a ReclipWarning."""
    p = os.fspath(path)
    limit = (f"the limit of {max_pixels} pixels (raise it with --max-image-pixels, 0 for no "
             "limit)")
    try:
        with open(p, "rb") as f:
            with _pil_limit(None):  # the header only: the size is checked here
                img = Image.open(f)
            (w, h), pixels = img.size, img.size[0] * img.size[1]
            size = f"{w}x{h} = {pixels} pixels"
            if max_pixels and pixels > max_pixels:
                too_large = f"{p}: cannot read image: {size}, more than {limit}"
            else:
                too_large = None
                if warn and max_pixels and pixels > max_pixels // 2:
                    warnings.warn(f"{p}: a large image ({size}), slow to decode; images "
                                  f"above {max_pixels} pixels are refused "
                                  "(--max-image-pixels)", ReclipWarning)
                with _pil_limit(max_pixels):
                    img.load()
                img = to_rgb(img)
    except FileNotFoundError:
        raise ValueError(f"{p}: cannot read image (file not found)") from None
    except MemoryError:
        raise
    except Image.DecompressionBombError:
        raise ValueError(f"{p}: cannot read image: a frame of it has more than {limit}") from None
    except Exception as e:  # PIL raises many types for corrupt data (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"{p}: cannot read image ({one_line(e)})") from None
    if too_large:
        raise ValueError(too_large)
    return img


def image_error(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image file cannot be used (the one-line message of load_image), or None; an
    image above half the limit gets load_image's warning.

    The per-file decision behind ``ImageSet.check`` and the first pass's check: it decodes the
    file exactly as loading the item does, so a file it passes loads.
    """
    try:
        load_image(path, max_pixels, warn=True)
    except ValueError as e:
        return str(e)
    return None


def _label_of(x: Any) -> int:
    """An item's label as int, -1 when it is not a scalar integer."""
    if x is None or isinstance(x, bool):
        return -1
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.is_floating_point():
        return int(x.item())
    if isinstance(x, np.ndarray) and x.size == 1 and np.issubdtype(x.dtype, np.integer):
        return int(x.item())
    return -1


def _known_labels(ds: Any) -> np.ndarray | None:
    """Labels of a dataset from its attributes, without loading images; None if unknown."""
    n = len(ds)
    if isinstance(ds, torch.utils.data.Subset):
        base = _known_labels(ds.dataset)
        if base is None:
            return None
        return base[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, torch.utils.data.TensorDataset):
        if len(ds.tensors) >= 2 and ds.tensors[1].ndim == 1 and not ds.tensors[1].is_floating_point():
            return ds.tensors[1].cpu().numpy().astype(np.int64)
        return np.full(n, -1, dtype=np.int64) if len(ds.tensors) == 1 else None
    for attr in ("targets", "labels", "_labels", "y"):
        v = getattr(ds, attr, None)
        if v is None or callable(v):
            continue
        try:
            a = np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
        except Exception:
            continue
        if a.ndim == 1 and len(a) == n and a.dtype.kind in "iu":
            return a.astype(np.int64)
    return None


# ----------------------------------------------------------------------------------------------
# ImageSet


class ImageSet(Dataset):
    """A sized image dataset; item ``i`` is ``(image, label, i)``.

    Attributes:
        paths: image file paths in a stable (sorted) order, None for in-memory sources.
        labels: int64 array, -1 where unknown. For a generic Dataset source without a
            ``targets`` / ``labels`` attribute this is read with one pass over it on first access.
        classes: the class sub-folder names of an ImageFolder layout (label i = classes[i]),
            the classes given to ``array_image_set``, else None.
        root: the folder of a folder source, else None.
        transform: applied to PIL images (never to tensor sources); None = ``to_tensor``.
        skipped: the unreadable files ``check(skip_bad=True)`` left out, in path order.
        max_pixels: a file image with more pixels is unreadable (MAX_PIXELS; 0: no limit).
        unchecked: None, or how the first pass is to treat an unreadable file ("stop" or
            "skip"), set by ``check_in_first_pass``.
    """

    def __init__(self, *, kind: str, n: int, paths: list[str] | None = None,
                 labels: np.ndarray | None = None, classes: list[str] | None = None,
                 transform: Transform | None = None, root: str | None = None,
                 tensor: torch.Tensor | None = None, dataset: Any = None,
                 array: np.ndarray | None = None):
        self.kind = kind
        self._n = int(n)
        self.paths = paths
        self._labels = None if labels is None else np.ascontiguousarray(labels, dtype=np.int64)
        self.classes = classes
        self.transform = transform
        self.root = root
        self._tensor = tensor
        self._dataset = dataset
        self._array = array
        self.skipped: list[str] = []
        self.unchecked: str | None = None
        self.max_pixels = MAX_PIXELS

    # -- sized dataset
    def __len__(self) -> int:
        return self._n

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:  # a generic Dataset: one pass, labels only
            self._labels = np.array([_label_of(self._raw(i)[1]) for i in range(self._n)], dtype=np.int64)
        return self._labels

    @labels.setter
    def labels(self, value) -> None:
        a = np.asarray(value, dtype=np.int64)
        if a.shape != (self._n,):
            raise ValueError(f"labels: expected shape ({self._n},), got {a.shape}")
        self._labels = np.ascontiguousarray(a)

    @property
    def has_labels(self) -> bool:
        """Whether every item's label is known (>= 0)."""
        return bool(self._n) and bool((self.labels >= 0).all())

    def _apply(self, img: Any) -> Any:
        t = self.transform if self.transform is not None else to_tensor
        return t(img)

    def _raw(self, i: int) -> tuple[Any, int]:
        """(image before the transform stage, label) of item i, for dataset sources."""
        item = self._dataset[i]
        if isinstance(item, (tuple, list)):
            if len(item) == 0:
                raise ValueError(f"dataset item {i} is empty")
            return item[0], (_label_of(item[1]) if len(item) > 1 else -1)
        return item, -1

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        i = int(i)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} images")
        if self.kind == "files":
            img = load_image(self.paths[i], self.max_pixels)
            return self._apply(img), int(self._labels[i]), i
        if self.kind == "tensor":
            return self._tensor[i], int(self._labels[i]), i
        if self.kind == "array":
            a = self._array[i]
            img = to_rgb(Image.fromarray(a))
            return self._apply(img), int(self._labels[i]), i
        img, label = self._raw(i)
        if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim in (2, 3):
            img = Image.fromarray(img)
        if isinstance(img, Image.Image):
            img = self._apply(img)
        if self._labels is not None:
            label = int(self._labels[i])
        return img, label, i

    def check(self, progress: Callable[[int], Any] | None = None, *,
              skip_bad: bool = False) -> "ImageSet":
        """Open and decode every image file now; ValueError naming the first unreadable one.

        With ``skip_bad`` the unreadable files are left out instead: the result is a new set
        of the others (labels kept), whose ``skipped`` lists them; ValueError if none is left.
        No-op for in-memory sources. ``progress`` (e.g. a tqdm bar's ``update``) is called with 1
        per file. Returns self when every file is readable.
        """
        if self.kind != "files":
            return self
        bad: dict[int, str] = {}
        for i, p in enumerate(self.paths):
            error = image_error(p, self.max_pixels)
            if error is not None:
                bad[i] = error
            if progress is not None:
                progress(1)
        if not bad:
            return self
        if not skip_bad:
            more = f" [and {len(bad) - 1} more unreadable image(s)]" if len(bad) > 1 else ""
            raise ValueError(next(iter(bad.values())) + more)
        return self._without(bad)

    def _without(self, bad: dict[int, str]) -> "ImageSet":
        """A copy without the items `bad` (index -> why unreadable), which join ``skipped``;
        ValueError if none is left."""
        keep = [i for i in range(self._n) if i not in bad]
        if not keep:
            first = bad[min(bad)]
            raise ValueError(f"{self.root}: none of its {self._n} images is readable ({first})")
        new = self.with_transform(self.transform)
        new._n, new.paths = len(keep), [self.paths[i] for i in keep]
        new._labels = self._labels[keep]
        new.skipped = self.skipped + [self.paths[i] for i in sorted(bad)]
        return new

    def check_in_first_pass(self, *, skip_bad: bool = False) -> "ImageSet":
        """A copy to be checked by its first pass (``checking_batches``) instead of now: the
        images are decoded once, in the loader's workers, rather than once here and again by
        that pass. That pass stops at an unreadable file (ValueError naming it) or, with
        `skip_bad`, leaves it out: the set then holds only the readable files (changed in
        place, so every later pass and ``skipped`` see the result). No-op for in-memory sources.
        """
        if self.kind != "files":
            return self
        new = self.with_transform(self.transform)
        new.unchecked = "skip" if skip_bad else "stop"
        return new

    def checking_batches(self, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                         *, indices: Sequence[int] | None = None,
                         found: dict[int, str] | None = None):
        """The ``(images, labels, indices)`` batches of one pass in order, doing the deferred
        check of ``check_in_first_pass`` (see there); the readable items only. The set's
        unreadable items are dropped once the pass is complete, so consume it to the end.

        A distributed pass reads only its rank's `indices` and collects the unreadable ones in
        `found` (index -> why) instead of acting on them: every rank must stop, or drop the
        same items, so the caller merges all ranks' findings and hands them to
        ``settle_check``."""
        if self.unchecked is None:
            raise ValueError("checking_batches: the set has no deferred check")
        sampler = None
        if indices is not None:
            items = list(indices)
            sampler = BatchList([items[i : i + batch_size]
                                 for i in range(0, len(items), batch_size)])
        dl = loader(_Tolerant(self), batch_size, num_workers=num_workers, pin_memory=pin_memory,
                    collate_fn=_collate_tolerant, batch_sampler=sampler)
        bad: dict[int, str] = {} if found is None else found
        for batch, errors in dl:
            for i, error in errors:
                if self.unchecked == "stop" and found is None:
                    raise ValueError(error)
                bad[i] = error
            if batch is not None:
                yield batch
        if found is None:
            self.settle_check(bad)

    def settle_check(self, bad: dict[int, str]) -> None:
        """End a deferred check that found `bad` (index -> why unreadable): ValueError naming
        the first of them unless unreadable images are skipped, else drop them (in place)."""
        if bad and self.unchecked == "stop":
            more = f" [and {len(bad) - 1} more unreadable image(s)]" if len(bad) > 1 else ""
            raise ValueError(bad[min(bad)] + more)
        if bad:
            self.__dict__.update(self._without(bad).__dict__)
        self.unchecked = None

    def with_transform(self, transform: Transform | None) -> "ImageSet":
        """A copy sharing the data, with another transform."""
        new = ImageSet.__new__(ImageSet)
        new.__dict__.update(self.__dict__)
        new.transform = transform
        return new

    def __repr__(self) -> str:
        where = f", root={self.root!r}" if self.root is not None else ""
        cls = f", classes={len(self.classes)}" if self.classes is not None else ""
        return f"ImageSet({self.kind}, n={self._n}{where}{cls})"


class _Tolerant(Dataset):
    """Items ``(image, label, index, None)`` of a file set, or ``(None, label, index, why)`` for
    a file load_image refuses: a worker reports the file instead of raising (a worker's
    exception reaches the main process as a many-line traceback that hides the path)."""

    def __init__(self, images: ImageSet):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:  # the first pass: the one that warns of a large image
            img = load_image(self.images.paths[i], self.images.max_pixels, warn=True)
        except ValueError as e:
            return None, int(self.images.labels[i]), i, str(e)
        return self.images._apply(img), int(self.images.labels[i]), i, None


def _collate_tolerant(items):
    """(the batch of the readable items or None, [(index, why) of the others])."""
    good = [item[:3] for item in items if item[3] is None]
    errors = [(item[2], item[3]) for item in items if item[3] is not None]
    return (default_collate(good) if good else None), errors


class BatchList(Sampler):
    """A batch sampler over given batches of indices, replaceable between passes: a DataLoader
    with persistent workers keeps its sampler, so each epoch sets its own order here."""

    def __init__(self, batches: list[list[int]] | None = None):
        self.batches = batches or []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# ----------------------------------------------------------------------------------------------
# sources


def _scan(folder: str) -> tuple[list[str], list[str]]:
    """(sorted paths of the image files, sorted names of the sub-folders) directly inside folder.

    One pass over os.scandir: a DirEntry carries the joined path and, on common file systems,
    the file type from the listing itself, so an ImageNet-sized folder (1.28M files) costs no
    stat and no os.path.join per file. All paths share the folder's prefix, so sorting them
    sorts by name.
    """
    images: list[str] = []
    subdirs: list[str] = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                name = e.name
                if name.startswith("."):
                    continue
                if name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file():
                    images.append(e.path)
                elif e.is_dir():
                    subdirs.append(name)
    except OSError as e:
        raise ValueError(f"{folder}: cannot list folder ({e.strerror or e})") from None
    images.sort()
    subdirs.sort()
    return images, subdirs


def folder_image_set(root: str | os.PathLike, transform: Transform | None = None) -> ImageSet:
    """An ImageSet from a folder: ImageFolder layout (class sub-folders) or flat (images inside).

    Classes are all non-hidden sub-folders in sorted order (an empty class folder keeps its label
    index). A folder holding both images and class sub-folders with images is refused.
    """
    r = os.path.expanduser(os.fspath(root))
    if not os.path.exists(r):
        raise FileNotFoundError(f"{r}: no such folder")
    if not os.path.isdir(r):
        raise NotADirectoryError(f"{r}: not a folder")
    top, subdirs = _scan(r)
    per_class = [_scan(os.path.join(r, d))[0] for d in subdirs]
    counts = [len(files) for files in per_class]
    exts = " ".join(IMAGE_EXTENSIONS)
    if sum(counts):
        if top:
            raise ValueError(f"{r}: holds both images ({len(top)}) and class sub-folders with images; "
                             "use one layout (all images in class sub-folders, or none in sub-folders)")
        paths = [p for files in per_class for p in files]
        labels = np.repeat(np.arange(len(subdirs), dtype=np.int64), counts)
        return ImageSet(kind="files", n=len(paths), paths=paths, labels=labels,
                        classes=subdirs, transform=transform, root=r)
    if top:
        return ImageSet(kind="files", n=len(top), paths=top, labels=np.full(len(top), -1, np.int64),
                        classes=None, transform=transform, root=r)
    raise ValueError(f"{r}: no images found (looked for {exts} directly inside it and in its sub-folders)")


def tensor_image_set(images: torch.Tensor, labels=None) -> ImageSet:
    """An ImageSet over already-preprocessed images (N, C, H, W); items are returned as stored."""
    if images.ndim != 4:
        raise ValueError(f"image tensor must have shape (N, C, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:
        raise ValueError("image tensor is empty (N = 0)")
    lab = np.full(n, -1, np.int64) if labels is None else _as_labels(labels, n, "labels")
    return ImageSet(kind="tensor", n=n, labels=lab, tensor=images)


def _as_labels(labels, n: int, what: str) -> np.ndarray:
    a = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if a.shape != (n,):
        raise ValueError(f"{what}: expected {n} labels, got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer labels, got dtype {a.dtype}")
    return a.astype(np.int64)


def image_set(source: Any, transform: Transform | None = None) -> ImageSet:
    """An ImageSet from a folder, a tensor (N, C, H, W), a Dataset, a DataLoader or an ImageSet.

    See the module docstring for the layouts and what ``transform`` applies to.
    """
    if isinstance(source, ImageSet):
        # the very set when its transform is already that one, or is never applied (tensor
        # items are stored preprocessed): a deferred check then filters the caller's set, and
        # features computed for it can be recognised, instead of a copy's
        if transform is None or transform is source.transform or source.kind == "tensor":
            return source
        return source.with_transform(transform)
    if isinstance(source, (str, os.PathLike)):
        return folder_image_set(source, transform)
    if isinstance(source, torch.Tensor):
        return tensor_image_set(source)
    if isinstance(source, DataLoader):
        return image_set(source.dataset, transform)
    if isinstance(source, Dataset) or (hasattr(source, "__getitem__") and hasattr(source, "__len__")
                                       and not isinstance(source, (np.ndarray, bytes, Sequence))):
        try:
            n = len(source)
        except TypeError:
            raise TypeError(f"image source {type(source).__name__} has no length (iterable datasets are not supported)") from None
        if n == 0:
            raise ValueError(f"image dataset {type(source).__name__} is empty")
        return ImageSet(kind="dataset", n=n, labels=_known_labels(source), transform=transform, dataset=source)
    hint = " (wrap uint8 arrays with array_image_set)" if isinstance(source, np.ndarray) else ""
    raise TypeError(f"unsupported image source {type(source).__name__}: expected a folder path, "
                    f"a tensor (N, C, H, W), a torch Dataset or a DataLoader{hint}")


def array_image_set(images: np.ndarray, labels=None, transform: Transform | None = None,
                    classes: Sequence[str] | None = None) -> ImageSet:
    """An ImageSet over in-memory uint8 images (N, H, W) or (N, H, W, 3), given to ``transform`` as RGB PIL."""
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"images: expected uint8, got {a.dtype}")
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 3 or (a.ndim == 4 and a.shape[-1] == 3)):
        raise ValueError(f"images: expected shape (N, H, W) or (N, H, W, 3), got {a.shape}")
    n = a.shape[0]
    if n == 0:
        raise ValueError("images: empty (N = 0)")
    lab = np.full(n, -1, np.int64) if labels is None else _as_labels(labels, n, "labels")
    cls = None if classes is None else [str(c) for c in classes]
    if cls is not None and lab.size and lab.max() >= len(cls):
        raise ValueError(f"labels: label {int(lab.max())} out of range for {len(cls)} classes")
    return ImageSet(kind="array", n=n, labels=lab, classes=cls, transform=transform,
                    array=np.ascontiguousarray(a))


def loader(images: Any, batch_size: int | None = 1, shuffle: bool = False,
           generator: torch.Generator | None = None, num_workers: int = 0, *,
           batch_sampler: Sampler | None = None, pin_memory: bool = False,
           collate_fn: Callable | None = None) -> DataLoader:
    """A DataLoader of ``(images, labels, indices)`` batches over an ImageSet (or any image source).

    `batch_sampler` (e.g. a ``BatchList``) replaces `batch_size` / `shuffle`. With workers the
    loader is persistent: the processes (each holding a copy of the set) live as long as the
    loader, so build it once and iterate it once per pass. `generator` defaults to a private
    one: creating the workers' seeds must not draw from torch's global random state.
    """
    if not isinstance(images, (ImageSet, _Tolerant)):
        images = image_set(images)
    kw: dict[str, Any] = {"batch_sampler": batch_sampler}
    if batch_sampler is None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kw = {"batch_size": int(batch_size), "shuffle": shuffle, "drop_last": False}
    workers = int(num_workers)
    if generator is None:
        generator = torch.Generator()
    return DataLoader(images, generator=generator, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin_memory,
                      collate_fn=collate_fn, **kw)
