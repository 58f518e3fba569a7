"""A resume on the same world size with another global batch: at an epoch's end the saved
perturbation is re-dealt to the new batch (as on another world size), mid-epoch it is refused."""

from types import SimpleNamespace

import pytest
import torch

from dist_free.checkpoint import CheckpointError
from dist_free.config import load_config
from dist_free.distributed import DistInfo
from dist_free.trainer.run import own_rank_state


class Tags:
    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)


def resumed(global_batch: int):
    cfg = load_config(None, [f"data.global_batch={global_batch}"])
    return SimpleNamespace(cfg=cfg, d=DistInfo(), tracker=Tags())


def saved_at(batch_in_epoch: int, rows: int = 32) -> dict:
    return {"config": {"data": {"global_batch": rows, "batch_size": 64}}, "world_size": 1,
            "epoch": 1, "batch_in_epoch": batch_in_epoch, "global_step": 16,
            "rank_states": [{"perturbation": torch.arange(rows * 2.0).reshape(rows, 1, 1, 2) + 1}]}


def test_a_larger_global_batch_at_an_epochs_end_gets_the_saved_rows_and_zeros():
    run, state = resumed(64), saved_at(0)
    mine = own_rank_state(run, state)["perturbation"]
    assert mine.shape == (64, 1, 1, 2)          # the new batch's rows: no shape error at step one
    assert torch.equal(mine[:32], state["rank_states"][0]["perturbation"])
    assert mine[32:].abs().sum() == 0
    assert "32 zero-filled" in run.tracker.tags["resume.perturbations"]


def test_another_global_batch_mid_epoch_is_refused_naming_the_batch_to_set():
    with pytest.raises(CheckpointError, match="data.global_batch=32") as e:
        own_rank_state(resumed(64), saved_at(3))
    assert "resume on 1 ranks" not in str(e.value)      # the world size is not what changed
