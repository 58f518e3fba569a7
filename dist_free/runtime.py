"""Turning a Config into live objects: precision, loaders, model (wrapped), method, optimizer,
loss and the lr schedule.

Shared by the trainer and the standalone evaluator so both build exactly the same model and val
pipeline from a checkpoint's config.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import pipelines
from dist_free import precision
from dist_free.config import Config, ConfigError
from dist_free.distributed import DistInfo
from dist_free.methods import METHODS
from dist_free.models import build_model
from dist_free.step_base import StepBase


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype (None: fp32); the rule and its reasons: dist_free.precision."""
    return precision.resolve_amp(amp, device)[0]


def attack_dtype(amp: str) -> torch.dtype | None:
    """Attacks and evaluation: fp32 unless eval.amp / --amp asks otherwise ("off" = fp32)."""
    return None if amp == "off" else precision.dtype_of(amp)


def loader_dtype(device: torch.device) -> torch.dtype:
    # fp16 halves the decoded batch's memory traffic on a GPU and holds [0, 1] pixels exactly
    # enough (11-bit mantissa > 8-bit JPEG); the perturbation is added in fp32 anyway.
    return torch.float16 if device.type == "cuda" else torch.float32


def build_loader(cfg: Config, d: DistInfo, split: str, class_to_idx: dict | None = None,
                 **options):
    """This rank's loader of `split` (train, val or holdout); `options` as pipelines takes them
    (subset=, whole_batches=, crash_note=). The training split always leaves out eval.holdout
    images."""
    data = cfg.data
    # Evaluation batches do not depend on the world size, so an evaluation batches the same
    # images on any number of ranks.
    batch = cfg.per_rank_batch(d.world_size) if split == "train" else \
        (data.val_batch_size or data.batch_size)
    return pipelines.build_loader(
        data.loader, data.root, split, batch_size=batch, image_size=data.image_size,
        val_resize=data.val_resize, min_area=data.min_area, rank=d.rank,
        world_size=d.world_size, seed=cfg.run.seed, device=d.device,
        dtype=loader_dtype(d.device), channels_last=cfg.model.channels_last,
        num_threads=data.threads, num_classes=cfg.model.num_classes, class_to_idx=class_to_idx,
        holdout=cfg.eval.holdout, data_format=data.format, pad=data.pad, **options)


def build_bare_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    return build_model(cfg.model.name, cfg.model.num_classes,
                       channels_last=cfg.model.channels_last).to(device)


def wrap(cfg: Config, model: torch.nn.Module, d: DistInfo) -> torch.nn.Module:
    """SyncBatchNorm, DDP and torch.compile around the bare model, as configured."""
    net = model
    if d.distributed:
        if cfg.model.sync_bn:
            if d.device.type != "cuda":
                raise ConfigError("model.sync_bn=true needs CUDA devices: torch's SyncBatchNorm "
                                  "runs on GPUs only")
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        # The perturbation is a leaf of the graph, not a parameter: DDP never all-reduces it.
        net = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return torch.compile(net) if cfg.model.compile else net


def loss_fn(cfg: Config):
    smoothing = cfg.optim.label_smoothing
    return lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=smoothing)


def method_options(cfg: Config) -> dict:
    """The options each method takes, from its config section (unused ones are not passed)."""
    m = cfg.method
    if m.name == "free":
        return dict(eps=m.eps, replays=m.replays, step_size=m.step_size, fused=m.fused)
    if m.name == "pgd":
        return dict(eps=m.eps, steps=m.steps, step_size=m.step_size)
    if m.name == "fast":
        return dict(eps=m.eps, step_size=m.step_size)
    return {}


def build_method(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 d: DistInfo, amp_dtype: torch.dtype | None) -> StepBase:
    """The configured training method around the wrapped (DDP/compiled) model."""
    return METHODS[cfg.method.name](wrap(cfg, model, d), optimizer, amp_dtype=amp_dtype,
                                    loss_fn=loss_fn(cfg), **method_options(cfg))


def build_optimizer(cfg: Config, model: torch.nn.Module, world_size: int) -> torch.optim.SGD:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    on_gpu = params[0].is_cuda
    return torch.optim.SGD(params, lr=base_lr(cfg, world_size), momentum=o.momentum,
                           weight_decay=o.weight_decay, nesterov=o.nesterov,
                           fused=True if on_gpu else None)   # one kernel for all parameters


def base_lr(cfg: Config, world_size: int) -> float:
    """Linear scaling: optim.lr was tuned for a global batch of optim.lr_batch."""
    return cfg.optim.lr * cfg.per_rank_batch(world_size) * world_size / cfg.optim.lr_batch


def lr_factor(cfg: Config, natural_epoch: float) -> float:
    """The schedule as a pure function of progress in natural-training epochs.

    Free training covers `replays` natural epochs' worth of SGD steps per real epoch, so the
    trainer passes real_epoch_progress * replays: milestones and warm-up stay in the paper's
    natural-epoch units. Being stateless, it resumes exactly from the saved progress.
    """
    o = cfg.optim
    if o.warmup_epochs > 0 and natural_epoch < o.warmup_epochs:
        return (natural_epoch + 1e-3) / o.warmup_epochs
    if o.schedule == "cosine":
        span = max(o.epochs - o.warmup_epochs, 1e-9)
        t = min(max(natural_epoch - o.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * (1 + math.cos(math.pi * t))
    return o.gamma ** sum(natural_epoch >= m for m in o.milestones)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
