"""Free adversarial training: Algorithm 1 of Shafahi et al., "Adversarial Training for Free!" (2019).

Each minibatch is replayed `replays` (the paper's m) times. Every replay runs one forward and one
backward on x_adv = clamp(x + delta, 0, 1); that single backward yields both the weight gradient
(one SGD step) and the input gradient (one FGSM step on delta). delta is never reset: it starts at
zero and carries over from one minibatch to the next (the warm start that makes m small replays
add up to a strong attack). Run total_epochs / m epochs and the cost equals natural training's.

Because that one backward is also the attack's, the loss is the plain cross-entropy
(`attacks.attack_loss`), with no `loss_fn` to choose. A label-smoothed loss cannot be had at that
price: its logit gradient is the plain one plus a(onehot - 1/K), which backpropagates through the
whole network to the input as well as to the weights, so a smoothed weight step beside a plain
perturbation step needs a second backward through the activations on every replay (no longer
free), and a smoothed perturbation step ascends toward the smoothed target, not away from the
true class (attacks.py). So the config refuses optim.label_smoothing with free training.

The perturbation update is `free_update`, a pure function written once as plain tensor code;
`FreeAdversarialTrainer` is the thin stateful wrapper that owns the buffers and calls it. Run
eagerly (the CPU) the update writes into preallocated `UpdateWork` buffers: eight element-wise
passes, nothing allocated (a tensor eps comes with its negation, `neg_eps`);
`compiled_free_update` hands the very same function to torch.compile, which fuses it into one
kernel (Triton on CUDA, Inductor's C++ backend on the CPU). Sharing the function is what makes
the two paths agree bit for bit. Its geometry (sign step, eps clamp, [0, 1] clamp) is linf.py's,
fused.

Under an eps warm-up (`set_eps`, step_base.Radius) eps and the step reach the update as 0-dim
device tensors rewritten in place: the compiled kernel takes them as inputs, so one graph serves
every eps. The buffer stays inside the current ball: every update clamps it to eps_t, and a
smaller eps (never the case in a warm-up, which only rises) clamps it at once.

Example:
    t = FreeAdversarialTrainer(model, optimizer, eps=4/255, replays=4)
    for images, labels in loader:          # images in [0, 1]
        stats = t.train_step(images, labels)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from dist_free.engine.attacks import attack_loss
from dist_free.engine.linf import Scalar
from dist_free.engine.step_base import Radius, StepBase, StepStats, batch_stats, true_classes


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
                found_inf: torch.Tensor | None, eps: Scalar, step_size: Scalar, x_adv: torch.Tensor,
                next_input: bool, work: UpdateWork | None = None,
                neg_eps: Scalar | None = None) -> None:
    """Free training's perturbation update, in place.

    x: the clean batch; delta: this rank's fp32 buffer rows for it; grad: dL/d x_adv from the replay
    just run (its positive loss scale does not change the sign); x_adv: that replay's input, which
    must be exactly clamp(x + delta, 0, 1) as `linf.perturb` or the previous update computed it.

    The paper differentiates through clamp(x + delta, 0, 1), so the step is masked where the clamp
    was active; torch's clamp backward passes gradient on the closed interval, so we do too. The
    clamp was inactive exactly where x_adv equals x + delta (elsewhere x_adv holds 0 or 1, which
    x + delta is not): one comparison instead of two and an AND. found_inf: the GradScaler's
    non-finite flag; where it is > 0 the step is skipped, like the optimizer's (None: no scaler,
    nothing to skip). next_input: overwrite x_adv with the next replay's input clamp(x + delta, 0, 1)
    (one tensor read and written in place: the compiled kernel would pay for an aliased output).
    `work`: reused scratch (eager, nothing batch-sized allocated); None computes the same
    operations as expressions, which under torch.compile cost nothing (the fused kernel keeps them
    in registers). eps, step_size: floats, or 0-dim tensors on the buffers' device (linf.Scalar);
    neg_eps: -eps, the ball's lower face (None: computed here, which for a tensor eps allocates a
    0-dim tensor per call, hence the trainer passes `Radius.neg_eps_t`).
    The step is sign x mask x step_size, then added: exact products of +-1 or 0, so the eager and
    the fused update agree bit for bit whatever the step's type.
    """
    low = -eps if neg_eps is None else neg_eps
    if work is None:
        return _free_update_expr(x, delta, grad, found_inf, low, eps, step_size, x_adv, next_input)
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
    step.mul_(inside)
    if isinstance(step_size, torch.Tensor):     # addcmul's `value` must be a host number
        delta.addcmul_(step, step_size)
    else:
        delta.add_(step, alpha=step_size)
    delta.clamp_(low, eps)
    if next_input:
        torch.add(x, delta, out=x_adv).clamp_(0.0, 1.0)


def _free_update_expr(x, delta, grad, found_inf, low: Scalar, eps: Scalar, step_size: Scalar,
                      x_adv, next_input: bool) -> None:
    """`free_update` without scratch: the same operations as expressions, for torch.compile to fuse
    (its graphs refuse `out=` into non-contiguous tensors, and channels_last batches are that)."""
    inside = torch.eq(x_adv, x + delta).float()
    step = grad.float().sign()
    if found_inf is not None:
        step = step.masked_fill(found_inf > 0, 0.0)
    delta.add_(step * inside * step_size).clamp_(low, eps)
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


class ReplayBuffers(NamedTuple):
    """The rows of the trainer's reused buffers that one batch uses."""
    perturbation: torch.Tensor          # delta, carried over between minibatches
    replay_input: torch.Tensor          # clamp(x + delta, 0, 1), fp32 whatever the autocast
    work: UpdateWork | None             # the eager update's scratch; None when fused


class FreeAdversarialTrainer(StepBase):
    name = "free"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, eps: float,
                 replays: int, step_size: float | None = None, amp_dtype: torch.dtype | None = None,
                 scaler: torch.amp.GradScaler | None = None,
                 input_shape: tuple[int, int, int, int] | None = None, fused: bool | str = "auto",
                 grad_clip: float | None = None):
        """input_shape: (max_batch, C, H, W) allocates the perturbation now; otherwise the first
        batch's shape is used. fused: "auto" (compiled kernel on CUDA, eager on CPU), True, False.
        grad_clip bounds the weight step's gradient only, never the perturbation's (x_adv.grad)."""
        # The one backward serves the weights and the attack: its loss is the attack's (above).
        super().__init__(model, optimizer, amp_dtype=amp_dtype, scaler=scaler, loss_fn=attack_loss,
                         grad_clip=grad_clip)
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (pixel units, e.g. 4/255), got {eps}")
        if isinstance(replays, bool) or not isinstance(replays, int) or replays < 1:
            raise ValueError(f"replays must be an integer >= 1, got {replays!r}")
        self.eps = float(eps)
        self.replays = replays
        self.step_size = float(eps if step_size is None else step_size)
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.radius = Radius(self.eps, self.step_size, self.device)
        self.fused = resolve_fused(fused, self.device)
        self.update = compiled_free_update() if self.fused else free_update   # the one in use
        self._delta: torch.Tensor | None = None
        self._x_adv: torch.Tensor | None = None
        self._work: UpdateWork | None = None
        if input_shape is not None:
            self._allocate(tuple(input_shape))

    @property
    def perturbation(self) -> torch.Tensor | None:
        """This rank's buffer, (max_batch, C, H, W), fp32; None until its shape is known."""
        return self._delta

    def _allocate(self, shape: tuple[int, ...], like: torch.Tensor | None = None) -> None:
        if len(shape) != 4:
            raise ValueError(f"input_shape must be (max_batch, C, H, W), got {shape}")
        # Same memory layout as the batches (channels_last on GPUs), so the element-wise update
        # walks all its tensors in the same order.
        channels_last = like is not None and like.dim() == 4 and not like.is_contiguous() \
            and like.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._delta = torch.empty(shape, device=self.device, dtype=torch.float32,
                                  memory_format=fmt).zero_()
        # The replay input lives in one reused buffer, in fp32 whatever the autocast dtype: the
        # model casts it inside, so rounding cannot push it out of the eps-ball (see linf).
        self._x_adv = torch.empty(shape, device=self.device, dtype=torch.float32,
                                  memory_format=fmt)
        # The eager update's scratch, allocated once; the fused kernel needs none.
        self._work = None if self.fused else UpdateWork.like(self._delta)

    def _check_shape(self, images: torch.Tensor) -> None:
        if self._delta is None:
            self._allocate(tuple(images.shape), like=images)
        buf = self._delta.shape
        if images.shape[1:] != buf[1:] or images.shape[0] > buf[0] or images.shape[0] == 0:
            raise ValueError(
                f"batch of shape {tuple(images.shape)} does not fit the perturbation buffer "
                f"{tuple(buf)}: batches must have the buffer's (C, H, W) and at most {buf[0]} images")

    def buffers(self, images: torch.Tensor) -> ReplayBuffers:
        """The buffer rows a batch of `images` uses, allocated at the first batch (ValueError if
        the batch does not fit). The benchmarks time the update on these same rows."""
        self._check_shape(images)
        b = images.shape[0]
        return ReplayBuffers(self._delta[:b], self._x_adv[:b],
                             None if self._work is None else self._work.rows(b))

    def buffer_tensors(self) -> list[torch.Tensor]:
        """Every tensor the trainer keeps between steps (empty before the first batch): the
        memory free training adds over natural training."""
        if self._delta is None:
            return []
        return [self._delta, self._x_adv, *(self._work or ())]

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """Replay one minibatch `replays` times; returns mean loss and accuracy on x_adv."""
        self.check_first_batch(images, labels)
        delta, x_adv_buf, work = self.buffers(images)
        b = images.shape[0]
        with torch.no_grad():
            torch.add(images, delta, out=x_adv_buf).clamp_(0.0, 1.0)     # linf.perturb, in place
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        classes = true_classes(labels)
        for replay in range(self.replays):
            # A fresh leaf over the reused storage; autograd hands us its gradient.
            x_adv = x_adv_buf.detach().requires_grad_(True)
            logits, loss, found_inf = self.sgd_step(x_adv, labels)
            last = replay == self.replays - 1
            with torch.no_grad():
                # Without a GradScaler no step is ever skipped: pass None, not a zero to test.
                self.update(images, delta, x_adv.grad,
                             found_inf=found_inf if self.scaler is not None else None,
                             eps=self.radius.eps_t, step_size=self.radius.step_t, x_adv=x_adv_buf,
                             next_input=not last, work=work, neg_eps=self.radius.neg_eps_t)
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == classes).sum()
        return batch_stats(loss_sum, correct, self.replays, b)

    def set_eps(self, eps: float) -> None:
        shrinking = eps < self.radius.now
        super().set_eps(eps)
        if shrinking and self._delta is not None:    # a rare event, not a step: no scratch kept
            self._delta.clamp_(-eps, eps)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "eps": self.eps, "replays": self.replays,
                "step_size": self.step_size}

    def rank_state(self) -> dict[str, torch.Tensor]:
        """The warm start is training state, and each rank's is its own."""
        return {} if self._delta is None else {"perturbation": self._delta}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        saved = state.get("perturbation")
        if saved is None:
            return
        if self._delta is not None and saved.shape != self._delta.shape:
            raise ValueError(f"saved perturbation has shape {tuple(saved.shape)}, this trainer's "
                             f"buffer is {tuple(self._delta.shape)} (batch size or image size changed)")
        if self._delta is None:
            self._allocate(tuple(saved.shape), like=saved)
        self._delta.copy_(saved)
