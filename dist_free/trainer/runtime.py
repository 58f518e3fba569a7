"""Turning a Config into live objects: loaders, model (wrapped), method, optimizer and loss.

Shared by the trainer and the standalone evaluator so both build exactly the same model and val
pipeline from a checkpoint's config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import pipelines
from dist_free import precision
from dist_free.config import Config, ConfigError
from dist_free.distributed import DistInfo
from dist_free.engine import method_registry, methods, optim, sync_batchnorm, timm_models
from dist_free.engine.ema import ModelEMA
from dist_free.engine.models import build_model
from dist_free.engine.step_base import StepBase
from dist_free.trainer.schedule import base_lr

log = logging.getLogger("dist_free.train")


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
        dtype=precision.loader_dtype(d.device), channels_last=cfg.model.channels_last,
        num_threads=data.threads, num_classes=cfg.model.num_classes, class_to_idx=class_to_idx,
        holdout=cfg.eval.holdout, data_format=data.format, pad=data.pad,
        auto_augment=data.auto_augment, **options)


def build_bare_model(cfg: Config, device: torch.device) -> torch.nn.Module:
    return build_model(cfg.model.name, cfg.model.num_classes, channels_last=cfg.model.channels_last,
                       kwargs=cfg.model.kwargs).to(device)


def check_model(cfg: Config) -> None:
    """A timm name or argument timm does not know is a config error, found before any worker
    joins a process group (the net is built on the meta device: no memory, no compute)."""
    if timm_models.is_timm(cfg.model.name):
        try:
            timm_models.check_buildable(cfg.model.name, cfg.model.num_classes, cfg.model.kwargs)
        except ValueError as e:
            raise ConfigError(f"model.name/model.kwargs: {e}") from None


def apply_init(cfg: Config, model: torch.nn.Module) -> None:
    """model.init: a fresh run starts from a local safetensors file, every key and shape checked
    first (a mismatch is a config error naming the tensors)."""
    if cfg.model.init:
        try:
            timm_models.load_init(getattr(model, "net", model), cfg.model.init)
        except timm_models.InitError as e:
            raise ConfigError(str(e)) from None


def build_ema(cfg: Config, model: torch.nn.Module) -> ModelEMA | None:
    """The EMA of the bare model when optim.ema is set (after model.init, before training)."""
    return ModelEMA(model, cfg.optim.ema) if cfg.optim.ema else None


def compile_wanted(cfg: Config, device: torch.device) -> bool:
    """model.compile resolved for `device`: auto compiles on CUDA only. On an H200 it made a
    ResNet-50 natural step 1.43x faster (README, "Benchmarks"); on this project's 2-core CPU it
    measured no gain (bench/RESULTS.md, "model.compile on the CPU") and costs minutes of
    C++ compilation per run."""
    wanted = cfg.model.compile
    return device.type == "cuda" if wanted == "auto" else bool(wanted)


class CompiledModel(torch.nn.Module):
    """`net` run by torch.compile, its first step timed, with a fallback to eager.

    torch.compile compiles lazily: the forward graph at the first call and, through AOTAutograd,
    the backward graph at the first backward. The cold compile time is therefore measured from
    the first call to the end of the first backward that reaches the weights, not by a warm-up
    step: a warm-up would move the weights, BatchNorm statistics and optimizer state before
    training (or need them saved and restored), and under DDP its backward is a collective that
    every rank must join. Nothing is timed after that, and nothing ever waits for the device:
    later calls go straight to the compiled module.

    A compiler that fails (no C++ compiler, an op the backend cannot lower) raises at that first
    call, not at torch.compile(): the call then runs eagerly, one warning says why, and every
    later call stays eager. An error that the eager call raises too is the model's own and is
    raised as such. (A failure in the backward graph alone would surface at the first backward,
    in the method, outside this wrapper.)

    Only training calls this wrapper. Evaluation and the probes run the bare module (the same
    parameters) or the EMA's copy, in eval mode on val batches of other sizes, so they add no
    graph and no recompile; training batches have one shape (the loaders drop the last partial
    global batch), hence dynamic=False: one static graph per call signature.
    """

    def __init__(self, net: torch.nn.Module, backend: str | Callable = "inductor"):
        super().__init__()
        self.eager = net
        # Not a submodule: its parameters are `eager`'s, and the state dict keeps one copy.
        object.__setattr__(self, "compiled", torch.compile(net, backend=backend, dynamic=False))
        self.stage = "first call"           # then "compiled" or "eager"
        self.first_step_s: float | None = None

    def forward(self, *args, **kwargs):
        if self.stage == "compiled":
            return self.compiled(*args, **kwargs)
        if self.stage == "eager":
            return self.eager(*args, **kwargs)
        return self.first_call(*args, **kwargs)

    def first_call(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure; the model's own re-raise below
            error = e
        else:
            self.stage = "compiled"
            self.time_first_backward(start, time.perf_counter() - start)
            return out
        out = self.eager(*args, **kwargs)      # outside the except: its own error, unchained
        self.stage = "eager"
        log.warning("model.compile: torch.compile failed at the first step (%s); training "
                    "continues eagerly", failure(error))
        return out

    def time_first_backward(self, start: float, forward_s: float) -> None:
        params = [p for p in self.eager.parameters() if p.requires_grad]
        handle = None

        def done(grads):
            if self.first_step_s is None:
                self.first_step_s = time.perf_counter() - start
                log.info("model.compile: the first forward and backward took %.1f s (forward "
                         "%.1f s): torch.compile compiles at the first step, and later steps "
                         "reuse its graphs", self.first_step_s, forward_s)
            handle.remove()
        if params:
            handle = torch.autograd.graph.register_multi_grad_hook(params, done, mode="all")


def failure(e: BaseException) -> str:
    """The compiler error's root cause in one line: dynamo wraps it (BackendCompilerFailed), and
    its own message starts with the wrapper's words, not the cause's."""
    root = e
    for _ in range(8):                  # a chain, not a cycle; a few links at most
        cause = root.__cause__ or getattr(root, "inner_exception", None)
        if cause is None or cause is root:
            break
        root = cause
    lines = [line for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0].strip()[:300] if lines else ''}"


def wrap(cfg: Config, model: torch.nn.Module, d: DistInfo,
         backend: str | Callable = "inductor") -> torch.nn.Module:
    """Global-batch BatchNorm (model.sync_bn), DDP and torch.compile (model.compile, resolved by
    compile_wanted) around the bare model, as configured. sync_bn converts the model's BatchNorms
    in place (same parameters and buffers). backend: torch.compile's (tests use a cheap one)."""
    net = model
    if d.distributed:
        if cfg.model.sync_bn:
            net = sync_batchnorm.convert(net, d.device.type)
        # The perturbation is a leaf of the graph, not a parameter: DDP never all-reduces it.
        net = DDP(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return CompiledModel(net, backend) if compile_wanted(cfg, d.device) else net


def loss_fn(cfg: Config):
    """The weight step's loss: label-smoothed cross-entropy when optim.label_smoothing is set,
    else None (the methods' plain cross-entropy). Attacks never use it (engine/attacks.py)."""
    smoothing = cfg.optim.label_smoothing
    if not smoothing:
        return None
    return lambda logits, labels: F.cross_entropy(logits, labels, label_smoothing=smoothing)


def build_method(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 d: DistInfo, amp_dtype: torch.dtype | None) -> StepBase:
    """The configured training method around the wrapped (DDP/compiled) model, with the options
    it takes from the config's method section. Free training has no loss to choose (its one
    backward is also its attack's): the config refuses label smoothing for it."""
    options = method_registry.configured_options(cfg.method)
    smoothed = loss_fn(cfg)
    if smoothed is not None:
        options["loss_fn"] = smoothed
    return methods.build_method(cfg.method.name, wrap(cfg, model, d), optimizer,
                                amp_dtype=amp_dtype, grad_clip=cfg.optim.clip_grad_norm, **options)


def build_optimizer(cfg: Config, model: torch.nn.Module, world_size: int) -> torch.optim.Optimizer:
    """optim.name sgd|adamw at the scaled lr; see dist_free.engine.optim for the weight-decay groups."""
    o = cfg.optim
    # timm's names are relative to the net; dist_free.engine.optim matches them as name suffixes.
    exempt = timm_models.no_weight_decay_names(getattr(model, "net", model))
    return optim.build_optimizer(model, name=o.name, lr=base_lr(cfg, world_size),
                                 weight_decay=o.weight_decay, momentum=o.momentum,
                                 nesterov=o.nesterov, betas=o.betas, wd_exempt=o.wd_exempt,
                                 exempt_names=exempt)
