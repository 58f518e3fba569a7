"""Checkpoints: plain dicts, written atomically, read back with `weights_only=True`.

Layout of a run directory:
    <run_dir>/checkpoints/last.pt   the latest state; auto-resume starts here
    <run_dir>/checkpoints/best.pt   the state with the best robust (PGD) validation accuracy

A checkpoint holds the model (unwrapped), optimizer, the method's shared state (its GradScaler),
epoch and step counters, the class-index map, the resolved config, the MLflow run id, each
rank's own method state (`rank_states`: free training's perturbation buffer, whose warm start is
training state, not a cache), and each rank's local state (`rank_local`: where its random
generators stand, its train loader's own state, its open log window; trainer/resume/rank_local.py),
which only the same rank of the same world size takes back.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from dist_free import atomic


class CheckpointError(RuntimeError):
    pass


def save_atomic(state: dict, path: Path, write=torch.save) -> Path:
    """Write `state` to `path` atomically (dist_free.atomic): a crash or preemption mid-write
    leaves the previous checkpoint intact. A full or unwritable disk is a CheckpointError naming
    the path and the free space, with nothing left behind. `write(state, file)` is torch.save;
    tests pass one that fails.
    """
    path = Path(path)
    try:
        return atomic.write_atomic(path, lambda f: write(state, f))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e} "
                              f"({free_space(path.parent)} free there); the previous "
                              f"{path.name}, if any, is intact") from None


def free_space(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown space"


def copy_atomic(src: Path, dst: Path) -> Path:
    """`dst` becomes a complete copy of `src` or stays as it was: temporary file, fsync, rename."""
    dst = Path(dst)

    def write(_, out):
        with open(src, "rb") as f:
            shutil.copyfileobj(f, out, 16 << 20)

    return save_atomic(None, dst, write)


def rank_state(state: dict, rank: int) -> dict:
    """This rank's part of the training state ({} for a rank the saved run did not have)."""
    states = state.get("rank_states")
    if states is None:   # checkpoints written before rank_states: the free buffer alone
        states = [{"perturbation": t} for t in state.get("perturbations") or []]
    return dict(states[rank]) if rank < len(states) else {}


# What every consumer (resume, evaluate, export) reads; the trainer always writes them.
REQUIRED = ("model", "epoch", "config")


def load(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without unpickling arbitrary objects; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {first}); "
                              "it may be truncated or not a dist-free checkpoint") from None
    missing = set(REQUIRED) - set(state) if isinstance(state, dict) else set(REQUIRED)
    if missing:
        raise CheckpointError(f"{path} is not a dist-free checkpoint (missing {sorted(missing)})")
    return state


def sha256(path: Path) -> str:
    """A checkpoint's identity in reports and model cards."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The checkpoint auto-resume starts from, or None for a fresh run."""
    path = checkpoint_dir(run_dir) / "last.pt"
    return path if path.is_file() else None

