"""The learning-rate schedule: linear scaling with the global batch, warm-up, step or cosine decay.

Milestones and warm-up are in natural-training epochs (the paper's units): free training covers
`replays` natural epochs' worth of SGD steps per real epoch, so the trainer passes
real_epoch_progress * replays. `lr_factor` is a pure function of that progress, so a resumed run
continues the schedule exactly from the saved step.
"""

from __future__ import annotations

import math

import torch

from dist_free.config import Config


def base_lr(cfg: Config, world_size: int) -> float:
    """Linear scaling: optim.lr was tuned for a global batch of optim.lr_batch."""
    return cfg.optim.lr * cfg.per_rank_batch(world_size) * world_size / cfg.optim.lr_batch


def lr_factor(cfg: Config, natural_epoch: float) -> float:
    """The multiplier on `base_lr` at `natural_epoch` (real-epoch progress x replays)."""
    o = cfg.optim
    if o.warmup_epochs > 0 and natural_epoch < o.warmup_epochs:
        return (natural_epoch + 1e-3) / o.warmup_epochs
    if o.schedule == "cosine":
        span = max(o.epochs - o.warmup_epochs, 1e-9)
        t = min(max(natural_epoch - o.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * (1 + math.cos(math.pi * t))
    return o.gamma ** sum(natural_epoch >= m for m in o.milestones)


def lr_at(cfg: Config, world_size: int, real_epoch: float) -> float:
    """The lr at a point of training given in real epochs (epoch + fraction of it done)."""
    return base_lr(cfg, world_size) * lr_factor(cfg, real_epoch * cfg.replays)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
