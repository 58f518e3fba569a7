"""Specification of the input pipelines: shards, epochs, labels, formats and fail-fast checks."""

from __future__ import annotations

import importlib.abc
import sys

import numpy as np
import pytest
import torch
from helpers_data import (
    bmp_claiming,
    collect,
    decode_batch,
    jpeg_claiming,
    png_claiming,
    write_coded_split,
    write_textured,
)
from PIL import Image

from pipelines import (
    DataError,
    build_loader,
    check_dataset,
    dali_available,
    list_split,
    resolve_kind,
)
from pipelines.datasets import file_list_path
from pipelines.sharding import train_shard, val_shard

TRAIN_COUNTS = [13, 11, 9]  # 33 images: divides evenly by no global batch used below
VAL_COUNTS = [5, 4, 4]  # 13 images
BATCH = 4
LOADERS = ["dali-cpu", "torchvision"]


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    train = write_coded_split(root, "train", TRAIN_COUNTS)
    val = write_coded_split(root, "val", VAL_COUNTS)
    return root, train, val


def loader(kind, root, split, **kwargs):
    options = dict(batch_size=BATCH, image_size=16, val_resize=18, min_area=0.3, num_threads=1)
    return build_loader(kind, root, split, **{**options, **kwargs})


def rank_epochs(kind, root, split, world_size, epoch=0, seed=0):
    """[(loader, ids, pixel labels, labels)] for every rank of a world."""
    runs = []
    for rank in range(world_size):
        ranked = loader(kind, root, split, rank=rank, world_size=world_size, seed=seed)
        ranked.set_epoch(epoch)
        runs.append((ranked, *collect(ranked)))
    return runs


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_train_shards_are_disjoint_equal_dropping_only_the_last_global_batch(coded, kind,
                                                                             world_size):
    root, train, _ = coded
    runs = rank_epochs(kind, root, "train", world_size, epoch=1)
    steps = len(train) // (world_size * BATCH)
    seen = [i for _, ids, _, _ in runs for i in ids]
    assert len(seen) == len(set(seen)) == steps * world_size * BATCH
    assert len(train) - len(seen) < world_size * BATCH
    for ranked, ids, pixel_labels, labels in runs:
        assert len(ranked) == steps and ranked.num_samples == steps * BATCH == len(ids)
        assert labels == pixel_labels == [train[i][1] for i in ids]  # label matches its folder


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_counts_every_image_exactly_once(coded, kind, world_size):
    root, _, val = coded
    runs = rank_epochs(kind, root, "val", world_size)
    seen = sorted(i for _, ids, _, _ in runs for i in ids)
    assert seen == sorted(val)
    assert sum(ranked.num_samples for ranked, *_ in runs) == len(val)
    for ranked, ids, pixel_labels, labels in runs:
        assert labels == pixel_labels == [val[i][1] for i in ids]
        assert len(ranked) == -(-ranked.num_samples // BATCH)


def test_every_image_is_trained_on_across_a_few_epochs(coded):
    root, train, _ = coded
    seen = set()
    for epoch in range(8):  # 9 of 33 images sit out each epoch, a different 9 each time
        seen |= {i for _, ids, _, _ in rank_epochs("dali-cpu", root, "train", 3, epoch) for i in ids}
    assert seen == set(train)


@pytest.mark.parametrize("kind", LOADERS)
def test_the_same_seed_with_epoch_repeats_order_with_augmentation(coded, kind):
    root = coded[0]

    def epoch_batches(seed, epoch):
        run = loader(kind, root, "train", seed=seed, min_area=0.08)
        run.set_epoch(epoch)
        return [images for images, _ in run]

    def order(batches):
        return [i for images in batches for i in decode_batch(images)[0]]

    first, again = epoch_batches(3, 2), epoch_batches(3, 2)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    assert order(first) != order(epoch_batches(3, 3))
    assert order(first) != order(epoch_batches(4, 2))


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """16 smooth, non-flat training images: their crops and flips show in the pixels."""
    root = tmp_path_factory.mktemp("textured")
    for i in range(16):
        write_textured(root / "train" / f"c{i % 2}" / f"{i}.JPEG", 40, 32, seed=i)
    return root


def test_torchvision_resumed_mid_epoch_gives_the_remaining_batches_augmented_alike(textured):
    """An epoch resumed at batch 1 is the epoch left alone minus its first batch, crops and
    flips included, and iterating leaves torch's global generator where it was (a DataLoader
    would draw its workers' seed from it at each new iterator: one more draw at every resume)."""
    run = loader("torchvision", textured, "train", min_area=0.08)
    run.set_epoch(1)
    before = torch.get_rng_state()
    whole = [images for images, _ in run]
    run.set_epoch(1, start_batch=1)
    rest = [images for images, _ in run]
    assert torch.equal(torch.get_rng_state(), before)
    assert len(whole) == 4 and len(rest) == 3
    assert all(torch.equal(a, b) for a, b in zip(whole[1:], rest))


@pytest.mark.parametrize("kind", LOADERS + ["synthetic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_have_the_shape_dtype_layout_range_asked(coded, kind, dtype, channels_last):
    run = loader(kind, coded[0], "train", dtype=dtype, channels_last=channels_last, image_size=12)
    images, labels = next(iter(run))
    assert images.shape == (BATCH, 3, 12, 12) and images.dtype == dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert images.is_contiguous(memory_format=layout)
    assert images.min() >= 0 and images.max() <= 1
    assert labels.dtype == torch.int64 and labels.shape == (BATCH,)
    assert run.kind == kind


@pytest.fixture(scope="module", params=LOADERS)
def ramp_crops(request, tmp_path_factory) -> list[float]:
    """Left-to-right brightness change of 32 training crops of an image that brightens from
    left to right: negative when the crop was flipped, larger in size when it spans more width."""
    kind, root = request.param, tmp_path_factory.mktemp("ramp")
    ramp = np.repeat(np.linspace(0, 255, 64, dtype=np.float32)[None, :, None], 64, 0)
    for i in range(16):
        path = root / "train" / "a" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(ramp, 3, 2).astype(np.uint8)).save(path, quality=95)
    run = build_loader(kind, root, "train", batch_size=16, image_size=16, num_threads=1)
    changes = []
    for epoch in range(2):
        run.set_epoch(epoch)
        for images, _ in run:
            changes += (images[..., -1].mean((1, 2)) - images[..., 0].mean((1, 2))).tolist()
    assert len(changes) == 32
    return changes


def test_train_crops_are_flipped_at_random(ramp_crops):
    assert all(abs(c) > 0.05 for c in ramp_crops)     # every crop spans some of the ramp
    assert any(c < 0 for c in ramp_crops) and any(c > 0 for c in ramp_crops)


def test_train_crops_vary_in_scale(ramp_crops):
    # A crop spanning a wider part of the ramp sees a larger change across it.
    spans = sorted(abs(c) for c in ramp_crops)
    assert spans[-1] > 1.5 * spans[0]


def test_dali_cpu_agrees_with_torchvision_on_the_val_pipeline(tmp_path):
    sizes = [(61, 45), (45, 70), (50, 50), (77, 39), (36, 80)]  # odd margins test rounding
    for i, (w, h) in enumerate(sizes):
        write_textured(tmp_path / "val" / f"c{i % 2}" / f"{i}.JPEG", w, h, seed=i)
    dali = loader("dali-cpu", tmp_path, "val", batch_size=8, image_size=32, val_resize=36)
    vision = loader("torchvision", tmp_path, "val", batch_size=8, image_size=32, val_resize=36)
    (a, ya), (b, yb) = next(iter(dali)), next(iter(vision))
    assert torch.equal(ya, yb) and a.shape == b.shape == (len(sizes), 3, 32, 32)
    per_image = (a - b).abs().flatten(1)
    assert per_image.mean(1).max() < 0.01  # JPEG decoders and resamplers differ by ~1/255
    assert per_image.max() < 0.05


def test_sharding_rule_for_many_sizes():
    for n in range(8, 60, 7):
        for world_size in (1, 2, 3, 4):
            if n < world_size * 2:
                continue
            shards = [train_shard(n, 2, r, world_size, seed=1, epoch=5) for r in range(world_size)]
            flat = [i for s in shards for i in s]
            assert len(set(map(len, shards))) == 1 and len(flat) == len(set(flat))
            assert 0 <= n - len(flat) < world_size * 2
            vals = [val_shard(n, r, world_size) for r in range(world_size)]
            assert sorted(i for v in vals for i in v) == list(range(n))


def test_a_training_set_smaller_than_one_global_batch_is_refused(coded):
    with pytest.raises(DataError, match="fewer than one global batch"):
        loader("dali-cpu", coded[0], "train", batch_size=16, world_size=3)


def test_class_map_is_sorted_folder_names_shared_by_every_split(tmp_path):
    write_coded_split(tmp_path, "train", [2, 2, 2], classes=["n02", "n10", "n01"])
    write_coded_split(tmp_path, "val", [1, 1, 1], classes=["n02", "n10", "n01"])
    expected = {"n01": 0, "n02": 1, "n10": 2}
    assert list_split(tmp_path, "train").class_to_idx == expected
    assert loader("torchvision", tmp_path, "val").class_to_idx == expected


def test_startup_checks_fail_fast_with_clear_messages(coded, tmp_path):
    root = coded[0]
    with pytest.raises(DataError, match="does not exist"):
        check_dataset(tmp_path / "nowhere", "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        check_dataset(tmp_path, "train")
    with pytest.raises(DataError, match="3 classes but the model has 1000"):
        loader("dali-cpu", root, "train", num_classes=1000)
    with pytest.raises(DataError, match="differs from the checkpoint"):
        loader("dali-cpu", root, "train", class_to_idx={"class0": 0, "class1": 2, "class2": 1})
    assert loader("dali-cpu", root, "train", num_classes=3,
                  class_to_idx={"class0": 0, "class1": 1, "class2": 2}).num_samples > 0


def test_loader_kind_is_resolved_or_refused():
    assert resolve_kind("auto", torch.device("cpu")) == "dali-cpu"
    with pytest.raises(DataError, match="decodes on a GPU"):
        resolve_kind("dali-gpu", torch.device("cpu"))
    with pytest.raises(DataError, match="unknown loader"):
        resolve_kind("dali", torch.device("cpu"))


class RefusedNvidia(importlib.abc.MetaPathFinder):
    """Finds `nvidia` and below by raising `error`: ModuleNotFoundError as for a package that is
    not installed, ImportError as for one that cannot be imported (or an import blocked on purpose)."""

    def __init__(self, error: type[ImportError]):
        self.error = error

    def find_spec(self, name, path, target=None):
        if name == "nvidia" or name.startswith("nvidia."):
            raise self.error(f"{name} refused by the test")
        return None


@pytest.mark.parametrize("error", [ModuleNotFoundError, ImportError])
def test_an_nvidia_package_that_cannot_be_imported_means_no_dali(monkeypatch, error):
    # Loaded modules would be found in sys.modules without asking any finder.
    for name in [m for m in sys.modules if m == "nvidia" or m.startswith("nvidia.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [RefusedNvidia(error), *sys.meta_path])
    assert dali_available() is False
    assert resolve_kind("auto", torch.device("cpu")) == "torchvision"
    with pytest.raises(DataError, match="needs nvidia-dali"):
        resolve_kind("dali-cpu", torch.device("cpu"))


@pytest.mark.parametrize("kind", LOADERS)
def test_a_corrupt_file_mid_epoch_is_named(tmp_path, kind):
    files = write_coded_split(tmp_path, "val", [6, 6])
    bad = files[9][0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: header only
    run = loader(kind, tmp_path, "val", batch_size=2)
    with pytest.raises(DataError, match=bad.name) as raised:
        collect(run)
    assert "dist_free.data verify" in str(raised.value)


# What the torchvision path must refuse, and the words that name why.
REFUSED = {
    "jpeg-bomb": (jpeg_claiming(60000, 60000), "(too-large): its JPEG header claims 60000 x 60000"),
    "png-over-limit": (png_claiming(10000, 9000), "(too-large): its PNG header claims 10000 x 9000"),
    "bmp-over-limit": (bmp_claiming(10000, 9000), "(too-large): not decoded: Image size (90000000"),
    "bmp-bomb": (bmp_claiming(60000, 60000), "(too-large): not decoded: Image size (3600000000"),
    "short-png": (png_claiming(9000, 9000), "(truncated): its PNG header claims 9000 x 9000 pixels"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_torchvision_refuses_a_lying_header_in_one_line_naming_the_file(tmp_path, name):
    files = write_coded_split(tmp_path, "val", [3, 3])
    bad = files[4][0]
    data, why = REFUSED[name]
    bad.write_bytes(data)
    with pytest.raises(DataError) as raised:
        collect(loader("torchvision", tmp_path, "val", batch_size=2))
    message = str(raised.value)
    assert message.startswith(f"cannot decode {bad} {why}") and "dist_free.data verify" in message
    assert "\n" not in message  # not the worker's traceback: the CLIs print it as one line


@pytest.fixture
def listed(tmp_path):
    """ROOT with train class folders and an empty val folder, and an image outside ROOT."""
    root = tmp_path / "root"
    files = write_coded_split(root, "train", [2, 2])
    (root / "val").mkdir()
    outside = write_textured(tmp_path / "elsewhere" / "x.JPEG", 8, 8, seed=0)
    return root, files[0][0].relative_to(root).as_posix(), outside


def write_list(root, *lines):
    file_list_path(root, "val").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_a_file_list_entry_outside_the_root_is_refused_naming_the_line(listed, escape):
    root, inside, outside = listed
    (root / "val" / "link.JPEG").symlink_to(outside)
    entry = {"absolute": str(outside), "dotdot": "../elsewhere/x.JPEG",
             "symlink": "val/link.JPEG"}[escape]
    write_list(root, f"{inside} 0", f"{entry} 1")
    with pytest.raises(DataError) as raised:
        list_split(root, "val")
    assert str(raised.value).startswith(
        f"{root / 'val_list.txt'}:2: entry {entry!r} resolves to {outside}, outside the dataset "
        f"root {root}")


def test_a_file_list_may_use_symlinks_inside_the_root_or_a_symlinked_root(listed, tmp_path):
    root, inside, _ = listed
    (root / "val" / "link.JPEG").symlink_to(root / inside)
    (root / "val" / "up").symlink_to(root / "train")
    alias = tmp_path / "alias"
    alias.symlink_to(root)
    write_list(alias, f"{inside} 0", "val/link.JPEG 1", "val/up/class1/0003.JPEG 1",
               "val/../" + inside + " 0")
    listing = list_split(alias, "val")
    assert listing.files == (alias / inside, alias / "val/link.JPEG",
                             alias / "val/up/class1/0003.JPEG", alias / "val/.." / inside)
    assert listing.labels == (0, 1, 1, 0)


@pytest.mark.parametrize("line, why", [
    ("train/class0/0000.JPEG", "'train/class0/0000.JPEG' has no label; expected "
                               "'relative/path label'"),
    ("train/class0/0000.JPEG one", "label 'one' of 'train/class0/0000.JPEG' is not a class "
                                   "index (a whole number in 0..1)"),
    ("train/class0/0000.JPEG -1", "label '-1' of 'train/class0/0000.JPEG' is not a class "
                                  "index (a whole number in 0..1)"),
    ("train/class0/0000.JPEG 2", "label 2 of 'train/class0/0000.JPEG' is out of range: the "
                                 "dataset has 2 classes (0..1)"),
])
def test_a_malformed_file_list_line_is_named(listed, line, why):
    root, inside, _ = listed
    write_list(root, f"{inside} 0", "", line, f"{inside} 1")  # the blank line is line 2
    with pytest.raises(DataError) as raised:
        list_split(root, "val")
    assert str(raised.value) == f"{root / 'val_list.txt'}:3: {why}"


def test_a_file_list_that_is_not_text_is_refused(listed):
    root, _, _ = listed
    file_list_path(root, "val").write_bytes(b"\xff\xfe\x00 0\n")
    with pytest.raises(DataError, match="val_list.txt: not a readable UTF-8 text file"):
        list_split(root, "val")


def test_synthetic_source_has_the_real_epoch_length_without_a_dataset(coded):
    real = loader("dali-cpu", coded[0], "train", world_size=2)
    fake = loader("synthetic", coded[0], "train", world_size=2)
    assert len(fake) == len(real) and fake.num_samples == real.num_samples
    assert fake.class_to_idx == real.class_to_idx
    imagenet = build_loader("synthetic", None, "val", batch_size=1000, num_classes=1000,
                            world_size=3, rank=0)
    assert imagenet.num_samples == 50_000 // 3 and len(imagenet) == 17
    assert sum(len(y) for _, y in imagenet) == imagenet.num_samples
