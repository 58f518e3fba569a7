"""MLflow tracking for the trainer: rank 0 only, asynchronous, survives server outages and kill -9.

    tracker = build_tracker(enabled=True, uri=None, experiment="dist-free", run_name="r50",
                            run_dir=Path("runs/r50"), rank=rank, run_id=ckpt.get("mlflow_run_id"))
    tracker.log_params(flatten(config)); tracker.set_tags(environment_tags(world_size))
    tracker.log_metrics({"train/loss": 2.3}, step=global_step)   # one append, returns at once
    tracker.log_artifacts(export_dir, "model")
    tracker.close()            # FINISHED; close(status="FAILED") on a crash;
                               # stop_soon() then close(status="KILLED") on SIGTERM/SIGINT

Modules: tracker (the log calls, the uploader thread, outage handling), journal (the on-disk
journal every item goes through first: files, bounds, what a kill -9 can lose), uploader
(following a journal by acknowledged offset; `replay`), sender (the MLflow calls), staging
(artifacts frozen at log time), uri (URI resolution, no credentials), system_metrics (CPU/GPU
sampling), tags (environment tags), direct (`log_to_run`: at once, no journal, for commands
that run after training); `python -m dist_free.tracking replay RUN_DIR` is __main__.

This package is the one home of MLflow: nothing else in dist_free imports it.
"""

from dist_free.tracking.direct import log_to_run
from dist_free.tracking.tags import environment_tags
from dist_free.tracking.tracker import NullTracker, Tracker, build_tracker
from dist_free.tracking.uri import TrackingConfigError, check_uri, redact, resolve_uri, shown_uri

__all__ = ["NullTracker", "Tracker", "TrackingConfigError", "build_tracker", "check_uri",
           "environment_tags", "log_to_run", "redact", "resolve_uri", "shown_uri"]
