"""The methods on a mixed batch (dist_free.engine.batch_augment): soft (B, K) targets pass through
the weight step's loss and the attacks' as they are; every attack, free training's perturbation
included, ascends the plain cross-entropy on the unsmoothed mixed target (never the smoothed
loss, never the dominant label alone); accuracy counts the dominant class.

The model is linear, z = W x + b, so d CE(t) / dx = W^T (softmax(z) - t) in closed form.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_free.engine import linf
from dist_free.engine.batch_augment import BatchDraw, mix_images, mixed_targets
from dist_free.engine.methods import build_method

K, EPS, LAM, SMOOTHING = 3, 4 / 255, 0.6, 0.5


def confident_linear(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, K))
    with torch.no_grad():
        model[1].weight.mul_(40.0)
        model[1].bias.copy_(-0.5 * model[1].weight.sum(1))
    return model


def mixed_batch(model, n=16, seed=1):
    """A mixup of images labelled with the model's own guesses (pixels in [0.2, 0.8]: no [0, 1]
    clamp within eps), and its soft targets."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.6 * torch.rand(n, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return mix_images(x, BatchDraw(LAM)), mixed_targets(y, LAM, K)


def input_grad(model, x, target):
    with torch.no_grad():
        return ((model(x).softmax(1) - target) @ model[1].weight).reshape(x.shape)


def smoothed(logits, target):
    return F.cross_entropy(logits, target, label_smoothing=SMOOTHING)


def assert_the_candidates_disagree(model, x, t):
    """Not vacuous: the dominant label's and the smoothed target's ascents point elsewhere."""
    dominant = F.one_hot(t.argmax(1), K).float()
    smooth = (1 - SMOOTHING) * t + SMOOTHING / K
    ours = input_grad(model, x, t).sign()
    for other in (dominant, smooth):
        assert (ours != input_grad(model, x, other).sign()).float().mean() > 0.2


@pytest.mark.parametrize("method", ["fast", "pgd"])
def test_inner_attacks_ascend_the_unsmoothed_mixed_target(method):
    model = confident_linear()
    x, t = mixed_batch(model)
    options = {"steps": 3} if method == "pgd" else {}
    trainer = build_method(method, model, torch.optim.SGD(model.parameters(), lr=0.1), eps=EPS,
                           loss_fn=smoothed, **options)
    torch.manual_seed(7)
    delta = trainer.attack(x, t)
    torch.manual_seed(7)
    expected = linf.random_start(x, EPS)
    if method == "pgd":
        expected = linf.clamp_pixels(x + expected) - x
    for _ in range(options.get("steps", 1)):
        grad = input_grad(model, linf.perturb(x, expected), t)
        expected = linf.attack_step(x, expected, grad, EPS, trainer.step_size)
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
    assert_the_candidates_disagree(model, x, t)


def test_free_training_adds_its_buffer_to_the_mixed_batch_and_ascends_its_target():
    model = confident_linear()
    x, t = mixed_batch(model)
    assert_the_candidates_disagree(model, x, t)
    trainer = build_method("free", model, torch.optim.SGD(model.parameters(), lr=0.1), eps=EPS,
                           replays=1, step_size=EPS / 2)
    expected = EPS / 2 * input_grad(model, x, t).sign()     # one replay from delta = 0
    trainer.train_step(x, t)
    torch.testing.assert_close(trainer.perturbation, expected, rtol=0, atol=1e-7)


def test_the_weight_step_descends_the_smoothed_soft_target():
    model = confident_linear()
    x, t = mixed_batch(model)
    W, b = (p.detach().clone() for p in model[1].parameters())
    lr = 0.1
    trainer = build_method("natural", model, torch.optim.SGD(model.parameters(), lr=lr),
                           loss_fn=smoothed)
    trainer.train_step(x, t)
    d = (x.flatten(1) @ W.T + b).softmax(1) - ((1 - SMOOTHING) * t + SMOOTHING / K)
    torch.testing.assert_close(model[1].weight.detach(), W - lr * d.T @ x.flatten(1) / len(t),
                               rtol=1e-5, atol=1e-6)


def test_accuracy_on_a_mixed_batch_counts_the_dominant_class():
    model = confident_linear()
    x, t = mixed_batch(model, n=32)
    trainer = build_method("natural", model, torch.optim.SGD(model.parameters(), lr=0.0))
    with torch.no_grad():
        expected = (model(x).argmax(1) == t.argmax(1)).float().mean().item()
    assert trainer.train_step(x, t)["acc"] == pytest.approx(expected)
    assert 0 < expected < 1         # neither all right nor all wrong: the count is the test


def test_labels_of_any_other_shape_are_refused():
    model = confident_linear()
    x, t = mixed_batch(model)
    trainer = build_method("natural", model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"labels \(B,\) or \(B, K\)"):
        trainer.train_step(x, t[:, :, None])
