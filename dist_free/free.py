"""Free adversarial training: Algorithm 1 of Shafahi et al., "Adversarial Training for Free!" (2019).

Each minibatch is replayed `replays` (the paper's m) times. Every replay runs one forward and one
backward on x_adv = clamp(x + delta, 0, 1); that single backward yields both the weight gradient
(one SGD step) and the input gradient (one FGSM step on delta). delta is never reset: it starts at
zero and carries over from one minibatch to the next (the warm start that makes m small replays
add up to a strong attack). Run total_epochs / m epochs and the cost equals natural training's.

Example:
    t = FreeAdversarialTrainer(model, optimizer, eps=4/255, replays=4)
    for images, labels in loader:          # images in [0, 1]
        stats = t.train_step(images, labels)
"""

from __future__ import annotations

import torch

from dist_free import linf
from dist_free.step_base import LossFn, StepBase, StepStats, batch_stats


class FreeAdversarialTrainer(StepBase):
    name = "free"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, eps: float,
                 replays: int, step_size: float | None = None, amp_dtype: torch.dtype | None = None,
                 scaler: torch.amp.GradScaler | None = None, loss_fn: LossFn | None = None,
                 input_shape: tuple[int, int, int, int] | None = None, fused: bool | str = "auto",
                 grad_clip: float | None = None):
        """input_shape: (max_batch, C, H, W) allocates the perturbation now; otherwise the first
        batch's shape is used. fused: "auto" (compiled kernel on CUDA, eager on CPU), True, False.
        grad_clip bounds the weight step's gradient only, never the perturbation's (x_adv.grad)."""
        super().__init__(model, optimizer, amp_dtype=amp_dtype, scaler=scaler, loss_fn=loss_fn,
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
        self.fused = linf.resolve_fused(fused, self.device)
        self._update = linf.compiled_free_update() if self.fused else linf.free_update
        self._delta: torch.Tensor | None = None
        self._x_adv: torch.Tensor | None = None
        self._work: linf.UpdateWork | None = None
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
        self._work = None if self.fused else linf.UpdateWork.like(self._delta)

    def _check_shape(self, images: torch.Tensor) -> None:
        if self._delta is None:
            self._allocate(tuple(images.shape), like=images)
        buf = self._delta.shape
        if images.shape[1:] != buf[1:] or images.shape[0] > buf[0] or images.shape[0] == 0:
            raise ValueError(
                f"batch of shape {tuple(images.shape)} does not fit the perturbation buffer "
                f"{tuple(buf)}: batches must have the buffer's (C, H, W) and at most {buf[0]} images")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        """Replay one minibatch `replays` times; returns mean loss and accuracy on x_adv."""
        self.check_first_batch(images, labels)
        self._check_shape(images)
        b = images.shape[0]
        delta, x_adv_buf = self._delta[:b], self._x_adv[:b]
        work = None if self._work is None else self._work.rows(b)
        with torch.no_grad():
            torch.add(images, delta, out=x_adv_buf).clamp_(0.0, 1.0)     # linf.perturb, in place
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for replay in range(self.replays):
            # A fresh leaf over the reused storage; autograd hands us its gradient.
            x_adv = x_adv_buf.detach().requires_grad_(True)
            logits, loss, found_inf = self.sgd_step(x_adv, labels)
            last = replay == self.replays - 1
            with torch.no_grad():
                # Without a GradScaler no step is ever skipped: pass None, not a zero to test.
                self._update(images, delta, x_adv.grad, found_inf if self.scaler is not None else None,
                             self.eps, self.step_size, x_adv_buf, not last, work)
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == labels).sum()
        return batch_stats(loss_sum, correct, self.replays, b)

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
