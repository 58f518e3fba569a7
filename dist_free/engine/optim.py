"""Optimizers and gradient clipping.

- sgd: the paper's (momentum, optional Nesterov); by default weight decay on every parameter, as
  Shafahi et al.'s ImageNet code (torch's SGD) and torchvision's ResNet recipes do. Their CIFAR
  code (TF) decays conv and FC weights only: `wd_exempt` true, which for that net exempts exactly
  the BatchNorm weights and biases and the FC bias.
- adamw: the ConvNeXt/ViT recipes' (ARES, Singh et al. 2023, Debenedetti et al. 2022), with no
  weight decay on norm weights, biases and position/class tokens (`wd_exempt`).

Both use torch's fused kernel on CUDA (one launch for all parameters).

Clipping bounds the global L2 norm of the *weight* gradient just before the optimizer step. Under
a GradScaler the gradients are unscaled first (`scaler.unscale_`), so the bound is in true units;
the scaler then skips its own unscale in `step` and keeps its non-finite flag. Free training's
input gradient is a different tensor (d loss / d x_adv): clipping never touches it, so the
perturbation's FGSM step sees the same gradient with or without clipping.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def split_decay(model: nn.Module, exempt_names: set[str] = frozenset()
                ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, exempt): exempt are biases, every 1-D parameter (norm weights and biases,
    layer-scale gammas) and the parameters named in `exempt_names` or ending in one of them
    (timm's `no_weight_decay()`: pos_embed, cls_token, ...)."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        token = any(name == n or name.endswith("." + n) for n in exempt_names)
        (exempt if p.ndim <= 1 or name.endswith(".bias") or token else decay).append(p)
    return decay, exempt


def exempts(name: str, wd_exempt: bool | str) -> bool:
    """wd_exempt "auto": AdamW exempts norms, biases and tokens; SGD decays everything."""
    return name == "adamw" if wd_exempt == "auto" else bool(wd_exempt)


def build_optimizer(model: nn.Module, *, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9, nesterov: bool = False,
                    betas: tuple[float, float] = (0.9, 0.999), wd_exempt: bool | str = "auto",
                    exempt_names: set[str] = frozenset()) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = True if params[0].is_cuda else None     # one kernel for all parameters
    if exempts(name, wd_exempt):
        decay, exempt = split_decay(model, exempt_names)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": exempt, "weight_decay": 0.0}]
    else:
        groups = params      # one group: the same optimizer (and state_dict) as before AdamW
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                 fused=fused)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd or adamw")


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float,
                   scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Clip the optimizer's parameter gradients to a global L2 norm of `max_norm`; returns the
    norm before clipping, as a device tensor (no host sync)."""
    if scaler is not None:
        scaler.unscale_(optimizer)     # true units; scaler.step will not unscale again
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
