"""Specification of `python -m dist_free.data demo` and `prepare`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers_data import collect, write_coded_split
from PIL import Image

from dist_free.data import main
from pipelines import DataError, build_loader, prepare_flat_val, scan
from pipelines.datasets import file_list_path

DEMO_CONFIG = dict(image_size=32, val_resize=36, min_area=0.35)  # what the demo config uses


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "digits"
    assert main(["demo", str(out)]) == 0
    return out


def test_demo_is_an_imagefolder_of_rgb_jpegs_split_80_20_per_digit(demo):
    for digit in range(10):
        train = list((demo / "train" / str(digit)).glob("*.JPEG"))
        val = list((demo / "val" / str(digit)).glob("*.JPEG"))
        assert 0.17 < len(val) / (len(train) + len(val)) < 0.23
    total = sum(1 for _ in demo.rglob("*.JPEG"))
    assert total == 1797  # every digit scikit-learn ships, each in exactly one split
    with Image.open(next(demo.rglob("*.JPEG"))) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (48, 48))
    assert scan(demo, workers=1) == []


def test_demo_is_the_same_for_the_same_seed(demo, tmp_path):
    write = [sys.executable, "-m", "dist_free.data", "demo", str(tmp_path / "again")]
    subprocess.run(write, check=True, capture_output=True)
    first = sorted(p.relative_to(demo) for p in demo.rglob("*.JPEG"))
    assert first == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.JPEG"))
    sample = first[100]
    assert (demo / sample).read_bytes() == (tmp_path / "again" / sample).read_bytes()


def test_demo_refuses_to_overwrite_a_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("user data")
    assert main(["demo", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_rerunning_the_demo_command_keeps_the_finished_demo(demo, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*.JPEG")}
    assert main(["demo", str(demo)]) == 0
    assert [sum(1 for _ in (demo / split).rglob("*.JPEG")) for split in ("train", "val")] == [
        1438, 359]
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*.JPEG")} == before
    assert main(["demo", str(demo), "--seed", "1"]) == 2       # a different recipe: refused


def test_demo_loads_with_the_demo_geometry(demo):
    train = build_loader("auto", demo, "train", batch_size=64, num_classes=10, **DEMO_CONFIG)
    val = build_loader("auto", demo, "val", batch_size=128, num_classes=10, **DEMO_CONFIG)
    images, labels = next(iter(train))
    assert images.shape == (64, 3, 32, 32) and set(labels.tolist()) <= set(range(10))
    assert sum(len(y) for _, y in val) == val.num_samples == 359
    # Digits stay legible: the tinted ink differs from the paper inside the crop.
    assert images.flatten(1).std(1).min() > 0.02


@pytest.fixture
def flat_val(tmp_path):
    """ImageFolder train plus ImageNet-style flat val named ILSVRC2012_val_*.JPEG."""
    write_coded_split(tmp_path, "train", [1, 1, 1], classes=["n01", "n02", "n03"])
    coded = write_coded_split(tmp_path / "tmp", "val", [2, 2, 2], classes=["n01", "n02", "n03"])
    (tmp_path / "val").mkdir()
    labels = {}
    for image_id, (path, label) in coded.items():  # names no longer sort by class
        name = f"ILSVRC2012_val_{(image_id * 5) % 6 + 1:08d}.JPEG"
        path.rename(tmp_path / "val" / name)
        labels[name] = label
    return tmp_path, dict(sorted(labels.items()))


@pytest.mark.parametrize("style", ["synset", "index", "filename synset"])
def test_prepare_writes_a_file_list_that_the_loaders_use(flat_val, style):
    root, labels = flat_val
    synsets = ["n01", "n02", "n03"]
    lines = {"synset": [synsets[y] for y in labels.values()],
             "index": [str(y) for y in labels.values()],
             "filename synset": [f"{n} {synsets[y]}" for n, y in reversed(labels.items())]}[style]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    assert main(["prepare", str(root), "--val-labels", str(root / "labels.txt")]) == 0
    assert file_list_path(root, "val").is_file()
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(labels)  # nothing copied
    for kind in ("dali-cpu", "torchvision"):
        val = build_loader(kind, root, "val", batch_size=4, image_size=16, val_resize=18,
                           num_threads=1)
        ids, pixel_labels, given = collect(val)
        assert sorted(ids) == list(range(6)) and given == pixel_labels


def test_prepare_rejects_labels_it_cannot_map(flat_val):
    root, labels = flat_val
    (root / "labels.txt").write_text("n01\n" * (len(labels) - 1) + "n99\n")
    with pytest.raises(DataError, match="'n99' is neither"):
        prepare_flat_val(root, root / "labels.txt")
    (root / "labels.txt").write_text("n01\n")
    with pytest.raises(DataError, match="1 labels for 6 images"):
        prepare_flat_val(root, root / "labels.txt")


def test_a_prepared_list_with_a_bad_line_names_the_line(flat_val):
    root, _ = flat_val
    file_list_path(root, "val").write_text("val/ILSVRC2012_val_00000001.JPEG 7\n")
    with pytest.raises(DataError, match="val_list.txt:1"):
        build_loader("torchvision", root, "val", batch_size=2, device=torch.device("cpu"))
