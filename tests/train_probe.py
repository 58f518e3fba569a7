"""`python -m dist_free.train`, instrumented for tests (run under torchrun as a script).

PROBE_OUT=dir: each rank saves its final weights and method state, the steps this process ran and
the steps per epoch to dir/rank<R>.pt, and what it resumed from to dir/resumed_rank<R>.pt.
PROBE_DIE_AFTER_EPOCH=k: rank 1 of the first torchrun attempt dies (os._exit) after its k-th
epoch checkpoint, as a killed worker would.
PROBE_SIGTERM_IN_WRITE=1: the process sends itself SIGTERM as its first checkpoint write begins.
PROBE_MARK_AT_STEP=n: a fresh (not resumed) process creates dir/step<n> after its n-th step.
PROBE_MARK_AFTER_SAVE=n: a fresh process creates dir/after_save after its n-th step past its first
checkpoint.
PROBE_SIGTERM_AT_STEP=n: a fresh (not resumed) process sends itself SIGTERM after its n-th step.
PROBE_COLLAPSE_FROM_EPOCH=k: the collapse probes (which still run) read robust accuracy 0.5 before
real epoch k and 0 from it on; the weights at the first 0 go to dir/collapsed_rank<R>.pt.
PROBE_SELECTION=a,b,c: the selection metric of the evaluation after epoch e is the e-th value
(the rest of the report is real).
"""

import os
import signal
import sys
from pathlib import Path

import torch

from dist_free import train
from dist_free.trainer import runtime, validation
from dist_free.trainer.run import Hooks

OUT = Path(os.environ["PROBE_OUT"])


class Probe(Hooks):
    resumed = False
    steps_run = 0
    first_save_at = None

    def after_finish(self, run):
        torch.save({"model": run.model.state_dict(), "epoch": run.epoch,
                    "steps_run": self.steps_run, "steps_per_epoch": len(run.train_loader),
                    **run.method.rank_state()}, OUT / f"rank{run.d.rank}.pt")

    def after_restore(self, run):
        self.resumed = True
        torch.save({"model": run.model.state_dict(), "epoch": run.epoch,
                    "start_batch": run.start_batch, "global_step": run.global_step},
                   OUT / f"resumed_rank{run.d.rank}.pt")

    def before_write(self, run):
        if os.environ.get("PROBE_SIGTERM_IN_WRITE") and not getattr(self, "signalled", False):
            self.signalled = True
            os.kill(os.getpid(), signal.SIGTERM)

    def after_save(self, run):
        if self.first_save_at is None:
            self.first_save_at = self.steps_run
        die_after = os.environ.get("PROBE_DIE_AFTER_EPOCH")
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if die_after and first_attempt and run.d.rank == 1 and run.epoch >= int(die_after):
            os._exit(17)

    def after_step(self):
        self.steps_run += 1
        if self.resumed:
            return
        if os.environ.get("PROBE_MARK_AT_STEP") == str(self.steps_run):
            (OUT / f"step{self.steps_run}").touch()
        after = os.environ.get("PROBE_MARK_AFTER_SAVE")
        if after and self.first_save_at is not None \
                and self.steps_run == self.first_save_at + int(after):
            (OUT / "after_save").touch()
        if os.environ.get("PROBE_SIGTERM_AT_STEP") == str(self.steps_run):
            os.kill(os.getpid(), signal.SIGTERM)


PROBE = Probe()


def counting_method(build):
    def build_method(*args, **kwargs):
        method = build(*args, **kwargs)
        step = method.train_step

        def train_step(*a, **kw):
            stats = step(*a, **kw)
            PROBE.after_step()
            return stats

        method.train_step = train_step
        return method
    return build_method


def collapsing_probe(real, from_epoch: int):
    def probe(run):
        _, clean = real(run)
        if run.epoch < from_epoch:
            return 0.5, clean
        target = OUT / f"collapsed_rank{run.d.rank}.pt"
        if not target.exists():
            torch.save({"model": run.model.state_dict(), "epoch": run.epoch,
                        "global_step": run.global_step}, target)
        return 0.0, clean
    return probe


def scripted_selection(real, values: list[float]):
    def epoch_report(run):
        report = real(run)
        report["selection_metric"] = values[run.epoch - 1]
        return report
    return epoch_report


runtime.build_method = counting_method(runtime.build_method)
if os.environ.get("PROBE_COLLAPSE_FROM_EPOCH"):
    validation.probe = collapsing_probe(validation.probe, int(os.environ["PROBE_COLLAPSE_FROM_EPOCH"]))
if os.environ.get("PROBE_SELECTION"):
    validation.epoch_report = scripted_selection(
        validation.epoch_report, [float(v) for v in os.environ["PROBE_SELECTION"].split(",")])


if __name__ == "__main__":
    train.exit_at_once(train.main(sys.argv[1:], hooks=PROBE))
