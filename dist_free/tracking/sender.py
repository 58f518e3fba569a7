"""The MLflow calls behind dist_free.tracking: open or create a run, send one queued item.

Shared by the tracker's background thread and by `python -m dist_free.tracking replay`, so a
replayed item goes through exactly the code a live one does. Items are plain dicts (JSON-ready
except a model), tagged by "kind": metrics, params, tags, artifact, model, end.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

log = logging.getLogger("dist_free.tracking")

# Error codes a retry cannot fix: the request itself is wrong, so waiting would stall the queue.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
}


def is_permanent(exc: BaseException) -> bool:
    """True when resending the same item can never succeed (bad value, missing file)."""
    if isinstance(exc, MlflowException):
        return exc.error_code in _PERMANENT_CODES
    return isinstance(exc, (FileNotFoundError, IsADirectoryError, TypeError, ValueError))


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


def send(client: MlflowClient, target: RunTarget, item: dict) -> None:
    """Deliver one item to the open run; raises on failure (see `is_permanent`)."""
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
        _send_artifact(client, target, item)
    elif kind == "model":
        _send_model(client, target, item)
    elif kind == "end":
        client.set_terminated(target.run_id, status=item["status"], end_time=item["end_ms"])
    else:
        raise ValueError(f"unknown tracking item kind {kind!r}")


def _send_params(client: MlflowClient, target: RunTarget, params: dict[str, str]) -> None:
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


def _send_artifact(client: MlflowClient, target: RunTarget, item: dict) -> None:
    path = item["path"]
    if os.path.isdir(path):
        client.log_artifacts(target.run_id, path, item["artifact_path"])
    elif os.path.isfile(path):
        client.log_artifact(target.run_id, path, item["artifact_path"])
    else:
        raise FileNotFoundError(f"artifact {path} no longer exists")
    if item.get("staged"):  # our hard link, made so the file could not change under us
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _send_model(client: MlflowClient, target: RunTarget, item: dict) -> None:
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(target.uri)  # log_model reads the process-wide URI
    model = item.get("model")
    if model is None:  # replayed: the model was saved locally when the tracker gave up
        model = mlflow.pytorch.load_model(item["saved_path"])
    if item.get("model_id") is None:
        # Created once and kept on the item, so a retry after a half-done upload reuses it
        # rather than leaving an empty logged model behind.
        logged = client.create_logged_model(target.experiment_id, name=item["name"],
                                            source_run_id=target.run_id)
        item["model_id"] = logged.model_id
    info = mlflow.pytorch.log_model(
        model, name=item["name"], model_id=item["model_id"], run_id=target.run_id,
        serialization_format="pickle",  # loads any nn.Module; 'pt2' needs an example input
        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        input_example=item.get("input_example"))
    client.set_tag(target.run_id, f"model_uri.{item['name']}", info.model_uri)
