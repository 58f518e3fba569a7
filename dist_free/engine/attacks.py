"""L-inf PGD (the one PGD loop: PGD training and evaluation both run `pgd_perturbation`) with
random restarts, FGSM, and the single-step training attacks (FGSM-RS, N-FGSM) as pure functions
of an input-gradient callable, like `pgd_perturbation`.

The training attacks take eps, step and noise as floats or as 0-dim device tensors that an eps
warm-up rewrites in place (linf.py): one traced graph serves every eps, and no value is read back.

Attacks run the model in eval mode and differentiate with respect to the input only
(`torch.autograd.grad`), so they never touch weights, their `.grad`, or BatchNorm running
statistics; the model's train/eval mode is restored afterwards. Pass an unwrapped model, not a
DDP wrapper: DDP would wait for a gradient all-reduce that an input-only backward never starts.

Precision: everything runs in fp32 unless `amp_dtype` (bf16 or fp16) is passed explicitly; an
attack run in low precision can report robustness that is only rounding (gradients that vanish
or lose their sign). The input gradient comes from a *sum*-reduced cross-entropy: a mean would
divide every sample's gradient by the batch size, pushing small gradients below what fp16/bf16
can represent, while the sign step only needs each sample's direction.

Loss: every attack, in training (PGD-k's and fast-FGSM's inner attacks, free training's
perturbation step) as in evaluation, ascends `attack_loss`, the plain cross-entropy on the true
labels, whatever loss the weights train on. A label-smoothed loss would turn the ascent around:
its gradient in the true logit is p_y - (1 - a + a/K), so once an image's true class is more
likely than the smoothed target, ascending it *raises* the true logit (the step makes the image
less adversarial).

Randomness: PGD's random starts come from `generator` when one is given, so an evaluation can
make them depend only on the batch they attack (see dist_free.evaluation.robust_eval), never on the global
RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dist_free.engine import linf


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _logits(model, x, amp_dtype):
    # fp32 input: a GPU loader hands fp16 batches, which an fp32 model without autocast refuses.
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        return model(x.float()).float()


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """What every attack ascends: the plain cross-entropy of fp32 logits on the true labels (see
    the module docstring: never the training loss, which may be smoothed). For a mixed batch the
    labels are its unsmoothed soft targets, whose cross-entropy this is too (why those and not
    the dominant label: dist_free.engine.batch_augment)."""
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def _input_grad(model, x, labels, amp_dtype):
    x = x.detach().requires_grad_(True)
    loss = attack_loss(_logits(model, x, amp_dtype), labels, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def default_step_size(eps: float, steps: int) -> float:
    """PGD's step when none is given, in training and evaluation alike: 2.5 eps / steps (Madry
    et al.), so the steps can reach the eps-ball's boundary from any start inside it and still
    move along it."""
    return 2.5 * eps / steps


InputGrad = Callable[[torch.Tensor], torch.Tensor]


def pgd_perturbation(images: torch.Tensor, input_grad: InputGrad, *,
                     eps: linf.Scalar, steps: int, step_size: linf.Scalar, random_start: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD's perturbation delta (fp32) of `images`: a random start in the eps-ball (or zero),
    then `steps` sign steps, each projected onto the eps-ball and the [0, 1] box.

    `input_grad(x_adv)` returns the loss gradient at x_adv = clamp(images + delta, 0, 1): the
    evaluation attack takes it in eval mode, PGD training through its own loss and scaler.
    """
    x = images.float()
    delta = linf.random_start(x, eps, generator) if random_start else torch.zeros_like(x)
    delta = linf.clamp_pixels(x + delta) - x
    for _ in range(steps):
        grad = input_grad(linf.perturb(x, delta))
        delta = linf.attack_step(x, delta, grad, eps, step_size)
    return delta


def fgsm_rs_perturbation(images: torch.Tensor, input_grad: InputGrad, *, eps: linf.Scalar,
                         step_size: linf.Scalar) -> torch.Tensor:
    """Wong et al. 2020 ("fast"): a uniform start in the eps-ball, one sign step, projected onto
    the ball and the image box. The gradient is taken at clamp(images + start, 0, 1)."""
    delta = linf.random_start(images, eps)
    grad = input_grad(linf.perturb(images, delta))
    return linf.attack_step(images, delta, grad, eps, step_size)


def nfgsm_perturbation(images: torch.Tensor, input_grad: InputGrad, *, noise: linf.Scalar,
                       step_size: linf.Scalar) -> torch.Tensor:
    """de Jorge et al. 2022 (N-FGSM): uniform noise in [-noise, noise] kept in the image box, one
    sign step from it, and NO projection onto the eps-ball (only onto the image box), so the
    perturbation reaches noise + step_size (3 eps at the paper's defaults). Not projecting is
    the method: the paper finds that clipping to the ball brings catastrophic overfitting back."""
    x = images.float()
    delta = linf.in_box(x, linf.random_start(x, noise))
    grad = input_grad(linf.perturb(x, delta))
    return linf.in_box(x, linf.sign_step(delta, grad, step_size))


def pgd(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
        steps: int, step_size: float | None = None, random_start: bool = True,
        amp_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """One PGD run; returns the adversarial images, in [0, 1] and within eps of `images`."""
    step_size = step_size if step_size is not None else default_step_size(eps, steps)
    x = images.float()
    with eval_mode(model):
        delta = pgd_perturbation(x, lambda x_adv: _input_grad(model, x_adv, labels, amp_dtype),
                                 eps=eps, steps=steps, step_size=step_size,
                                 random_start=random_start, generator=generator)
    return (x + delta).detach()


def fgsm(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float,
         amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Single signed-gradient step of size eps from the clean image."""
    return pgd(model, images, labels, eps=eps, steps=1, step_size=eps, random_start=False,
               amp_dtype=amp_dtype)


@torch.no_grad()
def correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
            amp_dtype: torch.dtype | None = None, topk: int = 1) -> torch.Tensor:
    """Per-sample bool: is the label among the top-k logits."""
    with eval_mode(model):
        logits = _logits(model, images, amp_dtype)
    top = logits.topk(min(topk, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1)


def robust_correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                   eps: float, steps: int, step_size: float | None = None, restarts: int = 1,
                   amp_dtype: torch.dtype | None = None,
                   generator: torch.Generator | None = None, attack=None) -> torch.Tensor:
    """Per-sample bool: correctly classified after every one of `restarts` PGD runs.

    A sample broken by any restart counts as broken (the worst case over restarts). The restarts
    draw their random starts one after the other from `generator` (None: the global RNG).
    `attack` (default `pgd`, same signature) is the attack each restart runs.
    """
    attack = attack or pgd
    if restarts < 1 or steps < 1:
        raise ValueError(f"restarts and steps must be >= 1, got restarts={restarts}, steps={steps}")
    survived = correct(model, images, labels, amp_dtype)
    for _ in range(restarts):
        x_adv = attack(model, images, labels, eps=eps, steps=steps, step_size=step_size,
                       amp_dtype=amp_dtype, generator=generator)
        survived &= correct(model, x_adv, labels, amp_dtype)
    return survived
