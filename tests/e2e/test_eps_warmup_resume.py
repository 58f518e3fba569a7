"""An eps warm-up through the trainer: N-FGSM on the digits demo logs eps at every step, and a
run stopped mid-warm-up and resumed trains each step at the eps the uninterrupted run used."""

import json
import sys

import pytest
from helpers_launch import ROOT, assert_ok, demo_args, run_cmd

from dist_free import checkpoint

pytestmark = pytest.mark.slow
SURVIVAL = str(ROOT / "tests" / "survival_probe.py")
EPS = 8 / 255


def eps_by_step(out) -> dict[int, float]:
    """train/eps as the tracker was given it (tests/survival_probe.py records every call)."""
    calls = [json.loads(x) for x in (out / "tracker.jsonl").read_text().splitlines()]
    logged = [(c["step"], c["metrics"]["train/eps"]) for c in calls
              if c["call"] == "log_metrics" and "train/eps" in c["metrics"]]
    steps = [step for step, _ in logged]
    assert steps == sorted(set(steps)), "a step was logged twice"
    return dict(logged)


def test_a_run_stopped_mid_warm_up_resumes_at_the_eps_it_would_have_had(demo_root, tmp_path):
    # 2 real epochs of N-FGSM (one pass per minibatch: natural epochs = real epochs), eps
    # warming up from eps / 4 over the first 1.5; a log point at every step.
    args = demo_args(demo_root, tmp_path / "runs", "method.name=nfgsm", "optim.epochs=2",
                     "optim.warmup_epochs=0", "method.eps_warmup_epochs=1.5",
                     "method.eps_warmup_start=0.25", "run.log_every=1", "eval.probes_per_epoch=0")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    for out in (whole, parts):
        out.mkdir()
    cmd = [sys.executable, SURVIVAL, *args]
    assert_ok(run_cmd(cmd, whole, env={"PROBE_RECORD_TRACKER": "1"}))
    uninterrupted = eps_by_step(whole)
    last = tmp_path / "runs" / "demo" / "checkpoints" / "last.pt"
    steps = checkpoint.load(last)["global_step"]
    assert sorted(uninterrupted) == list(range(1, steps + 1))          # every step logged
    values = [uninterrupted[s] for s in range(1, steps + 1)]
    assert values[0] == pytest.approx(EPS / 4) and values[-1] == pytest.approx(EPS)
    assert values == sorted(values) and len(set(values)) > steps // 2  # rising, step by step

    last.parent.parent.rename(tmp_path / "runs" / "whole_run")
    stop_at = steps // 3                                                 # inside epoch 0
    assert_ok(run_cmd(cmd, parts, env={"PROBE_RECORD_TRACKER": "1",
                                       "PROBE_SIGTERM_AT_STEP": str(stop_at)}))
    saved = checkpoint.load(last)
    assert (saved["epoch"], saved["global_step"]) == (0, stop_at)
    assert_ok(run_cmd(cmd, parts, env={"PROBE_RECORD_TRACKER": "1"}))
    resumed = eps_by_step(parts)
    assert sorted(resumed) == list(range(1, steps + 1))
    # Exact, not approximate: the same steps at the same eps, before and after the stop.
    assert resumed == uninterrupted
