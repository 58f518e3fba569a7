"""The baseline methods share the free trainer's interface and do what their papers say."""

import pytest
import torch
from helpers_nets import minibatches, sgd, tiny_net

from dist_free.engine.free import FreeAdversarialTrainer
from dist_free.engine.methods import FastFGSMTrainer, PGDTrainer, build_method, method_class


@pytest.mark.parametrize("name, options", [
    ("natural", {}), ("free", {"eps": 4 / 255, "replays": 2}),
    ("pgd", {"eps": 4 / 255, "steps": 3}), ("fast", {"eps": 4 / 255}), ("nfgsm", {"eps": 4 / 255}),
])
def test_every_method_trains_through_one_interface(name, options):
    model = tiny_net()
    before = [p.clone() for p in model.parameters()]
    trainer = build_method(name, model, sgd(model), **options)
    stats = trainer.train_step(*minibatches([8])[0])
    assert set(stats) >= {"loss", "acc", "samples"}
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert trainer.name == name and method_class(name) is type(trainer)


def test_registry_refuses_unknown_names_or_options():
    model = tiny_net()
    with pytest.raises(ValueError, match="unknown method 'fre'"):
        build_method("fre", model, sgd(model))
    with pytest.raises(TypeError, match="eps"):
        build_method("free", model, sgd(model))
    with pytest.raises(TypeError):
        build_method("natural", model, sgd(model), replays=4)
    assert method_class("free") is FreeAdversarialTrainer


@pytest.mark.parametrize("cls, per_step_passes", [(PGDTrainer, 3 + 1), (FastFGSMTrainer, 2)])
def test_attack_trainers_train_on_their_k_step_attack_inside_the_ball(cls, per_step_passes):
    model = tiny_net()
    inputs = []
    model.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    options = {"steps": 3} if cls is PGDTrainer else {}
    trainer = cls(model, sgd(model), eps=4 / 255, **options)
    x, y = minibatches([8])[0]
    trainer.train_step(x, y)
    assert len(inputs) == per_step_passes
    trained_on = inputs[-1]
    assert (trained_on - x).abs().max() <= 4 / 255 + 1e-6
    assert trained_on.min() >= 0 and trained_on.max() <= 1
    assert (trained_on - x).abs().max() > 3 / 255     # it really attacked


def test_default_step_sizes_follow_the_papers():
    model = tiny_net()
    assert PGDTrainer(model, sgd(model), eps=8 / 255, steps=10).step_size == pytest.approx(2 / 255)
    assert FastFGSMTrainer(model, sgd(model), eps=8 / 255).step_size == pytest.approx(10 / 255)
