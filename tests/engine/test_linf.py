"""The L-inf geometry and the fused perturbation update."""

import pytest
import torch

from dist_free.engine import free, linf


def inputs(dtype, seed=0, shape=(4, 3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g).to(torch.float16)          # the loader's fp16 output
    delta = (torch.rand(shape, generator=g) * 2 - 1) * (4 / 255)
    grad = torch.randn(shape, generator=g).to(dtype)
    grad[0, 0, 0, :4] = 0                                          # sign(0) = 0: no step
    return x, delta, grad


def run(update, dtype, found_inf=0.0, work=False):
    x, delta, grad = inputs(dtype)
    x_adv = linf.perturb(x, delta)
    update(x, delta, grad, torch.tensor(found_inf), 4 / 255, 1 / 255, x_adv, True,
           free.UpdateWork.like(delta) if work else None)
    return delta, x_adv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_update_equals_eager_update(dtype):
    eager_delta, eager_out = run(free.free_update, dtype, work=True)
    fused_delta, fused_out = run(free.compiled_free_update(), dtype)
    assert torch.equal(fused_delta, eager_delta)
    assert torch.equal(fused_out, eager_out)
    assert fused_out.dtype == torch.float32


def test_update_in_reused_scratch_equals_allocating_update():
    """Scratch left over from a different batch must not leak into the next update."""
    work = free.UpdateWork.like(inputs(torch.float32)[1])
    for t in work:
        t.fill_(float("nan"))
    fresh = run(free.free_update, torch.float32)
    x, delta, grad = inputs(torch.float32)
    x_adv = linf.perturb(x, delta)
    free.free_update(x, delta, grad, None, 4 / 255, 1 / 255, x_adv, True, work)
    assert torch.equal(delta, fresh[0]) and torch.equal(x_adv, fresh[1])


def test_update_steps_by_sign_clipped_to_eps_where_the_clamp_is_inactive():
    eps, step = 4 / 255, 1 / 255
    x = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.5])
    delta = torch.tensor([0.0, 3.5 / 255, 0.0, -1 / 255, 2 / 255, 0.0])
    grad = torch.tensor([1.0, 1.0, -2.0, 1.0, 1.0, 0.0])
    out = linf.perturb(x, delta)
    free.free_update(x, delta, grad, None, eps, step, out, True)
    # +step; clipped to eps; -step; clamp active below 0: no step; clamp active above 1: no step; zero grad.
    expected = torch.tensor([1 / 255, 4 / 255, -1 / 255, -1 / 255, 2 / 255, 0.0])
    torch.testing.assert_close(delta, expected)
    torch.testing.assert_close(out, (x + expected).clamp(0, 1))


def test_update_is_skipped_when_the_scaler_found_inf():
    x, delta, grad = inputs(torch.float32)
    before = delta.clone()
    grad[1] = float("nan")                  # what an overflowed backward can leave behind
    x_adv = linf.perturb(x, delta)
    free.free_update(x, delta, grad, torch.tensor(1.0), 4 / 255, 1 / 255, x_adv, False)
    assert torch.equal(delta, before)


def test_eager_update_with_scratch_allocates_no_batch_sized_tensor():
    """The CPU trainer runs this between every two replays: reused buffers, nothing allocated."""
    from torch.profiler import ProfilerActivity, profile
    x, delta, grad = inputs(torch.float32, shape=(8, 3, 32, 32))
    x, x_adv, work = x.float(), linf.perturb(x, delta), free.UpdateWork.like(delta)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        free.free_update(x, delta, grad, None, 4 / 255, 1 / 255, x_adv, True, work)
    allocated = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert max(allocated, default=0) < x.numel()          # not even a bool mask of the batch
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        free.free_update(x, delta, grad, None, 4 / 255, 1 / 255, x_adv, True)
    assert max(e.cpu_memory_usage for e in prof.events()) >= 4 * x.numel()   # the test can see one


def test_adversarial_inputs_are_fp32_within_eps():
    eps = 4 / 255
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=g)
    delta = torch.where(torch.rand(x.shape, generator=g) < 0.5, -eps, eps)
    x_adv = linf.perturb(x, delta)
    assert x_adv.dtype == torch.float32
    assert (x_adv - x).abs().max() <= eps + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    # Why fp32: rounding the same input to bf16 leaves the eps-ball, so perturb refuses to.
    assert ((x_adv.bfloat16().float() - x).abs() > eps + 1e-4).any()
    with pytest.raises(ValueError, match="adversarial inputs stay fp32"):
        linf.perturb(x, delta, torch.bfloat16)


def test_attack_steps_stay_in_the_eps_ball_inside_the_image_box():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g)
    delta = torch.zeros_like(x)
    for _ in range(5):
        delta = linf.attack_step(x, delta, torch.randn(x.shape, generator=g), 8 / 255, 3 / 255)
    assert delta.abs().max() <= 8 / 255 + 1e-7
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert delta.abs().max() > 7 / 255


def test_fused_resolution():
    assert free.resolve_fused("auto", torch.device("cpu")) is False
    assert free.resolve_fused("auto", torch.device("cuda", 0)) is True
    assert free.resolve_fused(True, torch.device("cpu")) is True
