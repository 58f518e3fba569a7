"""N-FGSM (de Jorge et al. 2022) as its authors' code runs it: noise uniform in [-2 eps, 2 eps], one
sign step of eps, no projection back onto the eps-ball, inputs in the [0, 1] box."""

import pytest
import torch
from helpers_nets import minibatches, sgd, tiny_net

from dist_free.config import ConfigError, load_config
from dist_free.engine import method_registry
from dist_free.engine.methods import NFGSMTrainer, build_method

EPS = 8 / 255


def model_inputs(model):
    """Every input the model is called on: N-FGSM's two passes per step, noise then attack."""
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


def mid_range_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # [0.2, 0.8]: 3 eps from either edge, so the pixel clamp never acts and the method's own
    # rules show in full.
    return 0.2 + 0.6 * torch.rand(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_the_defaults_are_the_authors():
    model = tiny_net()
    trainer = build_method("nfgsm", model, sgd(model), eps=EPS)
    assert (trainer.step_size, trainer.noise) == (pytest.approx(EPS), 2.0)
    assert load_config(None, ["method.name=nfgsm"]).method.noise == 2.0


def test_noise_is_uniform_in_twice_the_ball_and_the_step_is_one_eps_unprojected():
    model = tiny_net()
    seen = model_inputs(model)
    trainer = NFGSMTrainer(model, sgd(model), eps=EPS)
    x, y = mid_range_batch()
    trainer.train_step(x, y)
    noisy, trained_on = seen
    noise, delta = noisy - x, trained_on - x
    # U(-2 eps, 2 eps): bounded by 2 eps, spread over it (mean ~0, a quarter beyond 1 eps each way)
    assert noise.abs().max() <= 2 * EPS + 1e-6
    assert noise.abs().max() > 1.99 * EPS and abs(noise.mean()) < 0.05 * EPS
    assert 0.2 < (noise > EPS).float().mean() < 0.3
    # One sign step of eps from the noise, everywhere (the gradient is non-zero on a real net)
    torch.testing.assert_close((delta - noise).abs(), torch.full_like(x, EPS), rtol=0, atol=1e-6)
    # Not projected onto the eps-ball: a third of the pixels end beyond eps, up to 3 eps
    assert delta.abs().max() <= 3 * EPS + 1e-6
    assert (delta.abs() > EPS + 1e-6).float().mean() > 0.3


def test_the_noise_and_the_perturbation_are_cut_to_the_image_box():
    """As the authors' code: the noise is clamped so x + noise is an image, and the step starts
    from the clamped noise; the returned perturbation keeps x + delta in [0, 1] too."""
    model = tiny_net()
    seen = model_inputs(model)
    trainer = NFGSMTrainer(model, sgd(model), eps=EPS)
    x, y = minibatches([32])[0]                         # many pixels near 0 and 1
    torch.manual_seed(0)
    delta = trainer.attack(x, y)
    (noisy,) = seen
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert ((noisy == 0) | (noisy == 1)).float().mean() > 0.01     # the box did cut the noise
    adv = x + delta
    assert adv.min() >= 0 and adv.max() <= 1
    inside = (adv > 0) & (adv < 1)                      # where the last clamp did not act
    torch.testing.assert_close((adv - noisy)[inside].abs(), torch.full_like(adv[inside], EPS),
                               rtol=0, atol=1e-6)


def test_noise_is_set_as_a_multiple_of_eps():
    model = tiny_net()
    seen = model_inputs(model)
    trainer = build_method("nfgsm", model, sgd(model), eps=EPS, noise=0.5, step_size=EPS / 2)
    x, y = mid_range_batch()
    trainer.train_step(x, y)
    noise, delta = seen[0] - x, seen[1] - x
    assert noise.abs().max() <= EPS / 2 + 1e-6 and noise.abs().max() > 0.49 * EPS
    torch.testing.assert_close((delta - noise).abs(), torch.full_like(x, EPS / 2), rtol=0, atol=1e-6)


def test_one_training_step_moves_the_weights_on_the_attacked_batch():
    model = tiny_net()
    before = [p.detach().clone() for p in model.parameters()]
    seen = model_inputs(model)
    trainer = build_method("nfgsm", model, sgd(model), eps=EPS)
    stats = trainer.train_step(*mid_range_batch(16))
    # two passes per SGD step, as the registry declares (bench.compare budgets by it)
    assert len(seen) == 2 == method_registry.passes_per_step(
        load_config(None, ["method.name=nfgsm"]).method)
    assert set(stats) >= {"loss", "acc", "samples"} and stats["samples"] == 16
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bad_noise_is_refused():
    model = tiny_net()
    with pytest.raises(ValueError, match="noise is a multiple of eps"):
        NFGSMTrainer(model, sgd(model), eps=EPS, noise=-1.0)
    with pytest.raises(ConfigError, match="method.noise must be >= 0"):
        load_config(None, ["method.name=nfgsm", "method.noise=-1"])
