"""A stop signal in any phase ends the run within a grace period with every finished step saved."""

import json
import signal
import subprocess
import sys

import pytest
from helpers_launch import (
    PROBE,
    ROOT,
    assert_ok,
    demo_args,
    free_port,
    probe_env,
    run_cmd,
    stop_within,
    wait_for_file,
)
from mlflow import MlflowClient

from dist_free import checkpoint

pytestmark = pytest.mark.slow
# Well under torchrun's, Kubernetes' and Slurm's 30 s, on a loaded 2-core machine.
GRACE_S = 20


def start(cmd, tmp_path, env=None):
    return subprocess.Popen(cmd, cwd=ROOT, env=probe_env(tmp_path, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop_and_time(proc, sig=signal.SIGTERM) -> str:
    return stop_within(proc, sig, GRACE_S)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_evaluation_cut_short_by_a_stop_is_redone_by_the_restart(demo_root, tmp_path, sig):
    # A long evaluation (PGD-100 on the whole val set) in short batches (4 images: well under a
    # second each, even on a loaded machine), which the signal cuts between two batches.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = demo_args(demo_root, tmp_path, "optim.epochs=8", "eval.every=1", "eval.max_batches=null",
                     "data.val_batch_size=4", "tracking.enabled=true", f"tracking.uri={store}",
                     "tracking.system_metrics=false")
    cmd = [sys.executable, PROBE, *args, "eval.steps=100"]
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    proc = start(cmd, tmp_path)
    try:
        wait_for_file(last, proc)       # written before the evaluation starts
        # The val loader's in-flight note exists while val batches are being decoded.
        wait_for_file(tmp_path / "demo" / ".decoding_val_rank0.json", proc)
        out = stop_and_time(proc, sig)
    finally:
        proc.kill()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    saved = checkpoint.load(last)
    assert saved["epoch"] == 1 and saved["eval_pending"] and saved["eval"] is None
    assert not (tmp_path / "demo" / "eval" / "epoch_001.json").exists()
    # The restart evaluates the saved epoch first, then trains the rest.
    assert_ok(run_cmd([sys.executable, PROBE, *args, "eval.max_batches=2"], tmp_path))
    assert json.loads((tmp_path / "demo" / "eval" / "epoch_001.json").read_text())["epoch"] == 1
    final = checkpoint.load(last)
    assert final["epoch"] == 2 and not final["eval_pending"]
    # The redone evaluation reached MLflow, once: one value per evaluated epoch for every key.
    client = MlflowClient(store)
    (run,) = client.search_runs(client.get_experiment_by_name("dist-free").experiment_id)
    for key in ("eval/epoch", "eval/top1", "eval/pgd_top1", "holdout/pgd_top1"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [saved["global_step"], final["global_step"]], key
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "eval/epoch"),
                                    key=lambda m: m.step)] == [1, 2]
    train_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(train_steps) == len(set(train_steps))


def test_a_sigterm_during_a_checkpoint_write_finishes_the_write_then_stops(demo_root, tmp_path):
    cmd = [sys.executable, PROBE, *demo_args(demo_root, tmp_path, "optim.epochs=8")]
    proc = run_cmd(cmd, tmp_path, env={"PROBE_SIGTERM_IN_WRITE": "1"})
    assert_ok(proc)
    saved = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    # The write the signal interrupted completed (epoch 1), and the stop came within the next
    # log window of epoch 2 (log_every=5), saved mid-epoch.
    assert saved["epoch"] == 1 and 1 <= saved["batch_in_epoch"] <= 5
    assert not list((tmp_path / "demo" / "checkpoints").glob(".*tmp"))
    assert not (tmp_path / "rank0.pt").exists()      # it stopped: the probe writes it at the end


def test_a_sigterm_during_a_tracking_outage_stops_within_the_grace_losing_no_metric(demo_root, tmp_path):
    closed_port = free_port()                  # nothing listens there: the server is "down"
    args = [a for a in demo_args(demo_root, tmp_path, "optim.epochs=8", "run.log_every=2")
            if not a.startswith("tracking.")]
    cmd = [sys.executable, PROBE, *args, f"tracking.uri=http://127.0.0.1:{closed_port}",
           "tracking.system_metrics=false"]
    proc = start(cmd, tmp_path, env={"PROBE_MARK_AT_STEP": "6"})
    try:
        wait_for_file(tmp_path / "step6", proc)
        stop_and_time(proc)
    finally:
        proc.kill()
    saved = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    # Everything logged is in the run's write-ahead log; replay delivers each step once.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    replay = run_cmd([sys.executable, "-m", "dist_free.tracking", "replay",
                      str(tmp_path / "demo"), "--uri", store], tmp_path)
    assert replay.returncode == 0, replay.stderr
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("dist-free").experiment_id])
    assert run.info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    # Every log point, and the stop's own step (its window closes early: no metric is lost).
    last = saved["global_step"]
    assert sorted(steps) == sorted(set(range(2, last + 1, 2)) | {last})
