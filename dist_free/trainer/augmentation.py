"""The trainer's side of strong augmentation: `data.auto_augment` checked with the config (the
loaders run it, pipelines/augment_policy.py), and mixup, cutmix and random erasing applied to
every training minibatch before the method's step (dist_free.engine.batch_augment).

Each minibatch's draws are keyed by (run seed, rank, epoch, batch index), so a resumed run draws
what the interrupted one would have. Mixing stops at data.mixup_off_epoch natural-training
epochs (real-epoch progress x replays, as the lr schedule counts them); the batches keep their
soft targets after it, unmixed, as timm's do.
"""

from __future__ import annotations

import torch

from dist_free.config import Config, ConfigError
from dist_free.distributed import DistInfo
from dist_free.engine.batch_augment import BatchAugment, MixSpec
from pipelines.augment_policy import PolicyError, parse_policy


def check_policy(cfg: Config) -> None:
    """A policy string no loader here can parse is a config error, found before any worker
    joins a process group (which loader can run it is the loader's to say)."""
    try:
        parse_policy(cfg.data.auto_augment)
    except PolicyError as e:
        raise ConfigError(f"data.auto_augment: {e}") from None


class MinibatchAugment:
    """data.mixup/cutmix/reprob for one rank's training minibatches."""

    def __init__(self, cfg: Config, d: DistInfo):
        data = cfg.data
        self.cfg, self.rank = cfg, d.rank
        self.batch = BatchAugment(MixSpec(data.mixup, data.cutmix, data.mixup_prob,
                                          data.mixup_switch_prob, data.reprob),
                                  cfg.model.num_classes, d.device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int,
                 batches_per_epoch: int):
        natural_epoch = (epoch + batch / batches_per_epoch) * self.cfg.replays
        off = self.cfg.data.mixup_off_epoch
        return self.batch(images, labels, key=(self.cfg.run.seed, self.rank, epoch, batch),
                          mixing=not off or natural_epoch < off)


def build(cfg: Config, d: DistInfo) -> MinibatchAugment | None:
    """The minibatch augmentation the config asks for; None when it asks for none."""
    data = cfg.data
    if not (data.mixup or data.cutmix or data.reprob):
        return None
    return MinibatchAugment(cfg, d)
