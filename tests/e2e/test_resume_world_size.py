"""A checkpoint resumes on any world size that divides the global batch: the perturbation
buffers are re-dealt by position in the global batch (the warm start survives; the unit tests are
tests/trainer/test_redeal.py), the data order stays exact, the change is logged and tagged."""

import json
import sys

import pytest
import torch
from helpers_launch import ROOT, assert_ok, demo_args, run_cmd, torchrun

from dist_free import checkpoint
from pipelines import split_listing
from pipelines.sharding import train_shard

SURVIVAL = str(ROOT / "tests" / "survival_probe.py")


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

    # 2 -> 1: rank 0 holds both saved buffers, interleaved as the global batch is (its row p
    # is saved rank p % 2's row p // 2), and trains on from batch 3.
    (tmp_path / "labels_rank0.jsonl").rename(tmp_path / "labels_first_rank0.jsonl")
    proc = run_cmd([sys.executable, SURVIVAL, *args], tmp_path,
                   env={**env, "PROBE_SIGTERM_AT_STEP": "5", "PROBE_RECORD_TRACKER": "1"})
    assert_ok(proc)
    assert "2 -> 1 ranks at epoch 0 batch 3" in proc.stderr
    assert "64 of 64 saved rows kept, 0 dropped, 0 zero-filled" in proc.stderr
    restored = torch.load(tmp_path / "restored_rank0.pt", weights_only=True)["perturbation"]
    by_position = torch.stack([s["perturbation"] for s in saved2["rank_states"]], 1).flatten(0, 1)
    assert torch.equal(restored, by_position)
    tags = [json.loads(line) for line in (tmp_path / "tracker.jsonl").read_text().splitlines()]
    assert any(t.get("tags", {}).get("resume.world_size", "").startswith("2 -> 1") for t in tags)
    saved1 = checkpoint.load(last)      # one process has no one to agree with: it stops at once
    assert (saved1["world_size"], saved1["batch_in_epoch"]) == (1, 5)

    # 1 -> 2: rank r takes the saved rows of its positions r, r + 2, ..., and the run finishes.
    assert_ok(run_cmd(two, tmp_path, env=env))
    for r in range(2):
        half = torch.load(tmp_path / f"restored_rank{r}.pt", weights_only=True)["perturbation"]
        assert torch.equal(half, saved1["rank_states"][0]["perturbation"][r::2])
    final = checkpoint.load(last)
    assert final["epoch"] == 1 and final["global_step"] == 8 and final["world_size"] == 2

    # Every global batch of the epoch held one uninterrupted rank's shuffle, image for image at
    # the same positions (row i of rank r on W ranks is position i W + r), on 2, 1 and 2 ranks.
    listing = split_listing(demo_root, "train", holdout=900)
    order = train_shard(len(listing), 64, 0, 1, 0, 0)
    expected = [[listing.labels[i] for i in order[k * 64:(k + 1) * 64]] for k in range(8)]
    seen = {}       # batch -> rank -> its labels in batch order
    for f, rank in (("labels_first_rank0.jsonl", 0), ("labels_rank0.jsonl", 0),
                    ("labels_rank1.jsonl", 1)):
        for _, epoch, batch, labels in map(json.loads, (tmp_path / f).read_text().splitlines()):
            assert epoch == 0 and rank not in seen.setdefault(batch, {})
            seen[batch][rank] = labels
    assert sorted(seen) == list(range(8))
    assert [len(seen[k]) for k in range(8)] == [2, 2, 2, 1, 1, 2, 2, 2]
    by_position = [[seen[k][p % len(seen[k])][p // len(seen[k])] for p in range(64)]
                   for k in range(8)]
    assert by_position == expected
