"""`python -m dist_free.train`, instrumented for tests (run under torchrun as a script).

PROBE_OUT=dir: each rank saves its final weights and method state to dir/rank<R>.pt, and what it
resumed from to dir/resumed_rank<R>.pt. PROBE_DIE_AFTER_EPOCH=k: rank 1 of the first torchrun
attempt dies (os._exit) after its k-th epoch checkpoint, as a killed worker would.
PROBE_SIGTERM_IN_WRITE=1: the process sends itself SIGTERM as its first checkpoint write begins.
"""

import os
import signal
import sys
from pathlib import Path

import torch

from dist_free import train
from dist_free.loop import Hooks

OUT = Path(os.environ["PROBE_OUT"])


class Probe(Hooks):
    def after_finish(self, run):
        torch.save({"model": run.model.state_dict(), "epoch": run.epoch,
                    **run.method.rank_state()}, OUT / f"rank{run.d.rank}.pt")

    def after_restore(self, run):
        torch.save({"model": run.model.state_dict(), "epoch": run.epoch,
                    "global_step": run.global_step}, OUT / f"resumed_rank{run.d.rank}.pt")

    def before_write(self, run):
        if os.environ.get("PROBE_SIGTERM_IN_WRITE") and not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)

    def after_save(self, run):
        die_after = os.environ.get("PROBE_DIE_AFTER_EPOCH")
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if die_after and first_attempt and run.d.rank == 1 and run.epoch >= int(die_after):
            os._exit(17)


if __name__ == "__main__":
    train.exit_at_once(train.main(sys.argv[1:], hooks=Probe()))
