"""Config -> objects: the lr schedule in natural-training epochs, lr scaling, precision choice."""

import pytest
import torch

from dist_free import runtime
from dist_free.config import load_config


def test_step_schedule_is_in_natural_epochs_so_free_training_decays_m_times_sooner():
    cfg = load_config(None, ["optim.milestones=[30,60]", "optim.gamma=0.1", "method.replays=4"])
    assert runtime.lr_factor(cfg, 29.9) == 1.0
    assert runtime.lr_factor(cfg, 30.0) == pytest.approx(0.1)
    assert runtime.lr_factor(cfg, 61.0) == pytest.approx(0.01)
    # The trainer passes real-epoch progress x replays: real epoch 7.5 of 23 is natural epoch 30.
    assert runtime.lr_factor(cfg, 7.5 * cfg.replays) == pytest.approx(0.1)


def test_warmup_then_cosine_to_zero():
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_epochs=2", "optim.epochs=10"])
    assert runtime.lr_factor(cfg, 0.0) < 0.01
    assert runtime.lr_factor(cfg, 1.0) == pytest.approx(0.5, abs=1e-3)
    assert runtime.lr_factor(cfg, 2.0) == pytest.approx(1.0)
    assert runtime.lr_factor(cfg, 6.0) == pytest.approx(0.5)
    assert runtime.lr_factor(cfg, 10.0) == pytest.approx(0.0, abs=1e-9)


def test_lr_scales_linearly_with_the_global_batch():
    cfg = load_config(None, ["optim.lr=0.1", "optim.lr_batch=256", "data.batch_size=256"])
    assert runtime.base_lr(cfg, world_size=4) == pytest.approx(0.4)


def test_precision_defaults_to_fp32_on_the_cpu():
    assert runtime.resolve_amp("auto", torch.device("cpu")) is None
    assert runtime.resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert runtime.resolve_amp("fp16", torch.device("cpu")) is torch.float16
    assert runtime.resolve_amp("off", torch.device("cuda", 0)) is None
