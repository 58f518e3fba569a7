"""The ImageNet presets train what their papers trained, on any number of GPUs."""

import math
from pathlib import Path

import pytest

from dist_free.config import ConfigError, load_config
from dist_free.trainer import runtime, schedule

ROOT = Path(__file__).resolve().parents[2]
IMAGENET = sorted((ROOT / "configs" / "imagenet").glob("*.yaml"))
FREE = [p for p in IMAGENET if p.name.startswith("free_m4_")]
# ConvNeXt and ViT presets: ARES's AdamW recipe (see each file's sources), trained free.
TIMM = [p for p in IMAGENET if load_config(p).model.name.startswith("timm/")]
RESNET = [p for p in IMAGENET if p not in TIMM]


@pytest.mark.parametrize("world_size", [1, 4, 8])
@pytest.mark.parametrize("preset", RESNET, ids=lambda p: p.stem)
def test_every_resnet_preset_trains_at_a_global_batch_of_256(preset, world_size):
    assert load_config(preset).per_rank_batch(world_size) * world_size == 256


@pytest.mark.parametrize("world_size", [1, 4, 8])
@pytest.mark.parametrize("preset", RESNET, ids=lambda p: p.stem)
def test_every_resnet_preset_peaks_at_lr_0_1(preset, world_size):
    cfg = load_config(preset)
    assert schedule.base_lr(cfg, world_size) == pytest.approx(0.1)


@pytest.mark.parametrize("world_size", [1, 4, 8])
@pytest.mark.parametrize("preset", FREE, ids=lambda p: p.stem)
def test_free_presets_follow_the_authors_schedule(preset, world_size):
    """Shafahi et al.'s code: ceil(90 / m) epochs at lr 0.1 * 0.1 ** (epoch // ceil(30 / m))."""
    cfg = load_config(preset)
    m = cfg.method.replays
    assert (m, cfg.method.name, cfg.model.name) == (4, "free", "resnet50")
    assert cfg.method.step_size is None or cfg.method.step_size == cfg.method.eps
    assert cfg.real_epochs() == math.ceil(90 / m) == 23
    for epoch in range(cfg.real_epochs()):
        for within in (0.0, 0.5, 0.999):      # the trainer's progress within the epoch
            lr = schedule.base_lr(cfg, world_size) * schedule.lr_factor(cfg, (epoch + within) * m)
            assert lr == pytest.approx(0.1 * 0.1 ** (epoch // math.ceil(30 / m))), (epoch, within)


@pytest.mark.parametrize("preset", IMAGENET, ids=lambda p: p.stem)
def test_imagenet_presets_select_best_pt_on_held_out_training_images(preset):
    assert load_config(preset).eval.holdout == 10_000


def test_a_global_batch_that_does_not_split_over_the_ranks_is_a_clear_error():
    cfg = load_config(None, ["data.global_batch=256"])
    with pytest.raises(ConfigError, match="data.global_batch=256 does not split evenly over 3"):
        cfg.per_rank_batch(3)


def test_the_timm_presets_cover_convnext_with_vit():
    names = {load_config(p).model.name for p in TIMM}
    assert {"timm/convnext_tiny", "timm/vit_small_patch16_224"} <= names


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
@pytest.mark.parametrize("preset", TIMM, ids=lambda p: p.stem)
def test_timm_presets_follow_the_ares_schedule_trained_free(preset, world_size):
    """ARES: AdamW at 5e-4 per 512 images, 5 warm-up epochs from 1e-6, cosine to 1e-5 over 300
    epochs, EMA 0.9998; here free with m = 4: 75 real epochs, and without ARES's label smoothing
    (the config refuses it with free training: its one backward also steps the perturbation)."""
    cfg = load_config(preset)
    o, m = cfg.optim, cfg.method
    assert (m.name, m.replays, m.eps, m.step_size) == ("free", 4, pytest.approx(4 / 255), None)
    assert (o.name, o.weight_decay, o.label_smoothing, o.ema) == ("adamw", 0.05, 0.0, 0.9998)
    assert o.wd_exempt is True and o.clip_grad_norm is None
    assert cfg.per_rank_batch(world_size) * world_size == 512 and cfg.real_epochs() == 75
    def lr(real_epoch):      # the trainer's lr at a point given in real epochs
        return schedule.lr_at(cfg, world_size, real_epoch)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(5 / 4) == pytest.approx(5e-4)                  # 5 natural warm-up epochs
    assert lr(0.5 * 5 / 4) == pytest.approx((1e-6 + 5e-4) / 2)
    assert lr(75) == pytest.approx(1e-5)
    mid = 5 / 4 + (75 - 5 / 4) / 2
    assert lr(mid) == pytest.approx((5e-4 + 1e-5) / 2)
    text = preset.read_text()
    assert "OURS, NOT PUBLISHED" in text
    for source in ("ARES", "Singh", "Debenedetti"):
        assert source in text, source


@pytest.mark.parametrize("preset", TIMM, ids=lambda p: p.stem)
def test_timm_presets_name_architectures_timm_builds(preset):
    """On the meta device: no memory, no download; an unknown name or argument would fail."""
    runtime.check_model(load_config(preset))


@pytest.mark.parametrize("preset", FREE, ids=lambda p: p.stem)
def test_the_paper_presets_pgd_runs_at_the_authors_step(preset):
    """mahyarnajibi/FreeAdversarialTraining configs.yml: validation PGD step 1/255 at eps 2 and 4."""
    e = load_config(preset).eval
    assert (e.steps, e.restarts, e.step_size) == (10, 1, pytest.approx(1 / 255))


@pytest.mark.parametrize("preset", FREE, ids=lambda p: p.stem)
def test_the_paper_presets_select_on_pgd_and_name_the_authors_clean_selection(preset):
    """Ours: best.pt by holdout PGD; the authors' model_best by clean top-1 (main_free.py)."""
    assert load_config(preset).eval.select_on == "robust"
    header = "".join(l for l in preset.read_text().splitlines(True) if l.startswith("#"))
    assert "clean top-1" in header and "eval.select_on=clean" in header
