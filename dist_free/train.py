"""The dist-free trainer: free adversarial training (or a baseline) under DDP, logged to MLflow.

One 4-GPU workstation:
    torchrun --nproc_per_node=4 -m dist_free.train \
        --config configs/imagenet/free_m4_eps4.yaml data.root=/data/imagenet
Several nodes (run on each; c10d rendezvous on the first node's host:port):
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=node0:29400 \
        --rdzv_id=job42 --max_restarts=3 -m dist_free.train --config ... data.root=...
Any machine, no GPU, on the embedded digits demo (`python -m dist_free.data demo demo_data` first):
    torchrun --nproc_per_node=2 -m dist_free.train --config configs/demo.yaml

A run writes to <run.dir>/<run.name>/ (resolved config, class map, eval reports, checkpoints) and
resumes from its last checkpoint when started again with the same run directory.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from pathlib import Path
from typing import NoReturn

import pipelines
from dist_free import checkpoint, distributed
from dist_free.config import ConfigError, load_config
from dist_free.tracking.uri import TrackingConfigError, check_uri
from dist_free.trainer import augmentation, runtime
from dist_free.trainer.loop import fit
from dist_free.trainer.run import Hooks, Run
from dist_free.trainer.stops import job_stop

log = logging.getLogger("dist_free.train")
# Problems with the user's data, checkpoint or config: a message, not a traceback.
USER_ERRORS = (pipelines.DataError, checkpoint.CheckpointError, ConfigError)
# A stop signal is a clean exit (everything done is saved); a collapse of robust accuracy is not.
EXIT_CODES = {"FINISHED": 0, "KILLED": 0, "FAILED": 3}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dist_free.train",
        description="Free adversarial training under torchrun (see the module docstring).")
    parser.add_argument("--config", type=Path, help="YAML preset, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. data.root=/data/imagenet method.eps=2/255")
    return parser.parse_args(argv)


def setup_logging(is_main: bool) -> None:
    # Only rank 0 speaks unless something goes wrong: warnings from every rank still show.
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None, hooks: Hooks | None = None) -> int:
    # A native crash (e.g. in a decoder) still prints where Python was; the next start then
    # names the file from the decoder's note (pipelines/crash_notes.py).
    faulthandler.enable()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)   # before any process-group work
        runtime.check_model(cfg)                          # a timm name/argument timm lacks
        augmentation.check_policy(cfg)                    # data.auto_augment's string
        if cfg.tracking.enabled:     # a password must not reach config.yaml, params or logs
            check_uri(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except TrackingConfigError as e:
        print(f"config error: tracking.uri: {e}", file=sys.stderr)
        return 2
    d = distributed.init(cfg.run.device)
    setup_logging(d.is_main)
    note = Path(cfg.run.dir) / cfg.run.name / job_stop.NOTE
    try:
        try:
            job_stop.check(note, cfg.run.resume_stopped_step)
            run = Run.start(cfg, d, hooks)
        except job_stop.JobStopped as e:      # before any training: say so and exit as it did
            if d.is_main:
                print(f"error (JobStopped): {e}", file=sys.stderr)
            return e.exit_code
        except USER_ERRORS as e:
            # Every rank checks the same data and checkpoint: one message, from rank 0.
            if d.is_main:
                print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
            return 2
        try:
            status = fit(run)
        except pipelines.DataError as e:
            # Met mid-epoch (a corrupt file) by this rank alone: say which rank, and note it so
            # that torchrun's restarts of this job stop at once instead of meeting it again.
            print(f"error (DataError) on rank {d.rank}: {e}", file=sys.stderr)
            job_stop.record(note, "data error", str(e), run.global_step)
            return 2
        except checkpoint.CheckpointError as e:     # e.g. the disk filled during a save
            print(f"error (CheckpointError) on rank {d.rank}: {e}", file=sys.stderr)
            return 2
        if status == "FAILED":     # a collapse: final for this job too (every rank notes it,
            # in case torchrun ends the others as soon as one exits)
            job_stop.record(note, "collapse", f"robust accuracy collapsed (eval.on_collapse="
                            f"{cfg.eval.on_collapse}; see the log and the run's collapse tag)",
                            run.global_step)
        return EXIT_CODES[status]
    finally:
        distributed.shutdown()


def exit_at_once(code: int) -> NoReturn:
    """Leave without the interpreter's teardown once `main` has returned: everything is saved,
    closed and flushed by then, and tearing down torch, DALI and MLflow took 6-10 s on a loaded
    2-core machine, a third of a grace period after SIGTERM."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> NoReturn:
    exit_at_once(main())


if __name__ == "__main__":
    cli()
