"""dist_free.tracking when things go wrong: kill -9 during an outage, a WAL torn or tampered with,
a long outage against the memory and disk bounds, a restart in the same run directory, a stop
request with a dead server, credentials in the URI. The store is MLflow's embedded SQLite one."""

import contextlib
import io
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers_mlflow import finishes_within, held_server
from mlflow import MlflowClient

import dist_free.tracking.tracker as tracker_module
import dist_free.tracking.uploader as uploader_module
from dist_free.tracking import NullTracker, Tracker, TrackingConfigError, build_tracker, check_uri
from dist_free.tracking.__main__ import main
from dist_free.tracking.journal import BUDGET_ENV, WAL_DIR
from dist_free.tracking.staging import STAGING_DIR

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module: creating its tables takes seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts")


@pytest.fixture
def dead_uri(monkeypatch):
    """A tracking server that is down: nothing listens on the port."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tracker_for(uri, run_dir, experiment, artifacts=None, **kw) -> Tracker:
    kw.setdefault("system_metrics", False)
    return build_tracker(enabled=True, uri=uri, experiment=experiment, run_name="r",
                         run_dir=run_dir, rank=0, artifact_location=artifacts, **kw)


def wal_logs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / WAL_DIR).glob("*.jsonl"))


def wal_items(run_dir: Path) -> list[dict]:
    return [json.loads(line) for log in wal_logs(run_dir)
            for line in log.read_text().splitlines()[1:]]


def logged_steps(items: list[dict], key: str = "loss") -> list[int]:
    return [row[3] for item in items if item["kind"] == "metrics"
            for row in item["metrics"] if row[0] == key]


def the_run(client, experiment):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def history(client, run_id, key="loss") -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


# ---------------------------------------------------------------- kill -9

KILLED_CHILD = """
import sys, time
from pathlib import Path
from dist_free.tracking import build_tracker
uri, run_dir, artifacts = sys.argv[1:4]
tracker = build_tracker(enabled=True, uri=uri, experiment="killed", run_name="k",
                        run_dir=Path(run_dir), rank=0, system_metrics=False,
                        artifact_location=artifacts)
step = 0
while True:
    tracker.log_metrics({"loss": step / 2}, step=step)
    print(step, flush=True)
    step += 1
    time.sleep(0.005)
"""


def read_lines(proc, out: list) -> threading.Thread:
    def read():
        for line in proc.stdout:
            out.append(int(line))
    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_kill_9_during_an_outage_delivers_each_logged_step_exactly_once(
        tmp_path, store, dead_uri, capsys):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, dead_uri, str(run_dir), store[1]],
                            stdout=subprocess.PIPE, text=True, env=child_env())
    printed: list = []
    reader = read_lines(proc, printed)
    deadline = time.monotonic() + 60
    while len(printed) < 400 and proc.poll() is None:
        assert time.monotonic() < deadline, "the child logs too slowly"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    reader.join(10)  # what the pipe holds: every step printed, so logged, before the kill
    assert printed == list(range(len(printed)))

    assert main(["replay", str(run_dir), "--uri", store[0]]) == 0
    client = MlflowClient(store[0])
    run = the_run(client, "killed")
    steps = history(client, run.info.run_id)
    assert len(steps) == len(set(steps)), "a step arrived twice"
    # Nothing whose log call returned is lost; the step logged as the kill came may be there.
    assert set(printed) <= set(steps) <= set(range(len(printed) + 1))
    assert all(m.value == m.step / 2 for m in client.get_metric_history(run.info.run_id, "loss"))
    assert not wal_logs(run_dir)
    assert main(["replay", str(run_dir), "--uri", store[0]]) == 2  # nothing left to send twice
    capsys.readouterr()


GATED_CHILD = """
import json, sys, time
from pathlib import Path
import dist_free.tracking.tracker as T
import dist_free.tracking.uploader as U
from dist_free.tracking import build_tracker

uri, run_dir, artifacts = sys.argv[1:4]
gate = {"allow": 0, "calls": 0, "sent": []}
real_send = U.send_batch

def gated(client, target, items, run_dir):
    gate["calls"] += 1
    if gate["allow"] <= 0:
        raise ConnectionError("gate closed: the server is down")
    real_send(client, target, items, run_dir)
    gate["allow"] -= 1
    gate["sent"] += [r[3] for i in items if i["kind"] == "metrics" for r in i["metrics"]]

U.send_batch, T.MAX_BACKOFF_S = gated, 0.2
tracker = build_tracker(enabled=True, uri=uri, experiment="restart", run_name="g",
                        run_dir=Path(run_dir), rank=0, system_metrics=False,
                        artifact_location=artifacts, memory_items=20)
for step in range(200):
    tracker.log_metrics({"loss": float(step)}, step=step)
    if step % 10 == 9:
        tracker.set_tags({"last_step": step})  # breaks the backlog into several batches
calls = gate["calls"]
gate["allow"] = 5
while gate["calls"] < calls + 6:  # five delivered and acknowledged, the sixth refused
    time.sleep(0.02)
print(json.dumps({"run_id": tracker.run_id, "sent": gate["sent"]}), flush=True)
time.sleep(600)
"""


def counting(monkeypatch, module, sent: list) -> None:
    real = module.send_batch

    def send_batch(client, target, items, run_dir):
        real(client, target, items, run_dir)
        sent.extend(row[3] for i in items if i["kind"] == "metrics" for row in i["metrics"])
    monkeypatch.setattr(module, "send_batch", send_batch)


def test_the_next_start_sends_exactly_what_a_killed_session_left_undelivered(
        tmp_path, store, monkeypatch):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", GATED_CHILD, store[0], str(run_dir), store[1]],
                            stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "the child never reported its partial delivery"
        first = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert 0 < len(first["sent"]) < 200  # killed mid-way through the backlog

    sent: list[int] = []
    counting(monkeypatch, uploader_module, sent)  # the live uploader and replay alike
    tracker = tracker_for(store[0], run_dir, "restart", store[1], run_id=first["run_id"])
    assert tracker.logged_through("loss") == 199  # in the old WAL: a resume must not log it again
    for step in range(200, 210):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()
    assert not set(sent) & set(first["sent"]), "the next start resent acknowledged items"
    assert sorted(sent + first["sent"]) == list(range(210))
    client = MlflowClient(store[0])
    assert sorted(history(client, first["run_id"])) == list(range(210))
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["last_step"] == "199"
    assert not wal_logs(run_dir)


def server_outage(monkeypatch):
    """The uploader's sends fail while the returned event is set (the server is down); the list
    collects the metric steps delivered, in order."""
    blocked, order = threading.Event(), []
    blocked.set()
    real = uploader_module.send_batch

    def send_batch(client, target, items, run_dir):
        if blocked.is_set():
            raise ConnectionError("the server is down")
        real(client, target, items, run_dir)
        order.extend(row[3] for i in items if i["kind"] == "metrics" for row in i["metrics"])
    monkeypatch.setattr(uploader_module, "send_batch", send_batch)
    return blocked, order


def test_a_resumed_run_is_not_ended_by_the_status_an_earlier_session_left_in_its_wal(
        tmp_path, store, monkeypatch):
    blocked, _ = server_outage(monkeypatch)
    first = tracker_for(store[0], tmp_path, "resumed-killed", store[1])
    first.log_metrics({"loss": 0.0}, step=0)
    first.close(status="KILLED", timeout=0.5)  # SIGTERM during an outage: KILLED is in the WAL
    assert wal_items(tmp_path)[-1]["status"] == "KILLED"
    blocked.clear()

    (first_log,) = wal_logs(tmp_path)
    second = tracker_for(store[0], tmp_path, "resumed-killed", store[1], run_id=first.run_id)
    deadline = time.monotonic() + 30
    while first_log.exists() and time.monotonic() < deadline:  # the first session's log goes
        time.sleep(0.05)
    client = MlflowClient(store[0])
    assert not first_log.exists() and history(client, first.run_id) == [0]
    assert client.get_run(first.run_id).info.status == "RUNNING"  # still training
    second.close()
    assert client.get_run(first.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- replay of a damaged WAL

def write_wal(run_dir: Path, uri: str, artifacts: str, items: list[dict]) -> Path:
    header = {"kind": "run", "uri": uri, "experiment": "damaged", "run_name": "d",
              "start_ms": int(time.time() * 1000), "artifact_location": artifacts,
              "run_id": None, "session": "20250101T000000-1-abcd"}
    path = run_dir / WAL_DIR / f"{header['session']}.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps(header)] + [json.dumps({"seq": n, **item})
                                    for n, item in enumerate(items, 1)]
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics(step: int) -> dict:
    return {"kind": "metrics", "metrics": [["loss", float(step), 1000 + step, step]]}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, store):
    """A journal with a garbled line, a torn last line, artifacts outside the run folder and an
    unknown item kind among ten metrics, replayed once by the CLI."""
    root = tmp_path_factory.mktemp("damaged")
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("a: 1\n")
    secret = root / "secret.txt"  # outside the run folder
    secret.write_text("not for MLflow")
    (run_dir / "link.txt").symlink_to(secret)
    refused = [
        {"kind": "artifact", "path": str(secret), "artifact_path": None, "staged": True},
        {"kind": "artifact", "path": "../secret.txt", "artifact_path": None, "staged": False},
        {"kind": "artifact", "path": "link.txt", "artifact_path": None, "staged": False},
        {"kind": "model", "name": "model", "saved_path": str(run_dir / "model.pkl")},
    ]
    # "staged": True on a file that is no staging link: uploaded, but never deleted.
    config = {"kind": "artifact", "path": "config.yaml", "artifact_path": "cfg", "staged": True}
    log = write_wal(run_dir, store[0], store[1],
                    [metrics(s) for s in range(5)] + refused + [config]
                    + [metrics(s) for s in range(5, 10)])
    text = log.read_text().splitlines(keepends=True)
    text.insert(3, "this line is garbage\n")
    log.write_text("".join(text) + '{"seq": 99, "kind": "metrics", "metr')  # torn by a crash
    inode = log.stat().st_ino
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["replay", str(run_dir)])
    client = MlflowClient(store[0])
    return SimpleNamespace(run_dir=run_dir, log=log, inode=inode, secret=secret, refused=refused,
                           code=code, err=err.getvalue(), client=client,
                           run_id=the_run(client, "damaged").info.run_id)


def test_replay_skips_damaged_lines_delivering_those_around_them(damaged):
    assert sorted(history(damaged.client, damaged.run_id)) == list(range(10))
    assert "skipped 2 torn or garbled line(s)" in damaged.err  # said, with where and why
    assert "torn: a crash mid-append" in damaged.err


def test_replay_refuses_artifacts_outside_the_run_folder(damaged):
    assert damaged.code == 1  # the refused items are still there
    assert {a.path for a in damaged.client.list_artifacts(damaged.run_id)} == {"cfg"}
    assert damaged.secret.read_text() == "not for MLflow"
    for name in (damaged.secret, "../secret.txt", "link.txt"):  # each named in its refusal
        assert f"artifact {name} lies outside the run folder" in damaged.err
    assert "unknown tracking item kind 'model'" in damaged.err


def test_replay_deletes_only_staging_links_after_upload(damaged):
    assert (damaged.run_dir / "config.yaml").read_text() == "a: 1\n"  # marked staged, is not


def test_replay_rewrites_the_journal_by_rename_to_what_is_left(damaged):
    header, *left = damaged.log.read_text().splitlines()  # what is left stays, nothing else
    assert json.loads(header)["run_id"] == damaged.run_id
    assert [{k: v for k, v in json.loads(line).items() if k != "seq"}
            for line in left] == damaged.refused
    assert damaged.log.stat().st_ino != damaged.inode  # replaced by rename, not edited in place
    assert [p.name for p in damaged.log.parent.iterdir() if p.name.startswith(".")] == []


def test_replay_caps_http_retries_against_a_dead_server(tmp_path, store, dead_uri,
                                                         monkeypatch, capsys):
    # Without the cap, MLflow's defaults (7 retries, exponential backoff) take minutes.
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT")
    write_wal(tmp_path, dead_uri, store[1], [metrics(0)])
    started = time.monotonic()
    assert main(["replay", str(tmp_path)]) == 1
    assert time.monotonic() - started < 30
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert "1 item(s) still unsent (cannot open the MLflow run" in capsys.readouterr().err
    assert len(wal_items(tmp_path)) == 1


# ---------------------------------------------------------------- long outages: bounds

def test_a_long_outage_holds_one_batch_in_memory_the_rest_arriving_in_order_from_the_journal(
        tmp_path, store, monkeypatch):
    blocked, order = server_outage(monkeypatch)
    monkeypatch.setattr(tracker_module, "MAX_BACKOFF_S", 0.3)
    tracker = tracker_for(store[0], tmp_path, "bounded", store[1], memory_items=25)
    most = 0
    for step in range(400):
        tracker.log_metrics({"loss": float(step)}, step=step)
        if step % 50 == 0:
            tracker.set_tags({"at": step})
        most = max(most, tracker.backlog()["in_memory"])
    assert most <= 25
    assert tracker.backlog()["unsent"] == 408  # in the journal as each log call returned
    blocked.clear()
    tracker.close(timeout=60)
    assert order == list(range(400))  # read back from the WAL in order, each once
    assert sorted(history(MlflowClient(store[0]), tracker.run_id)) == list(range(400))
    assert not wal_logs(tmp_path)


def test_items_past_the_disk_budget_are_counted_lost_in_an_error_naming_the_budget(
        tmp_path, dead_uri, monkeypatch, caplog):
    monkeypatch.setenv(BUDGET_ENV, "4K")
    tracker = tracker_for(dead_uri, tmp_path, "budget", memory_items=10)
    with caplog.at_level(logging.ERROR, logger="dist_free.tracking"):
        for step in range(300):
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.close(timeout=1)
    (log,) = wal_logs(tmp_path)
    assert log.stat().st_size <= 4096
    lost = tracker.backlog()["lost"]
    assert lost > 0 and len(wal_items(tmp_path)) + lost == 301  # 300 metrics, the end status
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert BUDGET_ENV in errors and f"{lost} MLflow items were LOST" in errors
    assert logged_steps(wal_items(tmp_path)) == list(range(len(wal_items(tmp_path))))


def test_a_delivered_journal_is_cut_back_so_the_budget_bounds_only_the_backlog(
        tmp_path, store, monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "4K")  # 300 metric lines need about 20K
    sent: list[int] = []
    counting(monkeypatch, uploader_module, sent)
    tracker = tracker_for(store[0], tmp_path, "reset", store[1])
    for chunk in range(15):
        for step in range(chunk * 20, chunk * 20 + 20):
            tracker.log_metrics({"loss": float(step)}, step=step)
        deadline = time.monotonic() + 30  # delivered, and room made for the next chunk
        while (tracker.backlog()["unsent"] or tracker.backlog()["wal_bytes"] > 2048) \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tracker.backlog()["wal_bytes"] <= 2048
    assert tracker.backlog()["lost"] == 0
    tracker.close()
    assert sent == list(range(300))  # in order, each once, across the cuts
    assert sorted(history(MlflowClient(store[0]), tracker.run_id)) == list(range(300))
    assert not wal_logs(tmp_path)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "12T"])
def test_a_bad_disk_budget_is_a_clear_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv(BUDGET_ENV, value)
    with pytest.raises(TrackingConfigError, match=f"{BUDGET_ENV}=.*positive number of bytes"):
        tracker_for("sqlite:///never.db", tmp_path, "e")


# ---------------------------------------------------------------- restarts and stopping

def staged_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir / STAGING_DIR)).split("/")[0] + "/" + p.name
                  for p in (run_dir / STAGING_DIR).rglob("*") if p.is_file())


def test_each_session_deletes_only_the_staged_artifacts_it_uploaded(
        tmp_path, store, dead_uri):
    (tmp_path / "a.txt").write_text("from the first session")
    first = tracker_for(dead_uri, tmp_path, "staged", store[1])
    first.log_artifact(tmp_path / "a.txt")
    first.close(timeout=0.5)  # the server is down: a.txt stays staged, in the WAL
    (first_sid,) = {p.split("/")[0] for p in staged_files(tmp_path)}

    (tmp_path / "b.txt").write_text("from the second")
    second = tracker_for(store[0], tmp_path, "staged", store[1])  # another URI: no takeover
    second.log_artifact(tmp_path / "b.txt")
    second.close()
    assert staged_files(tmp_path) == [f"{first_sid}/a.txt"]  # its own upload only
    client = MlflowClient(store[0])
    assert [a.path for a in client.list_artifacts(second.run_id)] == ["b.txt"]

    assert main(["replay", str(tmp_path), "--uri", store[0]]) == 0
    assert staged_files(tmp_path) == []
    runs = client.search_runs([client.get_experiment_by_name("staged").experiment_id])
    assert sorted(a.path for r in runs for a in client.list_artifacts(r.info.run_id)) == [
        "a.txt", "b.txt"]


def test_after_a_stop_request_close_does_not_wait_out_the_server(tmp_path, store, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    monkeypatch.setattr(tracker_module, "CLOSE_TIMEOUT_S", 300.0)  # what close() gives otherwise
    with held_server() as (uri, held):
        tracker = tracker_for(uri, tmp_path, "stopped", store[1], start_timeout=1.0)
        for step in range(200):
            tracker.log_metrics({"loss": float(step)}, step=step)
        assert held.wait(60)  # the uploader is stuck in a request
        tracker.stop_soon()  # what the trainer's SIGTERM handler calls
        assert logged_steps(wal_items(tmp_path)) == list(range(200))  # on disk already
        assert finishes_within(60, lambda: tracker.close(status="KILLED")), \
            "close() after a stop request waited for the server"
    assert wal_items(tmp_path)[-1]["status"] == "KILLED"
    assert main(["replay", str(tmp_path), "--uri", store[0]]) == 0
    client = MlflowClient(store[0])
    run = the_run(client, "stopped")
    assert run.info.status == "KILLED"
    assert sorted(history(client, run.info.run_id)) == list(range(200))


# ---------------------------------------------------------------- credentials, pickles

@pytest.mark.parametrize("uri", ["http://alice:s3cret@mlflow.example:5000",
                                 "https://tok3n-s3cret@mlflow.example",
                                 "postgresql://bob:s3cret@db.example/mlflow"])
@pytest.mark.parametrize("via", ["argument", "environment"])
def test_credentials_in_the_tracking_uri_are_refused_on_every_rank(
        tmp_path, monkeypatch, uri, via):
    if via == "environment":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for rank in (0, 1):
        with pytest.raises(TrackingConfigError) as err:
            build_tracker(enabled=True, uri=uri if via == "argument" else None,
                          experiment="e", run_name="r", run_dir=tmp_path, rank=rank)
        message = str(err.value)
        assert "MLFLOW_TRACKING_USERNAME" in message and "MLFLOW_TRACKING_PASSWORD" in message
        assert "s3cret" not in message
    assert not (tmp_path / WAL_DIR).exists()


def test_check_uri_passes_uris_without_credentials(tmp_path):
    for uri in (None, "http://127.0.0.1:5000", "https://mlflow.example/path?x=1",
                f"sqlite:///{tmp_path}/a@b/mlflow.db", "postgresql://bob@db.example/mlflow",
                "databricks", "file:///tmp/mlruns"):
        check_uri(uri)
    assert issubclass(TrackingConfigError, ValueError)


def test_replay_refuses_a_uri_with_credentials_in_one_line(tmp_path, capsys):
    assert main(["replay", str(tmp_path), "--uri", "http://u:s3cret@h:5000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MLFLOW_TRACKING_PASSWORD" in err and "s3cret" not in err


def test_no_pickled_model_anywhere():
    assert not hasattr(Tracker, "log_model") and not hasattr(NullTracker, "log_model")
    source = "".join(p.read_text() for p in (ROOT / "dist_free" / "tracking").glob("*.py"))
    for word in ("import pickle", "pickle.load", "torch.load", "mlflow.pytorch", "load_model",
                 "import torch", "serialization_format"):
        assert word not in source, word
