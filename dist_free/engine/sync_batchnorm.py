"""BatchNorm over the global batch on every rank (`model.sync_bn`): on 4 GPUs a CIFAR batch of 128
otherwise gives each BatchNorm 32 images' statistics.

On CUDA this is torch's SyncBatchNorm. torch's cannot run on the CPU (torch 2.14): in training
mode under a process group its forward refuses a CPU input ("SyncBatchNorm expected input tensor
to be on GPU or XPU ..."), and the kernels behind it (aten::batch_norm_stats,
batch_norm_gather_stats_with_counts, batch_norm_elemt, batch_norm_backward_reduce) have no CPU
implementation. `GlobalBatchNorm` computes the same statistics with any backend, gloo included:
each channel's sum and element count, then its centred sum of squares, each summed over the ranks
by an all-reduce that autograd differentiates. Normalisation, running statistics (the
Bessel-corrected variance of the global batch) and momentum follow torch's BatchNorm.

timm's BatchNormAct2d (EfficientNet, RegNet, CSPNet, ...) is a BatchNorm whose forward also
applies its `drop` and `act`: torch's converter would make it a plain SyncBatchNorm and silently
drop the activation, so on CUDA a net holding one goes through timm's own converter
(SyncBatchNormAct) and on other devices it becomes a `GlobalBatchNormAct`.

Gradients are torch's SyncBatchNorm's: each rank's input gradient is that of the sum of every
rank's loss (the statistics are shared), and DDP averages the weight gradients, which then equal
one process's on the whole batch with the mean loss.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the gradient: every rank's loss
    depends on the summed tensor, so each rank's input receives all of their gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=ctx.group)
        return total, None


@torch.compiler.disable     # a collective inside a custom Function: run it eagerly
def sum_over_ranks(tensor: torch.Tensor, group=None) -> torch.Tensor:
    return _SumOverRanks.apply(tensor, group)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of the batch over all ranks of `group`;
    without a process group (or in eval mode) it is torch's BatchNorm."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def synced(self) -> bool:
        return self.training and dist.is_available() and dist.is_initialized() and \
            dist.get_world_size(self.process_group) > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.synced():
            return super().forward(x)
        self._check_input_dim(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        # Statistics in fp32 under autocast, as torch's BatchNorm kernels accumulate them.
        values = x.float()
        count = values.new_full((1,), values.numel() // values.size(1))
        sums = sum_over_ranks(torch.cat([values.sum(dims), count]), self.process_group)
        n, mean = sums[-1], sums[:-1] / sums[-1]
        centred = values - mean.view(shape)
        var = sum_over_ranks(centred.square().sum(dims), self.process_group) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self.update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp(min=1))
        return out.to(x.dtype)

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """torch's rule: momentum, or the cumulative average when momentum is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


class GlobalBatchNormAct(GlobalBatchNorm):
    """timm's BatchNormAct2d over all ranks: the statistics, then its `drop` and `act`, in timm's
    order (`_global` sets both, the same modules as the converted layer's)."""

    drop: nn.Module
    act: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def timm_norm_act() -> type | None:
    """timm's BatchNormAct2d class if timm is loaded (a timm net exists only then), else None."""
    if "timm" not in sys.modules:
        return None
    from timm.layers import BatchNormAct2d
    return BatchNormAct2d


def _global(bn: _BatchNorm) -> GlobalBatchNorm:
    """The same layer, computing over all ranks: its parameters and buffers are the same tensors,
    so the state_dict, the optimizer and an EMA see no difference."""
    norm_act = timm_norm_act()
    with_act = norm_act is not None and isinstance(bn, norm_act)
    new = (GlobalBatchNormAct if with_act else GlobalBatchNorm)(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if with_act:
        new.drop, new.act = bn.drop, bn.act
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    return new.train(bn.training)


def convert(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm in `module` (in place, as torch's converter does) made to normalise over the
    global batch: torch's SyncBatchNorm on CUDA, GlobalBatchNorm on any other device."""
    if device_type == "cuda":
        norm_act = timm_norm_act()
        if norm_act is not None and any(isinstance(m, norm_act) for m in module.modules()):
            from timm.layers import convert_sync_batchnorm
            return convert_sync_batchnorm(module)
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, (GlobalBatchNorm,
                                                                   nn.SyncBatchNorm)):
        return _global(module)
    for name, child in module.named_children():
        module.add_module(name, convert(child, device_type))
    return module
