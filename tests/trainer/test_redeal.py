"""A resume on another world size re-deals the perturbation rows by their position in the global
batch, the position pipelines/sharding.py deals images to: row i of rank r on W ranks is
position i W + r. So each image of the remaining batches meets the row it would have met."""

import pytest
import torch

from dist_free import checkpoint
from dist_free.trainer.resume.redeal import redeal
from pipelines.sharding import train_shard


def positions_as_rows(ranks: int, rows: int) -> list[dict]:
    """Saved buffers whose every row holds its own global position (rank r, row i: i W + r)."""
    return [{"perturbation": (torch.arange(rows) * ranks + r).float().reshape(rows, 1, 1, 1)
             .expand(rows, 3, 2, 2).clone()} for r in range(ranks)]


def dealt_positions(saved: list[dict], rank: int, world: int, rows: int) -> list[int]:
    mine, _ = redeal(saved, rank, world, rows)
    return mine["perturbation"][:, 0, 0, 0].long().tolist()


def test_the_global_batch_is_dealt_round_robin_so_row_i_of_rank_r_is_position_i_w_plus_r():
    n, g = 1000, 64
    one = train_shard(n, g, 0, 1, 0, 3)
    for world in (2, 4, 8):
        b = g // world
        shards = [train_shard(n, b, r, world, 0, 3) for r in range(world)]
        for k in range(n // g):
            for r in range(world):
                for i in range(b):
                    assert shards[r][k * b + i] == one[k * g + i * world + r]


@pytest.mark.parametrize("saved_world, world", [(2, 1), (1, 2), (2, 4), (4, 2), (4, 8), (3, 3)])
def test_each_rank_gets_the_rows_of_its_own_global_positions(saved_world, world):
    global_batch = 24
    saved = positions_as_rows(saved_world, global_batch // saved_world)
    rows = global_batch // world
    for r in range(world):
        assert dealt_positions(saved, r, world, rows) == [i * world + r for i in range(rows)]
    _, deal = redeal(saved, 0, world, rows)
    assert (deal.kept, deal.dropped, deal.zero_filled) == (global_batch, 0, 0)


def test_on_the_same_world_size_each_rank_gets_its_own_buffer_back():
    saved = positions_as_rows(2, 4)
    for r in range(2):
        mine, _ = redeal(saved, r, 2, 4)
        assert torch.equal(mine["perturbation"], saved[r]["perturbation"])


def test_a_changed_global_batch_drops_or_zero_fills_by_position_saying_so():
    saved = positions_as_rows(2, 4)                          # positions 0..7
    grown, deal = redeal(saved, 2, 3, 4)                     # 12 positions wanted, 8 saved
    assert (deal.kept, deal.dropped, deal.zero_filled) == (8, 0, 4)
    assert grown["perturbation"][:, 0, 0, 0].tolist() == [2, 5, 0, 0]   # 8 and 11: unsaved
    assert grown["perturbation"][2:].abs().sum() == 0
    assert dealt_positions(saved, 0, 1, 4) == [0, 1, 2, 3]  # 4 positions wanted: 4..7 dropped
    _, deal = redeal(saved, 0, 1, 4)
    assert (deal.kept, deal.dropped, deal.zero_filled) == (4, 4, 0)
    assert "4 dropped" in deal.describe()
    assert redeal([{}, {}], 0, 1, 8) == ({}, None)           # stateless methods


def test_a_rank_that_saved_no_buffer_counts_as_zeros_in_its_positions():
    saved = positions_as_rows(2, 4)
    saved[1] = {}
    assert dealt_positions(saved, 0, 1, 8) == [0, 0, 2, 0, 4, 0, 6, 0]


def test_buffers_of_different_shapes_are_a_damaged_checkpoint():
    saved = positions_as_rows(2, 4)
    saved[1]["perturbation"] = saved[1]["perturbation"][:3]
    with pytest.raises(checkpoint.CheckpointError, match="differ in shape"):
        redeal(saved, 0, 1, 8)
