"""An eps warm-up reaches every attack: the step (and N-FGSM's noise) follow eps, free training's
buffer stays inside the current ball, and a new eps costs no recompile."""

import pytest
import torch
from helpers_nets import minibatches, sgd, tiny_net
from torch._dynamo.testing import CompileCounter
from torch.utils._python_dispatch import TorchDispatchMode

from dist_free.engine import free
from dist_free.engine.methods import build_method

EPS = 8 / 255


def constant_gradient(trainer, seen):
    """The trainer's attack gradient replaced by +1 everywhere (a pure tensor function: no model,
    no autograd), recording every input it is asked about."""
    def input_grad(x_adv, labels):
        seen.append(x_adv.detach().clone())
        return torch.ones_like(x_adv)
    trainer.input_grad = input_grad


def mid_grey(n=8):
    # 0.5 +- 3 eps stays inside [0, 1]: the pixel clamp never acts, only the attack's own rules.
    return torch.full((n, 3, 6, 6), 0.5), torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("name, options, step_at_full_eps", [
    ("pgd", {"steps": 4}, 2.5 * EPS / 4),
    ("pgd", {"steps": 4, "step_size": EPS / 8}, EPS / 8),
    ("fast", {}, 1.25 * EPS),
    ("fast", {"step_size": EPS / 2}, EPS / 2),
    ("nfgsm", {}, EPS),
    ("nfgsm", {"step_size": EPS / 2}, EPS / 2),
    ("free", {"replays": 2}, EPS),
    ("free", {"replays": 2, "step_size": EPS / 2}, EPS / 2),
])
def test_the_step_default_or_set_scales_with_eps(name, options, step_at_full_eps):
    model = tiny_net()
    trainer = build_method(name, model, sgd(model), eps=EPS, **options)
    assert float(trainer.radius.step_t) == pytest.approx(step_at_full_eps)
    trainer.set_eps(EPS / 4)
    assert float(trainer.radius.eps_t) == pytest.approx(EPS / 4)
    assert float(trainer.radius.step_t) == pytest.approx(step_at_full_eps / 4)
    assert trainer.radius.now == EPS / 4


@pytest.mark.parametrize("eps_now", [EPS, EPS / 2])
def test_pgd_steps_by_its_step_at_the_current_eps(eps_now):
    """From a random start in the ball, a +1 gradient moves each pixel by the step until the
    ball's face stops it: the largest move is the step at eps now, 2.5 eps_t / steps."""
    model = tiny_net()
    trainer = build_method("pgd", model, sgd(model), eps=EPS, steps=5)
    trainer.set_eps(eps_now)
    seen = []
    constant_gradient(trainer, seen)
    x, y = mid_grey()
    torch.manual_seed(0)
    delta = trainer.attack(x, y)
    moves = seen[1] - seen[0]
    step = 2.5 * eps_now / 5
    assert moves.max() == pytest.approx(step, abs=1e-6) and moves.min() >= -1e-7
    assert delta.abs().max() <= eps_now + 1e-7 and delta.max() >= eps_now - 1e-6


@pytest.mark.parametrize("eps_now", [EPS, EPS / 2])
def test_fgsm_rs_steps_by_its_step_at_the_current_eps(eps_now):
    model = tiny_net()
    trainer = build_method("fast", model, sgd(model), eps=EPS)
    trainer.set_eps(eps_now)
    seen = []
    constant_gradient(trainer, seen)
    x, y = mid_grey()
    torch.manual_seed(0)
    delta = trainer.attack(x, y)
    start = seen[0] - x
    assert start.abs().max() <= eps_now + 1e-7 and start.abs().max() > 0.9 * eps_now
    moves = delta - start
    assert moves.max() == pytest.approx(1.25 * eps_now, abs=1e-6)
    assert delta.abs().max() <= eps_now + 1e-7


def test_nfgsm_noise_and_step_follow_eps():
    model = tiny_net()
    trainer = build_method("nfgsm", model, sgd(model), eps=EPS)
    trainer.set_eps(EPS / 2)
    seen = []
    constant_gradient(trainer, seen)
    x, y = mid_grey(64)
    torch.manual_seed(0)
    delta = trainer.attack(x, y)
    noise = seen[0] - x
    assert noise.abs().max() <= EPS + 1e-7 and noise.abs().max() > 0.95 * EPS   # 2 x eps_t
    torch.testing.assert_close(delta - noise, torch.full_like(x, EPS / 2), rtol=0, atol=1e-6)


def test_free_steps_by_a_set_step_scaled_to_the_current_eps():
    """One replay from delta = 0: |delta| is the step wherever the gradient and the pixel clamp
    allow one, here step_size / 2 at eps / 2 (well inside the ball)."""
    model = tiny_net()
    trainer = build_method("free", model, sgd(model), eps=EPS, replays=1, step_size=EPS / 2)
    trainer.set_eps(EPS / 2)
    x, y = minibatches([8])[0]
    trainer.train_step(x, y)
    sizes = trainer.perturbation.abs().unique()
    torch.testing.assert_close(sizes.max(), torch.tensor(EPS / 4), rtol=0, atol=1e-7)
    assert set(sizes.tolist()) <= {0.0, sizes.max().item()}


def test_free_buffer_stays_inside_the_current_ball_after_a_replay():
    """Three replays of step eps_t would carry delta to 3 eps_t under the full eps's clamp."""
    model = tiny_net()
    trainer = build_method("free", model, sgd(model), eps=EPS, replays=3)
    trainer.set_eps(EPS / 4)
    x, y = minibatches([8])[0]
    trainer.train_step(x, y)
    delta = trainer.perturbation
    assert delta.abs().max() <= EPS / 4 + 1e-7
    assert delta.abs().max() >= EPS / 4 - 1e-7


def test_a_smaller_eps_cuts_the_free_buffer_back_into_its_ball_at_once():
    model = tiny_net()
    trainer = build_method("free", model, sgd(model), eps=EPS, replays=2)
    x, y = minibatches([8])[0]
    trainer.train_step(x, y)
    assert trainer.perturbation.abs().max() > EPS / 2
    trainer.set_eps(EPS / 4)
    assert trainer.perturbation.abs().max() <= EPS / 4 + 1e-7


def test_eps_is_refused_above_the_methods_own_or_for_natural_training():
    model = tiny_net()
    with pytest.raises(ValueError, match=r"eps now must be in \[0, "):
        build_method("pgd", model, sgd(model), eps=EPS).set_eps(2 * EPS)
    with pytest.raises(ValueError, match="'natural' does not attack"):
        build_method("natural", model, sgd(model)).set_eps(EPS)


def test_changing_eps_does_not_recompile_free_trainings_fused_update(monkeypatch):
    torch._dynamo.reset()
    counter = CompileCounter()           # an eager backend that counts the graphs it is given
    monkeypatch.setattr(free, "compiled_free_update",
                        lambda: torch.compile(free.free_update, backend=counter, fullgraph=True))
    model = tiny_net()
    trainer = build_method("free", model, sgd(model), eps=EPS, replays=2, fused=True)
    x, y = minibatches([8])[0]
    trainer.set_eps(0.0)
    trainer.train_step(x, y)
    # One graph per value of the update's `next_input` flag (the last replay writes no next
    # input): both are traced by the first step, whatever eps is.
    assert counter.frame_count == 2
    for eps_now in (EPS / 4, EPS / 2, EPS):
        trainer.set_eps(eps_now)
        trainer.train_step(x, y)
        assert trainer.perturbation.abs().max() <= eps_now + 1e-7
    assert counter.frame_count == 2


@pytest.mark.parametrize("name, options", [("pgd", {"steps": 2}), ("fast", {}), ("nfgsm", {})])
def test_changing_eps_does_not_recompile_the_attacks(name, options):
    """The trainer's own attack, traced whole (its gradient stubbed by a tensor function)."""
    torch._dynamo.reset()
    model = tiny_net()
    trainer = build_method(name, model, sgd(model), eps=EPS, **options)
    trainer.input_grad = lambda x_adv, labels: x_adv - 0.3
    counter = CompileCounter()
    attack = torch.compile(trainer.attack, backend=counter, fullgraph=True)
    x, y = mid_grey()
    for eps_now in (0.0, EPS / 4, EPS / 2, EPS):
        trainer.set_eps(eps_now)
        delta = attack(x, y)
        assert delta.abs().max() <= 3 * eps_now + 1e-6
    assert counter.frame_count == 1


class OpNames(TorchDispatchMode):
    """The name of every aten op run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_eager_free_update_negates_no_eps_per_replay():
    """The ball's lower face is the Radius's -eps_t, rewritten with eps_t: the eager update (the
    CPU's) allocates no 0-dim negation on every replay, and the clamp still follows eps now."""
    model = tiny_net()
    trainer = build_method("free", model, sgd(model), eps=EPS, replays=3, fused=False)
    x, y = minibatches([8])[0]
    trainer.set_eps(EPS / 4)
    with OpNames() as ops:
        trainer.train_step(x, y)
    assert "neg.default" not in ops.names
    delta = trainer.perturbation
    assert delta.min() >= -EPS / 4 - 1e-7 and delta.min() <= -EPS / 4 + 1e-7
