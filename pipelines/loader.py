"""The batch contract every loader keeps, and the sharded, epoch-aware base they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .augment_policy import Policy
from .datasets import Listing
from .sharding import check_rank, num_batches, train_shard, val_shard


@dataclass(frozen=True)
class Augment:
    """Geometry of both pipelines (paper / torchvision reference values by default), and the
    training images' augmentation policy (augment_policy.py; None: crops and flips only)."""

    image_size: int = 224
    val_resize: int = 256
    min_area: float = 0.08
    aspect: tuple[float, float] = (3 / 4, 4 / 3)
    policy: Policy | None = None


@dataclass(frozen=True)
class BatchFormat:
    """Where and how batches are handed to the trainer."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def apply(self, images: torch.Tensor, labels: torch.Tensor):
        """(B,3,H,W) images in [0,1] -> the trainer's device, dtype and memory format."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, self.dtype, non_blocking=True, memory_format=fmt)
        labels = labels.reshape(-1).to(self.device, torch.int64, non_blocking=True)
        return images, labels


class ShardedLoader:
    """Iterates this rank's shard of a listing in batches; subclasses turn files into tensors."""

    kind = "abstract"

    def __init__(self, listing: Listing, split: str, batch_size: int, *, rank: int,
                 world_size: int, seed: int, augment: Augment, fmt: BatchFormat,
                 whole_batches: bool = False):
        check_rank(rank, world_size)
        self.listing, self.split, self.batch_size = listing, split, batch_size
        self.whole_batches = whole_batches
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.augment, self.format = augment, fmt
        self.class_to_idx = dict(listing.class_to_idx)
        self.epoch = 0
        self.start_batch = 0
        self.num_samples = len(self.shard())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """start_batch > 0 resumes an interrupted epoch: the same shuffle, minus the batches done."""
        self.epoch, self.start_batch = epoch, start_batch

    def state_dict(self) -> dict | None:
        """What this rank's loader must keep across a restart beyond (epoch, start_batch), or
        None: nothing. A loader whose batches depend only on (seed, epoch, rank, position in
        the shard) needs nothing (the resident and torchvision loaders draw theirs so); one
        whose random stream or reader has a state of its own (a pipeline with a running
        generator, a reader with its own checkpoint) returns it here. The trainer saves it with
        the run, as this rank's own, at every checkpoint (mid-epoch too), so it must be plain
        data that torch.load(weights_only=True) reads back: tensors, numbers, strings, lists,
        dicts."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """The `state_dict()` this rank saved, handed back once when a run resumes on the same
        world size and global batch, before its first `set_epoch` (elsewhere the loader starts
        from (epoch, start_batch) alone). Nothing to restore here."""

    def shard(self) -> list[int]:
        if self.split == "train":
            return train_shard(len(self.listing), self.batch_size, self.rank, self.world_size,
                               self.seed, self.epoch)
        block = self.batch_size if self.whole_batches else 1
        return val_shard(len(self.listing), self.rank, self.world_size, block)

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size)

    def augment_seed(self) -> int:
        """Random crops and flips differ per rank and epoch but repeat for the same seed."""
        return (self.seed * 7919 + self.epoch * 104729 + self.rank * 15485863) % (2**31 - 1)

    def __iter__(self):
        indices = self.shard()[self.start_batch * self.batch_size:]
        files = [self.listing.files[i] for i in indices]
        labels = [self.listing.labels[i] for i in indices]
        for images, targets in self.batches(files, labels):
            yield self.format.apply(images, targets)

    def batches(self, files, labels):
        raise NotImplementedError
