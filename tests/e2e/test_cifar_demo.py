"""The CIFAR demo end to end on real images: the digits written as CIFAR-10 the way the real
files are pickled, read through the restricted unpickler into the device-resident loader,
trained on a step budget, evaluated by the standalone evaluator."""

import json
from pathlib import Path

import numpy as np
import pytest

from dist_free import checkpoint, evaluate, train
from pipelines.cifar import find, read_split
from pipelines.cifar_demo import write_cifar_demo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_demo") / "cifar-10-batches-py"
    assert write_cifar_demo(root) == {"train": 1438, "val": 359}
    return root


def test_the_demo_folder_is_cifar_10_python_with_real_digit_images(demo_cifar):
    assert find(demo_cifar) == (demo_cifar, "cifar10-py")
    train = read_split(demo_cifar, "cifar10-py", "train")
    assert train.images.shape == (1438, 3, 32, 32) and train.class_names == tuple("0123456789")
    assert np.bincount(train.labels).min() > 130           # every digit, ~80% of its images
    assert train.images.std() > 40                         # ink on paper, not blank


@pytest.mark.usefixtures("one_thread")
def test_the_demo_trains_on_a_step_budget_then_evaluates(demo_cifar, tmp_path):
    status = train.main(["--config", str(ROOT / "configs/cifar_demo.yaml"),
                         f"data.root={demo_cifar.parent}", f"run.dir={tmp_path}",
                         "tracking.enabled=false", "optim.steps=48", "eval.every=1",
                         "eval.max_batches=1", "eval.probes_per_epoch=0", "eval.steps=2"])
    assert status == 0
    state = checkpoint.load(tmp_path / "cifar_demo/checkpoints/last.pt")
    assert state["global_step"] == 12 and state["epoch"] == 1      # 48 SGD steps / 4 replays
    assert state["config"]["data"]["loader"] == "auto"
    card = json.loads((tmp_path / "cifar_demo/export/model_card.json").read_text())["training"]
    assert (card["sgd_steps_budget"], card["minibatches_budget"], card["epochs_real"]) == (48, 12, 1)
    assert card["batches_per_epoch"] == state["batches_per_epoch"] >= 12
    report = json.loads((tmp_path / "cifar_demo/eval/epoch_001.json").read_text())
    assert report["selected_on"] == "holdout" and report["holdout"]["samples"] == 64
    out = tmp_path / "eval"
    code = evaluate.main(["--checkpoint", str(tmp_path / "cifar_demo/checkpoints/best.pt"),
                          "--steps", "2", "--restarts", "1", "--subset", "32",
                          "--eps", "0,8/255", "--out", str(out)])
    assert code == 0
    (path,) = out.glob("eval_*.json")
    final = json.loads(path.read_text())
    assert final["images"] == 32 and final["subset"]["n"] == 32
    assert final["results"][1]["robust_top1"] <= final["clean"]["top1"]
