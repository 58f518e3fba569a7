"""`python -m dist_free.train`, instrumented for tests (run under torchrun as a script).

PROBE_OUT=dir: each rank saves its final weights and perturbation to dir/rank<R>.pt, and what it
resumed from to dir/resumed_rank<R>.pt. PROBE_DIE_AFTER_EPOCH=k: rank 1 of the first torchrun
attempt dies (os._exit) after its k-th epoch checkpoint, as a killed worker would.
"""

import os
import sys
from pathlib import Path

import torch

from dist_free import loop, train

OUT = Path(os.environ["PROBE_OUT"])
_finish, _restore, _save = loop.finish, loop.Run.restore, loop.save


def finish(run):
    torch.save({"model": run.model.state_dict(), "perturbation": run.method.perturbation,
                "epoch": run.epoch}, OUT / f"rank{run.d.rank}.pt")
    _finish(run)


def restore(run, state, path):
    _restore(run, state, path)
    torch.save({"model": run.model.state_dict(), "epoch": run.epoch,
                "global_step": run.global_step}, OUT / f"resumed_rank{run.d.rank}.pt")


def save(run, *args, **kwargs):
    _save(run, *args, **kwargs)
    die_after = os.environ.get("PROBE_DIE_AFTER_EPOCH")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if die_after and first_attempt and run.d.rank == 1 and run.epoch >= int(die_after):
        os._exit(17)


loop.finish, loop.Run.restore, loop.save = finish, restore, save

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
