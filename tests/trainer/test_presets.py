"""The ImageNet presets train what their papers trained, on any number of GPUs."""

import math
from pathlib import Path

import pytest

from dist_free.config import ConfigError, load_config
from dist_free.trainer import runtime, schedule

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "configs" / "imagenet"
IMAGENET = sorted(PRESETS.glob("*.yaml"))
FREE = [p for p in IMAGENET if p.name.startswith("free_m4_")]
# ConvNeXt on ARES's recipe, the ViT on the light recipe (each file's sources), trained free.
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


def lr_in_real_epochs(cfg, world_size):
    """The trainer's lr at a point of the run given in real epochs."""
    return lambda real_epoch: schedule.lr_at(cfg, world_size, real_epoch)


def header(preset: Path) -> str:
    return "".join(line for line in preset.read_text().splitlines(True) if line.startswith("#"))


@pytest.mark.parametrize("preset", TIMM, ids=lambda p: p.stem)
def test_timm_presets_are_free_training_at_4_255_and_say_it_is_ours(preset):
    cfg = load_config(preset)
    m, o = cfg.method, cfg.optim
    assert (m.name, m.replays, m.eps, m.step_size) == ("free", 4, pytest.approx(4 / 255), None)
    assert (o.name, tuple(o.betas), o.wd_exempt, o.clip_grad_norm) == (
        "adamw", (0.9, 0.999), True, None)
    # Both recipes smooth labels by 0.1; the config refuses smoothing with free training.
    assert o.label_smoothing == 0.0 and "optim.label_smoothing" in header(preset)
    assert (cfg.data.image_size, cfg.data.val_resize, cfg.data.min_area) == (224, 256, 0.08)
    assert cfg.eval.select_on == "robust" and "OURS, NOT PUBLISHED" in header(preset)


CONVNEXT = PRESETS / "convnext_t_free_m4_eps4.yaml"
VIT = PRESETS / "vit_s_free_m4_eps4.yaml"


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_the_convnext_preset_follows_ares_optimiser_and_schedule(world_size):
    """thu-ml/ares robust_training: train_configs/convnext_small.yaml (lrb 5e-4 per 512 images,
    warmup_lr 1e-6 over 5 epochs, cosine over 300 to min_lr 1e-5, weight_decay 0.05, EMA
    0.9998) at 64 images x 8 GPUs (run_train.sh); free: 300 natural epochs = 75 real."""
    cfg = load_config(CONVNEXT)
    o = cfg.optim
    assert cfg.model.name == "timm/convnext_tiny" and cfg.model.kwargs == {}   # drop_path 0.0
    assert (o.weight_decay, o.ema) == (0.05, 0.9998)
    assert cfg.per_rank_batch(world_size) * world_size == 512 and cfg.real_epochs() == 75
    lr = lr_in_real_epochs(cfg, world_size)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(0.5 * 5 / 4) == pytest.approx((1e-6 + 5e-4) / 2)
    assert lr(5 / 4) == pytest.approx(5e-4)                  # 5 natural warm-up epochs
    assert lr(5 / 4 + (75 - 5 / 4) / 2) == pytest.approx((5e-4 + 1e-5) / 2)
    assert lr(75) == pytest.approx(1e-5)


def test_the_convnext_preset_warms_the_attack_up_as_ares():
    """adversarial_training.py: att_step = attack_step * min(epoch, 5) / 5, from 0 at epoch 0;
    here eps (and free training's step with it) from 0 over 5 natural epochs = 1.25 real."""
    cfg = load_config(CONVNEXT)
    assert schedule.eps_at(cfg, 0.0) == 0.0
    assert schedule.eps_at(cfg, 0.5 * 5 / 4) == pytest.approx(2 / 255)
    assert schedule.eps_at(cfg, 5 / 4) == schedule.eps_at(cfg, 70) == pytest.approx(4 / 255)


def test_the_convnext_preset_takes_ares_augmentation():
    """convnext_small.yaml: aa rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, mixup_prob 1.0,
    mixup_switch_prob 0.5, mixup_off_epoch 0, reprob 0.25, remode pixel; validate()'s PGD-10 at
    step 1/255."""
    d, e = load_config(CONVNEXT).data, load_config(CONVNEXT).eval
    assert d.auto_augment == "rand-m9-mstd0.5-inc1"
    assert (d.mixup, d.cutmix, d.mixup_prob, d.mixup_switch_prob, d.mixup_off_epoch) == (
        0.8, 1.0, 1.0, 0.5, 0.0)
    assert (d.reprob, d.remode) == (0.25, "pixel")
    assert (e.steps, e.restarts, e.step_size) == (10, 1, pytest.approx(1 / 255))
    text = header(CONVNEXT)
    for source in ("thu-ml/ares", "convnext_small.yaml", "adversarial_training.py",
                   "run_train.sh"):
        assert source in text, source


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_the_vit_preset_follows_the_light_recipe_optimiser_and_schedule(world_size):
    """dedeswim/vits-robustness-torch configs/xcit-adv-training.yaml: lr 5e-4 at 64 x 8 TPU
    cores, weight_decay 0.5, warmup_epochs 10 from warmup_lr 1e-6, cosine, epochs 100 +
    cooldown_epochs 10 to min_lr 1e-5, drop_path 0.05, no EMA; free: 110 natural epochs =
    ceil(110 / 4) = 28 real, the cosine ending at 110 (the trainer has no cool-down)."""
    cfg = load_config(VIT)
    o = cfg.optim
    assert cfg.model.name == "timm/vit_small_patch16_224" and not cfg.model.channels_last
    assert cfg.model.kwargs == {"drop_path_rate": 0.05}
    assert (o.weight_decay, o.ema) == (0.5, None)
    assert cfg.per_rank_batch(world_size) * world_size == 512 and cfg.real_epochs() == 28
    lr = lr_in_real_epochs(cfg, world_size)
    assert lr(0) == pytest.approx(1e-6)
    assert lr(0.5 * 10 / 4) == pytest.approx((1e-6 + 5e-4) / 2)
    assert lr(10 / 4) == pytest.approx(5e-4)                 # 10 natural warm-up epochs
    assert lr(10 / 4 + (110 / 4 - 10 / 4) / 2) == pytest.approx((5e-4 + 1e-5) / 2)
    assert lr(110 / 4) == lr(28) == pytest.approx(1e-5)


def test_the_vit_preset_warms_eps_up_as_the_light_recipe():
    """xcit-adv-training.yaml eps_schedule linear, eps_schedule_period 10 (src/attacks.py
    make_linear_schedule: eps x epoch / 10, from 0): 10 natural epochs = 2.5 real."""
    cfg = load_config(VIT)
    assert schedule.eps_at(cfg, 0.0) == 0.0
    assert schedule.eps_at(cfg, 0.5 * 10 / 4) == pytest.approx(2 / 255)
    assert schedule.eps_at(cfg, 10 / 4) == schedule.eps_at(cfg, 20) == pytest.approx(4 / 255)


def test_the_vit_preset_leaves_heavy_augmentation_out_as_the_light_recipe():
    """xcit-adv-training.yaml: aa None, mixup 0.0, cutmix 0.0, reprob 0.0 (crops and flips
    kept; its color_jitter 0.4 the trainer lacks, and the header says so)."""
    d = load_config(VIT).data
    assert (d.auto_augment, d.mixup, d.cutmix, d.reprob) == (None, 0.0, 0.0, 0.0)
    text = header(VIT)
    assert "no colour jitter" in text
    for source in ("dedeswim/vits-robustness-torch", "configs/xcit-adv-training.yaml",
                   "src/attacks.py", "Debenedetti"):
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
