"""Per-rank training state on a new world size: the saved buffers re-dealt, row by row.

Free training's warm start is each rank's perturbation buffer, one row per position of that
rank's batch (a row is not tied to an image: it perturbs whatever image the next batch puts at
its position). Saved from W ranks of B rows, the buffers are W x B rows of one population; a run
resumed on W' ranks of B' rows concatenates them in rank order and deals rank r the rows
[r B', (r + 1) B'). With the global batch fixed (W B = W' B') every row is kept, and on the same
world size each rank gets exactly its own buffer back; otherwise the surplus is dropped or the
shortfall zero-filled (a fresh buffer starts at zero too), and `Deal` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def redeal(saved: list[dict[str, torch.Tensor]], rank: int, world_size: int,
           rows: int) -> tuple[dict[str, torch.Tensor], Deal | None]:
    """`rank`'s share (`rows` rows per tensor) of the saved ranks' states, and what happened to
    the rows (None when nothing was saved: a stateless method, or a state never allocated)."""
    keys = sorted({k for state in saved for k in state})
    if not keys:
        return {}, None
    mine, deal = {}, None
    for key in keys:
        parts = [state[key] for state in saved if key in state]
        pool = torch.cat(parts) if len(parts) > 1 else parts[0]
        total, wanted = pool.shape[0], rows * world_size
        start = min(rank * rows, total)
        share = pool[start:start + rows]
        if share.shape[0] < rows:            # zero-fill the part nothing was saved for
            pad = pool.new_zeros((rows - share.shape[0], *pool.shape[1:]))
            share = torch.cat([share, pad])
        mine[key] = share.clone()
        deal = Deal(len(saved), world_size, total, min(total, wanted), max(total - wanted, 0),
                    max(wanted - total, 0))
    return mine, deal
