"""best.pt is chosen on held-out training images (eval.holdout), and replaced only by a better
evaluation; the val set only reports."""

import json
import sys

import pytest
from helpers_launch import PROBE, assert_ok, demo_args, run_cmd

from dist_free import checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def holdout_run(demo_root, tmp_path_factory):
    """One real epoch with 1000 of the ~1400 training images held out (a short epoch); its run
    directory."""
    out = tmp_path_factory.mktemp("holdout")
    assert_ok(run_cmd([sys.executable, PROBE, *demo_args(demo_root, out, "optim.epochs=4",
                                                          "eval.holdout=1000")], out))
    return out / "demo"


def test_the_selection_metric_is_pgd_accuracy_on_the_holdout(holdout_run):
    report = json.loads((holdout_run / "eval" / "epoch_001.json").read_text())
    assert report["selected_on"] == "holdout" and report["holdout"]["samples"] > 0
    assert report["selection_metric"] == report["holdout"]["pgd"]
    best = checkpoint.load(holdout_run / "checkpoints" / "best.pt")
    assert best["eval"]["selected_on"] == "holdout"
    assert best["best_metric"] == report["selection_metric"]


def test_the_epoch_evaluation_attacks_in_fp32_by_default(holdout_run):
    report = json.loads((holdout_run / "eval" / "epoch_001.json").read_text())
    assert report["dtype"] == "fp32" and report["attack"] == "pgd"


def test_best_pt_is_replaced_by_a_better_evaluation_only(demo_root, tmp_path):
    # Three evaluated epochs whose selection metrics read 0.3, 0.4, 0.2: epoch 2 must replace
    # epoch 1's best.pt, and epoch 3 must not replace epoch 2's. A large holdout keeps the
    # epochs short (about 400 training images).
    cmd = [sys.executable, PROBE, *demo_args(demo_root, tmp_path, "optim.epochs=12",
                                             "eval.every=1", "eval.holdout=1000")]
    assert_ok(run_cmd(cmd, tmp_path, env={"PROBE_SELECTION": "0.3,0.4,0.2"}))
    ckpts = tmp_path / "demo" / "checkpoints"
    best, last = checkpoint.load(ckpts / "best.pt"), checkpoint.load(ckpts / "last.pt")
    assert best["epoch"] == 2 and best["eval"]["selection_metric"] == 0.4
    assert last["epoch"] == 3 and last["eval"]["selection_metric"] == 0.2
    assert last["best_metric"] == 0.4
