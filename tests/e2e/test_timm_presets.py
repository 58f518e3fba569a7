"""The ConvNeXt and ViT presets free-train a few steps on the demo digits, their recipes in force
but for the net's size, the data, the batch, the evaluation's size and the run's length: ARES's
RandAugment in the loader, mixup/cutmix and random erasing on the device batch and the eps warm-up
for ConvNeXt; the light recipe's eps warm-up, drop path and no heavy augmentation for the ViT."""

from pathlib import Path

import pytest
import torch

from dist_free import checkpoint, train
from dist_free.engine import batch_augment
from dist_free.engine.free import FreeAdversarialTrainer
from pipelines import folder
from pipelines.augment_policy import RandAugment
from pipelines.torchvision_augment import TimmRandAugment

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "configs" / "imagenet"
EPS = 4 / 255
TINY = {
    "convnext_t_free_m4_eps4": ["model.name=timm/convnext_atto"],
    "vit_s_free_m4_eps4": ["model.name=timm/vit_tiny_patch16_224", "model.kwargs.img_size=32",
                           "model.kwargs.patch_size=4", "model.kwargs.depth=1",
                           "model.kwargs.embed_dim=24", "model.kwargs.num_heads=2"],
}
# 32 of the demo's 1,438 training digits left after the holdout: 2 minibatches of 16 per real
# epoch; the policy needs a loader with images per sample (torchvision here; not resident).
DEMO = ["model.num_classes=10", "data.loader=torchvision", "data.threads=1",
        "data.global_batch=16", "data.val_batch_size=16", "data.image_size=32",
        "data.val_resize=36", "eval.holdout=1406", "eval.max_batches=1", "eval.steps=1",
        "eval.probes_per_epoch=0", "tracking.enabled=false", "run.log_every=1"]


def train_preset(name, demo_root, run_dir, epochs, monkeypatch):
    """Train the preset's tiny variant for `epochs` natural-training epochs; what each minibatch
    met: (targets, eps), the erasing probabilities, the training transforms' policies."""
    steps, erased, policies = [], [], []
    real_step, real_erase = FreeAdversarialTrainer.train_step, batch_augment.random_erase
    real_transform = folder.train_transform

    def step(self, images, labels):
        steps.append((labels.clone(), self.radius.now))
        return real_step(self, images, labels)

    def erase(images, prob, generator):
        erased.append(prob)
        return real_erase(images, prob, generator)

    def transform(augment):
        policies.append((augment.policy, real_transform(augment)))
        return policies[-1][1]
    monkeypatch.setattr(FreeAdversarialTrainer, "train_step", step)
    monkeypatch.setattr(batch_augment, "random_erase", erase)
    monkeypatch.setattr(folder, "train_transform", transform)
    status = train.main(["--config", str(PRESETS / f"{name}.yaml"), f"data.root={demo_root}",
                         f"run.dir={run_dir}", f"optim.epochs={epochs}", *TINY[name], *DEMO])
    assert status == 0
    return steps, erased, policies, checkpoint.load(run_dir / name / "checkpoints" / "last.pt")


@pytest.mark.usefixtures("one_thread")
def test_the_convnext_preset_trains_on_ares_augmentation_with_its_eps_warm_up(
        demo_root, tmp_path, monkeypatch):
    steps, erased, policies, state = train_preset("convnext_t_free_m4_eps4", demo_root,
                                                  tmp_path, 8, monkeypatch)
    # 8 natural epochs = 2 real epochs of 2 minibatches, at 0, 2, 4, 6 natural epochs: eps rises
    # linearly from 0 over ARES's 5 warm-up epochs.
    assert [eps / EPS for _, eps in steps] == pytest.approx([0.0, 0.4, 0.8, 1.0])
    for targets, _ in steps:                      # mixup/cutmix: soft targets on every batch
        assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))
    assert any(targets.max() < 1 for targets, _ in steps)
    assert erased == [0.25] * 4                   # random erasing on each minibatch
    assert len(policies) == 2                     # each real epoch's training images through
    for policy, transform in policies:            # RandAugment m9
        assert policy == RandAugment(num_ops=2, magnitude=9, prob=0.5, magnitude_std=0.5,
                                     increasing=True)
        assert any(isinstance(t, TimmRandAugment) for t in transform.transforms)
    assert state["global_step"] == 4 and state["ema"]["updates"] == 16
    assert state["config"]["optim"]["ema"] == 0.9998


@pytest.mark.usefixtures("one_thread")
def test_the_vit_preset_trains_on_the_light_recipe_with_its_eps_warm_up(
        demo_root, tmp_path, monkeypatch):
    steps, erased, policies, state = train_preset("vit_s_free_m4_eps4", demo_root, tmp_path, 12,
                                                  monkeypatch)
    # 12 natural epochs = 3 real epochs of 2 minibatches: eps over the recipe's 10 epochs from 0.
    assert [eps / EPS for _, eps in steps] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(targets.shape == (16,) for targets, _ in steps)    # class indices: no mixing
    assert erased == []
    assert len(policies) == 3
    for policy, transform in policies:
        assert policy is None
        assert not any(isinstance(t, TimmRandAugment) for t in transform.transforms)
    assert state["ema"] is None
    assert state["config"]["model"]["kwargs"] == {
        "img_size": 32, "patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2,
        "drop_path_rate": 0.05}
