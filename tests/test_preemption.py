"""A stop signal in any phase ends the run within a grace period with every finished step saved;
a collapse of robust accuracy stops the run as configured; best.pt is chosen on held-out images."""

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers_launch import PROBE, ROOT, assert_ok, demo_args, free_port, probe_env, run_cmd, wait_for_file
from mlflow import MlflowClient

from dist_free import checkpoint
from dist_free.validation import CollapseGuard, probe_points

pytestmark = pytest.mark.slow
# Well under torchrun's, Kubernetes' and Slurm's 30 s, on a loaded 2-core machine.
GRACE_S = 20


def start(cmd, tmp_path):
    return subprocess.Popen(cmd, cwd=ROOT, env=probe_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop_and_time(proc, sig=signal.SIGTERM) -> str:
    """Send `sig`; assert a clean exit within the grace period; return the output."""
    sent = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 0, out[-3000:]
    assert took < GRACE_S, f"{took:.1f} s to stop"
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_during_evaluation_exits_at_once_and_the_restart_redoes_it(demo_root, tmp_path, sig):
    # A long evaluation (PGD-100 on the whole val set) in short batches (4 images: well under a
    # second each, even on a loaded machine), which the signal cuts between two batches.
    args = demo_args(demo_root, tmp_path, "optim.epochs=8", "eval.every=1", "eval.max_batches=null",
                     "data.val_batch_size=4")
    cmd = [sys.executable, PROBE, *args, "eval.steps=100"]
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    proc = start(cmd, tmp_path)
    try:
        wait_for_file(last, proc)       # written before the evaluation starts
        time.sleep(1.0)
        out = stop_and_time(proc, sig)
    finally:
        proc.kill()
    assert f"stopped on {sig.name} during the epoch 1 evaluation" in out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    saved = checkpoint.load(last)
    assert saved["epoch"] == 1 and saved["eval_pending"] and saved["eval"] is None
    assert not (tmp_path / "demo" / "eval" / "epoch_001.json").exists()
    # The restart evaluates the saved epoch first, then trains the rest.
    assert_ok(run_cmd([sys.executable, PROBE, *args, "eval.max_batches=2"], tmp_path))
    assert json.loads((tmp_path / "demo" / "eval" / "epoch_001.json").read_text())["epoch"] == 1
    final = checkpoint.load(last)
    assert final["epoch"] == 2 and not final["eval_pending"]


def test_a_sigterm_during_a_checkpoint_write_finishes_the_write_then_stops(demo_root, tmp_path):
    cmd = [sys.executable, PROBE, *demo_args(demo_root, tmp_path, "optim.epochs=8")]
    started = time.monotonic()
    proc = run_cmd(cmd, tmp_path, env={"PROBE_SIGTERM_IN_WRITE": "1"})
    assert_ok(proc)
    assert "stopped on SIGTERM at epoch 1 batch" in proc.stderr
    saved = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    # The write the signal interrupted completed (epoch 1), and the stop came within the next
    # log window of epoch 2 (log_every=5), saved mid-epoch.
    assert saved["epoch"] == 1 and 1 <= saved["batch_in_epoch"] <= 5
    assert not list((tmp_path / "demo" / "checkpoints").glob(".*tmp"))
    assert time.monotonic() - started < 120


def test_a_sigterm_during_a_tracking_outage_stops_fast_and_loses_no_metric(demo_root, tmp_path):
    closed_port = free_port()                  # nothing listens there: the server is "down"
    args = [a for a in demo_args(demo_root, tmp_path, "optim.epochs=8", "run.log_every=2")
            if not a.startswith("tracking.")]
    cmd = [sys.executable, PROBE, *args, f"tracking.uri=http://127.0.0.1:{closed_port}",
           "tracking.system_metrics=false"]
    proc = start(cmd, tmp_path)
    try:
        next(line for line in proc.stdout if "epoch 1/2 6/" in line)
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


def test_best_pt_is_selected_on_the_holdout_and_reports_say_so(demo_root, tmp_path):
    proc = run_cmd([sys.executable, PROBE, *demo_args(demo_root, tmp_path, "optim.epochs=8",
                                                       "eval.holdout=96")], tmp_path)
    assert_ok(proc)
    report = json.loads((tmp_path / "demo" / "eval" / "epoch_002.json").read_text())
    assert report["selected_on"] == "holdout" and report["holdout"]["samples"] > 0
    assert report["selection_metric"] == report["holdout"]["pgd"]
    assert report["dtype"] == "fp32" and report["attack"] == "pgd"   # attacks in fp32 by default
    best = checkpoint.load(tmp_path / "demo" / "checkpoints" / "best.pt")
    assert best["eval"]["selected_on"] == "holdout"
    assert best["best_metric"] == max(
        json.loads(p.read_text())["selection_metric"]
        for p in (tmp_path / "demo" / "eval").glob("epoch_*.json"))


@pytest.mark.parametrize("action", ["stop", "rollback"])
def test_a_collapse_of_robust_accuracy_stops_the_run_as_configured(demo_root, tmp_path, action):
    # A hair-trigger guard (any drop below the best probe is a "collapse") makes the mechanism
    # fire within two epochs of eight noisy probes each.
    cmd = [sys.executable, PROBE, *demo_args(
        demo_root, tmp_path, "optim.epochs=8", "eval.probes_per_epoch=8", "eval.probe_batches=1",
        "eval.probe_steps=2", "eval.collapse_armed_at=0", "eval.collapse_drop=0.0001",
        f"eval.on_collapse={action}")]
    proc = run_cmd(cmd, tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "ROBUST ACCURACY COLLAPSED" in proc.stderr
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    if action == "stop":                     # the collapsed state, mid-epoch, kept to inspect
        saved = checkpoint.load(last)
        assert saved["batch_in_epoch"] > 0
        assert 0 < saved["probe_best"] <= 1
    else:                                    # only healthy epoch ends were ever saved
        assert not last.exists() or checkpoint.load(last)["batch_in_epoch"] == 0


def test_the_collapse_guard_arms_at_its_floor_and_fires_on_a_large_drop():
    guard = CollapseGuard(drop=0.5, armed_at=0.2)
    assert [guard.check(a) for a in (0.15, 0.05, 0.3, 0.2, 0.16, 0.14)] == \
        [False, False, False, False, False, True]
    assert guard.best == 0.3


def test_probes_are_spread_over_the_epoch_and_the_last_is_at_its_end():
    assert probe_points(20, 4) == {5, 10, 15, 20}
    assert probe_points(3, 8) == {1, 2, 3}
    assert probe_points(20, 0) == set()
