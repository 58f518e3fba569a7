"""model.compile: auto resolves per device; the first step's compile is timed once; evaluation
adds no graph; a compiler that fails leaves training eager with one message. The cheap
"aot_eager" backend (dynamo and AOTAutograd, no code generation) keeps these to seconds on a CPU."""

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers_nets import minibatches, sgd, tiny_net
from torch._dynamo.utils import counters

from dist_free.config import ConfigError, load_config
from dist_free.distributed import DistInfo
from dist_free.engine.free import FreeAdversarialTrainer
from dist_free.trainer import runtime, validation

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)   # no GPU needed to name one


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled_trainer(backend="aot_eager"):
    model = tiny_net()
    net = runtime.wrap(load_config(None, ["model.compile=true"]), model, DistInfo(), backend=backend)
    return model, net, FreeAdversarialTrainer(net, sgd(model), eps=4 / 255, replays=2)


def test_compile_defaults_to_auto_which_is_on_for_cuda_only():
    assert load_config(None).model.compile == "auto"
    auto = load_config(None, ["model.compile=auto"])
    assert runtime.compile_wanted(auto, CUDA) is True
    assert runtime.compile_wanted(auto, CPU) is False
    for text, wanted in (("true", True), ("false", False)):
        cfg = load_config(None, [f"model.compile={text}"])
        assert runtime.compile_wanted(cfg, CPU) is wanted and runtime.compile_wanted(cfg, CUDA) is wanted
    with pytest.raises(ConfigError, match="model.compile"):
        load_config(None, ["model.compile=sometimes"])


def test_auto_on_a_cpu_trains_the_bare_model():
    model = tiny_net()
    assert runtime.wrap(load_config(None), model, DistInfo(device=CPU)) is model


def test_an_evaluation_after_training_compiles_no_graph():
    """Training compiles one graph; the trainer's PGD evaluation (validation.pgd_accuracy: eval
    mode, val batches of other sizes, a partial last one), then more training, compile nothing
    more."""
    model, net, trainer = compiled_trainer()
    for x, y in minibatches([8, 8]):
        trainer.train_step(x, y)
    assert net.stage == "compiled"
    assert counters["stats"]["unique_graphs"] == 1
    run = SimpleNamespace(cfg=load_config(None, ["model.compile=true"]), d=DistInfo(), model=model,
                          ema=None, preemption=SimpleNamespace(requested=False))
    report = validation.pgd_accuracy(run, minibatches([5, 3], seed=3), steps=2, restarts=1,
                                     max_batches=None)
    assert report["samples"] == 8
    for x, y in minibatches([8], seed=4):
        trainer.train_step(x, y)
    assert counters["stats"]["unique_graphs"] == 1
    assert model.training


def test_the_first_step_logs_its_compile_time_once(caplog):
    _, net, trainer = compiled_trainer()
    with caplog.at_level(logging.INFO, logger="dist_free.train"):
        for x, y in minibatches([8, 8, 8]):
            trainer.train_step(x, y)
    said = [r.getMessage() for r in caplog.records if "first forward and backward took" in r.getMessage()]
    assert len(said) == 1, said
    assert net.first_step_s is not None and net.first_step_s > 0
    assert f"{net.first_step_s:.1f} s" in said[0]


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(caplog):
    calls = []

    def broken(gm, example_inputs):
        calls.append(1)
        raise RuntimeError("no C++ compiler found\nmore detail")
    model, net, trainer = compiled_trainer(backend=broken)
    eager_model = copy.deepcopy(model)
    eager = FreeAdversarialTrainer(eager_model, sgd(eager_model), eps=4 / 255, replays=2)
    with caplog.at_level(logging.INFO, logger="dist_free.train"):
        for x, y in minibatches([8, 8]):
            trainer.train_step(x, y)
            eager.train_step(x, y)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["model.compile: torch.compile failed at the first step (RuntimeError: no "
                        "C++ compiler found); training continues eagerly"]
    assert net.stage == "eager" and len(calls) == 1          # never retried
    for a, b in zip(model.parameters(), eager_model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(trainer.perturbation, eager.perturbation)


def test_an_error_of_the_model_itself_is_raised_not_hidden(caplog):
    _, net, _ = compiled_trainer()
    with caplog.at_level(logging.WARNING, logger="dist_free.train"), \
            pytest.raises(RuntimeError, match="shape|size|channels"):
        net(torch.rand(2, 5, 6, 6))                          # 5 channels into a 3-channel net
    assert not [r for r in caplog.records if r.name == "dist_free.train"]
