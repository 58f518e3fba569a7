"""Per-rank training state on a new world size: the saved buffers re-dealt, row by row.

Free training's warm start is each rank's perturbation buffer, one row per position of that
rank's batch (a row is not tied to an image: it perturbs whatever image the next batch puts at
its position). pipelines/sharding.py deals each global batch round-robin, so row i of rank r on
W ranks is position p = i W + r of the global batch. A run resumed on W' ranks of B' rows gives
rank r' row i' the saved row of position p = i' W' + r' (saved rank p mod W, row p div W). With
the global batch fixed (W B = W' B') the remaining batches are the same images at the same
positions, so each meets the perturbation it would have met on W ranks: the resumed run is a
run of the new world size from that state, and every row is kept. On the same world size each
rank gets its own buffer back. Otherwise the positions past the new global batch are dropped and
those past the saved one zero-filled (a fresh buffer starts at zero too), and `Deal` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_free import checkpoint


@dataclass(frozen=True)
class Deal:
    saved_ranks: int
    ranks: int
    saved_rows: int      # rows in all the saved buffers together
    kept: int            # of them, dealt to some rank
    dropped: int         # of them, dealt to none (the new world holds fewer rows)
    zero_filled: int     # rows of the new buffers with nothing saved for them

    def describe(self) -> str:
        return (f"perturbation buffers re-dealt from {self.saved_ranks} to {self.ranks} ranks: "
                f"{self.kept} of {self.saved_rows} saved rows kept, {self.dropped} dropped, "
                f"{self.zero_filled} zero-filled")


def global_rows(parts: list[torch.Tensor | None], key: str) -> torch.Tensor:
    """The saved ranks' buffers as one tensor in global-batch order: row p is position p, rank
    p mod W's row p div W. A rank that saved none contributes zeros (as a fresh buffer would)."""
    like = next(t for t in parts if t is not None)
    shapes = {tuple(t.shape) for t in parts if t is not None}
    if len(shapes) > 1:
        raise checkpoint.CheckpointError(
            f"the checkpoint's per-rank '{key}' buffers differ in shape ({sorted(shapes)}); every "
            "rank saves one row per position of the same per-rank batch, so it is damaged")
    parts = [torch.zeros_like(like) if t is None else t for t in parts]
    return torch.stack(parts, dim=1).flatten(0, 1)


def redeal(saved: list[dict[str, torch.Tensor]], rank: int, world_size: int,
           rows: int) -> tuple[dict[str, torch.Tensor], Deal | None]:
    """`rank`'s share (`rows` rows per tensor) of the saved ranks' states, and what happened to
    the rows (None when nothing was saved: a stateless method, or a state never allocated)."""
    keys = sorted({k for state in saved for k in state})
    if not keys:
        return {}, None
    mine, deal = {}, None
    for key in keys:
        pool = global_rows([state.get(key) for state in saved], key)
        positions = torch.arange(rows, device=pool.device) * world_size + rank   # rows, globally
        total, wanted = pool.shape[0], rows * world_size
        share = pool.new_zeros((rows, *pool.shape[1:]))        # zero where nothing was saved
        held = positions < total
        share[held] = pool[positions[held]]
        mine[key] = share
        deal = Deal(len(saved), world_size, total, min(total, wanted), max(total - wanted, 0),
                    max(wanted - total, 0))
    return mine, deal
