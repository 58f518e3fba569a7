"""The device-resident loader: a whole CIFAR split as uint8 on the device, augmented there.

The split's pixels are copied to the device once, when the loader is built (CIFAR-10's 50,000
training images are 150 MB). Each batch is one gather from that tensor; training batches are
then padded with zeros, randomly cropped back to 32x32 and randomly flipped left-right, all in one
batched indexing operation (no decoder, no worker, no host round trip, no loop over samples),
and only then converted to the trainer's dtype and scaled to [0, 1].

Epochs and shards are those of every other loader (sharding.py): the train order is the
(seed, epoch) permutation dealt into disjoint per-rank shards; val is cut into contiguous,
unpadded ranges (whole global batches with ``whole_batches``). The crops and flips of an epoch
are drawn up front from a generator seeded with (seed, epoch, rank), so resuming mid-epoch
replays the same augmentation for the batches that remain.

Holdout and subsets work as for ImageNet (datasets.py), on a listing whose "file names" are the
images' indices in the distributed order: ``train/<i>`` for the i-th training image (data_batch_1
to 5 in order, or train), ``val/<i>`` for the i-th test image. The fixed selection order is thus
sha1 of the decimal index (ties by label), the same for the python and binary versions of a
dataset, and independent of seed and world size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cifar import CifarSplit
from .datasets import Listing
from .loader import ShardedLoader


def cifar_listing(data: CifarSplit, source: str) -> Listing:
    """The split as a listing of pseudo-files named by index (see the module docstring)."""
    files = tuple(Path(f"{source}/{i}") for i in range(len(data)))
    classes = {name: i for i, name in enumerate(data.class_names)}
    return Listing(files, tuple(int(v) for v in data.labels), classes)


def listing_rows(listing: Listing) -> list[int]:
    """The array rows a (selected) listing refers to."""
    return [int(f.name) for f in listing.files]


def gather_crops(images: torch.Tensor, index: torch.Tensor, shifts: torch.Tensor,
                 flips: torch.Tensor, pad: int) -> torch.Tensor:
    """images[index], each zero-padded by `pad` on every side, cropped back to its size at
    offset shifts[i] = (dy, dx) in [0, 2 pad] and mirrored left-right where flips[i].

    One index_select from the resident tensor does the gather, the crop and the flip for the
    whole batch (the padding is a mask: source pixels outside the image read as zero), so no
    padded copy is made and nothing loops over samples.
    """
    _, c, h, w = images.shape
    dev = images.device
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    rows = shifts[:, 0, None] - pad + ys                                          # (B, H)
    cols = shifts[:, 1, None] - pad + torch.where(flips[:, None], w - 1 - xs, xs)   # (B, W)
    inside = ((rows >= 0) & (rows < h))[:, None, :, None] & \
        ((cols >= 0) & (cols < w))[:, None, None, :]
    planes = (index[:, None] * c + torch.arange(c, device=dev)) * (h * w)          # (B, C)
    flat = planes[:, :, None, None] + rows.clamp(0, h - 1)[:, None, :, None] * w \
        + cols.clamp(0, w - 1)[:, None, None, :]
    out = images.reshape(-1).index_select(0, flat.reshape(-1)).view(len(index), c, h, w)
    return out.masked_fill_(~inside, 0)


class ResidentLoader(ShardedLoader):
    kind = "resident"

    def __init__(self, listing: Listing, pixels, split: str, batch_size: int, *, pad: int = 4,
                 content: dict | None = None, **common):
        super().__init__(listing, split, batch_size, **common)
        # {"format", "sha256"} of the split read: what a resume compares beyond the listing
        # (whose "file names" are only indices; see dist_free/trainer/resume/data_guard.py).
        self.content = content
        device = self.format.device
        # Once per loader: the selected images, uint8, on the device.
        self.images = torch.from_numpy(pixels[listing_rows(listing)]).to(device)
        self.labels = torch.as_tensor(listing.labels, dtype=torch.int64).to(device)
        self.pad = pad

    def draws(self, count: int):
        """This epoch's crop offsets (count, 2) and flips (count,), on the device."""
        device = self.images.device
        g = torch.Generator(device=device).manual_seed(self.augment_seed())
        shifts = torch.randint(0, 2 * self.pad + 1, (count, 2), device=device, generator=g)
        flips = torch.rand(count, device=device, generator=g) < 0.5
        return shifts, flips

    def __iter__(self):
        shard = self.shard()
        order = torch.as_tensor(shard, dtype=torch.long).to(self.images.device)
        train = self.split == "train"
        shifts, flips = self.draws(len(shard)) if train else (None, None)
        for start in range(self.start_batch * self.batch_size, len(shard), self.batch_size):
            index = order[start:start + self.batch_size]
            if train:
                stop = start + len(index)
                images = gather_crops(self.images, index, shifts[start:stop], flips[start:stop],
                                      self.pad)
            else:
                images = self.images.index_select(0, index)
            images = images.to(self.format.dtype).div_(255)
            yield self.format.apply(images, self.labels.index_select(0, index))
