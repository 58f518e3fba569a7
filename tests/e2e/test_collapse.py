"""A collapse of robust accuracy (the in-epoch probe far below its best) stops the run as
`eval.on_collapse` says: `stop` keeps the collapsed state, `rollback` the last healthy checkpoint."""

import sys

import pytest
import torch
from helpers_launch import PROBE, demo_args, run_cmd

from dist_free import checkpoint
from dist_free.trainer.validation import CollapseGuard, probe_points


def collapsing_run(demo_root, tmp_path, action: str):
    """Two real epochs, two probes each; the probes of epoch 2 read robust accuracy 0 (epoch 1's
    read 0.5), so the default guard (drop 0.5, armed at 0.1) fires at epoch 2's first probe,
    after epoch 1 was saved and evaluated. The exit status must be 3."""
    cmd = [sys.executable, PROBE, *demo_args(
        demo_root, tmp_path, "optim.epochs=8", "eval.every=1", "eval.holdout=1000",
        "eval.probes_per_epoch=2", "eval.probe_batches=1", "eval.probe_steps=2",
        f"eval.on_collapse={action}")]
    proc = run_cmd(cmd, tmp_path, env={"PROBE_COLLAPSE_FROM_EPOCH": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    collapsed = torch.load(tmp_path / "collapsed_rank0.pt", weights_only=True)
    return proc, collapsed, tmp_path / "demo" / "checkpoints"


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_on_collapse_stop_exits_3_keeping_the_collapsed_state_as_last_pt(demo_root, tmp_path):
    proc, collapsed, ckpts = collapsing_run(demo_root, tmp_path, "stop")
    last = checkpoint.load(ckpts / "last.pt")
    assert last["epoch"] == 1 and 0 < last["batch_in_epoch"]
    assert last["global_step"] == collapsed["global_step"]
    assert same_weights(last["model"], collapsed["model"])
    assert last["probe_best"] == 0.5
    assert checkpoint.load(ckpts / "best.pt")["epoch"] == 1     # the healthy evaluation's


@pytest.mark.slow
def test_on_collapse_rollback_exits_3_keeping_the_last_healthy_checkpoint(demo_root, tmp_path):
    proc, collapsed, ckpts = collapsing_run(demo_root, tmp_path, "rollback")
    last, best = checkpoint.load(ckpts / "last.pt"), checkpoint.load(ckpts / "best.pt")
    # epoch 1's end, evaluated; the collapsed weights, trained further, were never saved
    assert (last["epoch"], last["batch_in_epoch"]) == (1, 0) and last["eval"] is not None
    assert last["global_step"] < collapsed["global_step"]
    assert not same_weights(last["model"], collapsed["model"])
    assert best["epoch"] == 1 and same_weights(best["model"], last["model"])


def test_the_collapse_guard_fires_only_once_armed_on_a_large_drop():
    guard = CollapseGuard(drop=0.5, armed_at=0.2)
    # 0.05 after 0.15: a large drop, but the best (0.15) is below the floor, so not armed yet.
    assert [guard.check(a) for a in (0.15, 0.05, 0.3, 0.2, 0.16, 0.14)] == \
        [False, False, False, False, False, True]
    assert guard.best == 0.3


def test_probes_are_spread_evenly_over_the_epoch_ending_at_its_last_batch():
    assert probe_points(20, 4) == {5, 10, 15, 20}
    assert probe_points(3, 8) == {1, 2, 3}
    assert probe_points(20, 0) == set()
