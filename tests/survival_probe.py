"""tests/train_probe.py with more faults to inject and more to record, for the survival tests.

As train_probe (PROBE_OUT, its hooks), plus:
  PROBE_SIGTERM_AT_STEP=n     rank 0 sends itself SIGTERM once global step n is done (the
                              other ranks get no signal: they must stop with it all the same).
  PROBE_LABELS=1              each rank appends (attempt, epoch, batch, labels) per step to
                              labels_rank<R>.jsonl.
  PROBE_SLOW_WRITE=s          the first checkpoint write touches in_write and takes s seconds
                              more (a slow disk), so a test can signal during it.
  PROBE_DISK_FULL_AT_WRITE=k  the k-th checkpoint write fails as a full disk does (ENOSPC).
  PROBE_RECORD_TRACKER=1      rank 0's tracker is a recorder: every call of the tracker's
                              interface as loop.py uses it is appended to tracker.jsonl.
restored_rank<R>.pt holds each rank's method state right after a resume.
"""

import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from train_probe import Probe

from dist_free import train
from dist_free.tracking import NullTracker
from dist_free.trainer import loop
from dist_free.trainer import run as run_module

OUT = Path(os.environ["PROBE_OUT"])
ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


class Recorder(NullTracker):
    run_id = "recorded"

    def __init__(self):
        self.path = OUT / "tracker.jsonl"

    def note(self, call, **kw):
        with open(self.path, "a") as f:
            f.write(json.dumps({"call": call, "attempt": ATTEMPT, **kw}, default=str) + "\n")

    def set_tags(self, tags):
        self.note("set_tags", tags=dict(tags))

    def log_metrics(self, metrics, step, timestamp_ms=None):
        self.note("log_metrics", metrics=dict(metrics), step=step)

    def close(self, timeout=None, status="FINISHED"):
        self.note("close", status=status)


class SurvivalProbe(Probe):
    writes = 0

    def after_restore(self, run):
        super().after_restore(run)
        torch.save(run.method.rank_state(), OUT / f"restored_rank{run.d.rank}.pt")

    def before_write(self, run):
        super().before_write(run)
        self.writes += 1
        slow = os.environ.get("PROBE_SLOW_WRITE")
        if slow and self.writes == 1:
            (OUT / "in_write").touch()
            time.sleep(float(slow))
        if os.environ.get("PROBE_DISK_FULL_AT_WRITE") == str(self.writes):
            fail_next_fsync()


def fail_next_fsync():
    real = os.fsync

    def full(fd):
        os.fsync = real
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.fsync = full


def instrument(run):
    inner, rank = run.method.train_step, run.d.rank
    stop_at = int(os.environ.get("PROBE_SIGTERM_AT_STEP", "0"))
    labels_file = OUT / f"labels_rank{rank}.jsonl" if os.environ.get("PROBE_LABELS") else None

    def step(images, labels):
        stats = inner(images, labels)
        if labels_file:
            with open(labels_file, "a") as f:
                f.write(json.dumps([ATTEMPT, run.epoch, run.start_batch, labels.tolist()]) + "\n")
        if rank == 0 and run.global_step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats
    run.method.train_step = step


def patch_start():
    start = loop.Run.start.__func__

    def instrumented(cls, cfg, d, hooks=None):
        run = start(cls, cfg, d, hooks)
        instrument(run)
        return run
    loop.Run.start = classmethod(instrumented)
    if os.environ.get("PROBE_RECORD_TRACKER"):
        # build_tracker(enabled, uri, experiment, run_name, run_dir, rank, ...), as Run.start
        # (dist_free/trainer/run.py) calls it
        run_module.build_tracker = lambda *a, **kw: Recorder() if a[5] == 0 else NullTracker()


if __name__ == "__main__":
    patch_start()
    train.exit_at_once(train.main(sys.argv[1:], hooks=SurvivalProbe()))
