"""README's "What survives what", row by row, through the trainer as users start it.

Rows tested elsewhere: kill -9 and a worker dying under torchrun (test_train.py), a stop during
an evaluation and the tracking outage (test_preemption.py), a resume on another world size
(test_resume_world_size.py), a collapse under restarts (test_job_stop.py). Here: the stop-time
bound in every phase, a full disk during a checkpoint write, a damaged image under torchrun's
restarts.
"""

import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers_launch import ROOT, demo_args, probe_env, run_cmd, stop_within, torchrun, wait_for_file

from dist_free import checkpoint

pytestmark = pytest.mark.slow
SURVIVAL = str(ROOT / "tests" / "survival_probe.py")
# A third of Kubernetes' default 30 s grace period, on a loaded 2-core machine.
GRACE_S = 10
# Held out of training: a 14-step epoch, for the tests that need one to end.
SHORT = "eval.holdout=1000"


def start(args, tmp_path, **env):
    return subprocess.Popen([sys.executable, SURVIVAL, *args], cwd=ROOT,
                            env=probe_env(tmp_path, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop_within_grace(proc, sig) -> str:
    return stop_within(proc, sig, GRACE_S)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_a_training_batch_saves_that_batch_within_the_grace(demo_root, tmp_path,
                                                                           sig):
    # log_every=20: the stop must not wait for the next log point.
    proc = start(demo_args(demo_root, tmp_path, "run.log_every=20", "run.progress=log"), tmp_path,
                 PROBE_LABELS="1")
    try:
        wait_for_file(tmp_path / "labels_rank0.jsonl", proc)      # training has begun
        out = stop_within_grace(proc, sig)
    finally:
        proc.kill()
    assert f"stopped on {sig.name} at epoch 0 batch" in out
    saved = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 0 and 0 < saved["batch_in_epoch"] < 20


def test_a_stop_during_a_checkpoint_write_finishes_it_within_the_grace(demo_root, tmp_path):
    proc = start(demo_args(demo_root, tmp_path, SHORT), tmp_path, PROBE_SLOW_WRITE="3")
    try:
        wait_for_file(tmp_path / "in_write", proc)               # the epoch's write, slowed
        stop_within_grace(proc, signal.SIGTERM)
    finally:
        proc.kill()
    saved = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    assert saved["epoch"] == 1 and saved["eval_pending"]          # whole; its evaluation next
    assert not list((tmp_path / "demo" / "checkpoints").glob(".*tmp"))


def test_a_stop_during_a_long_evaluation_batch_stops_within_the_grace(demo_root, tmp_path):
    # Whole val batches of 64 images under PGD-100: one batch takes longer than the grace on
    # a loaded machine, so the stop cannot wait for the batch to end.
    args = demo_args(demo_root, tmp_path, SHORT, "eval.max_batches=null", "eval.steps=100",
                     "data.val_batch_size=64")
    proc = start(args, tmp_path)
    try:
        wait_for_file(tmp_path / "demo" / "checkpoints" / "last.pt", proc)
        time.sleep(1.0)
        out = stop_within_grace(proc, signal.SIGTERM)
    finally:
        proc.kill()
    assert "stopped on SIGTERM during the epoch 1 evaluation" in out


def test_a_full_disk_during_a_checkpoint_write_keeps_the_old_one_whole(demo_root, tmp_path):
    # Two writes at the end of the one epoch: before its evaluation, and after it (the second
    # meets a full disk).
    proc = run_cmd([sys.executable, SURVIVAL, *demo_args(demo_root, tmp_path, SHORT)], tmp_path,
                   env={"PROBE_DISK_FULL_AT_WRITE": "2"})
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot write checkpoint {last}: No space left on device" in proc.stderr
    assert "GiB free there" in proc.stderr and "Traceback" not in proc.stderr
    saved = checkpoint.load(last)                                 # the first write, whole
    assert saved["epoch"] == 1 and saved["eval_pending"]
    assert not list(last.parent.glob(".*tmp"))


def test_a_damaged_image_under_torchrun_restarts_stops_the_job_at_once(demo_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(demo_root, root)
    victim = sorted((root / "train" / "7").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:200])
    proc = run_cmd(torchrun("--standalone", "--nproc_per_node=1", "--max-restarts=2", SURVIVAL,
                            *demo_args(root, tmp_path / "runs")), tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count(" training: ") == 1, proc.stderr[-4000:]   # the restarts did not train
    assert str(victim) in proc.stderr
    # Whether DALI raised (a job note) or crashed outright (its in-flight note), each restart
    # named the file at start-up.
    restarts = len(re.findall(r"an earlier attempt of this job \(.*?\) stopped on a data error",
                              proc.stderr)) + proc.stderr.count("the previous run died while decoding")
    assert restarts == 2, proc.stderr[-4000:]
    assert not list((tmp_path / "runs").rglob(".*.tmp"))
