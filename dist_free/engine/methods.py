"""Training methods side by side behind one interface: `train_step(images, labels) -> StepStats`.

- natural: plain SGD on clean images (the cost baseline).
- free:    Shafahi et al. 2019, see free.py (one backward per replay feeds weights and delta).
- pgd:     Madry et al. 2018: k PGD steps from a random start, then one SGD step on the result;
           k+1 forward/backward passes per SGD step.
- fast:    Wong et al. 2020 "Fast is better than free": FGSM from a uniform random start with
           step 1.25 eps; two passes per SGD step.
- nfgsm:   de Jorge et al. 2022 "Make Some Noise: Reliable and Efficient Single-Step Adversarial
           Training" (NeurIPS; arXiv 2202.01181): noise uniform in [-k eps, k eps], one sign step
           of eps, and no projection back onto the eps-ball; two passes per SGD step. The defaults
           are the authors' code (github.com/pdejorge/N-FGSM, train.py): --unif 2.0 (k, "relative
           to epsilon"), --alpha equal to --epsilon in every run of experiments.sh (8 and 8 by
           default), --clip -1 ("no clipping"); the noise and the stepped perturbation are both
           clamped to the image box, and the attack runs in train mode, as here.

Every method that attacks takes an eps warm-up through `set_eps` (step_base.Radius): its step, and
N-FGSM's noise, follow eps.

`build_method(name, model, optimizer, **options)` picks one by name; dist_free.engine.method_registry
declares each method's name, options and builder.
"""

from __future__ import annotations

import importlib

import torch

from dist_free.engine import attacks, linf, method_registry
from dist_free.engine.attacks import default_step_size
from dist_free.engine.step_base import LossFn, Radius, StepBase, StepStats, batch_stats, true_classes


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
                 scaler=None, loss_fn: LossFn | None = None, grad_clip: float | None = None,
                 noise_radius: float = 0.0):
        """eps, step_size and N-FGSM's noise_radius (pixel units) at full eps; `radius` holds
        them now (an eps warm-up scales all three)."""
        super().__init__(model, optimizer, amp_dtype=amp_dtype, scaler=scaler, loss_fn=loss_fn,
                         grad_clip=grad_clip)
        if not eps > 0:
            raise ValueError(f"eps must be > 0 (pixel units, e.g. 4/255), got {eps}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.eps, self.step_size = float(eps), float(step_size)
        self.radius = Radius(eps, step_size, self.device, noise=noise_radius)

    def input_grad_of(self, labels: torch.Tensor):
        """The attacks' gradient callable (attacks.InputGrad) for this batch's labels."""
        return lambda x_adv: self.input_grad(x_adv, labels)

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
        r = self.radius
        return attacks.pgd_perturbation(images, self.input_grad_of(labels), eps=r.eps_t,
                                        steps=self.steps, step_size=r.step_t)


class FastFGSMTrainer(_AttackTrainer):
    name = "fast"

    def __init__(self, model, optimizer, *, eps: float, step_size: float | None = None, **kw):
        super().__init__(model, optimizer, eps=eps,
                         step_size=step_size if step_size is not None else 1.25 * eps, **kw)

    def attack(self, images, labels):
        r = self.radius
        return attacks.fgsm_rs_perturbation(images, self.input_grad_of(labels), eps=r.eps_t,
                                            step_size=r.step_t)


class NFGSMTrainer(_AttackTrainer):
    """N-FGSM (module docstring): `noise` is k, the noise radius as a multiple of eps."""

    name = "nfgsm"

    def __init__(self, model, optimizer, *, eps: float, step_size: float | None = None,
                 noise: float = 2.0, **kw):
        if not noise >= 0:
            raise ValueError(f"noise is a multiple of eps, >= 0, got {noise}")
        super().__init__(model, optimizer, eps=eps,
                         step_size=step_size if step_size is not None else eps,
                         noise_radius=noise * eps, **kw)
        self.noise = float(noise)

    def attack(self, images, labels):
        r = self.radius
        return attacks.nfgsm_perturbation(images, self.input_grad_of(labels), noise=r.noise_t,
                                          step_size=r.step_t)


def method_class(name: str) -> type[StepBase]:
    """The builder dist_free.engine.method_registry names for method `name`."""
    module, cls = method_registry.spec(name).builder.split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 **options) -> StepBase:
    """The one way to build a method by name. Options a method does not use (e.g. `replays`
    for natural) are an error, not ignored."""
    return method_class(name)(model, optimizer, **options)
