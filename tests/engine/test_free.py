"""FreeAdversarialTrainer against a plain restatement of the paper's loop (the oracle the GPU check
uses too, dist_free/bench/algorithm1.py), and its error messages."""

import copy

import pytest
import torch
from helpers_nets import minibatches, sgd, tiny_net

from dist_free.bench.algorithm1 import algorithm1
from dist_free.engine.free import FreeAdversarialTrainer


def test_matches_plain_restatement_of_the_paper_loop():
    eps, replays, sizes = 8 / 255, 3, [16, 16, 16, 7]   # several minibatches, smaller last one
    ref_model = tiny_net()
    model = copy.deepcopy(ref_model)
    ref_delta = algorithm1(ref_model, sgd(ref_model), minibatches(sizes), eps, replays)
    trainer = FreeAdversarialTrainer(model, sgd(model), eps=eps, replays=replays)
    for x, y in minibatches(sizes):
        trainer.train_step(x, y)
    torch.testing.assert_close(trainer.perturbation, ref_delta, rtol=0, atol=1e-7)
    for p, q in zip(model.state_dict().values(), ref_model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # The buffer really moved and stayed in the eps-ball (no trivial agreement at zero).
    assert trainer.perturbation.abs().max() == pytest.approx(eps)
    assert (trainer.perturbation != 0).float().mean() > 0.5


def test_perturbation_starts_at_zero_then_carries_over_between_minibatches():
    eps = 4 / 255
    model = tiny_net()
    t = FreeAdversarialTrainer(model, sgd(model), eps=eps, replays=1, step_size=eps / 2,
                               input_shape=(8, 3, 6, 6))
    assert torch.equal(t.perturbation, torch.zeros(8, 3, 6, 6))
    (x1, y1), (x2, y2) = minibatches([8, 8])
    t.train_step(x1, y1)
    assert t.perturbation.abs().max() == pytest.approx(eps / 2)
    t.train_step(x2, y2)
    # One half-eps step per minibatch: only a buffer carried over can reach eps.
    assert t.perturbation.abs().max() == pytest.approx(eps)


def test_smaller_last_batch_touches_only_its_rows():
    model = tiny_net()
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2, input_shape=(8, 3, 6, 6))
    (x, y), = minibatches([3])
    t.train_step(x, y)
    assert t.perturbation[:3].abs().sum() > 0
    assert torch.equal(t.perturbation[3:], torch.zeros(5, 3, 6, 6))


def test_stats_are_lazy_floats():
    model = tiny_net()
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2)
    (x, y), = minibatches([8])
    stats = t.train_step(x, y)
    assert isinstance(stats.tensors["loss"], torch.Tensor)
    assert isinstance(stats["loss"], float) and stats["loss"] > 0
    assert 0.0 <= stats["acc"] <= 1.0 and stats["samples"] == 8


def test_rank_state_round_trip_restores_buffer():
    model = tiny_net()
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2)
    for x, y in minibatches([8, 8]):
        t.train_step(x, y)
    assert "perturbation" not in t.state_dict()     # shared state only: the buffer is per rank
    saved = t.rank_state()
    model2 = tiny_net()
    t2 = FreeAdversarialTrainer(model2, sgd(model2), eps=4 / 255, replays=2)
    t2.load_rank_state(saved)
    assert torch.equal(t2.perturbation, t.perturbation)
    t3 = FreeAdversarialTrainer(model2, sgd(model2), eps=4 / 255, replays=2, input_shape=(4, 3, 6, 6))
    with pytest.raises(ValueError, match="batch size or image size changed"):
        t3.load_rank_state(saved)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0, replays=4), "eps must be > 0"),
    (dict(eps=-1 / 255, replays=4), "eps must be > 0"),
    (dict(eps=4 / 255, replays=0), "replays must be an integer >= 1"),
    (dict(eps=4 / 255, replays=2.5), "replays must be an integer >= 1"),
    (dict(eps=4 / 255, replays=4, step_size=0.0), "step_size must be > 0"),
])
def test_bad_hyperparameters_are_refused(kwargs, match):
    model = tiny_net()
    with pytest.raises(ValueError, match=match):
        FreeAdversarialTrainer(model, sgd(model), **kwargs)


def test_normalised_images_are_refused_with_a_hint():
    model = tiny_net()
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2)
    x = (torch.rand(4, 3, 6, 6) - 0.45) / 0.22
    with pytest.raises(ValueError, match="normalisation belongs inside the model"):
        t.train_step(x, torch.zeros(4, dtype=torch.long))


def test_pixel_range_is_checked_on_the_first_batch_only():
    """The check reads the batch back to the host (a sync): once at start-up, never per step."""
    model = tiny_net()
    (x, y), = minibatches([4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2).train_step(x * 255, y)
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2)
    t.train_step(x, y)
    t.train_step(x * 255, y)          # not checked again: no error, and no sync


@pytest.mark.parametrize("shape", [(9, 3, 6, 6), (4, 3, 7, 6), (4, 1, 6, 6)])
def test_batch_that_does_not_fit_the_buffer_is_refused(shape):
    model = tiny_net()
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2, input_shape=(8, 3, 6, 6))
    with pytest.raises(ValueError, match="does not fit the perturbation buffer"):
        t.train_step(torch.rand(shape), torch.zeros(shape[0], dtype=torch.long))


def test_fp16_overflow_moves_neither_weights_nor_perturbation():
    model = tiny_net()
    before = copy.deepcopy(model.state_dict())
    # A loss scale of 2**40 overflows fp16 gradients on the first step: the scaler must skip it.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=1, amp_dtype=torch.float16,
                               scaler=scaler, input_shape=(8, 3, 6, 6))
    (x, y), = minibatches([8])
    t.train_step(x, y)
    assert torch.equal(t.perturbation, torch.zeros(8, 3, 6, 6))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert scaler.get_scale() < 2.0 ** 40   # the scaler backed off, so training can proceed
    for _ in range(60):
        t.train_step(x, y)
    assert t.perturbation.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_replays_feed_fp32_inputs_computing_in_the_activation_dtype(dtype):
    model = tiny_net()
    seen, conv_out = [], []
    model.normalize.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model.net[0].register_forward_hook(lambda m, args, out: conv_out.append(out.dtype))
    t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2, amp_dtype=dtype)
    (x, y), = minibatches([8])
    t.train_step(x, y)
    assert t.perturbation.dtype == torch.float32
    assert t.perturbation.abs().max() == pytest.approx(4 / 255)
    assert seen == [torch.float32, torch.float32] and conv_out == [dtype, dtype]


def capture_inputs(model):
    """Every input the model is called on, as the model received it."""
    seen = []
    model.normalize.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("method, options", [
    ("free", dict(replays=3, step_size=4 / 255)),
    ("pgd", dict(steps=3)),
    ("fast", dict()),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_adversarial_inputs_stay_within_eps(method, options, dtype):
    """clamp(x + delta, 0, 1) rounded to bf16 lands up to 2^-9 from where it should: with delta at
    +-eps that is outside the eps-ball. The model must receive the unrounded fp32 input."""
    from dist_free.engine.methods import build_method
    eps = 4 / 255
    g = torch.Generator().manual_seed(3)
    x = 0.5 + 0.5 * torch.rand(16, 3, 6, 6, generator=g)     # [0.5, 1]: bf16's coarsest steps
    y = torch.randint(0, 5, (16,), generator=g)
    model = tiny_net()
    seen = capture_inputs(model)
    trainer = build_method(method, model, sgd(model), eps=eps, amp_dtype=dtype, **options)
    trainer.train_step(x, y)
    trainer.train_step(x, y)
    assert len(seen) >= 4
    distance = max(float((x_in.float() - x).abs().max()) for x_in in seen)
    assert distance <= eps + 1e-6                     # fp32 rounding of x + delta only
    assert distance > eps - 1e-6                      # the attack did reach the boundary


def test_fused_trainer_equals_eager_trainer():
    """The compiled (GPU-style) path and the eager (CPU) path, through the whole trainer."""
    results = []
    for fused in (False, True):
        model = tiny_net()
        t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=3, fused=fused)
        for x, y in minibatches([8, 8, 5]):
            t.train_step(x, y)
        results.append((t.perturbation, model.state_dict()))
    (d0, s0), (d1, s1) = results
    assert torch.equal(d0, d1)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def test_channels_last_batches_get_channels_last_buffers_giving_the_same_result():
    results = []
    for channels_last in (False, True):
        model = tiny_net()
        t = FreeAdversarialTrainer(model, sgd(model), eps=4 / 255, replays=2)
        for x, y in minibatches([8, 8]):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t.train_step(x, y)
        assert t.perturbation.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        results.append(t.perturbation)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-7)
