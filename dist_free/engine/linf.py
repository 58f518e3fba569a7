"""The L-inf geometry, in one place: pixel clamp, eps-ball projection, sign step, random start.

Training (free, PGD, fast-FGSM) and evaluation (attacks.py) all perturb images through these
functions, so the threat model cannot drift between them. Images live in [0, 1]; eps and step
sizes are in the same pixel units (4/255 means 4/255).

Adversarial inputs are fp32. Under bf16 or fp16 autocast the model casts them itself, inside
(after Normalize, at the first convolution); rounding clamp(x + delta, 0, 1) to bf16 *before* the
model would move it by up to half a bf16 step (2^-9 near 1, an eighth of eps = 4/255) and could
leave the eps-ball around x. `perturb` therefore refuses 16-bit dtypes.

Free training's fused in-place update (the same geometry, written as one kernel over reused
buffers) lives beside its trainer in free.py.

eps, step sizes and noise radii may be Python floats (evaluation) or 0-dim fp32 tensors on the
images' device (training under an eps warm-up, step_base.Radius): nothing here reads one back to
the host or branches on its value, so a tensor whose value changes in place costs neither a sync
nor, under torch.compile, a recompile.
"""

from __future__ import annotations

import torch

Scalar = float | torch.Tensor   # a float, or a 0-dim tensor (above)


def clamp_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0)


def project(delta: torch.Tensor, eps: Scalar) -> torch.Tensor:
    return delta.clamp(-eps, eps)


def sign_step(delta: torch.Tensor, grad: torch.Tensor, step_size: Scalar) -> torch.Tensor:
    return delta + step_size * grad.sign()


def perturb(x: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The adversarial input clamp(x + delta, 0, 1), in fp32 (see the module docstring)."""
    if dtype != torch.float32:
        raise ValueError(f"adversarial inputs stay fp32 (autocast casts inside the model); got "
                         f"{dtype}, whose rounding could leave the eps-ball")
    return clamp_pixels(x.float() + delta)


def in_box(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """delta cut back so that x + delta lies in the [0, 1] image box."""
    return clamp_pixels(x.float() + delta) - x.float()


def random_start(like: torch.Tensor, eps: Scalar,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform noise in the eps-ball, as PGD and fast-FGSM start from (N-FGSM: a larger ball);
    drawn from `generator` when given (evaluation keys its draws to the batch), else from the
    global RNG. Drawn in [-1, 1) and scaled, since `uniform_` takes its bounds as host floats."""
    noise = torch.empty_like(like, dtype=torch.float32).uniform_(-1.0, 1.0, generator=generator)
    return noise.mul_(eps)


def attack_step(x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, eps: Scalar,
                step_size: Scalar) -> torch.Tensor:
    """One PGD ascent step on delta, projected onto both the eps-ball and the image box."""
    return in_box(x, project(sign_step(delta, grad, step_size), eps))
