"""Honest selection: a fixed held-out slice of train, fixed val subsets, batches whole across ranks.

The held-out images and subsets are chosen by the SHA-1 of their file names, so they must not move
with the seed, the epoch, the world size or the loader; train must never see a held-out image.
"""

import hashlib

import pytest
import torch
from helpers_data import collect, decode_batch, write_coded_split

from pipelines import DataError, build_loader, split_listing
from pipelines.sharding import val_shard

TRAIN_COUNTS = [13, 11, 9]   # 33 images
VAL_COUNTS = [5, 4, 4]       # 13 images
HOLDOUT = 7
BATCH = 4


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    train = write_coded_split(root, "train", TRAIN_COUNTS)
    val = write_coded_split(root, "val", VAL_COUNTS)     # ids 0..12, read back from the pixels
    return root, train, val


def expected_order(files: dict) -> list[int]:
    """The documented rule, written out independently: sha1 of the file name, then the label."""
    return sorted(files, key=lambda i: (hashlib.sha1(files[i][0].name.encode()).hexdigest(),
                                        files[i][1]))


def loader(root, split, **kwargs):
    options = dict(batch_size=BATCH, image_size=16, val_resize=18, min_area=0.3, num_threads=1)
    return build_loader("torchvision", root, split, **{**options, **kwargs})


def ids_over_ranks(root, split, world_size, **kwargs):
    """Per rank: (loader, ids in reading order)."""
    runs = []
    for rank in range(world_size):
        ranked = loader(root, split, rank=rank, world_size=world_size, **kwargs)
        runs.append((ranked, collect(ranked)[0]))
    return runs


def test_holdout_is_a_fixed_exact_set_disjoint_from_train(coded):
    root, train, _ = coded
    held = set(expected_order(train)[:HOLDOUT])
    for seed, world_size in [(0, 1), (5, 2), (9, 3)]:
        runs = ids_over_ranks(root, "holdout", world_size, holdout=HOLDOUT, seed=seed)
        seen = [i for _, ids in runs for i in ids]
        assert sorted(seen) == sorted(held)               # each held-out image exactly once
        assert sum(r.num_samples for r, _ in runs) == HOLDOUT
        trained = set()
        for epoch in range(6):                             # train drops a few per epoch
            for rank in range(world_size):
                run = loader(root, "train", holdout=HOLDOUT, seed=seed, rank=rank,
                             world_size=world_size)
                run.set_epoch(epoch)
                trained |= set(collect(run)[0])
        assert trained == set(train) - held


def test_holdout_uses_the_val_transforms_not_augmentation(coded):
    root = coded[0]

    def pixels(seed, epoch):
        run = loader(root, "holdout", holdout=HOLDOUT, seed=seed, min_area=0.08)
        run.set_epoch(epoch)
        return torch.cat([images for images, _ in run])

    first = pixels(0, 0)
    assert first.shape == (HOLDOUT, 3, 16, 16)
    assert torch.equal(first, pixels(3, 2))                 # no random crop or flip


def test_val_subset_is_the_first_n_in_the_fixed_order_on_any_world_size(coded):
    root, _, val = coded
    for world_size in (1, 2, 3):
        runs = ids_over_ranks(root, "val", world_size, subset=6, seed=world_size)
        assert [i for _, ids in runs for i in ids] == expected_order(val)[:6]
    small = split_listing(root, "val", subset=3)
    assert small.files == split_listing(root, "val", subset=6).files[:3]   # nested
    holdout_subset = split_listing(root, "holdout", holdout=HOLDOUT, subset=2)
    assert holdout_subset.files == split_listing(root, "holdout", holdout=HOLDOUT).files[:2]


def test_whole_batches_hold_the_same_images_on_any_world_size(coded):
    root = coded[0]

    def batches(world_size):
        out = []
        for rank in range(world_size):
            run = loader(root, "val", rank=rank, world_size=world_size, whole_batches=True)
            out += [decode_batch(images)[0] for images, _ in run]
        return out

    one = batches(1)
    assert [len(b) for b in one] == [4, 4, 4, 1]
    assert batches(2) == one and batches(3) == one and batches(5) == one
    # 4 batches over 3 ranks: 1, 1, 2 batches; over 5 ranks one rank gets none.
    assert [len(val_shard(13, r, 3, block=4)) for r in range(3)] == [4, 4, 5]
    assert [len(val_shard(13, r, 5, block=4)) for r in range(5)] == [0, 4, 4, 4, 1]
    assert [val_shard(13, r, 3) for r in range(3)] == [val_shard(13, r, 3, block=1)
                                                       for r in range(3)]


def test_impossible_selections_are_refused_with_the_numbers(coded):
    root = coded[0]
    with pytest.raises(DataError, match="holdout=33 .* smaller than the 33 training images"):
        loader(root, "train", holdout=33)
    with pytest.raises(DataError, match="subset=14 .* the 13 images of split 'val'"):
        loader(root, "val", subset=14)
    with pytest.raises(DataError, match="subset=8 .* the 7 images of split 'holdout'"):
        loader(root, "holdout", holdout=7, subset=8)
    with pytest.raises(DataError, match="needs holdout > 0"):
        loader(root, "holdout")
    with pytest.raises(DataError, match="not 'train'"):
        loader(root, "train", subset=5)


def test_the_synthetic_source_sizes_its_splits_the_same_way():
    common = dict(batch_size=1000, num_classes=1000)
    assert build_loader("synthetic", None, "train", holdout=10_000, **common).num_samples \
        == (1_281_167 - 10_000) // 1000 * 1000
    assert build_loader("synthetic", None, "holdout", holdout=10_000, **common).num_samples \
        == 10_000
    assert build_loader("synthetic", None, "val", subset=5000, world_size=2, **common) \
        .num_samples == 2500
