"""reclip.data: image folders, tensor / Dataset / DataLoader sources, in-memory uint8 arrays."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reclip.data import (IMAGE_EXTENSIONS, ImageSet, array_image_set, image_error, image_set,
                         loader, tensor_image_set)
from reclip.labels import class_labels, closest_name, describe_unmatched, unmatched_folders


def _png(path, value, size=(5, 4), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, 7)
    Image.new(mode, size, color).save(path)


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, (p, msg)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "dog" / "b.png", 20)
    _png(root / "dog" / "a.png", 10)
    _png(root / "cat" / "z.PNG", 30, mode="L")
    _png(root / "cat" / "y.jpg", 40)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    (root / "empty_class").mkdir()
    return root


def test_image_folder_layout(folder):
    ds = image_set(folder)
    assert isinstance(ds, ImageSet) and len(ds) == 4
    assert ds.classes == ["cat", "dog", "empty_class"]
    names = [f"{Path(p).parent.name}/{Path(p).name}" for p in ds.paths]
    assert names == ["cat/y.jpg", "cat/z.PNG", "dog/a.png", "dog/b.png"]
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.has_labels
    img, label, idx = ds[2]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 4, 5) and img.dtype == torch.float32
    assert (label, idx) == (1, 2)
    assert abs(float(img[0, 0, 0]) - 10 / 255) < 1e-6
    gray, _, _ = ds[1]  # "L" image comes out RGB
    assert gray.shape == (3, 4, 5)
    assert image_set(folder).paths == ds.paths  # stable
    assert ds.check() is ds


def test_transform_applied(folder):
    ds = image_set(str(folder), transform=lambda im: im.size)
    assert ds[0][0] == (5, 4)
    ds2 = image_set(ds, transform=lambda im: "x")
    assert ds2[0][0] == "x" and ds[0][0] == (5, 4)
    assert image_set(ds) is ds


def test_flat_folder(tmp_path):
    for i, name in enumerate(["b.bmp", "a.png", "c.webp"]):
        _png(tmp_path / name, 10 * i)
    (tmp_path / "sub").mkdir()  # a sub-folder without images does not make it an ImageFolder
    ds = image_set(tmp_path)
    assert [Path(p).name for p in ds.paths] == ["a.png", "b.bmp", "c.webp"]
    assert ds.labels.tolist() == [-1, -1, -1] and ds.classes is None and not ds.has_labels
    assert ds[0][1] == -1


def test_folder_scan_rules(tmp_path):
    """What the scan keeps: only one level below each class folder, hidden entries skipped,
    extensions by name (any case), a folder named like an image is still a class folder, and
    the paths are those of the root as given (with or without a trailing separator)."""
    root = tmp_path / "imgs"
    (root / "n02").mkdir(parents=True)
    (root / "n02" / "n02_7.JPEG").write_bytes(b"")  # empty: the scan never opens a file
    (root / "n02" / "n02_10.jpeg").write_bytes(b"")
    (root / "n02" / "README").write_text("no extension")
    (root / "n02" / "deeper").mkdir()
    (root / "n02" / "deeper" / "x.png").write_bytes(b"")  # below a class folder: not read
    (root / "n01.png").mkdir()  # a class folder despite its name
    (root / "n01.png" / "a.PNG").write_bytes(b"")
    (root / ".cache").mkdir()  # hidden: not a class
    (root / ".cache" / "c.png").write_bytes(b"")
    (root / "n03").mkdir()  # empty: keeps its label index
    ds = image_set(root)
    assert ds.classes == ["n01.png", "n02", "n03"]
    assert [os.path.relpath(p, root) for p in ds.paths] == [
        os.path.join("n01.png", "a.PNG"), os.path.join("n02", "n02_10.jpeg"),
        os.path.join("n02", "n02_7.JPEG")]
    assert ds.labels.tolist() == [0, 1, 1]
    assert image_set(str(root) + os.sep).paths == [os.path.join(str(root), os.path.relpath(p, root))
                                                   for p in ds.paths]


def test_class_labels_by_folder_name_or_id(tmp_path):
    """Folder labels mapped onto a class list (not in sorted order) through the folder names,
    or through folder ids; a layout they do not cover has no labels at all."""
    counts = {"n0300": 1, "n0100": 2, "n0200": 3}  # sorted: n0100 (0), n0200 (1), n0300 (2)
    ids = {"n0200": "ship", "n0300": "cat", "n0100": "dog"}
    for folder, n in counts.items():
        for i in range(n):
            _png(tmp_path / "ids" / folder / f"{i}.png", i)
            _png(tmp_path / "names" / ids[folder] / f"{i}.png", i)
    classes = ["ship", "cat", "dog"]
    folders = ["n0200", "n0300", "n0100"]
    by_id = image_set(tmp_path / "ids")
    assert by_id.labels.tolist() == [0, 0, 1, 1, 1, 2]
    expected = [2, 2, 0, 0, 0, 1]  # dog dog ship ship ship cat
    assert class_labels(by_id, classes, folders).tolist() == expected
    by_name = image_set(tmp_path / "names")  # cat, dog, ship
    assert class_labels(by_name, classes).tolist() == [1, 2, 2, 0, 0, 0]
    # ids given, folders named by class: mapped by name
    assert class_labels(by_name, classes, folders).tolist() == [1, 2, 2, 0, 0, 0]
    # an empty folder holds no image to label, whatever its name
    (tmp_path / "ids" / "misc").mkdir()
    assert class_labels(image_set(tmp_path / "ids"), classes, folders).tolist() == expected

    # one folder that is neither a class nor an id: no label, never the folder indices
    (tmp_path / "names" / "dog").rename(tmp_path / "names" / "hound")
    renamed = image_set(tmp_path / "names")
    assert renamed.labels.tolist() == [0, 1, 1, 2, 2, 2]  # cat, hound, ship
    assert class_labels(renamed, classes).tolist() == [-1] * 6
    assert class_labels(renamed, classes, folders).tolist() == [-1] * 6
    assert class_labels(by_id, classes).tolist() == [-1] * 6  # ids without the mapping
    mixed = ["n0200", "cat", "dog"]  # ids for some folders, names for others: refused
    assert class_labels(by_id, classes, mixed).tolist() == [-1] * 6


def test_unmatched_folders_are_named_with_their_likely_class(tmp_path):
    """The folders that keep class_labels from labelling a set, each with the class it most
    likely meant: the same words written with underscores or another case, or a near spelling."""
    classes = ["zero", "seven", "great white shark", "Tench"]
    for name in ("zero", "sevn", "great_white_shark", "tench", "xyzzy"):
        _png(tmp_path / "d" / name / "0.png", 1)
    (tmp_path / "d" / "emptyfolder").mkdir()  # holds no image: never reported
    data = image_set(tmp_path / "d")
    assert class_labels(data, classes).tolist() == [-1] * 5
    # sorted folder order: great_white_shark, sevn, tench, xyzzy, zero
    assert unmatched_folders(data, classes) == [("great_white_shark", "great white shark"),
                                                ("sevn", "seven"), ("tench", "Tench"),
                                                ("xyzzy", None)]
    assert describe_unmatched(data, classes) == (
        "4 of its 5 folders match no class: 'great_white_shark' (did you mean 'great white "
        "shark'?), 'sevn' (did you mean 'seven'?), 'tench' (did you mean 'Tench'?), 'xyzzy'")
    assert describe_unmatched(data, classes, shown=1).endswith("shark'?) and 3 more")

    # every folder a class: nothing to report; a flat folder or an in-memory set neither
    for name in classes:
        _png(tmp_path / "fixed" / name / "0.png", 1)
    fixed = image_set(tmp_path / "fixed")
    assert unmatched_folders(fixed, classes) == [] and describe_unmatched(fixed, classes) is None
    _png(tmp_path / "flat" / "0.png", 1)
    assert unmatched_folders(image_set(tmp_path / "flat"), classes) == []
    assert unmatched_folders(array_image_set(np.zeros((2, 3, 3), np.uint8), [0, 1]), classes) == []


def test_unmatched_folders_named_by_id(tmp_path):
    """Folders named by ids are compared with the ids, and a mistyped id is suggested its id;
    one misspelt class name among class-named folders is compared with the class names."""
    classes, ids = ["ship", "cat", "dog"], ["n0200", "n0300", "n0100"]
    for name in ("n0200", "n0300", "n01000"):
        _png(tmp_path / "ids" / name / "0.png", 1)
    assert unmatched_folders(image_set(tmp_path / "ids"), classes, ids) == [("n01000", "n0100")]
    for name in ("ship", "cta", "dog"):
        _png(tmp_path / "names" / name / "0.png", 1)
    assert unmatched_folders(image_set(tmp_path / "names"), classes, ids) == [("cta", "cat")]
    assert closest_name("Cat_", classes) == "cat"
    assert closest_name("shipp", classes) == "ship"
    assert closest_name("Dogs and cats", classes) is None


def test_class_labels_of_other_sources(tmp_path):
    for i in range(2):
        _png(tmp_path / f"{i}.png", i)
    assert class_labels(image_set(tmp_path), ["a", "b"]).tolist() == [-1, -1]  # flat folder
    t = tensor_image_set(torch.zeros(3, 3, 2, 2), [2, 0, 1])
    assert class_labels(t, ["a", "b", "c"]).tolist() == [2, 0, 1]
    a = array_image_set(np.zeros((2, 4, 4), np.uint8), [1, 0], classes=["x", "y"])
    assert class_labels(a, ["p", "q"]).tolist() == [1, 0]  # its labels are class indices


def test_mixed_layout_refused(tmp_path):
    _png(tmp_path / "top.png", 1)
    _png(tmp_path / "cls" / "a.png", 2)
    with pytest.raises(ValueError) as e:
        image_set(tmp_path)
    _one_line(e, tmp_path)


def test_empty_and_missing_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        image_set(tmp_path)
    _one_line(e, tmp_path, "no images found")
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as e:
        image_set(missing)
    _one_line(e, missing)
    with pytest.raises(NotADirectoryError) as e:
        image_set(tmp_path / "readme.txt")
    _one_line(e, "readme.txt")


def test_corrupt_image_named(tmp_path):
    _png(tmp_path / "good.png", 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    trunc = tmp_path / "trunc.png"
    _png(trunc, 5, size=(64, 64))
    trunc.write_bytes(trunc.read_bytes()[:60])
    ds = image_set(tmp_path)
    assert len(ds) == 3  # listing does not open files
    with pytest.raises(ValueError) as e:
        ds[0]
    _one_line(e, bad)
    with pytest.raises(ValueError) as e:
        ds.check()
    _one_line(e, bad, "1 more")
    seen = []
    with pytest.raises(ValueError):
        ds.check(progress=seen.append)
    assert seen == [1, 1, 1]
    with pytest.raises(ValueError) as e:
        ds[2]
    _one_line(e, trunc)


def test_image_pixel_limit(tmp_path):
    """An image above the pixel limit is refused before it is decoded, naming the file, its
    size and --max-image-pixels; above half the limit the first pass warns in one line naming
    the file; 0 lifts the limit. PIL's own limit is left as it was."""
    import warnings

    from reclip.data import MAX_PIXELS, load_image
    from reclip.errors import ReclipWarning

    _png(tmp_path / "a" / "big.png", 5, size=(40, 30))  # 1200 pixels
    _png(tmp_path / "a" / "small.png", 5, size=(20, 20))  # 400 pixels
    big = tmp_path / "a" / "big.png"
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError) as e:
        load_image(big, 1199)
    _one_line(e, f"{big}: cannot read image: 40x30 = 1200 pixels, more than the limit of 1199 "
                 "pixels (raise it with --max-image-pixels, 0 for no limit)")
    assert Image.MAX_IMAGE_PIXELS == pil_limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(big, 1200).size == (40, 30)  # at the limit: loaded, no warning
        assert load_image(big, 2399, warn=True).size == (40, 30)
        assert load_image(big, 0, warn=True).size == (40, 30)
        assert load_image(big, 2400, warn=True).size == (40, 30)  # not above half of it
    assert [(w.category, str(w.message)) for w in caught] == [
        (ReclipWarning, f"{big}: a large image (40x30 = 1200 pixels), slow to decode; images "
                        "above 2399 pixels are refused (--max-image-pixels)")]
    assert Image.MAX_IMAGE_PIXELS == pil_limit and MAX_PIXELS == 2 * pil_limit

    # an ImageSet checks against its own limit, in this process and in the first pass
    data = image_set(tmp_path / "a")
    assert data.max_pixels == MAX_PIXELS
    data.max_pixels = 1000
    with pytest.raises(ValueError, match="big.png: cannot read image: 40x30"):
        data.check()
    with pytest.raises(ValueError, match="big.png: cannot read image: 40x30"):
        data[0]
    kept = data.check(skip_bad=True)
    assert kept.skipped == [str(big)] and len(kept) == 1
    first = data.check_in_first_pass(skip_bad=True)
    assert sum(len(b[0]) for b in first.checking_batches(2)) == 1 and first.skipped == [str(big)]


def test_check_can_skip_unreadable_images(tmp_path):
    _png(tmp_path / "a" / "1.png", 10)
    _png(tmp_path / "b" / "2.png", 20)
    _png(tmp_path / "b" / "4.png", 40)
    (tmp_path / "a" / "0.png").write_bytes(b"")  # zero bytes
    (tmp_path / "b" / "3.jpg").write_text("text, not a JPEG")
    ds = image_set(tmp_path)
    assert len(ds) == 5
    assert image_error(ds.paths[0]) is not None and str(ds.paths[0]) in image_error(ds.paths[0])
    assert image_error(ds.paths[1]) is None
    with pytest.raises(ValueError) as e:
        ds.check()  # the default stays: stop at the first, naming it
    _one_line(e, ds.paths[0], "1 more")
    seen = []
    good = ds.check(progress=seen.append, skip_bad=True)
    assert seen == [1] * 5
    assert good.skipped == [ds.paths[0], ds.paths[3]] and ds.skipped == []
    assert good.paths == [ds.paths[i] for i in (1, 2, 4)]
    assert good.labels.tolist() == [0, 1, 1] and good.classes == ["a", "b"]
    assert [good[i][2] for i in range(3)] == [0, 1, 2]  # items re-indexed, all loadable
    assert abs(float(good[2][0][0, 0, 0]) - 40 / 255) < 1e-6
    assert good.with_transform(lambda im: im.size).skipped == good.skipped
    assert good.check(skip_bad=True) is good  # nothing more to skip
    for p in good.paths:
        Path(p).write_bytes(b"")
    with pytest.raises(ValueError) as e:
        good.check(skip_bad=True)
    _one_line(e, tmp_path, "none of its 3 images")


@pytest.mark.parametrize("workers", [0, 2])
def test_check_in_first_pass(tmp_path, workers):
    """The deferred check: one pass decodes each image once (in the workers), stops at an
    unreadable one naming it, or leaves it out of the set for every later pass."""
    _png(tmp_path / "a" / "1.png", 10)
    _png(tmp_path / "b" / "2.png", 20)
    _png(tmp_path / "b" / "4.png", 40)
    (tmp_path / "a" / "0.png").write_bytes(b"")
    (tmp_path / "b" / "3.jpg").write_text("text, not a JPEG")
    listed = image_set(tmp_path)
    stop = listed.check_in_first_pass()
    assert stop.unchecked == "stop" and listed.unchecked is None
    with pytest.raises(ValueError) as e:
        list(stop.checking_batches(2, num_workers=workers))
    _one_line(e, listed.paths[0])
    skip = listed.check_in_first_pass(skip_bad=True)
    batches = list(skip.checking_batches(2, num_workers=workers))
    assert [b[2].tolist() for b in batches] == [[1], [2], [4]]  # readable items, in order
    assert [b[1].tolist() for b in batches] == [[0], [1], [1]]
    assert skip.skipped == [listed.paths[0], listed.paths[3]] and skip.unchecked is None
    assert skip.paths == [listed.paths[i] for i in (1, 2, 4)] and len(skip) == 3
    assert torch.cat([b[2] for b in loader(skip, 2, num_workers=workers)]).tolist() == [0, 1, 2]
    x = torch.zeros(2, 3, 4, 4)
    assert image_set(x).check_in_first_pass().unchecked is None  # nothing to decode


def test_tensor_source():
    x = torch.randn(6, 3, 8, 8)
    ds = image_set(x, transform=lambda im: 1 / 0)  # never applied to tensors
    assert len(ds) == 6 and ds.paths is None and ds.labels.tolist() == [-1] * 6
    img, label, idx = ds[-1]
    assert torch.equal(img, x[5]) and label == -1 and idx == 5
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        image_set(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        image_set(torch.randn(0, 3, 8, 8))


class _PilDataset(torch.utils.data.Dataset):
    def __init__(self, n, with_label=True):
        self.n, self.with_label = n, with_label

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        img = Image.new("RGB", (4, 4), (i, 0, 0))
        return (img, i % 3) if self.with_label else img


def test_dataset_source():
    ds = image_set(_PilDataset(5))
    img, label, idx = ds[4]
    assert img.shape == (3, 4, 4) and label == 1 and idx == 4
    assert ds.labels.tolist() == [0, 1, 2, 0, 1]  # one pass, read lazily
    ds = image_set(_PilDataset(3, with_label=False), transform=lambda im: im.getpixel((0, 0))[0])
    assert [ds[i][:2] for i in range(3)] == [(0, -1), (1, -1), (2, -1)]
    # tensors from a dataset pass through untouched; labels from a TensorDataset without a pass
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([3, 1, 0, 2])
    ds = image_set(torch.utils.data.TensorDataset(x, y), transform=lambda im: 1 / 0)
    assert ds.labels.tolist() == [3, 1, 0, 2]
    assert torch.equal(ds[1][0], x[1]) and ds[1][1] == 1
    sub = image_set(torch.utils.data.Subset(torch.utils.data.TensorDataset(x, y), [2, 0]))
    assert sub.labels.tolist() == [0, 3]


def test_dataset_targets_attribute():
    class WithTargets(_PilDataset):
        targets = [2, 2, 1]

        def __getitem__(self, i):
            raise AssertionError("labels must come from .targets without loading")

    assert image_set(WithTargets(3)).labels.tolist() == [2, 2, 1]


def test_dataloader_source_and_loader(folder):
    ds = image_set(folder)
    dl = loader(ds, batch_size=3)
    batches = list(dl)
    assert [b[0].shape[0] for b in batches] == [3, 1]
    assert batches[0][1].tolist() == [0, 0, 1] and batches[0][2].tolist() == [0, 1, 2]
    again = image_set(dl)
    assert again is ds
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    o1 = torch.cat([b[2] for b in loader(ds, 2, shuffle=True, generator=g1)])
    o2 = torch.cat([b[2] for b in loader(ds, 2, shuffle=True, generator=g2)])
    assert torch.equal(o1, o2) and sorted(o1.tolist()) == [0, 1, 2, 3]
    assert len(list(loader(torch.randn(5, 3, 2, 2), 2))) == 3  # any source
    with pytest.raises(ValueError):
        loader(ds, 0)


def test_unsupported_source():
    with pytest.raises(TypeError, match="array_image_set"):
        image_set(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(TypeError):
        image_set(42)


def test_array_image_set():
    gray = (np.arange(2 * 3 * 4) % 256).astype(np.uint8).reshape(2, 3, 4)
    ds = array_image_set(gray, [1, 0], None, classes=["a", "b"])
    img, label, idx = ds[0]
    assert img.shape == (3, 3, 4) and label == 1 and ds.classes == ["a", "b"] and ds.paths is None
    assert torch.allclose(img[0], torch.from_numpy(gray[0]).float() / 255)
    rgb = np.zeros((3, 5, 5, 3), np.uint8)
    ds = array_image_set(rgb, None, lambda im: (im.mode, im.size))
    assert ds[2] == (("RGB", (5, 5)), -1, 2)
    with pytest.raises(ValueError, match="uint8"):
        array_image_set(rgb.astype(np.float32), None, None)
    with pytest.raises(ValueError, match="labels"):
        array_image_set(rgb, [0, 1], None)
    with pytest.raises(ValueError, match="out of range"):
        array_image_set(rgb, [0, 1, 2], None, classes=["a", "b"])


def test_image_extensions():
    assert ".png" in IMAGE_EXTENSIONS and all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


def test_one_line_cause():
    from reclip.errors import MAX_CAUSE, one_line

    assert one_line(OSError("broken\n  at byte 7\n")) == "OSError: broken at byte 7"
    assert one_line(KeyError()) == "KeyError"
    # torch's messages set words in bold for a terminal: the codes are no text
    assert one_line(ValueError("a \x1b[1mbold\x1b[0m word")) == "ValueError: a bold word"
    long = one_line(ValueError("x" * 1000))
    assert len(long) == MAX_CAUSE and long.startswith("ValueError: xxx") and long.endswith("...")
