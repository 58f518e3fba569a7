"""MLflow tracking for the trainer: rank 0 only, asynchronous, survives tracking-server outages.

    tracker = build_tracker(enabled=True, uri=None, experiment="dist-free", run_name="r50",
                            run_dir=Path("runs/r50"), rank=rank, run_id=ckpt.get("mlflow_run_id"))
    tracker.log_params(flatten(config)); tracker.set_tags(environment_tags(world_size))
    tracker.log_metrics({"train/loss": 2.3}, step=global_step)   # enqueues, returns at once
    tracker.close()

Modules: tracker (the queue and its sending thread, outage handling), sender (the MLflow calls),
unsent (the file of what could not be sent, and `replay`), system_metrics (CPU/GPU sampling),
tags (environment tags); `python -m dist_free.tracking replay RUN_DIR` is __main__.
"""

from dist_free.tracking.tags import environment_tags
from dist_free.tracking.tracker import NullTracker, Tracker, build_tracker, resolve_uri

__all__ = ["NullTracker", "Tracker", "build_tracker", "environment_tags", "resolve_uri"]
