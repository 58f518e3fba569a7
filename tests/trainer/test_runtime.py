"""Config -> objects: the lr schedule in natural-training epochs, lr scaling, precision choice."""

import typing

import pytest
import torch

from dist_free import precision
from dist_free.config import MethodName, load_config
from dist_free.trainer import schedule


def test_step_schedule_is_in_natural_epochs_so_free_training_decays_m_times_sooner():
    cfg = load_config(None, ["optim.milestones=[30,60]", "optim.gamma=0.1", "method.replays=4"])
    assert schedule.lr_factor(cfg, 29.9) == 1.0
    assert schedule.lr_factor(cfg, 30.0) == pytest.approx(0.1)
    assert schedule.lr_factor(cfg, 61.0) == pytest.approx(0.01)
    # The trainer passes real-epoch progress x replays: real epoch 7.5 of 23 is natural epoch 30.
    assert schedule.lr_factor(cfg, 7.5 * cfg.replays) == pytest.approx(0.1)


def test_warmup_then_cosine_to_zero():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_epochs=2", "optim.epochs=10"])
    assert schedule.lr_factor(cfg, 0.0) < 0.01
    assert schedule.lr_factor(cfg, 1.0) == pytest.approx(0.5, abs=1e-3)
    assert schedule.lr_factor(cfg, 2.0) == pytest.approx(1.0)
    assert schedule.lr_factor(cfg, 6.0) == pytest.approx(0.5)
    assert schedule.lr_factor(cfg, 10.0) == pytest.approx(0.0, abs=1e-9)


def test_lr_scales_linearly_with_the_global_batch():
    cfg = load_config(None, ["optim.lr=0.1", "optim.lr_batch=256", "data.batch_size=256"])
    assert schedule.base_lr(cfg, world_size=4) == pytest.approx(0.4)


def test_training_autocast_follows_the_amp_setting():
    cpu = torch.device("cpu")
    assert precision.autocast_dtype("auto", cpu) is precision.resolve_amp("auto", cpu)[0]
    assert precision.autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert precision.autocast_dtype("fp16", torch.device("cpu")) is torch.float16
    assert precision.autocast_dtype("off", torch.device("cuda", 0)) is None


def test_attacks_follow_eval_amp_in_fp32_when_off():
    assert precision.attack_dtype("off") is None              # eval.amp=off: attacks in fp32
    assert precision.attack_dtype("bf16") is torch.bfloat16


def test_compiled_model_trains_like_the_eager_one():
    from helpers_nets import minibatches, sgd, tiny_net

    from dist_free.distributed import DistInfo
    from dist_free.engine.free import FreeAdversarialTrainer
    from dist_free.trainer.runtime import wrap
    results = []
    for compile_ in ("false", "true"):
        cfg = load_config(None, [f"model.compile={compile_}"])
        model = tiny_net()
        net = wrap(cfg, model, DistInfo())
        assert (net is not model) == (compile_ == "true")
        t = FreeAdversarialTrainer(net, sgd(model), eps=4 / 255, replays=2)
        for x, y in minibatches([8, 8]):
            t.train_step(x, y)
        results.append((t.perturbation, [p.detach().clone() for p in model.parameters()]))
    (d0, p0), (d1, p1) = results
    torch.testing.assert_close(d0, d1, rtol=0, atol=1e-7)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", typing.get_args(MethodName))
def test_every_method_choice_builds_from_the_config_with_the_options_it_takes(name):
    """Each config choice builds through the checked entry point, and the registry declares
    exactly the method-section keys its builder takes, which reach it from the config."""
    import dataclasses
    import inspect

    from helpers_nets import sgd, tiny_net

    from dist_free.config import MethodConfig
    from dist_free.distributed import DistInfo
    from dist_free.engine import method_registry
    from dist_free.trainer import runtime
    cfg = load_config(None, [f"method.name={name}", "method.replays=3", "method.steps=2",
                             "method.eps=2/255"])
    model = tiny_net()
    trainer = runtime.build_method(cfg, model, sgd(model), DistInfo(), amp_dtype=None)
    assert type(trainer).name == name
    keys = {f.name for f in dataclasses.fields(MethodConfig)} - {"name"}
    taken = {p for cls in type(trainer).__mro__ if "__init__" in vars(cls)
             for p in inspect.signature(cls.__init__).parameters if p in keys}
    assert set(method_registry.spec(name).options) == taken
    for key in ("eps", "replays", "steps"):
        if key in taken:
            assert getattr(trainer, key) == pytest.approx(getattr(cfg.method, key)), key
