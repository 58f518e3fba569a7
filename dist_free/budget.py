"""How long a run trains: natural-training epochs (the default), or SGD steps counting replays.

`optim.steps: S` is the authors' CIFAR budget (their `--train_steps 80000`): S SGD steps in all,
whatever the method. Natural and PGD-k training take one SGD step per minibatch; free training
takes one per replay, so it reads ceil(S / m) minibatches (10,000 of them at m = 8). Epochs follow
from the loader: ceil(minibatches / batches per epoch), the last one cut short where the budget
ends. `optim.epochs` is not used. The lr schedule in steps (milestones are SGD steps too: lr x
gamma at 40,000 and 60,000 of 80,000) is dist_free.lr_schedule's; config.py validates both.

Without `optim.steps` nothing changes: epochs, milestones and warm-up are natural-training epochs.
"""

from __future__ import annotations

import math

from dist_free.config import Config


def minibatches(cfg: Config) -> int | None:
    """Minibatches the step budget reads (None: an epoch budget)."""
    return None if cfg.optim.steps is None else math.ceil(cfg.optim.steps / cfg.replays)


def real_epochs(cfg: Config, batches_per_epoch: int) -> int:
    total = minibatches(cfg)
    return cfg.real_epochs if total is None else math.ceil(total / batches_per_epoch)


def batches_in_epoch(cfg: Config, epoch: int, batches_per_epoch: int) -> int:
    """Minibatches of this epoch: all of them, except where a step budget ends."""
    total = minibatches(cfg)
    if total is None:
        return batches_per_epoch
    return max(0, min(batches_per_epoch, total - epoch * batches_per_epoch))


def describe(cfg: Config, batches_per_epoch: int) -> str:
    if cfg.optim.steps is None:
        return (f"{cfg.real_epochs} epochs ({cfg.optim.epochs} natural-training epochs / "
                f"{cfg.replays} replays)")
    return (f"{cfg.optim.steps} SGD steps counting replays = {minibatches(cfg)} minibatches "
            f"x {cfg.replays} = {real_epochs(cfg, batches_per_epoch)} epochs of up to "
            f"{batches_per_epoch} minibatches")
