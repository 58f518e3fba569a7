"""How long a run trains: natural-training epochs (the default), or SGD steps counting replays.

`optim.steps: S` is the authors' CIFAR budget (their `--train_steps 80000`): S SGD steps in all,
whatever the method. Natural and PGD-k training take one SGD step per minibatch; free training
takes one per replay, so it reads ceil(S / m) minibatches (10,000 of them at m = 8). With a step
budget, `optim.milestones` are SGD steps too (lr x gamma at 40,000 and 60,000 of 80,000), and a
cosine schedule runs over the S steps. Epochs follow from the loader: ceil(minibatches / batches
per epoch), the last one cut short where the budget ends. `optim.epochs` is not used.

Without `optim.steps` nothing changes: epochs, milestones and warm-up are natural-training epochs
(see runtime.lr_factor).
"""

from __future__ import annotations

import math

from dist_free import runtime
from dist_free.config import Config, ConfigError


def check_steps_budget(cfg: Config) -> None:
    o = cfg.optim
    if o.warmup_epochs:
        raise ConfigError("optim.warmup_epochs is in epochs; with optim.steps set the schedule is "
                          "in steps and has no warm-up: set optim.warmup_epochs=0")
    if o.schedule == "step" and o.milestones and o.milestones[-1] > o.steps:
        raise ConfigError(f"optim.milestones are SGD steps when optim.steps is set: "
                          f"{list(o.milestones)} go beyond optim.steps={o.steps}")


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


def lr_factor(cfg: Config, epoch: int, batch: int, batches: int, global_step: int) -> float:
    """The lr factor for minibatch `batch` of `batches` in `epoch`, `global_step` minibatches
    into the run: in natural-training epochs, or in SGD steps under a step budget."""
    if cfg.optim.steps is None:
        return runtime.lr_factor(cfg, (epoch + batch / batches) * cfg.replays)
    o, sgd_steps = cfg.optim, global_step * cfg.replays
    if o.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(sgd_steps / o.steps, 1.0)))
    return o.gamma ** sum(sgd_steps >= m for m in o.milestones)


def describe(cfg: Config, batches_per_epoch: int) -> str:
    if cfg.optim.steps is None:
        return (f"{cfg.real_epochs} epochs ({cfg.optim.epochs} natural-training epochs / "
                f"{cfg.replays} replays)")
    return (f"{cfg.optim.steps} SGD steps counting replays = {minibatches(cfg)} minibatches "
            f"x {cfg.replays} = {real_epochs(cfg, batches_per_epoch)} epochs of up to "
            f"{batches_per_epoch} minibatches")
