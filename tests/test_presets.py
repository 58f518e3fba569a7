"""The ImageNet presets train what their papers trained, on any number of GPUs."""

import math
from pathlib import Path

import pytest

from dist_free import lr_schedule
from dist_free.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = sorted((ROOT / "configs" / "imagenet").glob("*.yaml"))
FREE = [p for p in IMAGENET if p.name.startswith("free_m4_")]


@pytest.mark.parametrize("world_size", [1, 4, 8])
@pytest.mark.parametrize("preset", IMAGENET, ids=lambda p: p.stem)
def test_every_imagenet_preset_trains_at_a_global_batch_of_256(preset, world_size):
    assert load_config(preset).per_rank_batch(world_size) * world_size == 256


@pytest.mark.parametrize("world_size", [1, 4, 8])
@pytest.mark.parametrize("preset", IMAGENET, ids=lambda p: p.stem)
def test_every_imagenet_preset_peaks_at_lr_0_1(preset, world_size):
    cfg = load_config(preset)
    assert lr_schedule.base_lr(cfg, world_size) == pytest.approx(0.1)


@pytest.mark.parametrize("world_size", [1, 4, 8])
@pytest.mark.parametrize("preset", FREE, ids=lambda p: p.stem)
def test_free_presets_follow_the_authors_schedule(preset, world_size):
    """Shafahi et al.'s code: ceil(90 / m) epochs at lr 0.1 * 0.1 ** (epoch // ceil(30 / m))."""
    cfg = load_config(preset)
    m = cfg.method.replays
    assert (m, cfg.method.name, cfg.model.name) == (4, "free", "resnet50")
    assert cfg.method.step_size is None or cfg.method.step_size == cfg.method.eps
    assert cfg.real_epochs == math.ceil(90 / m) == 23
    for epoch in range(cfg.real_epochs):
        for within in (0.0, 0.5, 0.999):      # the trainer's progress within the epoch
            lr = lr_schedule.base_lr(cfg, world_size) * lr_schedule.lr_factor(cfg, (epoch + within) * m)
            assert lr == pytest.approx(0.1 * 0.1 ** (epoch // math.ceil(30 / m))), (epoch, within)


@pytest.mark.parametrize("preset", IMAGENET, ids=lambda p: p.stem)
def test_imagenet_presets_select_best_pt_on_held_out_training_images(preset):
    assert load_config(preset).eval.holdout == 10_000


def test_a_global_batch_that_does_not_split_over_the_ranks_is_a_clear_error():
    cfg = load_config(None, ["data.global_batch=256"])
    with pytest.raises(ConfigError, match="data.global_batch=256 does not split evenly over 3"):
        cfg.per_rank_batch(3)
