"""The device-resident CIFAR loader: augmentation on the device, the exact epochs and shards of
every loader, exact sharded evaluation, holdout and subsets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pipelines
from pipelines import DataError
from pipelines.cifar_write import write_cifar
from pipelines.resident import gather_crops
from pipelines.sharding import train_shard

N_TRAIN, N_VAL = 203, 37


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random images: a batch compared with the arrays says which images it holds."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_TRAIN + N_VAL, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, N_TRAIN + N_VAL)
    root = tmp_path_factory.mktemp("cifar")
    splits = {"train": (images[:N_TRAIN], labels[:N_TRAIN]),
              "val": (images[N_TRAIN:], labels[N_TRAIN:])}
    names = [f"c{i}" for i in range(10)]
    write_cifar(root / "cifar-10-batches-py", "cifar10-py", splits, names)
    write_cifar(root / "bin" / "cifar-10-batches-bin", "cifar10-bin", splits, names)
    return root, images, labels


def loader(root, split, **kw):
    kw.setdefault("batch_size", 16)
    return pipelines.build_loader("auto", root, split, **kw)


def test_pad_crop_flip_is_a_zero_padded_crop_mirrored_per_image():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=g)
    index = torch.randperm(50, generator=g)[:20]
    shifts = torch.randint(0, 9, (20, 2), generator=g)
    flips = torch.rand(20, generator=g) < 0.5
    out = gather_crops(images, index, shifts, flips, 4)
    padded = F.pad(images[index], (4, 4, 4, 4))
    for b in range(20):
        dy, dx = shifts[b].tolist()
        ref = padded[b, :, dy:dy + 32, dx:dx + 32]
        assert torch.equal(out[b], ref.flip(-1) if flips[b] else ref)
    assert out.dtype == torch.uint8 and flips.any() and not flips.all()


def test_training_batches_are_the_shared_epoch_shuffle_dealt_into_disjoint_shards(data):
    root, images, labels = data
    seen = []
    for rank in range(2):
        ld = loader(root, "train", rank=rank, world_size=2, seed=5, pad=0)
        ld.set_epoch(3)
        assert ld.kind == "resident" and len(ld) == N_TRAIN // 32
        rows = train_shard(N_TRAIN, 16, rank, 2, 5, 3)
        got = torch.cat([x for x, _ in ld])
        ys = torch.cat([y for _, y in ld])
        want = torch.from_numpy(images[rows]).float() / 255
        # pad 0: the crop is the image itself, mirrored or not
        same = (got == want).flatten(1).all(1) | (got == want.flip(-1)).flatten(1).all(1)
        assert same.all()
        assert torch.equal(ys, torch.from_numpy(labels[rows]))
        seen += rows
    assert len(seen) == len(set(seen)) == N_TRAIN // 32 * 32


def test_a_resumed_epoch_replays_the_same_remaining_batches(data):
    root = data[0]
    ld = loader(root, "train", seed=1)
    ld.set_epoch(0)
    first = [x for x, _ in ld]
    ld.set_epoch(1)
    assert not torch.equal(first[0], next(iter(ld))[0])
    ld.set_epoch(0, start_batch=4)
    rest = [x for x, _ in ld]
    assert len(rest) == len(first) - 4
    assert all(torch.equal(a, b) for a, b in zip(first[4:], rest))


def test_evaluation_counts_every_test_image_once_on_any_world_size(data):
    root, images, labels = data
    for world in (1, 2, 3):
        got = [torch.cat([y for _, y in loader(root, "val", rank=r, world_size=world)])
               for r in range(world)]
        assert torch.equal(torch.cat(got), torch.from_numpy(labels[N_TRAIN:]))
    x, _ = next(iter(loader(root, "val", batch_size=8)))
    assert torch.equal(x, torch.from_numpy(images[N_TRAIN:N_TRAIN + 8]).float() / 255)
    whole = [len(loader(root, "val", rank=r, world_size=2, whole_batches=True, batch_size=16))
             for r in range(2)]
    assert sorted(whole) == [1, 2]                     # 37 images: batches of 16, 16, 5


def test_holdout_with_subsets_is_the_same_for_python_as_for_binary(data):
    root = data[0]
    train = loader(root, "train", holdout=20)
    held = loader(root, "holdout", holdout=20)
    assert train.num_samples // 16 * 16 == train.num_samples and len(held.listing) == 20
    train_rows = {f.name for f in train.listing.files}
    held_rows = [f.name for f in held.listing.files]
    assert not train_rows & set(held_rows) and len(train_rows) == N_TRAIN - 20
    binary = loader(root / "bin", "holdout", holdout=20)
    assert [f.name for f in binary.listing.files] == held_rows
    assert torch.equal(binary.images, held.images)
    sub = loader(root, "val", subset=10, seed=99, world_size=1)
    assert [f.name for f in sub.listing.files] == \
        [f.name for f in loader(root / "bin", "val", subset=10).listing.files]
    assert pipelines.selection_sha256(sub.listing) == pipelines.selection_sha256(
        loader(root, "val", subset=10).listing)


def test_a_cifar_root_needs_the_resident_loader(data, tmp_path):
    root = data[0]
    with pytest.raises(DataError, match="loader 'resident'"):
        pipelines.build_loader("torchvision", root, "train", batch_size=8)
    with pytest.raises(DataError, match="reads CIFAR folders"):
        pipelines.build_loader("resident", tmp_path, "train", batch_size=8)
    with pytest.raises(DataError, match="classes differ"):
        loader(root, "val", class_to_idx={"a": 0})


def test_batches_come_in_the_trainers_dtype_and_layout(data):
    root = data[0]
    ld = loader(root, "train", dtype=torch.bfloat16, channels_last=True)
    x, y = next(iter(ld))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and 0 <= x.min() and x.max() <= 1
