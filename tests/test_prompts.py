"""reclip.prompts: the 22 benchmark presets, class-name / template files, prompt formatting."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from reclip import prompts
from reclip.prompts import (DEFAULT_TEMPLATES, PRESETS, format_prompts, load_preset, preset_folders,
                            read_classes, read_classnames, read_templates)

COUNTS = {
    "aid": 30, "birdsnap": 500, "caltech101": 101, "cifar10": 10, "cifar100": 100, "country211": 211,
    "dtd": 47, "eurosat": 10, "fer2013": 7, "fgvc_aircraft": 100, "flowers102": 102, "food101": 101,
    "gtsrb": 43, "imagenet": 1000, "mnist": 10, "oxford_pets": 37, "pcam": 2, "sst2": 2,
    "resisc45": 45, "stanford_cars": 196, "stl10": 10, "sun397": 397,
}


def test_preset_names():
    assert PRESETS == tuple(sorted(COUNTS))
    shipped = {p.name[:-5] for p in resources.files("reclip").joinpath("presets").iterdir()
               if p.name.endswith(".json")}
    assert shipped == set(PRESETS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_preset_contents(name):
    classnames, templates = load_preset(name)
    assert len(classnames) == COUNTS[name]
    assert len(set(classnames)) == len(classnames)
    assert all(isinstance(c, str) and c == c.strip() and c for c in classnames)
    assert templates and all(t.count("{}") == 1 for t in templates)
    raw = json.loads(resources.files("reclip").joinpath("presets").joinpath(f"{name}.json").read_text("utf-8"))
    assert raw["name"] == name and {"name", "classnames", "templates"} <= set(raw)
    assert set(raw) <= {"name", "classnames", "templates", "folders"}
    folders = preset_folders(name)
    assert folders is None or (len(folders) == len(classnames) and len(set(folders)) == len(folders))


def test_preset_label_order_spot_checks():
    # label index i = classnames[i] in each dataset's canonical order
    assert load_preset("cifar10")[0][:3] == ["airplane", "automobile", "bird"]
    assert load_preset("cifar100")[0][:2] == ["apple", "aquarium fish"]
    assert load_preset("mnist")[0] == [str(d) for d in range(10)]
    assert load_preset("imagenet")[0][:2] == ["tench", "goldfish"]
    pets = load_preset("oxford_pets")[0]
    assert pets[:3] == ["Abyssinian", "american bulldog", "american pit bull terrier"]
    assert pets[-1] == "yorkshire terrier"
    euro = load_preset("eurosat")[0]  # AnnualCrop, Forest, HerbaceousVegetation, ... SeaLake
    assert euro[0] == "annual crop land" and euro[2] == "brushland or shrubland" and euro[-1] == "lake or sea"
    assert load_preset("caltech101")[0][0] == "off-center face"  # no BACKGROUND_Google class
    assert load_preset("flowers102")[0][0] == "pink primrose"
    assert load_preset("gtsrb")[0][14] == "stop"
    assert load_preset("sst2")[0] == ["negative", "positive"]
    assert load_preset("pcam")[0][0] == "lymph node"
    assert load_preset("fer2013")[0] == ["angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"]


def test_imagenet_preset_folder_ids():
    """ImageNet's folders are WordNet ids; its canonical label order is the sorted id order, and
    the class names are in that same order (anchors: the first, a few well-known, the last)."""
    names, folders = load_preset("imagenet")[0], preset_folders("imagenet")
    assert len(folders) == 1000 and folders == sorted(folders) and len(set(folders)) == 1000
    assert all(len(f) == 9 and f[0] == "n" and f[1:].isdigit() for f in folders)
    anchors = {0: ("n01440764", "tench"), 1: ("n01443537", "goldfish"),
               2: ("n01484850", "great white shark"), 151: ("n02085620", "Chihuahua"),
               281: ("n02123045", "tabby cat"), 999: ("n15075141", "toilet paper")}
    for i, (wnid, name) in anchors.items():
        assert (folders[i], names[i]) == (wnid, name), i
    assert preset_folders("ImageNet-1k") == folders
    assert preset_folders("cifar10") is None  # folders named by the class: nothing to map


def test_preset_lookup_is_forgiving():
    assert load_preset("CIFAR-10") == load_preset("cifar10")
    assert load_preset("FGVC Aircraft") == load_preset("fgvc_aircraft")
    assert load_preset("pets") == load_preset("oxford_pets")


def test_preset_unknown_lists_valid_names():
    with pytest.raises(ValueError) as e:
        load_preset("cifar11")
    msg = str(e.value)
    assert "cifar11" in msg and "cifar10" in msg and "sun397" in msg and "\n" not in msg


def test_load_preset_returns_fresh_lists():
    a, _ = load_preset("cifar10")
    a.append("x")
    assert len(load_preset("cifar10")[0]) == 10


def test_read_classnames(tmp_path):
    p = tmp_path / "classes.txt"
    p.write_text("\ufeff# digits\nzero\n\n  one  \n# comment\ntwo\n", encoding="utf-8")
    assert read_classnames(p) == ["zero", "one", "two"]
    assert read_classnames(str(p)) == ["zero", "one", "two"]


def test_read_classes_two_columns(tmp_path):
    p = tmp_path / "classes.tsv"
    p.write_text("# id\tname\nn0002\tship\n\n n0003 \t  cat \nn0001\tdog\n", encoding="utf-8")
    assert read_classes(p) == (["ship", "cat", "dog"], ["n0002", "n0003", "n0001"])
    assert read_classnames(p) == ["ship", "cat", "dog"]
    one = tmp_path / "classes.txt"
    one.write_text("ship\n  cat\t\ndog\n")  # a tab at the end of a line is only whitespace
    assert read_classes(one) == (["ship", "cat", "dog"], None)


@pytest.mark.parametrize("text,line,mentions", [
    ("n1\tcat\ndog\n", 2, "'dog'"),  # a one-column line in a tabbed file
    ("cat\nn2\tdog\n", 1, "'cat'"),
    ("n1\tcat\nn2\tdog\tdogs\n", 2, "folder<TAB>class name"),  # three fields
    ("n1\tcat\nn2\t\tdog\n", 2, "folder<TAB>class name"),  # an empty middle field
    ("n1\tcat\nn1\tdog\n", 2, "duplicate folder 'n1' (first on line 1)"),
    ("n1\tcat\nn2\tcat\n", 2, "duplicate class name 'cat' (first on line 1)"),
])
def test_read_classes_errors(tmp_path, text, line, mentions):
    p = tmp_path / "bad.tsv"
    p.write_text(text)
    _one_line_error(ValueError, read_classes, p, contains=[str(p), f"line {line}:", mentions])


def _one_line_error(exc_type, fn, *args, contains=()):
    with pytest.raises(exc_type) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    for c in contains:
        assert c in msg, (c, msg)
    return msg


def test_read_classnames_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    _one_line_error(FileNotFoundError, read_classnames, missing, contains=[str(missing)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n# only a comment\n")
    _one_line_error(ValueError, read_classnames, empty, contains=[str(empty), "no class names"])
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\ncat\n")
    _one_line_error(ValueError, read_classnames, dup, contains=[str(dup), "line 3", "'cat'", "line 1"])
    _one_line_error(ValueError, read_classnames, tmp_path, contains=[str(tmp_path)])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x80abc")
    _one_line_error(ValueError, read_classnames, binary, contains=[str(binary), "UTF-8"])


def test_read_templates(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("a photo of a {}.\n# comment\n\n  a {} in {{braces}}  \n")
    assert read_templates(p) == ["a photo of a {}.", "a {} in {{braces}}"]


def test_read_templates_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    _one_line_error(FileNotFoundError, read_templates, missing, contains=[str(missing)])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _one_line_error(ValueError, read_templates, empty, contains=[str(empty), "no templates"])
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo without placeholder\n")
    _one_line_error(ValueError, read_templates, bad, contains=[str(bad), "line 2", "found 0"])
    two = tmp_path / "two.txt"
    two.write_text("{} and {}\n")
    _one_line_error(ValueError, read_templates, two, contains=[str(two), "line 1", "found 2"])
    dup = tmp_path / "dup.txt"
    dup.write_text("a {}.\na {}.\n")
    _one_line_error(ValueError, read_templates, dup, contains=[str(dup), "line 2"])


def test_format_prompts():
    out = format_prompts(["cat", "dog"], ["a photo of a {}.", "a {} {{x}}"])
    assert out == [["a photo of a cat.", "a cat {{x}}"], ["a photo of a dog.", "a dog {{x}}"]]
    assert format_prompts(["c{}at"]) == [["a photo of a c{}at."]]  # plain substitution
    assert format_prompts(["cat"], None) == [[DEFAULT_TEMPLATES[0].replace("{}", "cat")]]
    names, temps = load_preset("cifar100")
    out = format_prompts(names, temps)
    assert len(out) == 100 and all(len(row) == len(temps) for row in out)


def test_format_prompts_errors():
    with pytest.raises(ValueError, match="exactly one"):
        format_prompts(["cat"], ["no placeholder"])
    with pytest.raises(ValueError, match="no class names"):
        format_prompts([], ["a {}."])
    with pytest.raises(ValueError, match="no templates"):
        format_prompts(["cat"], [])
    with pytest.raises(ValueError, match="duplicate"):
        format_prompts(["cat", "cat"])
    with pytest.raises(TypeError):
        format_prompts("cat")


def test_check_helpers():
    assert prompts.check_classnames([" a ", "b"]) == ["a", "b"]
    assert prompts.check_templates(None) == list(DEFAULT_TEMPLATES)
    with pytest.raises(ValueError, match="blank"):
        prompts.check_classnames(["a", "  "])
