"""The log window: a rank's sums over the steps between two log points, kept on the device until
the log point, where one all-reduce (and so one sync) turns them into the logged metrics.

A stop between two log points closes the window early, so its figures are logged at the stop's
step, but keeps the sums: they are saved with the rank's other local state
(resume/rank_local.py), and a run resumed on the same ranks adds them back. Its next regular log
point then averages the loss and accuracy over the same steps as the run left alone would have,
with the same value; the throughput figures count only this session's images and time.
"""

from __future__ import annotations

import time

import torch

from dist_free import distributed, environment


class Window:
    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(2, device=device)    # loss * n, correct
        self.carried = 0                             # images summed before a restart
        self.restart_clock()

    def restart_clock(self) -> None:
        """This session's count and time (an epoch's start, a log point)."""
        self.count, self.started, self.waited = 0, time.perf_counter(), 0.0

    def reset(self) -> None:
        self.sums.zero_()
        self.carried = 0
        self.restart_clock()

    def wait_for(self, batches):
        t = time.perf_counter()
        batch = next(batches)
        self.waited += time.perf_counter() - t
        return batch

    def add(self, stats, n: int) -> None:
        s = stats.tensors
        self.sums += torch.stack([s["loss"] * n, s["acc"] * n])
        self.count += n

    def close(self, stop_requested: bool, passes: int, keep: bool = False) -> tuple[dict, bool]:
        """The window's metrics and whether any rank asked to stop. passes: forward/backward
        passes per minibatch (free's replays, PGD-k's k + 1). `keep`: a close for a stop alone,
        not a log point; the sums stay, for the checkpoint."""
        host = torch.tensor([float(self.carried + self.count), float(self.count),
                             float(stop_requested)], device=self.device)
        totals = distributed.all_reduce_sum(torch.cat([self.sums, host])).tolist()
        loss, correct, n, fresh, stops = totals
        elapsed = time.perf_counter() - self.started
        metrics = {"train/loss": loss / n, "train/adv_acc": correct / n,
                   "perf/images_per_s": fresh / elapsed,
                   "perf/passes_per_s": fresh * passes / elapsed,
                   "perf/data_wait_frac": min(self.waited / elapsed, 1.0),
                   "perf/peak_mem_gb": environment.peak_memory_bytes(self.device) / 2**30}
        if not keep:
            self.reset()
        return metrics, stops > 0

    def state_dict(self) -> dict:
        """The open window's sums (this rank's, before any all-reduce) and its images."""
        return {"sums": self.sums.to("cpu", copy=True), "images": self.carried + self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums.copy_(state["sums"])
        self.carried = int(state["images"])
