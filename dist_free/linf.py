"""The L-inf geometry, in one place: pixel clamp, eps-ball projection, sign step.

Training (free, PGD, fast-FGSM) and evaluation (attacks.py) all perturb images through these
functions, so the threat model cannot drift between them. Images live in [0, 1]; eps and step
sizes are in the same pixel units (4/255 means 4/255).

`free_update` is the free-training inner update written once as plain tensor code. Run eagerly it is
a handful of element-wise kernels; `compiled_free_update` hands the very same function to
torch.compile, which fuses it into one kernel (Triton on CUDA, Inductor's C++ backend on the CPU).
Sharing the function is what makes the two paths agree bit for bit.
"""

from __future__ import annotations

import functools

import torch


def clamp_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    return delta.clamp(-eps, eps)


def sign_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
    return delta + step_size * grad.sign()


def perturb(x: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The adversarial input clamp(x + delta, 0, 1), computed in fp32, stored in `dtype`."""
    return clamp_pixels(x.float() + delta).to(dtype)


def random_start(like: torch.Tensor, eps: float) -> torch.Tensor:
    """Uniform noise in the eps-ball, as PGD and fast-FGSM start from."""
    return torch.empty_like(like, dtype=torch.float32).uniform_(-eps, eps)


def attack_step(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, eps: float,
                step_size: float) -> torch.Tensor:
    """One PGD ascent step on delta, projected onto both the eps-ball and the image box."""
    delta = project(sign_step(delta, grad, step_size), eps)
    return clamp_pixels(x.float() + delta) - x.float()


def free_update(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, found_inf: torch.Tensor,
                eps: float, step_size: float, x_adv_out: torch.Tensor | None) -> None:
    """Free training's perturbation update, in place.

    x: the clean batch; delta: this rank's fp32 buffer rows for it; grad: dL/d x_adv from the replay
    just run (in the activation dtype; its positive loss scale does not change the sign).

    The paper differentiates through clamp(x + delta, 0, 1), so the step is masked where the clamp
    was active; torch's clamp backward passes gradient on the closed interval, so we do too. When
    the GradScaler found non-finite gradients (found_inf > 0) the step is skipped, like the
    optimizer's. If `x_adv_out` is given, the next replay's input clamp(x + delta, 0, 1) is written
    there in its dtype in the same pass, saving a separate read of x and delta.
    """
    pre = x.float() + delta
    inside = (pre >= 0.0) & (pre <= 1.0)
    step = torch.where(inside, step_size * grad.float().sign(), 0.0)
    new = project(delta + step, eps)
    new = torch.where(found_inf > 0, delta, new)
    delta.copy_(new)
    if x_adv_out is not None:
        x_adv_out.copy_(clamp_pixels(x.float() + new).to(x_adv_out.dtype))


@functools.cache
def compiled_free_update():
    """`free_update` fused by torch.compile; compiled lazily on first use, once per process."""
    # dynamic=None: the first shape compiles static; a smaller last batch triggers one dynamic
    # recompile instead of one per size.
    return torch.compile(free_update, fullgraph=True)


def resolve_fused(fused: bool | str, device: torch.device) -> bool:
    """'auto' fuses on CUDA only: on a CPU the one-off C++ compile costs more than short runs gain."""
    if fused == "auto":
        return device.type == "cuda"
    return bool(fused)
