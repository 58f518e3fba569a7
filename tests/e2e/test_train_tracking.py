"""A demo run as MLflow sees it: params, metrics by step, artifacts, a model that loads back."""

import signal
import subprocess
import sys

import pytest
import torch
from helpers_launch import PROBE, QUICK, ROOT, assert_ok, probe_env, wait_for_file
from mlflow import MlflowClient

from dist_free import checkpoint
from dist_free.engine.models import build_model
from dist_free.publish.load import from_checkpoint

pytestmark = pytest.mark.slow
TRACKED = [q for q in QUICK if not q.startswith("tracking.")] + ["tracking.system_metrics=false"]


def train_cmd(demo_root, run_dir, *extra):
    # Run from run_dir so the default embedded store (./mlflow.db, ./mlartifacts) lands there.
    return [sys.executable, PROBE, "--config", str(ROOT / "configs/demo.yaml"),
            f"data.root={demo_root}", f"run.dir={run_dir}", *TRACKED, *extra]


def client_for(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def the_run(client):
    exp = client.get_experiment_by_name("dist-free")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_a_demo_run_is_fully_recorded_in_the_embedded_store(demo_root, tmp_path):
    proc = subprocess.run(train_cmd(demo_root, tmp_path, "optim.epochs=8"), cwd=tmp_path,
                          env=probe_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    client = client_for(tmp_path)
    run = the_run(client)
    assert run.info.status == "FINISHED"
    assert float(run.data.params["method.eps"]) == pytest.approx(8 / 255)
    assert run.data.params["model.name"] == "small_cnn"
    assert run.data.tags["world_size"] == "1"
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(loss_steps) >= 4 and loss_steps == sorted(set(loss_steps))
    for key in ("train/adv_acc", "train/lr", "train/eps", "perf/images_per_s", "perf/data_wait_frac",
                "eval/top1", "eval/top5", "eval/pgd_top1"):
        assert client.get_metric_history(run.info.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "class_map.json", "eval", "checkpoints"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")} >= {
        "checkpoints/last.pt", "checkpoints/best.pt"}
    # The final model is the exported best.pt: plain tensors and a card, no pickle; downloaded
    # from MLflow it predicts exactly like the checkpoint.
    assert_exported_model_matches(client, run.info.run_id, tmp_path / "demo", tmp_path / "dl")


def assert_exported_model_matches(client, run_id, run_dir, download_to):
    names = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/model.pt", "model/model_card.json",
            "model/MODEL_CARD.md"} <= names, names
    assert not any(n.endswith((".pkl", "MLmodel")) for n in names)
    local = client.download_artifacts(run_id, "model", str(download_to))
    model = from_checkpoint(local)
    state = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    reference = build_model("small_cnn", 10)
    reference.load_state_dict(state["model"])
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(model(x), reference.eval()(x))


def test_a_run_resumed_after_kill_9_continues_its_mlflow_run_without_duplicate_steps(
        demo_root, tmp_path):
    cmd = train_cmd(demo_root, tmp_path, "optim.epochs=16", "run.log_every=2")
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=probe_env(tmp_path, PROBE_MARK_AFTER_SAVE="5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed 5 steps past the epoch-1 checkpoint: steps logged that the restart re-runs.
        wait_for_file(tmp_path / "after_save", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    saved = checkpoint.load(last)
    assert saved["mlflow_run_id"] and saved["epoch"] < 4
    assert_ok(subprocess.run(cmd, cwd=tmp_path, env=probe_env(tmp_path), capture_output=True,
                             text=True, timeout=300))
    client = client_for(tmp_path)
    run = the_run(client)
    assert run.info.run_id == saved["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    final = checkpoint.load(last)
    assert max(steps) == final["global_step"]
    assert set(range(2, final["global_step"], 2)) <= set(steps)   # nothing missing either


def test_a_demo_run_over_http_survives_the_server_going_down_mid_run(demo_root, tmp_path):
    from helpers_launch import free_port
    from helpers_mlflow import server_processes, stop
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = train_cmd(demo_root, tmp_path, "optim.epochs=12", "run.log_every=2",
                    f"tracking.uri={uri}")
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    with server_processes(tmp_path, port) as start:
        server = start()
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=probe_env(tmp_path, PROBE_MARK_AFTER_SAVE="6"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_file(last, proc)
            stop(server)                       # mid-run: epoch 2 of 3 is being trained
            wait_for_file(tmp_path / "after_save", proc)   # 3 log windows into the outage
            start()
            out, _ = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-4000:]
        client = MlflowClient(uri)
        run = the_run(client)
        final = checkpoint.load(last)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        expected = set(range(2, final["global_step"] + 1, 2)) | {final["global_step"]}
        assert sorted(steps) == sorted(expected)          # every step, exactly once
        assert client.get_metric_history(run.info.run_id, "eval/pgd_top1")
        assert_exported_model_matches(client, run.info.run_id, tmp_path / "demo", tmp_path / "dl")
