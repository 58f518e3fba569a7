"""The MLflow calls behind dist_free.tracking: open or create a run, send one batch of items.

Called only by the uploader, live or replaying, so a replayed item goes through exactly the
code a live one does. Items are plain JSON-ready dicts,
tagged by "kind": metrics, params, tags, artifact, end. Nothing is ever unpickled: models are
logged as folders of files (weights, model card) like any other artifact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # MLflow is imported where it is used: a run with tracking off never loads it
    from mlflow import MlflowClient

from dist_free.tracking.staging import remove_staged

METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
log = logging.getLogger("dist_free.tracking")

# Error codes a retry cannot fix: the request itself is wrong, so waiting would stall the queue.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
}


class RefusedItem(ValueError):
    """An item that must not be sent as it is (e.g. an artifact outside the run folder)."""


def is_permanent(exc: BaseException) -> bool:
    """True when resending the same item can never succeed (bad value, missing file)."""
    from mlflow.exceptions import MlflowException
    if isinstance(exc, MlflowException):
        return exc.error_code in _PERMANENT_CODES
    # KeyError, AttributeError, TypeError: a malformed item (e.g. from an edited WAL line).
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, TypeError, ValueError,
                            KeyError, AttributeError))


@dataclass
class RunTarget:
    """Where items go. `run_id` is the run to continue (from a checkpoint) until opened."""

    uri: str
    experiment: str
    run_name: str
    start_ms: int
    artifact_location: str | None = None
    run_id: str | None = None
    experiment_id: str | None = None
    known_params: dict[str, str] = field(default_factory=dict)
    resumed: bool = False

    def describe(self) -> dict:
        return {"kind": "run", "uri": self.uri, "experiment": self.experiment,
                "run_name": self.run_name, "start_ms": self.start_ms,
                "artifact_location": self.artifact_location, "run_id": self.run_id}


def open_run(client: MlflowClient, target: RunTarget) -> None:
    """Reopen `target.run_id` (status back to RUNNING) or create a new run; fills the target."""
    from mlflow.exceptions import MlflowException
    if target.run_id is not None:
        try:
            run = client.get_run(target.run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s (from the checkpoint) is not in %s; starting a new run",
                        target.run_id, target.uri)
            target.run_id = None
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            target.experiment_id = run.info.experiment_id
            target.start_ms = run.info.start_time
            target.known_params = dict(run.data.params)
            target.resumed = True
            return
    target.experiment_id = _experiment_id(client, target)
    run = client.create_run(target.experiment_id, start_time=target.start_ms,
                            run_name=target.run_name)
    target.run_id = run.info.run_id


def _experiment_id(client: MlflowClient, target: RunTarget) -> str:
    from mlflow.exceptions import MlflowException
    experiment = client.get_experiment_by_name(target.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(target.experiment,
                                        artifact_location=target.artifact_location)
    except MlflowException as exc:  # another process created it between our two calls
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(target.experiment).experiment_id


class Batch:
    """Consecutive items one request can carry: a run of metrics items holding at most
    METRICS_PER_BATCH rows (and `max_items` items), or any other single item."""

    def __init__(self, max_items: int = METRICS_PER_BATCH):
        self.items: list[dict] = []
        self._rows, self._max = 0, max_items  # rows 0 after a non-metrics item: nothing may join

    def add(self, item: dict) -> bool:
        """Add `item` if it fits; False, adding nothing, if it does not."""
        rows = len(item["metrics"]) if item["kind"] == "metrics" else 0
        if self.items and not (rows and self._rows and self._rows + rows <= METRICS_PER_BATCH
                               and len(self.items) < self._max):
            return False
        self.items.append(item)
        self._rows += rows
        return True


def send_batch(client: MlflowClient, target: RunTarget, items: list[dict],
               run_dir: Path) -> None:
    """Deliver the items of one `Batch` in one request."""
    if len(items) == 1:
        send(client, target, items[0], run_dir)
    else:
        send(client, target, {"kind": "metrics",
                              "metrics": [row for item in items for row in item["metrics"]]},
             run_dir)


def send(client: MlflowClient, target: RunTarget, item: dict, run_dir: Path) -> None:
    """Deliver one item to the open run; raises on failure (see `is_permanent`)."""
    from mlflow.entities import Metric, RunTag
    kind = item["kind"]
    if kind == "metrics":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in item["metrics"]]
        client.log_batch(target.run_id, metrics=metrics, synchronous=True)
    elif kind == "params":
        _send_params(client, target, item["params"])
    elif kind == "tags":
        tags = [RunTag(k, v) for k, v in item["tags"].items()]
        client.log_batch(target.run_id, tags=tags, synchronous=True)
    elif kind == "artifact":
        _send_artifact(client, target, item, Path(run_dir))
    elif kind == "end":
        client.set_terminated(target.run_id, status=item["status"], end_time=item["end_ms"])
    else:
        raise RefusedItem(f"unknown tracking item kind {kind!r}")


def _send_params(client: MlflowClient, target: RunTarget, params: dict[str, str]) -> None:
    from mlflow.entities import Param, RunTag
    # MLflow forbids changing a logged param; a resumed run may legitimately change a few
    # (more epochs), so new values become tags instead of failing the whole batch.
    new = {k: v for k, v in params.items() if k not in target.known_params}
    changed = {k: v for k, v in params.items()
               if k in target.known_params and target.known_params[k] != v}
    tags = [RunTag(f"param_changed_on_resume.{k}", v) for k, v in changed.items()]
    if changed:
        log.warning("MLflow params changed since the run started (kept as tags "
                    "param_changed_on_resume.*): %s", sorted(changed))
    client.log_batch(target.run_id, params=[Param(k, v) for k, v in new.items()],
                     tags=tags, synchronous=True)
    target.known_params.update(new)


def _send_artifact(client: MlflowClient, target: RunTarget, item: dict, run_dir: Path) -> None:
    # The path may come from a file on disk (the WAL) that could have been edited: only what
    # lies inside the run's own folder is ever read and uploaded.
    path = (run_dir / item["path"]).resolve()
    if not path.is_relative_to(run_dir.resolve()):
        raise RefusedItem(f"artifact {item['path']} lies outside the run folder {run_dir}; "
                          "refused")
    if item.get("folder"):
        if not path.is_dir():
            raise FileNotFoundError(f"artifact folder {path} no longer exists")
        client.log_artifacts(target.run_id, str(path), item["artifact_path"])
    elif path.is_file():
        client.log_artifact(target.run_id, str(path), item["artifact_path"])
    else:
        raise FileNotFoundError(f"artifact {path} no longer exists")
    if item.get("staged"):  # our own link or copy, made so the file could not change under us
        remove_staged(run_dir, item["path"])
