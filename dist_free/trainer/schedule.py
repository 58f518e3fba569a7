"""The learning-rate schedule: linear scaling with the global batch, warm-up, step or cosine decay,
or the ConvNeXt/ViT recipes' warm-up + cosine (optim.schedule=warmup_cosine).

Milestones and warm-up are in natural-training epochs (the paper's units): free training covers
`replays` natural epochs' worth of SGD steps per real epoch, so the trainer passes
real_epoch_progress * replays. `lr_factor` is a pure function of that progress, so a resumed run
continues the schedule exactly from the saved step.

Under a step budget (`optim.steps`, the authors' CIFAR recipe; its length: Config.real_epochs) the
schedule is in SGD steps counting every replay instead: milestones are steps, a cosine runs over the
`optim.steps` steps, and there is no warm-up (config.py refuses one). `lr_factor_in_steps` is that
schedule; `lr_at` picks the one the config asks for.

The attack's eps has a schedule of its own, `eps_at`: a linear warm-up over
method.eps_warmup_epochs natural-training epochs, in the same units as the lr's warm-up (an epoch
budget only: config.py refuses it with optim.steps). Like the lr, it is a pure function of the
run's progress, which the checkpoint records (epoch, batch in epoch): a resumed run sets exactly
the eps the uninterrupted one would, so eps itself is not saved.
"""

from __future__ import annotations

import math

import torch

from dist_free.config import Config
from dist_free.engine import method_registry


def base_lr(cfg: Config, world_size: int) -> float:
    """Linear scaling: optim.lr was tuned for a global batch of optim.lr_batch."""
    return cfg.optim.lr * cfg.per_rank_batch(world_size) * world_size / cfg.optim.lr_batch


def lr_factor(cfg: Config, natural_epoch: float) -> float:
    """The multiplier on `base_lr` at `natural_epoch` (real-epoch progress x replays)."""
    o = cfg.optim
    if o.schedule == "warmup_cosine":
        return warmup_cosine_factor(natural_epoch, epochs=o.epochs, warmup_epochs=o.warmup_epochs,
                                    start=o.warmup_start, floor=o.lr_floor)
    if o.warmup_epochs > 0 and natural_epoch < o.warmup_epochs:
        return (natural_epoch + 1e-3) / o.warmup_epochs
    if o.schedule == "cosine":
        return half_cosine(natural_epoch, o.warmup_epochs, o.epochs)
    return o.gamma ** sum(natural_epoch >= m for m in o.milestones)


def warmup_cosine_factor(natural_epoch: float, *, epochs: float, warmup_epochs: float,
                         start: float = 0.0, floor: float = 0.0) -> float:
    """Linear from `start` x peak at epoch 0 to the peak at `warmup_epochs`, then half a cosine
    from the peak down to `floor` x peak at `epochs` (and `floor` after). `start` and `floor` are
    fractions of the peak lr, so the schedule scales with the batch like the peak does."""
    if warmup_epochs > 0 and natural_epoch < warmup_epochs:
        return start + (1.0 - start) * natural_epoch / warmup_epochs
    return floor + (1.0 - floor) * half_cosine(natural_epoch, warmup_epochs, epochs)


def half_cosine(natural_epoch: float, begin: float, end: float) -> float:
    """1 at `begin` down to 0 at `end` along half a cosine (1 before, 0 after)."""
    t = min(max(natural_epoch - begin, 0.0) / max(end - begin, 1e-9), 1.0)
    return 0.5 * (1 + math.cos(math.pi * t))


def lr_factor_in_steps(cfg: Config, sgd_steps: int) -> float:
    """The multiplier on `base_lr` after `sgd_steps` SGD steps (minibatches x replays) of a run
    with a step budget."""
    o = cfg.optim
    if o.schedule == "step":
        return o.gamma ** sum(sgd_steps >= m for m in o.milestones)
    floor = o.lr_floor if o.schedule == "warmup_cosine" else 0.0
    return floor + (1.0 - floor) * half_cosine(sgd_steps, 0.0, o.steps)


def lr_at(cfg: Config, world_size: int, real_epoch: float, global_step: int = 0) -> float:
    """The lr at a point of training: `real_epoch` (epoch + fraction of it done) for an epoch
    budget, `global_step` minibatches into the run for a step budget."""
    if cfg.optim.steps is not None:
        return base_lr(cfg, world_size) * lr_factor_in_steps(cfg, global_step * cfg.replays)
    return base_lr(cfg, world_size) * lr_factor(cfg, real_epoch * cfg.replays)


def eps_factor(cfg: Config, natural_epoch: float) -> float:
    """eps now as a fraction of method.eps: from method.eps_warmup_start at epoch 0 linearly up
    to 1 at method.eps_warmup_epochs, and 1 after (and without a warm-up)."""
    m = cfg.method
    if not m.eps_warmup_epochs or natural_epoch >= m.eps_warmup_epochs:
        return 1.0
    start = m.eps_warmup_start
    return min(1.0, start + (1.0 - start) * natural_epoch / m.eps_warmup_epochs)


def eps_at(cfg: Config, real_epoch: float) -> float | None:
    """The attack's eps at `real_epoch` (epoch + fraction of it done), pixel units; None for a
    method that does not attack."""
    if not method_registry.takes(cfg.method.name, "eps"):
        return None
    return cfg.method.eps * eps_factor(cfg, real_epoch * cfg.replays)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------ the budget in words

def describe(cfg: Config, batches_per_epoch: int, epoch: int = 0, done: int = 0) -> str:
    """How long the run trains (the rule: Config.real_epochs; `epoch` epochs, of `done`
    minibatches in all, already run), for the log."""
    if cfg.minibatches is None:
        return (f"{cfg.real_epochs()} epochs ({cfg.optim.epochs} natural-training epochs / "
                f"{cfg.replays} replays)")
    epochs = cfg.real_epochs(batches_per_epoch, epoch=epoch, done=done)
    before = f"{epoch} done ({done} minibatches), then " if epoch else ""
    return (f"{cfg.optim.steps} SGD steps counting replays = {cfg.minibatches} minibatches "
            f"x {cfg.replays} = {epochs} epochs: {before}up to {batches_per_epoch} minibatches "
            "each")
