"""Ranks agree at every training step whether any was asked to stop, without a device sync.

A stop signal reaches each rank on its own, so no rank may leave the step loop on its own flag:
the others would wait in the next collective for ever. The flags are summed by an all-reduce
that each step starts (asynchronous, on the CPU, over gloo: it never waits on the GPU) and the
next step collects: a signal during step i stops every rank after step i + 1, whatever
`run.log_every` is. On a machine whose step takes seconds (a loaded CPU) that is what keeps the
stop within the launchers' grace periods; on a GPU it costs a tiny message per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class StopVote:
    def __init__(self):
        self.work = None
        self.group = None
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")    # CPU flags, never NCCL
        # Two flags used in turn: the one in flight is never overwritten, none is allocated.
        self.flags, self.turn = (torch.zeros(1), torch.zeros(1)), 0

    def poll(self, requested: bool) -> bool:
        """Post this step's flag; True when some rank had asked to stop by the previous step."""
        if not self.distributed:
            return requested
        agreed = self.collect()
        flag = self.flags[self.turn]
        self.turn ^= 1
        flag.fill_(1.0 if requested else 0.0)
        self.work = dist.all_reduce(flag, group=self.group, async_op=True)
        return agreed

    def collect(self) -> bool:
        """Wait for the vote in flight (all ranks must, before leaving the step loop together)."""
        if self.work is None:
            return False
        self.work.wait()
        self.work = None
        return self.flags[self.turn ^ 1].item() > 0
