"""The trainer's augmentation settings: validated with the config (each bad value named by its
key), and the minibatch augmentation keyed by (seed, rank, epoch, batch) with mixing off from
data.mixup_off_epoch natural-training epochs on."""

import pytest
import torch
import torch.nn.functional as F

from dist_free import train
from dist_free.config import ConfigError, load_config
from dist_free.distributed import DistInfo
from dist_free.trainer import augmentation

K = 10


@pytest.mark.parametrize("override, message", [
    ("data.reprob=1.5", r"data\.reprob is a probability in \[0, 1\], got 1\.5"),
    ("data.mixup_prob=-0.1", r"data\.mixup_prob is a probability in \[0, 1\]"),
    ("data.mixup_switch_prob=2", r"data\.mixup_switch_prob is a probability in \[0, 1\]"),
    ("data.mixup=-0.2", r"data\.mixup must be >= 0"),
    ("data.cutmix=-1", r"data\.cutmix must be >= 0"),
    ("data.mixup_off_epoch=-3", r"data\.mixup_off_epoch must be >= 0"),
    ("data.remode=const", r"data\.remode: 'const' is not one of \['pixel'\]")])
def test_bad_augmentation_settings_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_policy_string_no_loader_can_parse_is_a_config_error_before_training(capfd):
    with pytest.raises(ConfigError, match=r"data\.auto_augment: 'rand-m9-x1': section 'x1'"):
        augmentation.check_policy(load_config(None, ["data.auto_augment=rand-m9-x1"]))
    augmentation.check_policy(load_config(None, ["data.auto_augment=rand-m9-mstd0.5-inc1"]))
    assert train.main(["data.auto_augment=rand-m12", "tracking.enabled=false"]) == 2
    assert "config error: data.auto_augment: 'rand-m12': m must be" in capfd.readouterr().err


def cfg(*overrides):
    return load_config(None, [f"model.num_classes={K}", *overrides])


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    return 0.9 * torch.rand(n, 3, 12, 12, generator=g), torch.randint(0, K, (n,), generator=g)


def test_nothing_configured_builds_nothing():
    assert augmentation.build(cfg(), DistInfo()) is None
    assert augmentation.build(cfg("data.reprob=0.1"), DistInfo()) is not None


def test_mixing_stops_at_the_off_epoch_counted_in_natural_training_epochs():
    """Free training at m=4: real epoch 1 batch 5 of 10 is natural epoch (1 + 5/10) x 4 = 6."""
    augment = augmentation.build(cfg("method.name=free", "method.replays=4", "data.mixup=1.0",
                                     "data.mixup_off_epoch=6"), DistInfo())
    x, y = batch()
    before, t_before = augment(x, y, epoch=1, batch=4, batches_per_epoch=10)    # natural 5.6
    after, t_after = augment(x, y, epoch=1, batch=5, batches_per_epoch=10)      # natural 6.0
    assert not torch.equal(before, x) and (t_before.max(1).values < 1).any()
    assert torch.equal(after, x) and torch.equal(t_after, F.one_hot(y, K).float())
    natural = augmentation.build(cfg("method.name=natural", "data.mixup=1.0",
                                     "data.mixup_off_epoch=6"), DistInfo())
    assert not torch.equal(natural(x, y, epoch=5, batch=9, batches_per_epoch=10)[0], x)


def test_the_draws_are_the_runs_seed_rank_epoch_and_batch_so_a_restart_repeats_them():
    config = cfg("data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.25")
    x, y = batch()
    first = augmentation.build(config, DistInfo(rank=1, world_size=2))(x, y, 3, 7, 20)
    restarted = augmentation.build(config, DistInfo(rank=1, world_size=2))(x, y, 3, 7, 20)
    assert torch.equal(first[0], restarted[0]) and torch.equal(first[1], restarted[1])
    rank0 = augmentation.build(config, DistInfo(rank=0, world_size=2))(x, y, 3, 7, 20)
    reseeded = augmentation.build(cfg("data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.25",
                                      "run.seed=1"), DistInfo(rank=1, world_size=2))(x, y, 3, 7, 20)
    assert not torch.equal(first[0], rank0[0]) and not torch.equal(first[0], reseeded[0])
