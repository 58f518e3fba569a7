"""Rank 0's MLflow run behind a queue: asynchronous, survives tracking-server outages.

    tracker = build_tracker(enabled=True, uri=None, experiment="dist-free", run_name="r50",
                            run_dir=Path("runs/r50"), rank=rank, run_id=ckpt.get("mlflow_run_id"))
    tracker.log_params(flatten(config)); tracker.set_tags(environment_tags(world_size))
    tracker.log_metrics({"train/loss": 2.3}, step=global_step)   # enqueues, returns at once
    tracker.close()

Every log call only appends to an in-memory queue; one background thread delivers it with
`MlflowClient`, keeping each item until MLflow accepts it, and retrying with bounded backoff
while the server is down. Whatever is still unsent when `close` gives up is written to
RUN_DIR/mlflow_unsent.jsonl and can be sent later with

    python -m dist_free.tracking replay RUN_DIR [--uri URI]

With no URI (argument or MLFLOW_TRACKING_URI) runs go to MLflow's embedded store in the working
directory: ./mlflow.db (SQLite) and ./mlartifacts; `launch/mlflow_ui.sh` opens the UI on it.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from dist_free.tracking.sender import RunTarget, is_permanent, open_run, send
from dist_free.tracking.system_metrics import SystemSampler
from dist_free.tracking.unsent import UNSENT_FILE, dump, replay_command

log = logging.getLogger("dist_free.tracking")

# MLflow's per-request limits (mlflow.utils.validation); fixed here so importing this module
# stays cheap and the numbers are visible.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
MAX_BACKOFF_S = 15.0


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
    def log_model(self, model, name: str = "model", input_example=None) -> None: ...
    def close(self, timeout: float = 30.0, status: str = "FINISHED") -> None: ...
    def logged_through(self, key: str, timeout: float = 5.0) -> int: return -1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status="FAILED" if exc_type else "FINISHED")


class Tracker(NullTracker):
    """Rank 0's MLflow run behind a queue; see the module docstring."""

    def __init__(self, target: RunTarget, run_dir: Path, system_metrics: bool = True,
                 start_timeout: float = 10.0):
        self._target, self._run_dir = target, Path(run_dir)
        self._pending: deque[dict] = deque()
        self._rejected: list[dict] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._closed = self._abandoned = False
        self._opened, self._first_try = threading.Event(), threading.Event()
        self._want_system, self._sampler = system_metrics, None
        self._staged = 0
        self._worker = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._worker.start()
        # Wait briefly so the run id is known before the first checkpoint; a dead server
        # answers at once, a black-holed one costs at most start_timeout, once.
        self._first_try.wait(start_timeout)

    @property
    def run_id(self) -> str | None:
        """The run being continued or created; None while a new run could not be created yet."""
        return self._target.run_id

    # -- the calls the trainer makes: each only enqueues

    def log_params(self, flat: Mapping) -> None:
        params = _stringify(flat, MAX_PARAM_VALUE, "param")
        keys = list(params)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            self._enqueue({"kind": "params",
                           "params": {k: params[k] for k in keys[i:i + PARAMS_PER_BATCH]}})

    def set_tags(self, tags: Mapping) -> None:
        tags = _stringify(tags, MAX_TAG_VALUE, "tag")
        keys = list(tags)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            self._enqueue({"kind": "tags",
                           "tags": {k: tags[k] for k in keys[i:i + PARAMS_PER_BATCH]}})

    def log_metrics(self, metrics: Mapping, step: int, timestamp_ms: int | None = None) -> None:
        """Values should be Python numbers: float() of a CUDA tensor would sync the device."""
        ts = _now_ms() if timestamp_ms is None else timestamp_ms
        rows = [[str(k), float(v), ts, int(step)] for k, v in metrics.items()]
        for i in range(0, len(rows), METRICS_PER_BATCH):
            self._enqueue({"kind": "metrics", "metrics": rows[i:i + METRICS_PER_BATCH]})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        staged, is_staged = self._stage(Path(path))
        self._enqueue({"kind": "artifact", "path": staged, "artifact_path": artifact_path,
                       "staged": is_staged})

    def log_model(self, model, name: str = "model", input_example=None) -> None:
        """Queue `model` for mlflow.pytorch.log_model; copies it to CPU now, uploads later."""
        if input_example is not None:
            input_example = input_example.detach().cpu()
        self._enqueue({"kind": "model", "name": name, "model": _cpu_copy(model),
                       "model_id": None, "input_example": input_example})

    def close(self, timeout: float = 30.0, status: str = "FINISHED") -> None:
        """Flush for up to `timeout` s; then write what is left to RUN_DIR and say how to replay."""
        if self._closed:
            return
        if self._sampler is not None:
            self._sampler.stop()
        self._enqueue({"kind": "end", "status": status, "end_ms": _now_ms()})
        self._closed = True
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self._worker.join(timeout)
        with self._cond:
            self._abandoned = True  # the worker stops touching the queue from here on
            left = self._rejected + list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        if left:
            self._write_unsent(left)

    def logged_through(self, key: str, timeout: float = 5.0) -> int:
        """The highest step of metric `key` MLflow holds for this run, or -1 if unknown.

        A resumed run re-runs the steps after its checkpoint; the trainer skips logging those
        MLflow already has, so no step appears twice. Asked once, at resume, in a helper
        thread so an unreachable server costs at most `timeout` s (then nothing is skipped:
        a duplicate is better than a gap).
        """
        if self._target.run_id is None:
            return -1
        answer = []

        def ask():
            from mlflow import MlflowClient
            history = MlflowClient(self._target.uri).get_metric_history(self._target.run_id, key)
            answer.append(max((m.step for m in history), default=-1))

        thread = threading.Thread(target=ask, name="mlflow-resume-query", daemon=True)
        thread.start()
        thread.join(timeout)
        if not answer:
            log.warning("could not ask MLflow which steps run %s already has; steps re-run "
                        "after the checkpoint may be logged twice", self._target.run_id)
            return -1
        return answer[0]

    # -- internals

    def _enqueue(self, item: dict) -> None:
        with self._cond:
            if self._closed:
                log.warning("MLflow tracker already closed; dropped a %s item", item["kind"])
                return
            self._pending.append(item)
            self._cond.notify_all()

    def _stage(self, path: Path) -> tuple[str, bool]:
        # A hard link freezes the file as it is now (the trainer replaces checkpoints by
        # rename), costs no copy, and keeps it for the unsent file if the upload never happens.
        if not path.is_file():
            return str(path), False
        self._staged += 1
        folder = self._run_dir / ".mlflow_staging" / f"{self._staged:06d}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.link(path, folder / path.name)
        except OSError:  # another file system, or links unsupported: upload the live file
            return str(path), False
        return str(folder / path.name), True

    def _write_unsent(self, items: list[dict]) -> None:
        try:
            path = dump(self._run_dir, self._target, items)
        except Exception:  # noqa: BLE001 - the run must still end; say what was lost
            log.exception("could not write %d unsent MLflow items to %s", len(items),
                          self._run_dir)
            return
        log.warning("MLflow tracking at %s did not accept %d items before exit; they are in %s. "
                    "Send them when the server is back with: %s", self._target.uri, len(items),
                    path, replay_command(self._run_dir))

    def _work(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self._target.uri)
        failures = 0
        while self._wait_for_work(failures):
            try:
                if self._opened.is_set():
                    self._send_next(client)
                else:
                    self._open(client)
                if failures:
                    log.warning("MLflow at %s reachable again; sending %d queued items",
                                self._target.uri, len(self._pending))
                failures = 0
            except Exception as exc:  # noqa: BLE001 - any failure here means: keep, retry later
                failures += 1
                if failures == 1:
                    log.warning("MLflow at %s unreachable or failing (%s); training goes on, "
                                "items are kept and retried", self._target.uri, exc)
            finally:
                self._first_try.set()

    def _wait_for_work(self, failures: int) -> bool:
        """Back off after failures, sleep while idle; False when the worker should stop."""
        if failures:
            delay = min(0.25 * 2 ** failures, MAX_BACKOFF_S)
            if self._closing.is_set():  # flushing at exit: retry often, the clock is short
                time.sleep(min(delay, 0.5))
            else:
                self._closing.wait(delay)
        with self._cond:
            while (self._opened.is_set() and not self._pending and not self._closing.is_set()
                   and not self._abandoned):
                self._cond.wait()
            return not self._abandoned and not (self._closing.is_set() and not self._pending)

    def _open(self, client) -> None:
        open_run(client, self._target)
        self._opened.set()
        log.info("MLflow run %s at %s%s", self._target.run_id, self._target.uri,
                 " (resumed)" if self._target.resumed else "")
        if self._want_system and self._sampler is None and not self._closing.is_set():
            self._sampler = SystemSampler(self, self._target.start_ms)

    def _send_next(self, client) -> None:
        with self._cond:
            batch = _head_batch(self._pending)
        item = batch[0] if len(batch) == 1 else {
            "kind": "metrics", "metrics": [row for b in batch for row in b["metrics"]]}
        try:
            send(client, self._target, item)
        except Exception as exc:
            if not is_permanent(exc):
                raise
            log.warning("MLflow rejected a %s item (%s); kept for %s", item["kind"], exc,
                        UNSENT_FILE)
            with self._cond:
                self._rejected.extend(batch)
        with self._cond:
            if not self._abandoned:  # close() already took the queue: leave it alone
                for _ in batch:
                    self._pending.popleft()


def _head_batch(pending: deque) -> list[dict]:
    """The first item, or the leading run of metrics items that fits one log_batch call."""
    batch, rows = [pending[0]], len(pending[0].get("metrics", ()))
    if pending[0]["kind"] != "metrics":
        return batch
    for item in list(pending)[1:]:
        if item["kind"] != "metrics" or rows + len(item["metrics"]) > METRICS_PER_BATCH:
            break
        batch.append(item)
        rows += len(item["metrics"])
    return batch


def _cpu_copy(model):
    """A CPU copy in eval mode, unwrapped from DDP and torch.compile, safe to pickle later."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return copy.deepcopy(model).cpu().eval()


# ---------------------------------------------------------------- construction

def resolve_uri(uri: str | None) -> str:
    """The argument, else MLFLOW_TRACKING_URI, else the embedded store ./mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _bound_http_retries(uri: str) -> None:
    # MLflow's HTTP defaults (7 retries with exponential backoff, 120 s timeout) would hold the
    # worker on one request for minutes; the worker retries by itself, between items.
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def build_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str,
                  run_dir: Path, rank: int, run_id: str | None = None,
                  system_metrics: bool = True, artifact_location: str | None = None,
                  start_timeout: float = 10.0) -> NullTracker:
    """Rank 0's tracker, or a NullTracker; never raises for network trouble.

    `artifact_location` applies only when the experiment is created; with the embedded store
    it defaults to ./mlartifacts.
    """
    if rank != 0 or not enabled:
        return NullTracker()
    if artifact_location is None and not (uri or os.environ.get("MLFLOW_TRACKING_URI")):
        artifact_location = str(Path.cwd() / "mlartifacts")  # beside ./mlflow.db
    uri = resolve_uri(uri)
    _bound_http_retries(uri)
    run_dir = Path(run_dir)
    if (run_dir / UNSENT_FILE).exists():
        log.warning("%s holds MLflow items a previous session could not send; send them with: %s",
                    run_dir / UNSENT_FILE, replay_command(run_dir))
    target = RunTarget(uri=uri, experiment=experiment, run_name=run_name, start_ms=_now_ms(),
                       artifact_location=artifact_location, run_id=run_id)
    return Tracker(target, run_dir, system_metrics=system_metrics, start_timeout=start_timeout)
