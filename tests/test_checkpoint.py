"""Checkpoints: atomic writes, safe loading, clear errors, class-map checks."""

import os

import pytest
import torch

from dist_free import checkpoint


def state(value=1.0):
    return {"model": {"w": torch.full((3,), value)}, "epoch": 2, "config": {"run": {"name": "x"}}}


def test_round_trip_and_latest(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    path = checkpoint.save_atomic(state(), checkpoint.checkpoint_dir(tmp_path) / "last.pt")
    assert checkpoint.latest(tmp_path) == path
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3)) and loaded["epoch"] == 2


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = checkpoint.save_atomic(state(1.0), tmp_path / "last.pt")

    def crash(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic(state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]          # no temporary file left behind


def test_truncated_and_foreign_files_are_named_in_the_error(tmp_path):
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


def test_class_map_must_match_on_resume():
    checkpoint.check_class_map(None, {"a": 0})
    checkpoint.check_class_map({"a": 0, "b": 1}, {"a": 0, "b": 1})
    with pytest.raises(checkpoint.CheckpointError, match="class map differs"):
        checkpoint.check_class_map({"a": 0, "b": 1}, {"a": 1, "b": 0})
