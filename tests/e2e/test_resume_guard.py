"""A resume on data other than its checkpoint's stops naming the difference (exit 2), unless
run.accept_data_changes accepts it: then it is logged and tagged."""

import json
import shutil
import sys

import numpy as np
import pytest
from helpers_launch import ROOT, assert_ok, demo_args, run_cmd

import pipelines
from dist_free import checkpoint
from dist_free.config import load_config
from dist_free.trainer.resume.data_guard import check, differences, identity
from pipelines.cifar_write import write_cifar

SURVIVAL = str(ROOT / "tests" / "survival_probe.py")
SAVED = {"root": "/data/a", "holdout": 100, "classes": {"cat": 0, "dog": 1},
         "train_files": {"images": 900, "sha256": "1" * 64},
         "val_files": {"images": 50, "sha256": "2" * 64}}


def test_each_kind_of_change_is_named():
    assert differences(SAVED, dict(SAVED)) == {}
    now = {**SAVED, "root": "/data/b", "holdout": 0, "classes": {"cat": 1, "dog": 0},
           "train_files": {"images": 901, "sha256": "3" * 64}}
    found = differences(SAVED, now)
    assert set(found) == {"root", "holdout", "classes", "files"}
    assert "/data/a" in found["root"] and "/data/b" in found["root"]
    assert "eval.holdout was 100 images, now 0" in found["holdout"]
    assert "training file list (900 images, now 901" in found["files"]
    assert "2 classes" in found["classes"]


def test_a_checkpoint_without_an_identity_is_checked_on_its_config(tmp_path):
    state = {"config": {"data": {"root": str(tmp_path)}, "eval": {"holdout": 10}},
             "class_to_idx": {"a": 0}}
    now = {"root": str(tmp_path.resolve()), "holdout": 20, "classes": {"a": 0},
           "train_files": None, "val_files": None}
    with pytest.raises(checkpoint.CheckpointError, match="eval.holdout was 10") as refused:
        check(state, now, (), tmp_path / "last.pt")
    assert "run.accept_data_changes=[holdout]" in str(refused.value)
    assert check(state, now, ("holdout",), tmp_path / "last.pt").keys() == {"holdout"}


def cifar_identity(root, holdout=0):
    """The identity a CIFAR run (resident loader, no file list) records."""
    cfg = load_config(ROOT / "configs/cifar_demo.yaml", [f"data.root={root}",
                                                         f"eval.holdout={holdout}"])
    build = lambda split: pipelines.build_loader("auto", root, split, batch_size=8,  # noqa: E731
                                                 holdout=holdout)
    return identity(cfg, build("train"), build("val"), build("holdout") if holdout else None)


def test_a_cifar_run_is_identified_by_its_format_and_its_pixels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)
    splits = {"train": (images[:30], labels[:30]), "val": (images[30:], labels[30:])}
    names = [f"c{i}" for i in range(10)]
    root = write_cifar(tmp_path / "a" / "cifar-10-batches-py", "cifar10-py", splits, names)
    saved = cifar_identity(root, holdout=5)
    assert saved["format"] == "cifar10-py" and saved["train_files"]["images"] == 30
    assert differences(saved, cifar_identity(root, holdout=5)) == {}
    # Same labels, one pixel changed: the index listing alone would not see it.
    changed = images.copy()
    changed[3, 0, 0, 0] ^= 1
    write_cifar(root, "cifar10-py", {"train": (changed[:30], labels[:30])}, names)
    found = differences(saved, cifar_identity(root, holdout=5))
    assert set(found) == {"files"} and "training file list" in found["files"]
    with pytest.raises(checkpoint.CheckpointError, match=r"accept_data_changes=\[files\]"):
        check({"data": saved}, cifar_identity(root, holdout=5), (), tmp_path / "last.pt")
    # The same arrays in the binary version: a change of format, named as such.
    other = write_cifar(tmp_path / "a" / "cifar-10-batches-bin", "cifar10-bin", splits, names)
    now = {**cifar_identity(other, holdout=5), "root": saved["root"]}
    assert now["train_files"] == saved["train_files"]
    assert "data format (cifar10-py, now cifar10-bin)" in differences(saved, now)["files"]


@pytest.mark.slow
def test_a_resume_on_changed_data_stops_unless_the_change_is_accepted(demo_root, tmp_path):
    args = demo_args(demo_root, tmp_path, "run.log_every=1")
    assert_ok(run_cmd([sys.executable, SURVIVAL, *args], tmp_path,
                      env={"PROBE_SIGTERM_AT_STEP": "2"}))
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    before = last.read_bytes()

    held = run_cmd([sys.executable, "-m", "dist_free.train", *args, "eval.holdout=200"], tmp_path)
    assert held.returncode == 2, held.stderr[-3000:]
    assert "eval.holdout was 256 images, now 200" in held.stderr
    assert "Traceback" not in held.stderr

    moved = tmp_path / "digits"                    # the same images elsewhere, one file fewer
    shutil.copytree(demo_root, moved)
    sorted((moved / "train" / "3").iterdir())[0].unlink()
    other = run_cmd([sys.executable, "-m", "dist_free.train",
                     *demo_args(moved, tmp_path, "run.log_every=1")], tmp_path)
    assert other.returncode == 2, other.stderr[-3000:]
    assert f"data.root was {demo_root}" in other.stderr and "training file list" in other.stderr
    assert last.read_bytes() == before             # nothing trained, nothing overwritten

    accepted = run_cmd([sys.executable, SURVIVAL, *args, "eval.holdout=200",
                        "run.accept_data_changes=holdout"], tmp_path,
                       env={"PROBE_SIGTERM_AT_STEP": "3", "PROBE_RECORD_TRACKER": "1"})
    assert_ok(accepted)
    assert "accepted by run.accept_data_changes: eval.holdout was 256" in accepted.stderr
    calls = [json.loads(x) for x in (tmp_path / "tracker.jsonl").read_text().splitlines()]
    assert any("eval.holdout was 256" in c.get("tags", {}).get("resume.accepted_data_changes", "")
               for c in calls)
    assert checkpoint.load(last)["data"]["holdout"] == 200   # the next resume compares with this
