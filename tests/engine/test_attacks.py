"""Evaluation attacks: correct geometry, restarts counted per sample, the model left untouched."""

import copy

import pytest
import torch

from dist_free.engine import attacks


@pytest.fixture
def trained(digits_model):
    model, x, y = digits_model
    return copy.deepcopy(model), x, y


def test_pgd_stays_within_eps_of_the_input_inside_the_image_box(trained):
    model, x, y = trained
    x_adv = attacks.pgd(model, x, y, eps=8 / 255, steps=5)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.fixture(scope="module")
def accuracies(digits_model):
    """Clean, random-noise, FGSM and PGD-10 accuracy of the digits net at eps 0.15."""
    model, x, y = digits_model
    model = copy.deepcopy(model)
    eps = 0.15
    noise = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    return {"clean": attacks.correct(model, x, y).float().mean(),
            "noisy": attacks.correct(model, noise, y).float().mean(),
            "fgsm": attacks.correct(model, attacks.fgsm(model, x, y, eps=eps), y).float().mean(),
            "pgd": attacks.robust_correct(model, x, y, eps=eps, steps=10).float().mean()}


def test_pgd_hurts_far_more_than_random_noise_of_the_same_size(accuracies):
    a = accuracies
    assert a["clean"] > 0.85 and a["noisy"] > 0.75 and a["pgd"] < 0.5 * a["noisy"]


def test_more_attack_steps_hurt_more(accuracies):
    a = accuracies
    assert a["pgd"] <= a["fgsm"] < a["clean"]


def test_attacks_leave_the_model_as_they_found_it(trained):
    model, x, y = trained
    model.train()
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = None
    attacks.robust_correct(model, x, y, eps=8 / 255, steps=3, restarts=2)
    attacks.fgsm(model, x, y, eps=8 / 255)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_sample_is_robust_only_if_it_survives_every_restart(trained):
    model, x, y = trained
    runs = iter([x, (1 - x)])      # restart 1: harmless; restart 2: a different image
    survived = attacks.robust_correct(model, x, y, eps=1.0, steps=1, restarts=2,
                                      attack=lambda *a, **k: next(runs))
    expected = (attacks.correct(model, x, y) & attacks.correct(model, 1 - x, y))
    assert torch.equal(survived, expected)
    assert survived.sum() < attacks.correct(model, x, y).sum()


def test_top5_counts_a_label_anywhere_in_the_top_five(trained):
    model, x, y = trained
    logits = model.eval()(x)
    fifth = logits.topk(5, dim=1).indices[:, 4]
    assert attacks.correct(model, x, fifth, topk=5).all()
    assert not attacks.correct(model, x, fifth, topk=1).any()


def test_bad_restarts_are_refused(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="restarts"):
        attacks.robust_correct(model, x, y, eps=0.1, steps=1, restarts=0)


def test_every_attack_path_runs_in_fp32_unless_amp_is_asked_for(trained):
    """A GPU loader hands fp16 batches; no attack may quietly run the model in low precision."""
    from dist_free.evaluation.robust_eval import evaluate
    model, x, y = trained
    x = x[:16].half()
    seen = []
    model.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0].dtype, out.dtype)))
    attacks.correct(model, x, y[:16], topk=5)
    attacks.fgsm(model, x, y[:16], eps=8 / 255)
    attacks.robust_correct(model, x, y[:16], eps=8 / 255, steps=2, restarts=2)
    evaluate(model, [(x, y[:16])], eps_values=[8 / 255], steps=2)
    assert len(seen) > 10 and set(seen) == {(torch.float32, torch.float32)}
    seen.clear()
    attacks.robust_correct(model, x, y[:16], eps=8 / 255, steps=2, amp_dtype=torch.bfloat16)
    assert {out for _, out in seen} == {torch.bfloat16}     # the probe does see autocast


def test_each_samples_input_gradient_is_independent_of_the_batch_size(trained):
    """Sum-reduced loss: a mean would shrink every gradient by 1/batch (underflow in bf16)."""
    model, x, y = trained
    alone = attacks._input_grad(model.eval(), x[:1], y[:1], None)
    in_batch = attacks._input_grad(model, x[:64], y[:64], None)[:1]
    assert alone.abs().sum() > 0
    torch.testing.assert_close(in_batch, alone, rtol=1e-4, atol=1e-7)


def seeded_pgd(trained, seed):
    model, x, y = trained
    g = torch.Generator().manual_seed(seed)
    return attacks.pgd(model, x, y, eps=0.1, steps=1, step_size=1e-9, generator=g)


def test_a_generator_makes_pgd_repeatable(trained):
    first, again, other = (seeded_pgd(trained, s) for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_pgd_with_a_generator_leaves_the_global_rng_alone(trained):
    state = torch.get_rng_state()
    seeded_pgd(trained, 0)
    assert torch.equal(torch.get_rng_state(), state)


def test_pgd_without_a_step_takes_madrys_two_and_a_half_eps_over_steps(trained):
    """The default every caller shares (training, evaluation, the report and the model card)."""
    model, x, y = trained
    assert attacks.default_step_size(8 / 255, 10) == pytest.approx(2 / 255)
    runs = [attacks.pgd(model, x, y, eps=8 / 255, steps=3, step_size=step,
                        generator=torch.Generator().manual_seed(0))
            for step in (None, 2.5 * (8 / 255) / 3)]
    assert torch.equal(*runs)
