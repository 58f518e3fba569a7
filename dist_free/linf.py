"""The L-inf geometry, in one place: pixel clamp, eps-ball projection, sign step.

Training (free, PGD, fast-FGSM) and evaluation (attacks.py) all perturb images through these
functions, so the threat model cannot drift between them. Images live in [0, 1]; eps and step
sizes are in the same pixel units (4/255 means 4/255).

Adversarial inputs are fp32. Under bf16 or fp16 autocast the model casts them itself, inside
(after Normalize, at the first convolution); rounding clamp(x + delta, 0, 1) to bf16 *before* the
model would move it by up to half a bf16 step (2^-9 near 1, an eighth of eps = 4/255) and could
leave the eps-ball around x. `perturb` therefore refuses 16-bit dtypes.

`free_update` is the free-training inner update written once as plain tensor code. Run eagerly
(the CPU) it writes into preallocated `UpdateWork` buffers: seven element-wise passes, nothing
allocated; `compiled_free_update` hands the very same function to torch.compile, which fuses it
into one kernel (Triton on CUDA, Inductor's C++ backend on the CPU). Sharing the function is what
makes the two paths agree bit for bit.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


def clamp_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    return delta.clamp(-eps, eps)


def sign_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
    return delta + step_size * grad.sign()


def perturb(x: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The adversarial input clamp(x + delta, 0, 1), in fp32 (see the module docstring)."""
    if dtype != torch.float32:
        raise ValueError(f"adversarial inputs stay fp32 (autocast casts inside the model); got "
                         f"{dtype}, whose rounding could leave the eps-ball")
    return clamp_pixels(x.float() + delta)


def random_start(like: torch.Tensor, eps: float) -> torch.Tensor:
    """Uniform noise in the eps-ball, as PGD and fast-FGSM start from."""
    return torch.empty_like(like, dtype=torch.float32).uniform_(-eps, eps)


def attack_step(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, eps: float,
                step_size: float) -> torch.Tensor:
    """One PGD ascent step on delta, projected onto both the eps-ball and the image box."""
    delta = project(sign_step(delta, grad, step_size), eps)
    return clamp_pixels(x.float() + delta) - x.float()


class UpdateWork(NamedTuple):
    """Scratch tensors for the eager update, allocated once per buffer shape and reused."""
    pre: torch.Tensor       # x + delta, fp32
    inside: torch.Tensor    # 1.0 where the pixel clamp was inactive, else 0.0 (fp32)
    step: torch.Tensor      # sign of the gradient, fp32

    @classmethod
    def like(cls, delta: torch.Tensor) -> UpdateWork:
        return cls(*(torch.empty_like(delta) for _ in cls._fields))

    def rows(self, b: int) -> UpdateWork:
        return UpdateWork(*(t[:b] for t in self))


def free_update(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor,
                found_inf: torch.Tensor | None, eps: float, step_size: float, x_adv: torch.Tensor,
                next_input: bool, work: UpdateWork | None = None) -> None:
    """Free training's perturbation update, in place.

    x: the clean batch; delta: this rank's fp32 buffer rows for it; grad: dL/d x_adv from the replay
    just run (its positive loss scale does not change the sign); x_adv: that replay's input, which
    must be exactly clamp(x + delta, 0, 1) as `perturb` or the previous update computed it.

    The paper differentiates through clamp(x + delta, 0, 1), so the step is masked where the clamp
    was active; torch's clamp backward passes gradient on the closed interval, so we do too. The
    clamp was inactive exactly where x_adv equals x + delta (elsewhere x_adv holds 0 or 1, which
    x + delta is not): one comparison instead of two and an AND. found_inf: the GradScaler's
    non-finite flag; where it is > 0 the step is skipped, like the optimizer's (None: no scaler,
    nothing to skip). next_input: overwrite x_adv with the next replay's input clamp(x + delta, 0, 1)
    (one tensor read and written in place: the compiled kernel would pay for an aliased output).
    `work`: reused scratch (eager, nothing allocated); None computes the same operations as
    expressions, which under torch.compile cost nothing (the fused kernel keeps them in registers).
    """
    if work is None:
        return _free_update_expr(x, delta, grad, found_inf, eps, step_size, x_adv, next_input)
    pre, inside, step = work
    torch.add(x, delta, out=pre)
    torch.eq(x_adv, pre, out=inside)
    if grad.dtype == step.dtype:
        torch.sign(grad, out=step)
    else:                                   # a 16-bit gradient: widen in place, then its sign
        step.copy_(grad).sign_()
    if found_inf is not None:
        # masked_fill, not a multiply: a skipped step's gradient may hold NaN, and NaN * 0 is NaN.
        step.masked_fill_(found_inf > 0, 0.0)
    delta.addcmul_(step, inside, value=step_size).clamp_(-eps, eps)
    if next_input:
        torch.add(x, delta, out=x_adv).clamp_(0.0, 1.0)


def _free_update_expr(x, delta, grad, found_inf, eps: float, step_size: float, x_adv,
                      next_input: bool) -> None:
    """`free_update` without scratch: the same operations as expressions, for torch.compile to fuse
    (its graphs refuse `out=` into non-contiguous tensors, and channels_last batches are that)."""
    inside = torch.eq(x_adv, x + delta).float()
    step = grad.float().sign()
    if found_inf is not None:
        step = step.masked_fill(found_inf > 0, 0.0)
    delta.addcmul_(step, inside, value=step_size).clamp_(-eps, eps)
    if next_input:
        x_adv.copy_((x + delta).clamp(0.0, 1.0))


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
