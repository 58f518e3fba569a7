"""Training methods side by side behind one interface: `train_step(images, labels) -> StepStats`.

- natural: plain SGD on clean images (the cost baseline).
- free:    Shafahi et al. 2019, see free.py (one backward per replay feeds weights and delta).
- pgd:     Madry et al. 2018: k PGD steps from a random start, then one SGD step on the result;
           k+1 forward/backward passes per SGD step.
- fast:    Wong et al. 2020 "Fast is better than free": FGSM from a uniform random start with
           step 1.25 eps; two passes per SGD step.

`build_method(name, model, optimizer, **options)` picks one by name; dist_free.engine.method_registry
declares each method's name, options and builder.
"""

from __future__ import annotations

import importlib

import torch

from dist_free.engine import linf, method_registry
from dist_free.engine.attacks import default_step_size, pgd_perturbation
from dist_free.engine.step_base import LossFn, StepBase, StepStats, batch_stats, true_classes


def _count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == true_classes(labels)).sum()


class NaturalTrainer(StepBase):
    name = "natural"

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        self.check_first_batch(images, labels)
        logits, loss, _ = self.sgd_step(images.to(self.input_dtype), labels)
        return batch_stats(loss.detach(), _count_correct(logits.detach(), labels), 1, images.shape[0])


class _AttackTrainer(StepBase):
    """Trains on an attack computed fresh for each minibatch (no state carried across batches).
    The attack ascends the plain cross-entropy (`input_grad`); only the weight step on its result
    uses `loss_fn`, label-smoothed or not."""

    def __init__(self, model, optimizer, *, eps: float, step_size: float, amp_dtype=None,
                 scaler=None, loss_fn: LossFn | None = None, grad_clip: float | None = None):
        super().__init__(model, optimizer, amp_dtype=amp_dtype, scaler=scaler, loss_fn=loss_fn,
                         grad_clip=grad_clip)
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (pixel units, e.g. 4/255), got {eps}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.eps, self.step_size = float(eps), float(step_size)

    def attack(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepStats:
        self.check_first_batch(images, labels)
        # Like Madry et al. and Wong et al., the attack runs in train mode (batch statistics).
        delta = self.attack(images, labels)
        x_adv = linf.perturb(images, delta, self.input_dtype)
        logits, loss, _ = self.sgd_step(x_adv, labels)
        return batch_stats(loss.detach(), _count_correct(logits.detach(), labels), 1, images.shape[0])


class PGDTrainer(_AttackTrainer):
    name = "pgd"

    def __init__(self, model, optimizer, *, eps: float, steps: int = 7,
                 step_size: float | None = None, **kw):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"PGD steps must be an integer >= 1, got {steps!r}")
        super().__init__(model, optimizer, eps=eps, step_size=step_size if step_size is not None
                         else default_step_size(eps, steps), **kw)
        self.steps = steps

    def attack(self, images, labels):
        return pgd_perturbation(images, lambda x_adv: self.input_grad(x_adv, labels), eps=self.eps,
                                steps=self.steps, step_size=self.step_size)


class FastFGSMTrainer(_AttackTrainer):
    name = "fast"

    def __init__(self, model, optimizer, *, eps: float, step_size: float | None = None, **kw):
        super().__init__(model, optimizer, eps=eps,
                         step_size=step_size if step_size is not None else 1.25 * eps, **kw)

    def attack(self, images, labels):
        delta = linf.random_start(images, self.eps)
        grad = self.input_grad(linf.perturb(images, delta, self.input_dtype), labels)
        return linf.attack_step(images, delta, grad, self.eps, self.step_size)


def method_class(name: str) -> type[StepBase]:
    """The builder dist_free.engine.method_registry names for method `name`."""
    module, cls = method_registry.spec(name).builder.split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 **options) -> StepBase:
    """The one way to build a method by name. Options a method does not use (e.g. `replays`
    for natural) are an error, not ignored."""
    return method_class(name)(model, optimizer, **options)
