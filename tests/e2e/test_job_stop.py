"""A collapse (or a data error) is final for its job: restarts of the same job exit at once with
the reason; a new job, or run.resume_stopped_step naming the stop, goes on."""

import json

import pytest
from helpers_launch import ROOT, demo_args, run_cmd, torchrun

from dist_free.trainer.stops import job_stop

SURVIVAL = str(ROOT / "tests" / "survival_probe.py")


@pytest.fixture
def note(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    path = tmp_path / job_stop.NOTE
    job_stop.record(path, "collapse", "robust accuracy collapsed", 120)
    return path


def test_a_restart_of_the_same_job_stops_with_the_collapse_exit_status_naming_the_reason(note):
    with pytest.raises(job_stop.JobStopped, match="collapse at step 120") as stopped:
        job_stop.check(note)
    assert stopped.value.exit_code == 3
    assert "run.resume_stopped_step=120" in str(stopped.value)
    assert note.exists()


def test_a_data_error_stops_its_restarts_with_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    path = tmp_path / job_stop.NOTE
    job_stop.record(path, "data error", "bad.JPEG is truncated", 7)
    with pytest.raises(job_stop.JobStopped, match="bad.JPEG") as stopped:
        job_stop.check(path)
    assert stopped.value.exit_code == 2


@pytest.mark.parametrize("env", [{"TORCHELASTIC_RUN_ID": "job-b"}, {"TORCHELASTIC_RUN_ID": None},
                                 {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}],
                         ids=["another job", "no torchrun", "a new launch without a job id"])
def test_a_new_job_goes_ahead_forgetting_the_note(note, monkeypatch, env):
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key)
        else:
            monkeypatch.setenv(key, value)
    job_stop.check(note)
    assert not note.exists()


def test_the_restarts_of_a_launch_without_a_job_id_are_one_job(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    path = tmp_path / job_stop.NOTE
    job_stop.record(path, "collapse", "collapsed", 5)
    with pytest.raises(job_stop.JobStopped):
        job_stop.check(path)


def test_the_override_resumes_past_only_the_stop_it_names(note):
    job_stop.check(note, resume_stopped_step=120)        # on purpose: goes on
    with pytest.raises(job_stop.JobStopped):
        job_stop.check(note, resume_stopped_step=119)    # a later stop is not covered


@pytest.mark.slow
def test_a_collapse_under_torchrun_restarts_stays_stopped_with_its_run_failed(
        demo_root, tmp_path):
    # A hair-trigger guard fires within two epochs (as in the collapse tests); rollback keeps
    # the last healthy last.pt, which torchrun's restarts would otherwise train from again.
    args = demo_args(demo_root, tmp_path, "optim.epochs=8", "eval.holdout=900",
                     "eval.probes_per_epoch=8",
                     "eval.probe_batches=1", "eval.probe_steps=2", "eval.collapse_armed_at=0",
                     "eval.collapse_drop=0.0001", "eval.on_collapse=rollback")
    proc = run_cmd(torchrun("--standalone", "--nproc_per_node=1", "--max-restarts=2", SURVIVAL,
                            *args), tmp_path, env={"PROBE_RECORD_TRACKER": "1"})
    assert proc.returncode != 0
    assert proc.stderr.count("ROBUST ACCURACY COLLAPSED") == 1
    assert proc.stderr.count(" training: ") == 1             # only the first attempt trained
    assert proc.stderr.count("error (JobStopped): an earlier attempt of this job") == 2
    assert "exitcode  : 3" in proc.stderr or "exitcode: 3" in proc.stderr
    # The tracker (its interface as loop.py uses it; tests/survival_probe.py records it): the
    # collapse tag, then FAILED, and nothing from the restarts.
    calls = [json.loads(x) for x in (tmp_path / "tracker.jsonl").read_text().splitlines()]
    assert {c["attempt"] for c in calls} == {"0"}
    assert any("collapse" in c.get("tags", {}) for c in calls if c["call"] == "set_tags")
    assert [c["status"] for c in calls if c["call"] == "close"] == ["FAILED"]
