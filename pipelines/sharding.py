"""Which images each rank reads in an epoch: the exact epoch semantics, shared by every loader.

Train: each epoch is a fresh permutation of the whole training set drawn from (seed, epoch),
identical on every rank. Its first ``world_size * batch_size * k`` images (k as large as fits)
are dealt round-robin into ``world_size`` disjoint shards, so every rank gets exactly k full
batches and the remaining < world_size * batch_size images are dropped *for this epoch only*;
the next epoch's permutation drops a different handful. No image is ever seen twice in an epoch.

Val: the sorted listing is cut into ``world_size`` contiguous ranges whose sizes differ by at
most one; nothing is padded or dropped, so summing counts across ranks counts each image once.
A rank's last val batch may be smaller, and ranks may differ by one batch.
"""

from __future__ import annotations

import math

import torch

from .errors import DataError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch), so every rank draws the same order."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def train_batches_per_rank(num_images: int, batch_size: int, world_size: int) -> int:
    batches = num_images // (batch_size * world_size)
    if batches == 0:
        raise DataError(f"the training set has {num_images} images, fewer than one global batch "
                        f"({world_size} ranks x {batch_size}); lower the batch size")
    return batches


def train_shard(num_images: int, batch_size: int, rank: int, world_size: int,
                seed: int, epoch: int) -> list[int]:
    """Indices (into the listing) this rank trains on this epoch, in reading order."""
    used = train_batches_per_rank(num_images, batch_size, world_size) * batch_size * world_size
    order = torch.randperm(num_images, generator=epoch_generator(seed, epoch))[:used]
    return order[rank::world_size].tolist()


def val_shard(num_images: int, rank: int, world_size: int) -> list[int]:
    """A contiguous, unpadded range of the sorted listing."""
    start = rank * num_images // world_size
    stop = (rank + 1) * num_images // world_size
    return list(range(start, stop))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")


def num_batches(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)
