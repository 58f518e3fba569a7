"""Stops that are final for the job: a data error or a collapse of robust accuracy.

Both are deterministic: torchrun's `--max-restarts` (and Kubernetes' restartPolicy) would resume
from `last.pt` and meet the same damaged file, or train back into the same collapse, once per
restart, and a restart that happened to finish would end FINISHED. So the attempt that stops
leaves a note in the run directory, keyed by the job, and every later attempt of the same job
exits at once with the reason (`check`). A new job goes ahead (the data may have been fixed, the
recipe changed), and so does the same job when `run.resume_stopped_step` names the stop's step:
an explicit "resume past this stop on purpose" that a later stop, at another step, does not
inherit.

The job is torchrun's rendezvous id (TORCHELASTIC_RUN_ID): a Slurm job id, a uuid for each
`--standalone` launch, RDZV_ID for launch/multinode.sh, rdzvId for the PyTorchJob. torchrun
without a rendezvous id says "none" for every launch: there only the restarts of one launch
(TORCHELASTIC_RESTART_COUNT > 0) count as the same job. Without torchrun there is no job.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

NOTE = ".job_stop.json"
EXIT_CODES = {"data error": 2, "collapse": 3}

log = logging.getLogger("dist_free.train")


class JobStopped(Exception):
    """An earlier attempt of this job stopped for good; `exit_code` is what it exited with."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def current_job() -> str | None:
    """This attempt's job, or None when no later attempt can be told apart from a new job."""
    job = os.environ.get("TORCHELASTIC_RUN_ID") or None
    if job == "none" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return None          # the first attempt of a launch without a rendezvous id: a new job
    return job


def record(note: Path, kind: str, message: str, step: int) -> None:
    """Remember why this attempt stopped (kind: "data error" or "collapse"), for the next ones."""
    note.parent.mkdir(parents=True, exist_ok=True)
    tmp = note.with_name(f"{note.name}.{os.getpid()}.tmp")     # ranks may write at once
    tmp.write_text(json.dumps({"job": os.environ.get("TORCHELASTIC_RUN_ID"), "kind": kind,
                               "step": step, "message": message}))
    os.replace(tmp, note)     # a crash mid-write leaves the previous note whole


def check(note: Path, resume_stopped_step: int | None = None) -> None:
    """Raise JobStopped if an earlier attempt of this same job stopped for good."""
    try:
        recorded = json.loads(note.read_text())
    except FileNotFoundError:
        return
    except ValueError:
        recorded = {}
    job = current_job()
    if job is None or recorded.get("job") != job:
        note.unlink(missing_ok=True)      # a new job: the data or the recipe may have changed
        return
    step, kind = recorded.get("step"), recorded.get("kind", "data error")
    if resume_stopped_step is not None and resume_stopped_step == step:
        log.warning("run.resume_stopped_step=%s: resuming past this job's %s stop on purpose "
                    "(%s)", step, kind, recorded.get("message"))
        return
    raise JobStopped(
        f"an earlier attempt of this job (TORCHELASTIC_RUN_ID={job}) stopped on a {kind} at step "
        f"{step}, and restarting would only meet it again: {recorded.get('message')}. To go on, "
        f"start a new job (a new rendezvous id), or resume on purpose with "
        f"run.resume_stopped_step={step}. (Noted in {note}.)", EXIT_CODES.get(kind, 2))
