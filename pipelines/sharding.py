"""Which images each rank reads in an epoch: the exact epoch semantics, shared by every loader.

Train: each epoch is a fresh permutation of the whole training set drawn from (seed, epoch),
identical on every rank. Its first ``world_size * batch_size * k`` images (k as large as fits)
are dealt round-robin into ``world_size`` disjoint shards, so every rank gets exactly k full
batches and the remaining < world_size * batch_size images are dropped *for this epoch only*;
the next epoch's permutation drops a different handful. No image is ever seen twice in an epoch.

Val: the sorted listing is cut into ``world_size`` contiguous ranges whose sizes differ by at
most one; nothing is padded or dropped, so summing counts across ranks counts each image once.
A rank's last val batch may be smaller, and ranks may differ by one batch.

Val in whole batches (``block=batch_size``): the listing is first cut into global batches of
``block`` images (the last may be smaller) and each rank gets a contiguous range of whole
batches, so batch b holds the same images on any world size. Attacks whose result for an image
depends on the rest of its batch (AutoAttack's random draws) then give the same per-image
results on 1 or N ranks. Ranks may differ by one batch, and a rank may get none.
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


def val_shard(num_images: int, rank: int, world_size: int, block: int = 1) -> list[int]:
    """A contiguous, unpadded range of the listing, made of whole blocks of `block` images."""
    blocks = math.ceil(num_images / block)
    start = min(num_images, rank * blocks // world_size * block)
    stop = min(num_images, (rank + 1) * blocks // world_size * block)
    return list(range(start, stop))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")


def num_batches(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)
