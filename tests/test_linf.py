"""The L-inf geometry and the fused perturbation update."""

import pytest
import torch

from dist_free import linf


def inputs(dtype, seed=0, shape=(4, 3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g).to(torch.float16)          # the loader's fp16 output
    delta = (torch.rand(shape, generator=g) * 2 - 1) * (4 / 255)
    grad = torch.randn(shape, generator=g).to(dtype)
    grad[0, 0, 0, :4] = 0                                          # sign(0) = 0: no step
    return x, delta, grad


def run(update, dtype, found_inf=0.0):
    x, delta, grad = inputs(dtype)
    out = torch.empty(x.shape, dtype=dtype)
    update(x, delta, grad, torch.tensor(found_inf), 4 / 255, 1 / 255, out)
    return delta, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_update_equals_eager_update(dtype):
    eager_delta, eager_out = run(linf.free_update, dtype)
    fused_delta, fused_out = run(linf.compiled_free_update(), dtype)
    assert torch.equal(fused_delta, eager_delta)
    assert torch.equal(fused_out, eager_out)
    assert fused_out.dtype == dtype


def test_update_steps_by_sign_within_eps_and_masks_the_clamp():
    eps, step = 4 / 255, 1 / 255
    x = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.5])
    delta = torch.tensor([0.0, 3.5 / 255, 0.0, -1 / 255, 2 / 255, 0.0])
    grad = torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0, 0.0])
    out = torch.empty(6)
    linf.free_update(x, delta, grad, torch.tensor(0.0), eps, step, out)
    # +step; clipped to eps; -step; clamp active below 0: no step; clamp active above 1: no step; zero grad.
    expected = torch.tensor([1 / 255, 4 / 255, -1 / 255, -1 / 255, 2 / 255, 0.0])
    torch.testing.assert_close(delta, expected)
    torch.testing.assert_close(out, (x + expected).clamp(0, 1))


def test_update_is_skipped_when_the_scaler_found_inf():
    x, delta, grad = inputs(torch.float32)
    before = delta.clone()
    linf.free_update(x, delta, grad, torch.tensor(1.0), 4 / 255, 1 / 255, None)
    assert torch.equal(delta, before)


def test_attack_step_stays_in_eps_ball_and_image_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    delta = torch.zeros_like(x)
    for _ in range(5):
        delta = linf.attack_step(x, delta, torch.randn(x.shape, generator=g), 8 / 255, 3 / 255)
    assert delta.abs().max() <= 8 / 255 + 1e-7
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert delta.abs().max() > 7 / 255


def test_fused_resolution():
    assert linf.resolve_fused("auto", torch.device("cpu")) is False
    assert linf.resolve_fused("auto", torch.device("cuda", 0)) is True
    assert linf.resolve_fused(True, torch.device("cpu")) is True
