"""The torchvision DataLoader path, for hosts without DALI: the same shard, crops and contract.

Each sample's random crop, flip and policy ops (data.auto_augment, torchvision_augment.py) come
from a generator seeded by (loader seed, epoch, rank, position in the shard), so the order *and*
the augmentation repeat for a seed regardless of how many worker processes decode, and an epoch
resumed at batch k gives the same batches k, k+1, ... as the epoch left alone. Iterating takes
nothing from torch's global generator either (a DataLoader draws its workers' base seed from it
unless given one), so a resume that starts a new iterator mid-epoch leaves the training's own
draws (dropout, random starts) where they were.

A file that cannot be decoded ends the epoch with a one-line DataError naming it. The error
travels from the worker as a value, not an exception: DataLoader re-raises a worker's exception
with the worker's whole traceback as its message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from .errors import DataError
from .loader import Augment, ShardedLoader
from .torchvision_augment import policy_transform
from .verify import Refused, decode, said

VERIFY_HINT = "Run `python -m dist_free.data verify ROOT` to list every bad file."


def load_rgb(path) -> Image.Image:
    """The image as RGB; anything the header checks or Pillow refuse is a DataError naming it."""
    try:
        with open(path, "rb") as f:
            return decode(f).convert("RGB")  # CMYK and grayscale JPEGs become RGB, as in DALI
    except Refused as err:
        raise DataError(f"cannot decode {path} ({err.kind}): {err.detail}. {VERIFY_HINT}") from err
    except Exception as err:  # cannot be opened, or a decoded mode Pillow cannot convert
        raise DataError(f"cannot read {path}: {said(err)}. {VERIFY_HINT}") from err


@dataclass(frozen=True)
class Failed:
    """A sample (and then its batch) that could not be loaded: the DataError's message."""

    message: str


def collate(samples):
    failed = next((s for s in samples if isinstance(s, Failed)), None)
    return failed or default_collate(samples)


class ResizeShorter(torch.nn.Module):
    """Shorter side to ``size``, the longer side *rounded* as DALI's ``resize_shorter`` does
    (torchvision's Resize(int) truncates, which shifts the centre crop by a pixel)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = self.size / min(h, w)
        target = [self.size, round(w * scale)] if h <= w else [round(h * scale), self.size]
        return v2.functional.resize(image, target, antialias=True)


class CentreCrop(torch.nn.Module):
    """Centre crop with DALI's anchor, half a pixel rounded up (torchvision rounds half to even)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        top, left = (math.floor((n - self.size) / 2 + 0.5) for n in (h, w))
        return image[..., top:top + self.size, left:left + self.size]


def val_transform(augment: Augment):
    size = augment.image_size
    return v2.Compose([v2.PILToTensor(), ResizeShorter(augment.val_resize),
                       CentreCrop(size), v2.ToDtype(torch.float32, scale=True)])


def train_transform(augment: Augment):
    policy = policy_transform(augment.policy)      # data.auto_augment, on the uint8 crop
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(augment.image_size, scale=(augment.min_area, 1.0),
                             ratio=augment.aspect, antialias=True),
        v2.RandomHorizontalFlip(), *([policy] if policy is not None else []),
        v2.ToDtype(torch.float32, scale=True)])


class ShardDataset(Dataset):
    """files[i] is the shard's image at position `first + i`; its augmentation is seeded by
    seed + that position, wherever the epoch was started."""

    def __init__(self, files, labels, transform, seed: int | None, first: int = 0):
        self.files, self.labels, self.transform, self.seed = files, labels, transform, seed
        self.first = first

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(self.files[i])
        except DataError as err:
            return Failed(str(err))
        if self.seed is None:
            return self.transform(image), self.labels[i]
        with torch.random.fork_rng(devices=[]):  # torchvision's random ops use the global RNG
            torch.manual_seed(self.seed + self.first + i)
            return self.transform(image), self.labels[i]


class FolderLoader(ShardedLoader):
    kind = "torchvision"

    def __init__(self, *args, num_workers: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_workers = num_workers

    def batches(self, files, labels):
        train = self.split == "train"
        dataset = ShardDataset(files, labels, (train_transform if train else val_transform)(
            self.augment), self.augment_seed() * 1_000_000 if train else None,
            first=self.start_batch * self.batch_size)
        # Its own generator: the workers' base seed (unused, ShardDataset seeds each sample)
        # would otherwise be drawn from the global RNG at every epoch, evaluation and resume.
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                            num_workers=self.num_workers, drop_last=False,
                            pin_memory=self.format.device.type == "cuda",
                            persistent_workers=False, collate_fn=collate,
                            generator=torch.Generator())
        for batch in loader:
            if isinstance(batch, Failed):
                raise DataError(batch.message)
            yield batch
