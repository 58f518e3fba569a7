"""Rank 0's MLflow run: every item into the journal first, one uploader thread sending it.

    tracker = build_tracker(enabled=True, uri=None, experiment="dist-free", run_name="r50",
                            run_dir=Path("runs/r50"), rank=rank, run_id=ckpt.get("mlflow_run_id"))
    tracker.log_params(flatten(config)); tracker.set_tags(environment_tags(world_size))
    tracker.log_metrics({"train/loss": 2.3}, step=global_step)   # one append; returns at once
    tracker.log_artifacts(export_dir, "model")       # a folder: weights and model card
    tracker.close()                                  # or close(status="FAILED") on a crash

Every log call appends one line to the session's journal (journal.py: the files, what a kill -9
can lose, the bounds) and wakes the "mlflow-uploader" thread, which first sends what earlier
sessions' journals still hold (those logging to the same URI), then follows this session's
journal by acknowledged offset (uploader.py), retrying with bounded backoff while the server is
down. `python -m dist_free.tracking replay RUN_DIR` runs the same uploader over a journal to its
end.

Stopping on SIGTERM/SIGINT: call `stop_soon()` (safe inside a signal handler: everything logged
is on disk already), then `close(status="KILLED")`, which waits at most STOP_TIMEOUT_S for a
server that may be dead.

With no URI (argument or MLFLOW_TRACKING_URI) runs go to MLflow's embedded store in the working
directory: ./mlflow.db (SQLite) and ./mlartifacts; `launch/mlflow_ui.sh` opens the UI on it.
A URI holding credentials is refused (see uri.py).
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from dist_free.tracking.journal import Ack, Journal, budget_bytes, read_header, session_paths, sessions
from dist_free.tracking.sender import METRICS_PER_BATCH, RunTarget
from dist_free.tracking.staging import remove_session, stage
from dist_free.tracking.system_metrics import SystemSampler
from dist_free.tracking.uploader import BATCH_ITEMS, Uploader, pending_max_step, replay_command, replay_file
from dist_free.tracking.uri import bound_http_retries, check_uri, redact, resolve_uri, shown_uri

log = logging.getLogger("dist_free.tracking")

# MLflow's per-request limits (mlflow.utils.validation); fixed here so importing this module
# stays cheap and the numbers are visible.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
MAX_BACKOFF_S = 15.0
IDLE_WAIT_S = 1.0  # the uploader also wakes at each log call
CLOSE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 2.0  # close() after stop_soon() or with status KILLED: the server may be dead


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- params and tags

def _clip(text: str, limit: int, what: str) -> str:
    if len(text) <= limit:
        return text
    log.warning("MLflow %s longer than %d characters, truncated: %s...", what, limit, text[:60])
    return text[: limit - 3] + "..."


def _stringify(values: Mapping, value_limit: int, what: str) -> dict[str, str]:
    return {_clip(str(k), MAX_KEY, f"{what} key"): _clip(str(v), value_limit, f"{what} {k}")
            for k, v in values.items()}


# ---------------------------------------------------------------- trackers

class NullTracker:
    """What ranks other than 0, and disabled tracking, get: every call does nothing."""

    run_id = None

    def log_params(self, flat: Mapping) -> None: ...
    def set_tags(self, tags: Mapping) -> None: ...
    def log_metrics(self, metrics: Mapping, step: int, timestamp_ms: int | None = None) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, folder, artifact_path: str | None = None) -> None: ...
    def stop_soon(self) -> None: ...
    def close(self, timeout: float | None = None, status: str = "FINISHED") -> None: ...
    def logged_through(self, key: str, timeout: float = 5.0) -> int: return -1
    def steps_logged(self, keys, timeout: float = 30.0) -> dict[str, int]: return dict.fromkeys(keys, -1)
    def backlog(self) -> dict[str, int]: return {"in_memory": 0, "unsent": 0, "wal_bytes": 0,
                                                 "lost": 0}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status="FAILED" if exc_type else "FINISHED")


class Tracker(NullTracker):
    """Rank 0's MLflow run behind a journal and one uploader thread; see the module docstring."""

    def __init__(self, target: RunTarget, run_dir: Path, system_metrics: bool = True,
                 start_timeout: float = 10.0, memory_items: int = BATCH_ITEMS,
                 wal_budget: int | None = None):
        self._target, self._run_dir = target, Path(run_dir)
        self._sid = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
        self._journal = Journal(session_paths(self._run_dir, self._sid),
                                wal_budget or budget_bytes(),
                                {**target.describe(), "session": self._sid})
        self._uploader = Uploader(self._journal.paths, self._run_dir, target,
                                  Ack(self._journal.header_end), batch_items=memory_items,
                                  should_stop=lambda: self._abandoned)
        self._older = self._older_journals()
        self._opened = self._closed = self._stopping = self._abandoned = False
        self._staged, self._want_system, self._sampler = 0, system_metrics, None
        self._wake, self._closing, self._first_try = (threading.Event(), threading.Event(),
                                                      threading.Event())
        self._thread = threading.Thread(target=self._run, name="mlflow-uploader", daemon=True)
        self._thread.start()
        # Wait briefly so the run id is known before the first checkpoint; a dead server
        # answers at once, a black-holed one costs at most start_timeout, once.
        self._first_try.wait(start_timeout)

    @property
    def run_id(self) -> str | None:
        """The run being continued or created; None while a new run could not be created yet."""
        return self._target.run_id

    # -- the calls the trainer makes: each appends to the journal

    def log_params(self, flat: Mapping) -> None:
        self._log_map("params", _stringify(flat, MAX_PARAM_VALUE, "param"))

    def set_tags(self, tags: Mapping) -> None:
        self._log_map("tags", _stringify(tags, MAX_TAG_VALUE, "tag"))

    def log_metrics(self, metrics: Mapping, step: int, timestamp_ms: int | None = None) -> None:
        """Values should be Python numbers: float() of a CUDA tensor would sync the device."""
        ts = _now_ms() if timestamp_ms is None else timestamp_ms
        rows = [[str(k), float(v), ts, int(step)] for k, v in metrics.items()]
        for i in range(0, len(rows), METRICS_PER_BATCH):
            self._log({"kind": "metrics", "metrics": rows[i:i + METRICS_PER_BATCH]})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Upload file `path` (as it is now: it is hard-linked at once) under `artifact_path`."""
        path = Path(path)
        if path.is_dir():  # as MLflow does: the folder itself, by name, under artifact_path
            sub = posixpath.join(artifact_path, path.name) if artifact_path else path.name
            self.log_artifacts(path, sub)
        else:
            self._log(self._artifact_item(path, artifact_path, folder=False))

    def log_artifacts(self, folder, artifact_path: str | None = None) -> None:
        """Upload the files in `folder` (recursively, as they are now) under `artifact_path`,
        e.g. log_artifacts(export_dir, "model") for exported weights and their model card."""
        folder = Path(folder)
        if not folder.is_dir():
            log.warning("MLflow artifact folder %s does not exist; it will be reported as "
                        "rejected", folder)
        self._log(self._artifact_item(folder, artifact_path, folder=True))

    def stop_soon(self) -> None:
        """We are stopping and the server may be dead: close() waits at most STOP_TIMEOUT_S by
        default. Everything logged is on disk already. Safe inside a signal handler."""
        self._stopping = True

    def backlog(self) -> dict[str, int]:
        """Items held in memory, items not yet delivered, journal size in bytes, items lost."""
        return {"in_memory": self._uploader.holding,
                "unsent": self._journal.appended - self._uploader.delivered,
                "wal_bytes": self._journal.size, "lost": self._journal.lost}

    def close(self, timeout: float | None = None, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED): delivery gets `timeout` s
        more (default CLOSE_TIMEOUT_S; STOP_TIMEOUT_S after stop_soon() or with KILLED, as the
        server may be what is down). Logs what is left and how to send it, and what was lost."""
        if self._closed:
            return
        if timeout is None:
            hurry = status == "KILLED" or self._stopping
            timeout = STOP_TIMEOUT_S if hurry else CLOSE_TIMEOUT_S
        deadline = time.monotonic() + timeout
        if self._sampler is not None:
            self._sampler.stop(timeout=min(1.0, timeout))
        self._log({"kind": "end", "status": status, "end_ms": _now_ms()})
        self._closed = True
        self._closing.set()
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._abandoned = self._thread.is_alive()  # stuck on the server: it stops at its next step
        self._finish()

    def logged_through(self, key: str, timeout: float = 5.0) -> int:
        """The highest step of metric `key` this run holds or will receive, or -1 if unknown."""
        return self.steps_logged([key], timeout)[key]

    def steps_logged(self, keys, timeout: float = 30.0) -> dict[str, int]:
        """For each metric key, the highest step this run holds or will receive (-1: unknown).

        A resumed run re-runs the steps after its checkpoint; the trainer skips logging those
        MLflow already has, or an earlier session's journal will still send, so no step appears
        twice. The server is asked once, at resume, in a helper thread so an unreachable one
        costs at most `timeout` s (then nothing is skipped: a duplicate is better than a gap).
        The first request pays for the client's start-up (seconds for a SQLite store's schema
        check on a loaded machine), hence the generous default.
        """
        keys = list(dict.fromkeys(keys))
        if self._target.run_id is None:
            return dict.fromkeys(keys, -1)
        # Earlier sessions' journals first, MLflow second: the live uploader may be replaying a
        # journal meanwhile, and an item it delivers in between is then in MLflow's answer (asked
        # the other way round, it could be in neither, and be logged twice).
        pending = {key: pending_max_step(self._run_dir, key, self._target.run_id, skip=self._sid)
                   for key in keys}
        answer = {}

        def ask():
            from mlflow import MlflowClient
            client = MlflowClient(self._target.uri)
            for key in keys:
                history = client.get_metric_history(self._target.run_id, key)
                answer[key] = max((m.step for m in history), default=-1)

        thread = threading.Thread(target=ask, name="mlflow-resume-query", daemon=True)
        thread.start()
        thread.join(timeout)
        if len(answer) < len(keys):
            log.warning("could not ask MLflow which steps run %s already has; steps re-run "
                        "after the checkpoint may be logged twice", self._target.run_id)
            return dict.fromkeys(keys, -1)
        return {key: max(answer[key], pending[key]) for key in keys}

    # -- the caller's side

    def _log_map(self, kind: str, values: dict[str, str]) -> None:
        keys = list(values)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            self._log({"kind": kind, kind: {k: values[k] for k in keys[i:i + PARAMS_PER_BATCH]}})

    def _log(self, item: dict) -> None:
        if self._closed:
            log.warning("MLflow tracker already closed; dropped a %s item", item["kind"])
            return
        self._journal.append(item)
        self._wake.set()

    def _artifact_item(self, path: Path, artifact_path: str | None, folder: bool) -> dict:
        # A hard link freezes the file as it is now (the trainer replaces checkpoints by
        # rename), costs no copy, and keeps it for the journal if the upload has to wait.
        self._staged += 1
        staged = stage(self._run_dir, self._sid, self._staged, path)
        return {"kind": "artifact", "path": str(staged if staged else path.absolute()),
                "artifact_path": artifact_path, "staged": staged is not None, "folder": folder}

    # -- the uploader thread

    def _run(self) -> None:
        from mlflow import MlflowClient

        client, failures = MlflowClient(self._target.uri), 0
        while not self._abandoned:
            closing = self._closing.is_set()  # read first: the end item is in the journal then
            self._wake.clear()
            try:
                busy = self._work(client)
            except Exception as exc:  # noqa: BLE001 - any failure here means: keep, retry later
                failures += 1
                if failures == 1:
                    log.warning("MLflow at %s unreachable or failing (%s); training goes on, "
                                "items are kept and retried", shown_uri(self._target.uri),
                                redact(str(exc), self._target.uri))
                self._first_try.set()
                self._back_off(failures)
                continue
            self._first_try.set()
            if failures:
                log.warning("MLflow at %s reachable again; sending the %d queued items",
                            shown_uri(self._target.uri), self.backlog()["unsent"])
                failures = 0
            if not busy:
                if closing:
                    return
                self._wake.wait(IDLE_WAIT_S)

    def _work(self, client) -> bool:
        """One step: open the run, or send an older journal, or one batch of ours; False when
        there was nothing to do (then a delivered journal may be cut back)."""
        if not self._opened:
            self._open(client)
        elif self._older:
            self._replay_older()
        elif not self._uploader.step(client, self._journal.size):
            if not self._uploader.ack.kept and not self._abandoned:  # kept lines stay for replay
                self._journal.reset(self._uploader.cursor, self._uploader.restart_at)
            return False
        return True

    def _back_off(self, failures: int) -> None:
        delay = min(0.25 * 2 ** failures, MAX_BACKOFF_S)
        if self._closing.is_set():  # flushing at exit: retry often, the clock is short
            time.sleep(min(delay, 0.5))
        else:
            self._closing.wait(delay)

    def _open(self, client) -> None:
        self._uploader.open(client)
        self._opened = True
        log.info("MLflow run %s at %s%s", self._target.run_id, shown_uri(self._target.uri),
                 " (resumed)" if self._target.resumed else "")
        if self._want_system and self._sampler is None and not self._closing.is_set():
            self._sampler = SystemSampler(self, self._target.uri, self._target.start_ms)

    def _older_journals(self) -> list:
        """Earlier sessions' journals this session sends first: those logging to the same URI."""
        same, other = [], []
        for paths in sessions(self._run_dir):
            if paths.sid == self._sid:
                continue
            try:
                uri = read_header(paths.log)[0].get("uri")
            except (OSError, ValueError):
                uri = None
            (same if uri == self._target.uri else other).append(paths)
        if same:
            log.warning("%d MLflow write-ahead log(s) from earlier sessions in %s: sending "
                        "them first", len(same), self._run_dir)
        if other:
            log.warning("%d MLflow write-ahead log(s) in %s were logging to another URI (or "
                        "are damaged); send them with: %s", len(other), self._run_dir,
                        replay_command(self._run_dir))
        return same

    def _replay_older(self) -> None:
        result = replay_file(self._older[0], self._run_dir, live_run_id=self._target.run_id,
                             should_stop=lambda: self._abandoned)
        if result.transient and not self._abandoned:
            raise ConnectionError(result.error)  # back off, then try this journal again
        self._older.pop(0)
        if result.left or result.error or result.busy:
            log.warning("%s: %d MLflow items left (%s); send them with: %s", result.path,
                        result.left, result.error or ("in use" if result.busy else "rejected"),
                        replay_command(self._run_dir))

    # -- the end

    def _finish(self) -> None:
        """Close the journal (removing it if everything arrived); say what is left or lost."""
        unsent = self._journal.appended - self._uploader.delivered
        kept = len(self._uploader.ack.kept)
        delivered_all = unsent == 0 and not self._abandoned
        self._journal.close(delivered_all)
        if delivered_all:
            remove_session(self._run_dir, self._sid)
        elif unsent:
            log.warning("MLflow at %s did not accept %d items before exit (%d rejected); they "
                        "are in %s. The next run in %s sends them, or now: %s",
                        shown_uri(self._target.uri), unsent, kept, self._journal.paths.log,
                        self._run_dir, replay_command(self._run_dir))
        if self._journal.lost:
            log.error("%d MLflow items were LOST: %s", self._journal.lost,
                      self._journal.lost_reason)


# ---------------------------------------------------------------- construction

def build_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str,
                  run_dir: Path, rank: int, run_id: str | None = None,
                  system_metrics: bool = True, artifact_location: str | None = None,
                  start_timeout: float = 10.0, memory_items: int = BATCH_ITEMS) -> NullTracker:
    """Rank 0's tracker, or a NullTracker; never raises for network trouble.

    Raises TrackingConfigError (on every rank, so all stop alike) for a URI holding
    credentials or a bad DIST_FREE_MLFLOW_WAL_BYTES. `artifact_location` applies only when the
    experiment is created; with the embedded store it defaults to ./mlartifacts.
    """
    if not enabled:
        return NullTracker()
    check_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"))
    budget = budget_bytes()
    if rank != 0:
        return NullTracker()
    if artifact_location is None and not (uri or os.environ.get("MLFLOW_TRACKING_URI")):
        artifact_location = str(Path.cwd() / "mlartifacts")  # beside ./mlflow.db
    uri = resolve_uri(uri)
    bound_http_retries(uri)
    target = RunTarget(uri=uri, experiment=experiment, run_name=run_name, start_ms=_now_ms(),
                       artifact_location=artifact_location, run_id=run_id)
    return Tracker(target, Path(run_dir), system_metrics=system_metrics,
                   start_timeout=start_timeout, memory_items=memory_items, wal_budget=budget)
