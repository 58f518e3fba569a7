"""Checkpoints: atomic writes, safe loading, clear errors, class-map checks."""

import errno
import os
import re

import pytest
import torch

from dist_free import checkpoint


def state(value=1.0):
    return {"model": {"w": torch.full((3,), value)}, "epoch": 2, "config": {"run": {"name": "x"}}}


def test_a_saved_checkpoint_loads_back_equal(tmp_path):
    path = checkpoint.save_atomic(state(), checkpoint.checkpoint_dir(tmp_path) / "last.pt")
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3)) and loaded["epoch"] == 2


def test_latest_is_the_runs_last_pt_once_there_is_one(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    path = checkpoint.save_atomic(state(), checkpoint.checkpoint_dir(tmp_path) / "last.pt")
    assert checkpoint.latest(tmp_path) == path


def test_a_write_that_fills_the_disk_names_the_cause_keeping_the_previous_checkpoint(tmp_path):
    path = checkpoint.save_atomic(state(1.0), tmp_path / "last.pt")

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.save_atomic(state(2.0), path, write=full_disk)
    message = str(e.value)
    assert str(path) in message and "No space left on device" in message
    assert re.search(r"\d+\.\d\d GiB free there", message)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]          # no temporary file left behind


def test_an_atomic_copy_that_fails_leaves_the_target_as_it_was(tmp_path):
    src = checkpoint.save_atomic(state(1.0), tmp_path / "last.pt")
    best = checkpoint.copy_atomic(src, tmp_path / "best.pt")
    assert best.read_bytes() == src.read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match="best.pt"):
        checkpoint.copy_atomic(tmp_path / "missing.pt", best)
    assert best.read_bytes() == src.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_unreadable_checkpoint_files_are_named_in_the_error(tmp_path):
    path = checkpoint.save_atomic(state(), tmp_path / "last.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match="cannot read checkpoint .*last.pt"):
        checkpoint.load(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(checkpoint.CheckpointError, match="not a dist-free checkpoint"):
        checkpoint.load(other)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_arbitrary_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    path = tmp_path / "evil.pt"
    torch.save({"model": Evil(), "epoch": 0}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load(path)

