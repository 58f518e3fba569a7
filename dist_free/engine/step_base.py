"""What every training method shares: mixed precision, the optimizer step (with optional gradient
clipping, dist_free.engine.optim), input checks, stats.

A method (free, natural, PGD, fast-FGSM) subclasses `StepBase` and implements `train_step`. Two
losses: the weights step on `loss_fn` (default plain cross-entropy; the trainer passes a
label-smoothed one when optim.label_smoothing is set), while `input_grad`, the attacks' gradient,
always differentiates `attacks.attack_loss`, the plain cross-entropy: a smoothed loss would point
the attack the wrong way for confident images (attacks.py). Labels are class indices, or the soft
(B, K) targets of a mixed batch (dist_free.engine.batch_augment), which both losses take as they
are (torch's cross-entropy reads probability targets).

Methods that attack keep their eps in a `Radius`: eps, step and noise now, as 0-dim device
tensors that `set_eps` (an eps warm-up, dist_free.trainer.schedule.eps_at) rewrites in place.

The base keeps the hot path free of host-device syncs: statistics stay on the device in a
`StepStats` and only become Python floats when somebody reads them (the trainer does so every
`log_every` steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from dist_free.engine.attacks import attack_loss
from dist_free.engine.optim import clip_gradients

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepStats(Mapping):
    """A dict of floats whose values are device tensors until read.

    `stats["loss"]` syncs once for that value; `stats.tensors` gives the raw tensors, which the
    trainer sums on the device over many steps without syncing at all.
    """

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors

    def __getitem__(self, key: str) -> float:
        return float(self.tensors[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"StepStats({dict(self)})"


def check_pixel_range(images: torch.Tensor) -> None:
    """Fail on inputs outside [0, 1]: eps is in pixel units, so normalised inputs would break it."""
    lo, hi = torch.aminmax(images.detach())
    lo, hi = float(lo), float(hi)
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"images must lie in [0, 1] (got min {lo:.3f}, max {hi:.3f}); mean/std normalisation "
            "belongs inside the model (dist_free.engine.models.Normalize), not in the input pipeline")


def scaler_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The non-finite flag that `scaler.step` just acted on, as a device tensor (no sync).

    GradScaler exposes it only through its per-optimizer state, the same record torch's fused
    optimizers receive; it is valid between `scaler.step(optimizer)` and `scaler.update()`.
    """
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    return sum(found.values())


class Radius:
    """An attack's size now: eps_t, and its step and noise, which follow eps (step_size x eps_t /
    eps: the default steps are multiples of eps, and a step the user set scales alike).

    0-dim fp32 tensors on the method's device, rewritten in place by `set`: the attacks and free
    training's compiled update take them as tensor inputs, so a new eps neither recompiles a
    graph (a Python float would be baked into it as a constant) nor syncs with the host. `now`
    is eps_t's host copy, for the log and for skipping an unchanged value (after the warm-up
    `set` launches nothing). `neg_eps_t` is -eps_t, kept so that free training's eager update
    does not allocate the negation on every replay."""

    def __init__(self, eps: float, step_size: float, device: torch.device, noise: float = 0.0):
        self.eps, self.step_size, self.noise_size = float(eps), float(step_size), float(noise)
        self.now = self.eps
        self.eps_t, self.neg_eps_t, self.step_t, self.noise_t = (
            torch.full((), v, dtype=torch.float32, device=device)
            for v in (self.eps, -self.eps, self.step_size, self.noise_size))

    def set(self, eps: float) -> None:
        """eps_t = `eps` (pixel units, 0 <= eps <= the method's eps) from the next attack on."""
        if not 0.0 <= eps <= self.eps:
            raise ValueError(f"eps now must be in [0, {self.eps}] (the method's eps), got {eps}")
        if eps == self.now:
            return
        scale = eps / self.eps
        self.eps_t.fill_(eps)
        self.neg_eps_t.fill_(-eps)
        self.step_t.fill_(self.step_size * scale)
        self.noise_t.fill_(self.noise_size * scale)
        self.now = eps


class StepBase:
    """Shared plumbing. Subclasses implement `train_step(images, labels) -> StepStats`."""

    name = "base"
    radius: Radius | None = None      # eps now, for the methods that attack (set_eps)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                 loss_fn: LossFn | None = None, grad_clip: float | None = None):
        """loss_fn: the weight step's loss (default plain cross-entropy), never an attack's.
        grad_clip: bound on the weight gradient's global L2 norm (dist_free.engine.optim)."""
        if amp_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype}")
        if scaler is not None and amp_dtype is None:
            raise ValueError("a GradScaler needs amp_dtype=torch.float16")
        self.model = model
        self.optimizer = optimizer
        self.amp_dtype = amp_dtype
        self.device = next(model.parameters()).device
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        if scaler is None and amp_dtype is torch.float16:
            scaler = torch.amp.GradScaler(self.device.type)
        self.scaler = scaler
        self.loss_fn = loss_fn or F.cross_entropy
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.grad_clip = grad_clip
        # Model inputs are fp32 pixels under any autocast dtype: autocast casts them inside the
        # model, after Normalize. Rounding an adversarial input to bf16 first could move it out of
        # the eps-ball (see dist_free.engine.linf), and it would save nothing: Normalize's fp32 mean and
        # std promote a bf16 input back to fp32 anyway.
        self.input_dtype = torch.float32
        self._checked_first_batch = False
        self._no_inf = torch.zeros((), device=self.device)

    def check_first_batch(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Validate the first batch only: one sync at start-up, none per step. Labels are class
        indices (B,) or soft targets (B, K), the rows of a mixed batch (batch_augment.py)."""
        if self._checked_first_batch:
            return
        if images.dim() != 4 or labels.shape[:1] != images.shape[:1] or labels.dim() > 2:
            raise ValueError(f"expected images (B, C, H, W) and labels (B,) or (B, K), got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        check_pixel_range(images)
        self._checked_first_batch = True

    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            return self.model(images)

    def forward_loss(self, images: torch.Tensor, labels: torch.Tensor):
        """Logits and the weight step's loss (`loss_fn`)."""
        logits = self.forward_logits(images)
        return logits, self.loss_fn(logits.float(), labels)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> torch.Tensor:
        """Step the weights; return the scaler's non-finite flag (0 when there is no scaler)."""
        if self.grad_clip is not None:
            clip_gradients(self.optimizer, self.grad_clip, self.scaler)
        if self.scaler is None:
            self.optimizer.step()
            return self._no_inf
        self.scaler.step(self.optimizer)
        found_inf = scaler_found_inf(self.scaler, self.optimizer)
        self.scaler.update()
        return found_inf

    def sgd_step(self, images: torch.Tensor, labels: torch.Tensor):
        """zero_grad, forward, backward, step. Returns (logits, loss, found_inf)."""
        self.optimizer.zero_grad(set_to_none=True)
        logits, loss = self.forward_loss(images, labels)
        self.backward(loss)
        return logits, loss, self.optimizer_step()

    def input_grad(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """d attack_loss / d images only (the plain cross-entropy, whatever `loss_fn` is): no
        parameter gradients are accumulated (attack steps)."""
        images = images.detach().requires_grad_(True)
        # A mean, unlike evaluation's sum: under fp16 the loss scale (up to 2^16) times a sum over
        # the batch would overflow fp16's gradients; the mean's 1/B is what the scale is for.
        loss = attack_loss(self.forward_logits(images), labels)
        # Under fp16 the loss scale keeps small input gradients from flushing to zero; a positive
        # factor leaves their sign, the only thing an L-inf step uses, unchanged.
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        (grad,) = torch.autograd.grad(loss, images)
        return grad

    def set_eps(self, eps: float) -> None:
        """The eps of every attack from the next step on (an eps warm-up); ValueError for a
        method that does not attack, or an eps above its own."""
        if self.radius is None:
            raise ValueError(f"method {self.name!r} does not attack: it has no eps to set")
        self.radius.set(eps)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def rank_state(self) -> dict[str, torch.Tensor]:
        """State that differs between ranks (free training's perturbation): checkpoints keep one
        per rank. Stateless methods have none."""
        return {}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        """This rank's saved `rank_state`; {} when the run had fewer ranks (start afresh)."""

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        raise NotImplementedError


def true_classes(labels: torch.Tensor) -> torch.Tensor:
    """The class each image's accuracy is counted against: its label, or for a soft target (a
    mixed batch) the class with the largest share."""
    return labels if labels.dim() == 1 else labels.argmax(1)


def batch_stats(loss_sum: torch.Tensor, correct: torch.Tensor, passes: int, batch: int) -> StepStats:
    """Mean loss and accuracy over `passes` forward passes of a batch of `batch` samples."""
    return StepStats(loss=loss_sum / passes, acc=correct.float() / (passes * batch),
                     samples=torch.tensor(float(batch)))
