"""A step budget counts what was done: a run resumed at an epoch's end on another global batch
trains exactly optim.steps SGD steps, in the epochs the rule says, and its model card says so."""

import json
import math
import sys

import pytest
import torch
from helpers_launch import PROBE, assert_ok, demo_args, run_cmd, torchrun

from dist_free import checkpoint

pytestmark = pytest.mark.slow

MINIBATCHES, REPLAYS = 40, 4


def budget_args(demo_root, tmp_path, global_batch):
    # 538 training digits (900 of 1438 held out); the evaluation after every epoch is where the
    # first session's stop lands, so its checkpoint is an epoch's end.
    return demo_args(demo_root, tmp_path, f"data.global_batch={global_batch}",
                     f"optim.steps={MINIBATCHES * REPLAYS}", "optim.warmup_epochs=0",
                     "eval.holdout=900", "eval.every=1", "eval.probes_per_epoch=0")


def test_one_gpu_then_two_at_twice_the_global_batch_trains_optim_steps(demo_root, tmp_path):
    """The finding's case (free_m8: one GPU at 128, resumed on two at 256), in small: one process
    at a global batch of 32 for one epoch, stopped at its end, then two ranks at 64."""
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    first = [sys.executable, PROBE, *budget_args(demo_root, tmp_path, 32)]
    assert_ok(run_cmd(first, tmp_path, env={"PROBE_SIGTERM_IN_WRITE": "1"}))
    saved = checkpoint.load(last)
    assert (saved["epoch"], saved["batch_in_epoch"], saved["world_size"]) == (1, 0, 1)
    assert saved["global_step"] == saved["batches_per_epoch"]

    second = torchrun("--standalone", "--nproc_per_node=2", PROBE,
                      *budget_args(demo_root, tmp_path, 64))
    proc = run_cmd(second, tmp_path)
    assert_ok(proc)
    assert "the global batch changes from 32 (1 ranks) to 64 (2 ranks)" in proc.stderr
    final = checkpoint.load(last)
    ran = steps_run(tmp_path)
    # Every SGD step of the budget, counted by the trainer and by the steps the processes ran.
    assert final["global_step"] * REPLAYS == MINIBATCHES * REPLAYS
    assert saved["global_step"] + ran == MINIBATCHES
    after = final["batches_per_epoch"]
    assert after < saved["batches_per_epoch"]                 # twice the batch: shorter epochs
    assert final["epoch"] == 1 + math.ceil((MINIBATCHES - saved["global_step"]) / after)
    # The card (of best.pt, whichever epoch it holds) states the epochs the run trained.
    export = tmp_path / "demo" / "export"
    card = json.loads((export / "model_card.json").read_text())["training"]
    assert (card["epochs_real"], card["batches_per_epoch"], card["batches_per_epoch_since"]) \
        == (final["epoch"], after, 1)
    assert (f"{final['epoch']} real epochs: 1 of another length (a resume changed the global "
            f"batch), then up to {after} minibatches each") in (export / "MODEL_CARD.md").read_text()


def steps_run(out) -> int:
    """The train steps the resumed session's rank 0 ran (train_probe's count)."""
    return torch.load(out / "rank0.pt", weights_only=True)["steps_run"]
