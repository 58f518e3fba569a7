"""dist_free.tracking against a real `mlflow server` on a loopback port: everything arrives over
HTTP, and what is logged while the server is stopped waits in the journal, not in the log call."""

import time

import pytest
from helpers_launch import free_port
from helpers_mlflow import server_processes, stop
from mlflow import MlflowClient

from dist_free.tracking import build_tracker
from dist_free.tracking.journal import WAL_DIR

KEYS = ("train/loss", "train/adv_acc", "lr")


def log_steps(tracker, steps) -> None:
    for step in steps:
        tracker.log_metrics({k: step / 100 for k in KEYS}, step=step)
        time.sleep(0.01)  # a (very) fast training step


def wait_until_sent(client, run_id, key, count, seconds=30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(client.get_metric_history(run_id, key)) >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} values of {key} not on the server after {seconds} s")


@pytest.mark.slow
def test_metrics_logged_during_a_server_outage_wait_in_the_journal_until_it_returns(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as build_tracker sets it,
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # but restored after the test
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    (tmp_path / "config.yaml").write_text("train:\n  replays: 4\n")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"weights")
    with server_processes(tmp_path, port) as start:
        server = start()
        tracker = build_tracker(enabled=True, uri=uri, experiment="outage", run_name="r",
                                run_dir=tmp_path / "run", rank=0, system_metrics=False)
        assert tracker.run_id is not None
        client = MlflowClient(uri)
        tracker.log_params({"train.replays": 4, "model.arch": "mlp"})
        log_steps(tracker, range(0, 20))
        wait_until_sent(client, tracker.run_id, "lr", 20)

        stop(server)
        log_steps(tracker, range(20, 60))
        tracker.log_artifact(tmp_path / "config.yaml")
        tracker.log_artifacts(tmp_path / "export", "model")
        # Every call returned with its item undelivered: none waited for the server.
        assert tracker.backlog()["unsent"] >= 42

        start()  # same port, same store
        log_steps(tracker, range(60, 80))
        tracker.close(timeout=90)

        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        for key in KEYS:
            history = client.get_metric_history(tracker.run_id, key)
            assert sorted(m.step for m in history) == list(range(80)), key
        assert run.data.params["model.arch"] == "mlp"
        assert "config.yaml" in {a.path for a in client.list_artifacts(tracker.run_id)}
        assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == [
            "model/model.safetensors"]
        assert not list((tmp_path / "run" / WAL_DIR).glob("*"))  # all delivered, all removed
