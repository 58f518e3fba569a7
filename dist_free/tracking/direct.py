"""Logging at once to an MLflow run that already exists, with no journal and no uploader thread:
for a command that runs after training (`python -m dist_free.evaluate` records its final
numbers on the run its checkpoint names). Nothing is kept for later: a failure is the caller's
to report.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from dist_free.tracking.uri import bound_http_retries, check_uri


def log_to_run(uri: str, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str],
               artifact: Path, artifact_path: str) -> None:
    """Metrics (at step 0, timestamped now) and tags in one request, then the file `artifact`
    under `artifact_path`, to run `run_id` at `uri` (resolved: see uri.resolve_uri). Raises
    TrackingConfigError for a URI with credentials (before any request), else whatever MLflow
    raises."""
    check_uri(uri)
    bound_http_retries(uri)     # fail in seconds when a server is down, not after minutes
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient(uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_artifact(run_id, str(artifact), artifact_path)
