"""Each rank's local state (resume/rank_local.py): its RNGs, its train loader's own state and its
open log window are handed back to the same rank of the same world, and on another world the
generators are seeded afresh, said in the log and a tag."""

import logging
import random
from types import SimpleNamespace

import pytest
import torch

from dist_free.checkpoint import CheckpointError
from dist_free.config import load_config
from dist_free.distributed import DistInfo
from dist_free.trainer.resume import rank_local
from dist_free.trainer.window import Window


class Tags:
    def __init__(self):
        self.tags = {}

    def set_tags(self, tags):
        self.tags.update(tags)


class KeepsState:
    """A loader with a state of its own (a reader's position, say)."""

    def __init__(self, position=0):
        self.position, self.loaded = position, None

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.loaded = state


def a_run(rank=0, world=1, step=7, loader=None):
    return SimpleNamespace(cfg=load_config(None, ["run.seed=3"]), d=DistInfo(rank, world),
                           train_loader=loader or KeepsState(), window=Window(torch.device("cpu")),
                           tracker=Tags(), global_step=step)


def saved_by(world: int) -> list[dict]:
    """What `world` ranks saved: each rank's own draws, loader position and window."""
    states = []
    for rank in range(world):
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        run = a_run(rank, world, loader=KeepsState(position=10 + rank))
        run.window.sums += torch.tensor([float(rank), 2.0])
        run.window.count = 16
        states.append(rank_local.capture(run))
    return states


def test_each_rank_gets_its_own_generators_loader_state_and_window_back():
    state = {rank_local.KEY: saved_by(2)}
    torch.manual_seed(100 + 1)
    random.seed(100 + 1)
    expected = torch.rand(3), random.random()
    torch.manual_seed(0)
    run = a_run(rank=1, world=2)
    rank_local.restore(run, state, same_ranks=True)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert run.train_loader.loaded == {"position": 11}
    assert torch.equal(run.window.sums, torch.tensor([1.0, 2.0])) and run.window.carried == 16
    assert run.tracker.tags == {}


def test_on_another_world_size_the_generators_are_seeded_from_seed_rank_and_step(caplog):
    state = {rank_local.KEY: saved_by(2)}
    run = a_run(rank=0, world=1, step=7)
    with caplog.at_level(logging.WARNING, "dist_free.train"):
        rank_local.restore(run, state, same_ranks=False)
    drawn = torch.rand(3)
    torch.manual_seed(rank_local.fresh_seed(3, 0, 7))
    assert torch.equal(drawn, torch.rand(3))
    assert run.train_loader.loaded is None and run.window.carried == 0
    assert "seeded afresh from (run.seed, rank, step)" in caplog.text
    assert "the train loader's own state is not handed back" in caplog.text
    assert run.tracker.tags == {"resume.rng": "reseeded at step 7"}
    # Another rank or step: another stream, and none is a fresh run's seed + rank.
    seeds = {rank_local.fresh_seed(3, r, s) for r in range(4) for s in range(50)}
    assert len(seeds) == 200 and not seeds & {3, 4, 5, 6}


def test_a_checkpoint_without_rank_states_reseeds_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, "dist_free.train"):
        rank_local.restore(a_run(), {}, same_ranks=True)
    assert "the checkpoint holds no per-rank RNG state" in caplog.text


def test_a_damaged_rank_state_is_a_checkpoint_error_naming_it():
    broken = saved_by(1)
    del broken[0]["rng"]["torch"]
    with pytest.raises(CheckpointError, match="last.pt: the rank_local state of rank 0"):
        rank_local.restore(a_run(), {rank_local.KEY: broken}, same_ranks=True, path="last.pt")

