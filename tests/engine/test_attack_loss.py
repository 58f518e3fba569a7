"""Attacks ascend the plain cross-entropy on the true labels whatever the training loss; only the
weight step uses a label-smoothed loss, and free training (one backward for both) refuses one.

The model is linear, z = W x + b, so every gradient has a closed form to check against:
d CE / dz = p - onehot(y), d CE_a / dz = p - ((1 - a) onehot(y) + a / K) for smoothing a, and
d/dx = W^T (d/dz). With a = 0.5 and K = 3 the smoothed target is 2/3: for every image whose true
class is more likely than that, the smoothed ascent raises the true logit instead of lowering it.
"""

import copy

import pytest
import torch
import torch.nn as nn

from dist_free.config import ConfigError, load_config
from dist_free.engine import linf
from dist_free.engine.methods import FastFGSMTrainer, PGDTrainer, build_method
from dist_free.trainer import runtime

K, SMOOTHING, EPS = 3, 0.5, 4 / 255


def confident_linear(seed=0):
    """A linear classifier on 3x4x4 pixels that puts most images well past the smoothed target."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, K))
    with torch.no_grad():
        model[1].weight.mul_(40.0)
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))     # z = W (x - 0.5): mixed classes
    return model


def images_and_labels(model, n=16, seed=1):
    """Pixels in [0.2, 0.8] (no [0, 1] clamp within eps), labelled with the model's own guess so
    most are confidently right."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def target(y, smoothing):
    return (1 - smoothing) * nn.functional.one_hot(y, K).float() + smoothing / K


def logit_grad(model, x, y, smoothing):
    """d loss / d z of each image, in closed form (the batch mean only scales it)."""
    with torch.no_grad():
        return model(x).softmax(1) - target(y, smoothing)


def input_grad(model, x, y, smoothing=0.0):
    with torch.no_grad():
        return (logit_grad(model, x, y, smoothing) @ model[1].weight).reshape(x.shape)


def assert_smoothing_would_differ(model, x, y):
    """Not vacuous: most images are past the smoothed target, where the two ascents disagree."""
    p_true = model(x).softmax(1).gather(1, y[:, None]).squeeze(1)
    assert (p_true > 1 - SMOOTHING + SMOOTHING / K).float().mean() > 0.5
    differ = input_grad(model, x, y).sign() != input_grad(model, x, y, SMOOTHING).sign()
    assert differ.float().mean() > 0.3


def smoothed_loss_cfg(method):
    return load_config(None, [f"method.name={method}", f"optim.label_smoothing={SMOOTHING}"])


def fast_attack_by_hand(model, x, y, eps, step_size, seed, smoothing=0.0):
    torch.manual_seed(seed)
    start = linf.random_start(x, eps)                  # the draw the trainer makes first
    grad = input_grad(model, linf.perturb(x, start), y, smoothing)
    return linf.attack_step(x, start, grad, eps, step_size)


def pgd_attack_by_hand(model, x, y, eps, steps, step_size, seed):
    torch.manual_seed(seed)
    delta = linf.random_start(x, eps)
    delta = linf.clamp_pixels(x + delta) - x
    for _ in range(steps):
        delta = linf.attack_step(x, delta, input_grad(model, linf.perturb(x, delta), y), eps,
                                 step_size)
    return delta


@pytest.mark.parametrize("method", ["fast", "pgd"])
def test_inner_attacks_ascend_the_plain_cross_entropy_under_label_smoothing(method):
    model = confident_linear()
    x, y = images_and_labels(model)
    options = {"steps": 3} if method == "pgd" else {}
    trainer = build_method(method, model, torch.optim.SGD(model.parameters(), lr=0.1), eps=EPS,
                           loss_fn=runtime.loss_fn(smoothed_loss_cfg(method)), **options)
    torch.manual_seed(7)
    delta = trainer.attack(x, y)
    if method == "fast":
        expected = fast_attack_by_hand(model, x, y, EPS, trainer.step_size, seed=7)
    else:
        expected = pgd_attack_by_hand(model, x, y, EPS, 3, trainer.step_size, seed=7)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    assert_smoothing_would_differ(model, x, y)
    smoothed = fast_attack_by_hand(model, x, y, EPS, trainer.step_size, seed=7, smoothing=SMOOTHING)
    assert (delta - smoothed).abs().max() > EPS / 2


def test_the_attack_gradient_is_the_plain_cross_entropys_whatever_the_training_loss():
    model = confident_linear()
    x, y = images_and_labels(model)
    trainer = PGDTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), eps=EPS,
                         loss_fn=runtime.loss_fn(smoothed_loss_cfg("pgd")))
    grad = trainer.input_grad(x, y)
    assert torch.equal(grad.sign(), input_grad(model, x, y).sign())


def test_the_weight_step_still_descends_the_smoothed_loss():
    """fast-FGSM at a = 0.5: the attack as by hand (plain CE), then one SGD step whose gradient
    is the smoothed cross-entropy's, (p - t)^T x_adv / B for W and mean(p - t) for b."""
    model = confident_linear()
    before = copy.deepcopy(model)
    x, y = images_and_labels(model)
    lr = 0.1
    trainer = FastFGSMTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), eps=EPS,
                              loss_fn=runtime.loss_fn(smoothed_loss_cfg("fast")))
    torch.manual_seed(3)
    trainer.train_step(x, y)
    delta = fast_attack_by_hand(before, x, y, EPS, trainer.step_size, seed=3)
    x_adv = linf.perturb(x, delta).flatten(1)
    W, b = (p.detach() for p in before[1].parameters())

    def step(smoothing):
        d = (x_adv @ W.T + b).softmax(1) - target(y, smoothing)
        return W - lr * d.T @ x_adv / len(y), b - lr * d.mean(0)
    W_smoothed, b_smoothed = step(SMOOTHING)
    torch.testing.assert_close(model[1].weight.detach(), W_smoothed, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].bias.detach(), b_smoothed, rtol=1e-5, atol=1e-6)
    assert (step(0.0)[0] - W_smoothed).abs().max() > 1e-3      # the smoothing really counted


def test_the_free_step_ascends_the_plain_cross_entropy_and_takes_no_other_loss():
    model = confident_linear()
    x, y = images_and_labels(model)
    assert_smoothing_would_differ(model, x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="loss_fn"):
        build_method("free", model, optimizer, eps=EPS, replays=1,
                     loss_fn=runtime.loss_fn(smoothed_loss_cfg("pgd")))
    expected = EPS / 2 * input_grad(model, x, y).sign()      # one replay from delta = 0
    trainer = build_method("free", model, optimizer, eps=EPS, replays=1, step_size=EPS / 2)
    trainer.train_step(x, y)
    torch.testing.assert_close(trainer.perturbation, expected, rtol=0, atol=1e-7)


def test_the_config_refuses_label_smoothing_with_free_training_saying_why():
    with pytest.raises(ConfigError, match=r"optim\.label_smoothing=0\.1 with method\.name=free.*"
                                          r"second backward.*optim\.label_smoothing=0"):
        load_config(None, ["method.name=free", "optim.label_smoothing=0.1"])
    for method in ("natural", "pgd", "fast"):      # whose attacks are apart from the weight step
        assert load_config(None, [f"method.name={method}",
                                  "optim.label_smoothing=0.1"]).optim.label_smoothing == 0.1
    assert runtime.loss_fn(load_config(None, [])) is None          # plain: the methods' default
