"""A short free-training run of the CIFAR demo with mixup, cutmix and random erasing: the
trainer augments each minibatch once, on the device batch the resident loader gives, and hands
the method soft targets; every replay of free training sees that one mixed batch."""

import json
from pathlib import Path

import pytest
import torch

from dist_free import checkpoint, train
from dist_free.engine.free import FreeAdversarialTrainer
from dist_free.trainer import augmentation
from pipelines.cifar_demo import write_cifar_demo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_demo") / "cifar-10-batches-py"
    write_cifar_demo(root)
    return root


@pytest.mark.usefixtures("one_thread")
def test_the_cifar_demo_trains_on_mixed_and_erased_minibatches(demo_cifar, tmp_path,
                                                               monkeypatch):
    calls, steps = [], []
    real_augment = augmentation.MinibatchAugment.__call__
    real_step = FreeAdversarialTrainer.train_step

    def augment(self, images, labels, epoch, batch, batches_per_epoch):
        out = real_augment(self, images, labels, epoch, batch, batches_per_epoch)
        calls.append((epoch, batch, images.clone(), out[0].clone()))
        return out

    def step(self, images, labels):
        inputs = []
        hook = self.model.register_forward_pre_hook(lambda _, args: inputs.append(args[0].clone()))
        try:
            stats = real_step(self, images, labels)
        finally:
            hook.remove()
        steps.append((images.clone(), labels.clone(), inputs, self.perturbation.clone()))
        return stats
    monkeypatch.setattr(augmentation.MinibatchAugment, "__call__", augment)
    monkeypatch.setattr(FreeAdversarialTrainer, "train_step", step)

    status = train.main(["--config", str(ROOT / "configs/cifar_demo.yaml"),
                         f"data.root={demo_cifar.parent}", f"run.dir={tmp_path}",
                         "tracking.enabled=false", "optim.steps=16", "eval.every=1",
                         "eval.max_batches=1", "eval.probes_per_epoch=0", "eval.steps=1",
                         "data.mixup=0.8", "data.cutmix=1.0", "data.reprob=0.25"])
    assert status == 0
    state = checkpoint.load(tmp_path / "cifar_demo/checkpoints/last.pt")
    assert state["global_step"] == 4 == len(steps)          # 16 SGD steps / 4 replays
    assert state["config"]["data"]["mixup"] == 0.8
    # One augmentation per minibatch, keyed by its batch index, not one per replay.
    assert [(e, b) for e, b, *_ in calls] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert all(not torch.equal(before, after) for *_, before, after in calls)
    for (*_, augmented), (images, labels, inputs, delta) in zip(calls, steps):
        assert torch.equal(images, augmented)
        assert labels.shape == (64, 10) and torch.allclose(labels.sum(1), torch.ones(64))
        assert len(inputs) == 4                              # the m replays, each of them on
        for replay in inputs:                                # the mixed batch plus the buffer
            assert (replay - images).abs().max() <= 8 / 255 + 1e-6
    assert (steps[-1][3] != 0).any()
    report = json.loads((tmp_path / "cifar_demo/eval/epoch_001.json").read_text())
    assert 0 <= report["top1"] <= 1
