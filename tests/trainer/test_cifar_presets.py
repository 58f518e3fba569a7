"""The CIFAR presets run the authors' recipe: 80,000 SGD steps counting every replay."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dist_free.config import ConfigError, load_config
from dist_free.trainer import runtime, schedule

ROOT = Path(__file__).resolve().parents[2]
ALL = sorted((ROOT / "configs").glob("cifar1*/*.yaml"))
# Ours, not the authors': the Free-8 preset in bf16 (its header says so).
VARIANTS = {ROOT / "configs/cifar10/free_m8_bf16.yaml": ROOT / "configs/cifar10/free_m8.yaml"}
PRESETS = [p for p in ALL if p not in VARIANTS]
BATCHES_PER_EPOCH = (50_000 - 1_000) // 128          # one GPU, 1,000 images held out


def test_there_is_a_preset_for_every_row_of_the_papers_cifar_tables():
    names = {(p.parent.name, p.stem) for p in PRESETS}
    rows = {"free_m2", "free_m4", "free_m8", "free_m10", "natural", "pgd7"}
    assert names == {(d, r) for d in ("cifar10", "cifar100") for r in rows}
    assert set(ALL) == set(PRESETS) | set(VARIANTS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_each_preset_is_the_authors_recipe(preset):
    cfg = load_config(preset)
    assert (cfg.model.name, cfg.model.num_classes) == \
        ("shafahi2019_wrn32_10", 10 if preset.parent.name == "cifar10" else 100)
    # Their network in fp32, with BatchNorm over the whole batch of 128 on any number of GPUs
    # and weight decay on conv and FC weights only (tests/engine/test_shafahi2019.py).
    assert (cfg.run.amp, cfg.eval.amp, cfg.model.sync_bn, cfg.optim.wd_exempt) == \
        ("off", "off", True, True)
    assert cfg.per_rank_batch(1) == 128 and schedule.base_lr(cfg, 1) == pytest.approx(0.1)
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 2e-4)
    if cfg.method.name != "natural":
        assert cfg.method.eps == pytest.approx(8 / 255)
    assert cfg.data.pad == 2 and cfg.data.image_size == 32
    m = cfg.replays
    assert cfg.minibatches * m == 80_000                         # every replay counts
    epochs = cfg.real_epochs(BATCHES_PER_EPOCH)
    assert epochs == math.ceil(80_000 / m / BATCHES_PER_EPOCH)
    assert minibatches_run(cfg, [(BATCHES_PER_EPOCH, None)]) == (80_000 // m, epochs)
    # lr 0.1 -> 0.01 -> 0.001 at SGD steps 40,000 and 60,000 (every m here divides both)
    for minibatch, factor in ((0, 1), (40_000 // m - 1, 1), (40_000 // m, 0.1),
                              (60_000 // m - 1, 0.1), (60_000 // m, 0.01), (80_000 // m - 1, 0.01)):
        assert schedule.lr_factor_in_steps(cfg, minibatch * m) == pytest.approx(factor)
        # the trainer's lr depends on the minibatches done, not on the epoch it is in
        assert schedule.lr_at(cfg, 1, 0.0, minibatch) == pytest.approx(0.1 * factor)


def minibatches_run(cfg, sessions):
    """(minibatches, real epochs) a run trains as trainer/loop.py counts them: each session (its
    minibatches per epoch, the epochs it runs before a stop at an epoch's end, None: to the end)
    resumes where the one before stopped."""
    epoch = done = 0
    for length, epochs_run in sessions:
        end = cfg.real_epochs(length, epoch=epoch, done=done)
        if epochs_run is not None:
            end = min(end, epoch + epochs_run)
        for epoch in range(epoch, end):
            done += cfg.batches_in_epoch(done, length)
        epoch = end
    return done, epoch


def test_free_m8_is_ten_thousand_minibatches():
    cfg = load_config(ROOT / "configs/cifar10/free_m8.yaml")
    assert cfg.method.name == "free" and cfg.replays == 8 and cfg.minibatches == 10_000


@pytest.mark.parametrize("first, then", [(382, 191), (191, 382)])
def test_a_step_budget_resumed_on_another_global_batch_counts_what_was_done(first, then):
    """free_m8, 10 epochs at one global batch (128 on one GPU: 382 minibatches of the 49,000
    images), then resumed at another (256 on two: 191), or the other way round: 80,000 SGD steps
    either way, in 10 epochs and as many more as the rest of the budget takes."""
    cfg = load_config(ROOT / "configs/cifar10/free_m8.yaml")
    done, epochs = minibatches_run(cfg, [(first, 10), (then, None)])
    assert done * cfg.replays == 80_000
    assert epochs == 10 + math.ceil((10_000 - 10 * first) / then)
    assert cfg.real_epochs(then, epoch=10, done=10 * first) == epochs
    assert cfg.real_epochs(then, epoch=epochs, done=10_000) == epochs    # the end stays the end


def test_pgd7_takes_seven_steps_of_2_over_255():
    cfg = load_config(ROOT / "configs/cifar10/pgd7.yaml")
    assert (cfg.method.steps, cfg.method.step_size) == (7, pytest.approx(2 / 255))


def test_a_step_budget_refuses_milestones_beyond_it_or_epoch_warm_up():
    with pytest.raises(ConfigError, match="beyond optim.steps"):
        load_config(ROOT / "configs/cifar10/free_m8.yaml", ["optim.steps=50000"])
    with pytest.raises(ConfigError, match="warmup"):
        load_config(ROOT / "configs/cifar10/free_m8.yaml", ["optim.warmup_epochs=1"])


def test_without_a_step_budget_nothing_changes():
    cfg = load_config(ROOT / "configs/demo.yaml")
    assert cfg.real_epochs(17) == cfg.real_epochs() == 15     # 60 natural epochs / m=4
    assert cfg.batches_in_epoch(3, 17) == 17
    assert schedule.lr_at(cfg, 1, 2 + 5 / 17, 999) == \
        schedule.base_lr(cfg, 1) * schedule.lr_factor(cfg, (2 + 5 / 17) * 4)


def test_a_cosine_step_budget_runs_over_the_steps():
    cfg = load_config(ROOT / "configs/cifar10/free_m8.yaml",
                      ["optim.schedule=cosine", "optim.milestones=[]"])
    assert schedule.lr_factor_in_steps(cfg, 0) == pytest.approx(1.0)
    assert schedule.lr_factor_in_steps(cfg, 40_000) == pytest.approx(0.5)
    assert schedule.lr_factor_in_steps(cfg, 80_000) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("variant", sorted(VARIANTS), ids=lambda p: p.stem)
def test_a_variant_is_its_paper_preset_but_for_what_it_names_as_ours(variant):
    cfg, paper = load_config(variant), load_config(VARIANTS[variant])
    assert (cfg.run.amp, cfg.eval.amp, cfg.run.name) == ("bf16", "off", paper.run.name + "_bf16")
    def apart_from_amp_and_name(c):
        return {**c.to_dict(), "run": {**c.to_dict()["run"], "amp": None, "name": None}}
    assert apart_from_amp_and_name(cfg) == apart_from_amp_and_name(paper)
    assert variant.read_text().startswith("# OURS, NOT THE AUTHORS'")


def test_the_presets_optimizer_decays_conv_and_fc_weights_only():
    """Built as the trainer builds it, on the real network (meta device: no memory)."""
    cfg = load_config(ROOT / "configs/cifar10/free_m8.yaml")
    with torch.device("meta"):
        model = runtime.build_bare_model(cfg, torch.device("meta"))
    decayed, exempt = runtime.build_optimizer(cfg, model, 1).param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (2e-4, 0.0)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert {id(p) for p in decayed["params"]} == {id(p) for p in weights}
    assert sum(p.numel() for p in decayed["params"]) + sum(p.numel() for p in exempt["params"]) \
        == sum(p.numel() for p in model.parameters())
