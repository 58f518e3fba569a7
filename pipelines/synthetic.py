"""An on-device synthetic source: the compute ceiling, with no decoding or copying at all.

One batch of uniform [0,1] images and random labels is made on the device once and handed out
``len(self)`` times per epoch, so a step's time is the model's alone.
"""

from __future__ import annotations

import torch

from .loader import Augment, BatchFormat
from .sharding import epoch_generator, num_batches, train_batches_per_rank, val_shard


class SyntheticLoader:
    kind = "synthetic"

    def __init__(self, num_images: int, class_to_idx: dict[str, int], split: str,
                 batch_size: int, *, rank: int, world_size: int, seed: int, augment: Augment,
                 fmt: BatchFormat):
        self.class_to_idx = dict(class_to_idx)
        self.batch_size, self.format, self.size = batch_size, fmt, augment.image_size
        self.seed, self.rank, self.epoch = seed, rank, 0
        if split == "train":  # same epoch length as a real dataset of this size would give
            self.num_samples = train_batches_per_rank(num_images, batch_size, world_size) * batch_size
        else:
            self.num_samples = len(val_shard(num_images, rank, world_size))
        self.batch = None
        self.start_batch = 0

    def __len__(self) -> int:
        return num_batches(self.num_samples, self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def make_batch(self):
        g = epoch_generator(self.seed, self.rank)
        images = torch.rand(self.batch_size, 3, self.size, self.size, generator=g)
        labels = torch.randint(len(self.class_to_idx), (self.batch_size,), generator=g)
        return self.format.apply(images, labels)

    def __iter__(self):
        if self.batch is None:
            self.batch = self.make_batch()
        images, labels = self.batch
        for start in range(self.start_batch * self.batch_size, self.num_samples, self.batch_size):
            count = min(self.batch_size, self.num_samples - start)
            yield images[:count], labels[:count]
