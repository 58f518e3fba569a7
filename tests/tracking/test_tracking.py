"""dist_free.tracking against MLflow's embedded store (SQLite in a temp dir): what the trainer
logs is what MLflow's own client reads back, and an unreachable server never costs training."""

import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from helpers_mlflow import finishes_within, held_server
from mlflow import MlflowClient

from dist_free.config import flatten
from dist_free.tracking import NullTracker, Tracker, build_tracker, environment_tags, log_to_run
from dist_free.tracking.__main__ import main
from dist_free.tracking.journal import WAL_DIR
from dist_free.tracking.staging import STAGING_DIR

CONFIG = {"model": {"arch": "resnet50", "eps": 4 / 255},
          "train": {"replays": 4, "lr": {"peak": 0.1, "milestones": [30, 60]}},
          "notes": "x" * 7000}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module: creating its tables takes seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")


def make_tracker(store, run_dir, experiment, **kw) -> Tracker:
    uri, artifacts = store
    kw.setdefault("system_metrics", False)
    return build_tracker(enabled=True, uri=uri, experiment=experiment, run_name="test",
                         run_dir=run_dir, rank=0, artifact_location=artifacts, **kw)


def export_dir(root: Path) -> Path:
    """A stand-in for the trainer's model export: weights and a model card, no pickle."""
    folder = root / "export"
    (folder / "extra").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\x00weights")
    (folder / "README.md").write_text("# model card\n")
    (folder / "extra" / "class_map.json").write_text("{}")
    return folder


def wal_logs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / WAL_DIR).glob("*.jsonl"))


def wal_text(run_dir: Path) -> str:
    return "".join(p.read_text() for p in wal_logs(run_dir))


def steps_of(client, run_id, key) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flatten_joins_nested_keys_with_dots():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "f"}) == {
        "a.b": 1, "a.c.d": [1, 2], "e": "f"}


def test_ranks_other_than_0_or_disabled_tracking_get_a_null_tracker(tmp_path, store):
    uri = f"sqlite:///{tmp_path / 'never.db'}"
    for rank, enabled in ((1, True), (0, False)):
        tracker = build_tracker(enabled=enabled, uri=uri, experiment="e", run_name="r",
                                run_dir=tmp_path, rank=rank)
        assert type(tracker) is NullTracker and tracker.run_id is None
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.close()
    assert not (tmp_path / "never.db").exists()


def test_environment_tags_describe_the_runs_environment():
    tags = environment_tags(world_size=4)
    assert tags["world_size"] == "4"
    assert tags["version.torch"] == torch.__version__
    for key in ("mlflow.source.git.commit", "version.cuda", "version.dali", "devices"):
        assert tags[key]
    assert "pytest" in tags["launch.command"]  # the command that started this process


def test_without_a_uri_runs_go_to_the_embedded_store_in_the_working_dir(
        tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracker = build_tracker(enabled=True, uri=None, experiment="default", run_name="r",
                            run_dir=tmp_path / "run", rank=0, system_metrics=False)
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.close()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.data.metrics == {"loss": 1.0}
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlartifacts"))


def test_mlflow_tracking_uri_env_is_used_when_no_uri_is_given(tmp_path, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])
    tracker = build_tracker(enabled=True, uri=None, experiment="from-env", run_name="r",
                            run_dir=tmp_path, rank=0, system_metrics=False,
                            artifact_location=store[1])
    tracker.close()
    assert MlflowClient(store[0]).get_run(tracker.run_id).info.status == "FINISHED"


def test_the_run_holds_everything_logged(tmp_path, store):
    (tmp_path / "config.yaml").write_text("model:\n  arch: resnet50\n")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "best.pt").write_bytes(b"weights")
    exported = export_dir(tmp_path)
    tracker = make_tracker(store, tmp_path, "full")
    assert tracker.run_id is not None  # known before the first checkpoint
    tracker.log_params(flatten(CONFIG))
    tracker.set_tags(environment_tags(world_size=1))
    for step in range(25):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.log_artifact(tmp_path / "ckpt" / "best.pt", artifact_path="checkpoints")
    tracker.log_artifacts(exported, "model")
    tracker.close()

    client = MlflowClient(store[0])
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "resnet50"
    assert run.data.params["train.lr.milestones"] == "[30, 60]"
    assert len(run.data.params["notes"]) <= 6000  # MLflow's limit; longer would fail the batch
    assert run.data.tags["world_size"] == "1"
    assert steps_of(client, tracker.run_id, "train/loss") == list(range(25))
    assert client.get_metric_history(tracker.run_id, "train/loss")[3].value == pytest.approx(0.25)
    top = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.yaml", "checkpoints"} <= top
    assert [a.path for a in client.list_artifacts(tracker.run_id, "checkpoints")] == [
        "checkpoints/best.pt"]
    assert {a.path for a in client.list_artifacts(tracker.run_id, "model")} == {
        "model/model.safetensors", "model/README.md", "model/extra"}
    local = client.download_artifacts(tracker.run_id, "model", str(tmp_path / "down"))
    assert (Path(local) / "model.safetensors").read_bytes() == b"\x00weights"
    assert (Path(local) / "extra" / "class_map.json").read_text() == "{}"
    assert not wal_logs(tmp_path)  # everything arrived: no write-ahead log left behind
    assert not any((tmp_path / STAGING_DIR).rglob("*.*"))  # staged links removed once sent


def test_resumed_run_continues_the_same_run_without_duplicate_steps(tmp_path, store):
    first = make_tracker(store, tmp_path, "resume")
    first.log_params({"epochs": 2, "lr": 0.1})
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close()

    second = make_tracker(store, tmp_path, "resume", run_id=first.run_id)
    assert second.run_id == first.run_id
    second.log_params({"epochs": 4, "lr": 0.1})  # more epochs on resume: must not fail the run
    for step in range(5, 10):
        second.log_metrics({"loss": float(step)}, step=step)
    second.close()

    client = MlflowClient(store[0])
    run = client.get_run(first.run_id)
    assert steps_of(client, first.run_id, "loss") == list(range(10))
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2"
    assert run.data.tags["param_changed_on_resume.epochs"] == "4"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_an_exception_inside_the_with_block_marks_the_run_failed(tmp_path, store):
    with pytest.raises(RuntimeError):
        with make_tracker(store, tmp_path, "failed") as tracker:
            raise RuntimeError("loss is NaN")
    assert MlflowClient(store[0]).get_run(tracker.run_id).info.status == "FAILED"


@pytest.mark.parametrize("status", ["FAILED", "KILLED"])
def test_close_with_failed_or_killed_is_the_runs_end_status(tmp_path, store, status):
    tracker = make_tracker(store, tmp_path, f"status-{status}")
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.close(status=status)
    run = MlflowClient(store[0]).get_run(tracker.run_id)
    assert run.info.status == status and run.info.end_time is not None


def test_a_rejected_item_stays_in_the_journal_without_holding_back_the_rest(tmp_path, store, caplog):
    tracker = make_tracker(store, tmp_path, "rejected")
    tracker.log_artifact(tmp_path / "deleted.pt")
    tracker.log_metrics({"loss": 0.5}, step=7)
    with caplog.at_level(logging.WARNING, logger="dist_free.tracking"):
        tracker.close()
    assert steps_of(MlflowClient(store[0]), tracker.run_id, "loss") == [7]
    (log,) = wal_logs(tmp_path)
    assert "deleted.pt" in log.read_text()
    assert len(json.loads(log.with_suffix(".ack").read_text())["kept"]) == 1  # the artifact
    assert str(log) in caplog.text  # the warning says where the kept item is
    assert main(["replay", str(tmp_path)]) == 1  # still rejected: it stays, and says so
    header, kept = log.read_text().splitlines()  # rewritten to what is left, nothing else
    assert '"kind": "run"' in header and "deleted.pt" in kept
    assert steps_of(MlflowClient(store[0]), tracker.run_id, "loss") == [7]  # not sent twice


def test_artifact_is_uploaded_as_it_was_when_logged(tmp_path, store):
    last = tmp_path / "last.pt"
    last.write_bytes(b"epoch 1")
    tracker = make_tracker(store, tmp_path, "frozen")
    tracker.log_artifact(last)
    replacement = tmp_path / "last.pt.tmp"
    replacement.write_bytes(b"epoch 2")
    os.replace(replacement, last)  # how checkpoints are saved: write, then rename
    tracker.close()
    local = MlflowClient(store[0]).download_artifacts(tracker.run_id, "last.pt", str(tmp_path))
    assert Path(local).read_bytes() == b"epoch 1"
    assert not any((tmp_path / STAGING_DIR).rglob("*.pt"))  # links removed once sent


def test_system_metrics_come_from_mlflows_collectors(tmp_path, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tracker = make_tracker(store, tmp_path, "system", system_metrics=True)
    client = MlflowClient(store[0])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        keys = client.get_run(tracker.run_id).data.metrics
        if "system/cpu_utilization_percentage" in keys:
            break
        time.sleep(0.2)
    tracker.close()
    metrics = client.get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_items_logged_while_the_server_is_unreachable_replay_later(tmp_path, store, caplog,
                                                                   monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as build_tracker sets it,
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # but restored after the test
    uri = f"http://127.0.0.1:{unused_port()}"
    started = time.monotonic()
    tracker = build_tracker(enabled=True, uri=uri, experiment="offline", run_name="offline",
                            run_dir=tmp_path, rank=0, system_metrics=False,
                            artifact_location=store[1], start_timeout=60)
    assert time.monotonic() - started < 30  # a refused connection ends the wait at once
    assert tracker.run_id is None
    tracker.log_params({"lr": 0.1})
    for step in range(50):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 50}, step=step)
    tracker.log_artifacts(export_dir(tmp_path), "model")
    with caplog.at_level(logging.WARNING, logger="dist_free.tracking"):
        tracker.close(timeout=2)
    (log,) = wal_logs(tmp_path)
    warning = " ".join(r.getMessage() for r in caplog.records)  # tells where, and how to send
    assert str(log) in warning and f"python -m dist_free.tracking replay {tmp_path}" in warning

    assert main(["replay", str(tmp_path), "--uri", store[0]]) == 0
    assert not log.exists()
    client = MlflowClient(store[0])
    (run,) = client.search_runs([client.get_experiment_by_name("offline").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    assert steps_of(client, run.info.run_id, "loss") == list(range(50))
    assert "model/model.safetensors" in {
        a.path for a in client.list_artifacts(run.info.run_id, "model")}


HELD_S = 120  # how long a held request lasts before the client gives up: far past any bound


def test_a_server_that_never_answers_holds_up_no_log_call(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HELD_S))
    with held_server() as (uri, held):
        built = []
        assert finishes_within(HELD_S / 4, lambda: built.append(build_tracker(
            enabled=True, uri=uri, experiment="silent", run_name="r", run_dir=tmp_path, rank=0,
            system_metrics=False, start_timeout=1.0))), "the start waited for the server"
        tracker = built[0]
        assert held.wait(HELD_S / 4)  # the uploader is inside a request the server holds
        assert finishes_within(HELD_S / 4, lambda: [
            tracker.log_metrics({"loss": 1.0}, step=step) for step in range(100)]), \
            "a log call waited for the server"
        assert tracker.backlog()["unsent"] == 100
        assert wal_text(tmp_path).count('"loss"') == 100
        tracker.close(timeout=0.1)


def test_close_gives_a_server_that_never_answers_only_its_timeout(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HELD_S))
    with held_server() as (uri, held):
        tracker = build_tracker(enabled=True, uri=uri, experiment="silent", run_name="r",
                                run_dir=tmp_path, rank=0, system_metrics=False,
                                start_timeout=1.0)
        tracker.log_metrics({"loss": 1.0}, step=0)
        assert held.wait(HELD_S / 4)
        assert finishes_within(HELD_S / 4, lambda: tracker.close(timeout=1.0)), \
            "close waited for the server"
    assert wal_text(tmp_path).count('"loss"') == 1  # kept for the next start


def test_replay_without_a_write_ahead_log_names_the_folder(tmp_path, capsys):
    assert main(["replay", str(tmp_path)]) == 2
    assert f"no MLflow write-ahead log in {tmp_path / WAL_DIR}" in capsys.readouterr().err


def test_log_to_run_records_metrics_tags_and_a_file_on_an_existing_run(tmp_path, store):
    uri, artifacts = store
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("direct", artifacts)).info.run_id
    report = tmp_path / "eval.json"
    report.write_text("{}")
    log_to_run(uri, run_id, {"final/top1": 0.5}, {"final.dtype": "fp32"}, report, "final_eval")
    run = client.get_run(run_id)
    assert run.data.metrics == {"final/top1": 0.5} and run.data.tags["final.dtype"] == "fp32"
    assert steps_of(client, run_id, "final/top1") == [0]
    assert [a.path for a in client.list_artifacts(run_id, "final_eval")] == ["final_eval/eval.json"]


def test_log_to_run_gives_up_on_a_dead_server_in_seconds(tmp_path, monkeypatch):
    """MLflow's own retries would hold the command for minutes: they are bounded first."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    failed = []

    def log():
        try:
            log_to_run("http://127.0.0.1:9", "0" * 32, {"m": 1.0}, {}, tmp_path, "final_eval")
        except Exception as e:  # noqa: BLE001 - which error MLflow raises is its own business
            failed.append(e)
    assert finishes_within(30, log) and failed
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
