"""Each rank's local state: saved as that rank's own, handed back to the same rank of the same
world. It is where the rank's random streams stand (torch's CPU and CUDA generators and Python's:
dropout, timm's drop-path, the random starts of pgd and fast), its train loader's own state (for
a loader that keeps one, pipelines/loader.py) and its open log window (trainer/window.py). With
it, a run stopped mid-epoch and resumed on the same world size and global batch draws the same
numbers as the run left alone, and in fp32 ends with the same weights, bit for bit
(tests/e2e/test_exact_resume.py).

None of it can be re-dealt to another world size as the perturbation buffers are (redeal.py): a
generator's state is one stream, not rows of a batch. There (and for a checkpoint that holds
none) each rank's generators are seeded afresh from (run.seed, rank, step), the loader starts
from its (epoch, batch) alone and the window starts empty, and the log says so: the run goes on
from the saved weights, optimizer and perturbations, with other random numbers than the run left
alone would have drawn.
"""

from __future__ import annotations

import logging

from dist_free import checkpoint, distributed, environment

log = logging.getLogger("dist_free.train")

KEY = "rank_local"      # the checkpoint's list of per-rank states, rank r's at index r


def capture(run) -> dict:
    """This rank's local state now."""
    loader_state = getattr(run.train_loader, "state_dict", None)
    return {"rng": environment.rng_state(run.d.device),
            "loader": loader_state() if loader_state is not None else None,
            "window": run.window.state_dict()}


def gather(run) -> list[dict]:
    """Every rank's local state on rank 0 (others get [])."""
    return distributed.gather_objects_to_main(capture(run))


def restore(run, state: dict, same_ranks: bool, path="the checkpoint") -> None:
    """Hand this rank its own saved state back; the last step of a restore, after everything
    that draws random numbers while a run is built (the model's initialisation)."""
    saved = state.get(KEY)
    if same_ranks and saved is not None and len(saved) == run.d.world_size:
        try:
            hand_back(run, saved[run.d.rank])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise checkpoint.CheckpointError(
                f"{path}: the {KEY} state of rank {run.d.rank} does not fit this run (damaged?): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        return
    environment.seed_everything(fresh_seed(run.cfg.run.seed, run.d.rank, run.global_step))
    why = ("the checkpoint holds no per-rank RNG state" if saved is None else
           "its RNG states belong to another world size or global batch")
    log.warning("resumed at step %d: %s, so each rank's generators are seeded afresh from "
                "(run.seed, rank, step): dropout, drop-path and random starts draw other numbers "
                "than the run left alone would have%s", run.global_step, why,
                "; the train loader's own state is not handed back"
                if saved and any(s.get("loader") is not None for s in saved) else "")
    if run.d.is_main:
        run.tracker.set_tags({"resume.rng": f"reseeded at step {run.global_step}"})


def hand_back(run, mine: dict) -> None:
    environment.set_rng_state(mine["rng"], run.d.device)
    if mine["loader"] is not None:
        run.train_loader.load_state_dict(mine["loader"])
    run.window.load_state_dict(mine["window"])


def fresh_seed(seed: int, rank: int, step: int) -> int:
    """A seed for (seed, rank, step) that no other rank and step of the run shares (below 2**63,
    what torch.manual_seed takes), so a reseeded run does not replay its first steps' draws."""
    return (seed + rank + 1_000_003 * (step + 1)) % 2**63
