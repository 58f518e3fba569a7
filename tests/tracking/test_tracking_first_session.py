"""A first session that never reached MLflow: its journal goes into the run the next session
continues, not into a second run."""

import time

from mlflow import MlflowClient

from dist_free.tracking.journal import Journal, budget_bytes, session_paths
from dist_free.tracking.sender import RunTarget
from dist_free.tracking.uploader import replay_file


def test_a_journal_without_a_run_is_replayed_into_the_live_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    live = client.create_run(client.create_experiment("dist-free")).info.run_id
    # The first session's journal: it never opened a run, so neither header nor ack has an id.
    target = RunTarget(uri=uri, experiment="dist-free", run_name="demo", start_ms=int(time.time() * 1000))
    header = {**target.describe(), "session": "first"}
    journal = Journal(session_paths(tmp_path, "first"), budget_bytes(), header)
    for step in (1, 2, 3):
        journal.append({"kind": "metrics", "metrics": [["train/loss", 1.0 / step, 0, step]]})
    journal.close(delivered_all=False)

    result = replay_file(session_paths(tmp_path, "first"), tmp_path, live_run_id=live)

    assert result.delivered == 3 and not result.error
    steps = [m.step for m in client.get_metric_history(live, "train/loss")]
    assert sorted(steps) == [1, 2, 3]
    assert len(client.search_runs([client.get_experiment_by_name("dist-free").experiment_id])) == 1
