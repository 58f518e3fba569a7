"""A checkpoint resumes on any world size that divides the global batch: the perturbation
buffers are re-dealt (the warm start survives), the data order stays exact, the change is logged
and tagged."""

import json
import sys

import pytest
import torch
from helpers_launch import ROOT, assert_ok, demo_args, run_cmd, torchrun

from dist_free import checkpoint
from dist_free.trainer.resume.redeal import redeal
from pipelines import split_listing
from pipelines.sharding import train_shard

SURVIVAL = str(ROOT / "tests" / "survival_probe.py")


def buffers(ranks: int, rows: int) -> list[dict]:
    return [{"perturbation": torch.arange(rows * 2.0).reshape(rows, 1, 1, 2) + 100 * r}
            for r in range(ranks)]


def test_a_redeal_keeps_every_row_the_new_world_can_hold():
    saved = buffers(2, 4)
    for r in range(2):
        mine, deal = redeal(saved, r, 2, 4)
        assert torch.equal(mine["perturbation"], saved[r]["perturbation"])
    one, deal = redeal(saved, 0, 1, 8)                        # 2 ranks -> 1: all rows, in order
    assert torch.equal(one["perturbation"], torch.cat([s["perturbation"] for s in saved]))
    assert (deal.kept, deal.dropped, deal.zero_filled) == (8, 0, 0)
    halves = [redeal(buffers(1, 8), r, 2, 4)[0]["perturbation"] for r in range(2)]   # 1 -> 2
    assert torch.equal(torch.cat(halves), buffers(1, 8)[0]["perturbation"])


def test_a_changed_global_batch_drops_or_zero_fills_saying_so():
    saved = buffers(2, 4)
    grown, deal = redeal(saved, 2, 3, 4)                     # 12 rows wanted, 8 saved
    assert (deal.kept, deal.dropped, deal.zero_filled) == (8, 0, 4)
    assert grown["perturbation"].abs().sum() == 0           # rank 2's share: nothing saved
    _, deal = redeal(saved, 0, 1, 4)                         # 4 rows wanted, 8 saved
    assert (deal.kept, deal.dropped, deal.zero_filled) == (4, 4, 0)
    assert "4 dropped" in deal.describe()
    assert redeal([{}, {}], 0, 1, 8) == ({}, None)           # stateless methods


def test_a_global_batch_holds_the_same_images_on_any_world_size():
    """Why a resume mid-epoch on another world size is exact: batch k of the epoch is the same
    block of the (seed, epoch) shuffle whatever the number of ranks sharing it."""
    n, g = 1000, 64
    for k in range(n // g):
        one = train_shard(n, g, 0, 1, 0, 3)[k * g:(k + 1) * g]
        for world in (2, 4, 8):
            b = g // world
            split = [train_shard(n, b, r, world, 0, 3)[k * b:(k + 1) * b] for r in range(world)]
            assert sorted(sum(split, [])) == sorted(one)


@pytest.mark.slow
def test_a_run_moved_from_2_ranks_to_1_to_2_keeps_its_warm_start_with_the_data_order(
        demo_root, tmp_path):
    # Global batch 64: 32 per rank on 2 ranks, 64 on 1. One real epoch of 8 steps (900 of the
    # 1438 training digits held out).
    args = demo_args(demo_root, tmp_path, "data.global_batch=64", "run.log_every=20",
                     "eval.holdout=900")
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    env = {"PROBE_LABELS": "1"}
    two = torchrun("--standalone", "--nproc_per_node=2", SURVIVAL, *args)
    assert_ok(run_cmd(two, tmp_path, env={**env, "PROBE_SIGTERM_AT_STEP": "2"}))
    saved2 = checkpoint.load(last)
    assert (saved2["world_size"], saved2["batch_in_epoch"]) == (2, 3)   # stopped one step later

    # 2 -> 1: rank 0 holds both saved buffers, in rank order, and trains on from batch 3.
    (tmp_path / "labels_rank0.jsonl").rename(tmp_path / "labels_first_rank0.jsonl")
    proc = run_cmd([sys.executable, SURVIVAL, *args], tmp_path,
                   env={**env, "PROBE_SIGTERM_AT_STEP": "5", "PROBE_RECORD_TRACKER": "1"})
    assert_ok(proc)
    assert "2 -> 1 ranks at epoch 0 batch 3" in proc.stderr
    assert "64 of 64 saved rows kept, 0 dropped, 0 zero-filled" in proc.stderr
    restored = torch.load(tmp_path / "restored_rank0.pt", weights_only=True)["perturbation"]
    assert torch.equal(restored, torch.cat([s["perturbation"] for s in saved2["rank_states"]]))
    tags = [json.loads(line) for line in (tmp_path / "tracker.jsonl").read_text().splitlines()]
    assert any(t.get("tags", {}).get("resume.world_size", "").startswith("2 -> 1") for t in tags)
    saved1 = checkpoint.load(last)      # one process has no one to agree with: it stops at once
    assert (saved1["world_size"], saved1["batch_in_epoch"]) == (1, 5)

    # 1 -> 2: each rank takes its half of the one saved buffer, and the run finishes.
    assert_ok(run_cmd(two, tmp_path, env=env))
    for r in range(2):
        half = torch.load(tmp_path / f"restored_rank{r}.pt", weights_only=True)["perturbation"]
        assert torch.equal(half, saved1["rank_states"][0]["perturbation"][r * 32:(r + 1) * 32])
    final = checkpoint.load(last)
    assert final["epoch"] == 1 and final["global_step"] == 8 and final["world_size"] == 2

    # Every global batch of the epoch was the same 64 images as one uninterrupted rank's shuffle.
    listing = split_listing(demo_root, "train", holdout=900)
    order = train_shard(len(listing), 64, 0, 1, 0, 0)
    expected = [sorted(listing.labels[i] for i in order[k * 64:(k + 1) * 64]) for k in range(8)]
    seen = {}
    for rows in (json.loads(x) for f in ("labels_first_rank0.jsonl", "labels_rank0.jsonl",
                                         "labels_rank1.jsonl")
                 for x in (tmp_path / f).read_text().splitlines()):
        _, epoch, batch, labels = rows
        assert epoch == 0
        seen.setdefault(batch, []).extend(labels)
    assert sorted(seen) == list(range(8))
    assert [sorted(seen[k]) for k in range(8)] == expected
