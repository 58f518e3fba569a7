"""The torchrun trainer end to end on the digits demo (CPU, gloo), as a user runs it."""

import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers_launch import (  # noqa: F401
    PROBE,
    QUICK,
    ROOT,
    assert_ok,
    assert_same_weights,
    demo_args,
    free_port,
    probe_env,
    run_cmd,
    torchrun,
    two_rank_states,
    wait_for_file,
)

from dist_free import checkpoint

pytestmark = pytest.mark.slow


def test_two_ranks_train_identical_weights_with_their_own_perturbations(demo_root, tmp_path):
    proc = run_cmd(torchrun("--nproc_per_node=2", "--standalone", PROBE,
                            *demo_args(demo_root, tmp_path)), tmp_path)
    assert_ok(proc)
    r0, r1 = two_rank_states(tmp_path)
    state = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["world_size"] == 2
    assert torch.equal(state["rank_states"][1]["perturbation"], r1["perturbation"])   # every rank saved
    report = state["eval"]                   # the epoch's PGD-2 evaluation, in the checkpoint
    assert report["samples"] > 0 and (report["pgd_steps"], report["pgd_restarts"]) == (2, 1)


def test_two_nodes_train_together_after_a_c10d_rendezvous(demo_root, tmp_path):
    port = free_port()
    node = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", PROBE,
                    *demo_args(demo_root, tmp_path))
    env = probe_env(tmp_path)
    nodes = [subprocess.Popen(node, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(r0["model"], r1["model"])
    assert checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")["world_size"] == 2


def test_killed_run_resumes_at_its_checkpoint_with_the_saved_weights(demo_root, tmp_path):
    args = demo_args(demo_root, tmp_path, "optim.epochs=16")      # 4 real epochs
    cmd = [sys.executable, PROBE, *args]
    env = probe_env(tmp_path)
    last = tmp_path / "demo" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_file(last, proc)
        proc.send_signal(signal.SIGKILL)                          # no chance to clean up
        proc.wait(timeout=30)
    finally:
        proc.kill()
    saved = checkpoint.load(last)
    assert 1 <= saved["epoch"] < 4
    assert_ok(run_cmd(cmd, tmp_path))
    resumed = torch.load(tmp_path / "resumed_rank0.pt", weights_only=True)
    assert resumed["epoch"] == saved["epoch"] and resumed["global_step"] == saved["global_step"]
    for k, v in saved["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    assert checkpoint.load(last)["epoch"] == 4


def test_a_sigterm_mid_epoch_resumes_at_the_batch_it_saved(demo_root, tmp_path):
    # The process signals itself after its 7th step; the loop checks for a stop after every step
    # (dist_free/trainer/stops/stop_vote.py; one process needs no vote), so it stops and saves at step 7 of
    # epoch 1, mid-epoch, between two log points (log_every=5).
    cmd = [sys.executable, PROBE, *demo_args(demo_root, tmp_path, "optim.epochs=8")]
    assert_ok(run_cmd(cmd, tmp_path, env={"PROBE_SIGTERM_AT_STEP": "7"}))
    saved = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["batch_in_epoch"], saved["global_step"]) == (0, 7, 7)
    assert not (tmp_path / "rank0.pt").exists()               # it stopped, it did not finish
    assert_ok(run_cmd(cmd, tmp_path))
    resumed = torch.load(tmp_path / "resumed_rank0.pt", weights_only=True)
    assert (resumed["epoch"], resumed["start_batch"], resumed["global_step"]) == (0, 7, 7)
    for k, v in saved["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    done = torch.load(tmp_path / "rank0.pt", weights_only=True)
    final = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    # The interrupted epoch was finished from batch 7, not restarted: two epochs' steps in all.
    assert done["steps_per_epoch"] > 10
    assert final["epoch"] == 2 and final["global_step"] == 2 * done["steps_per_epoch"]
    assert done["steps_run"] == 2 * done["steps_per_epoch"] - 7


def test_a_worker_killed_under_torchrun_is_restarted_resuming_the_run(demo_root, tmp_path):
    proc = run_cmd(torchrun("--nproc_per_node=2", "--standalone", "--max-restarts=1", PROBE,
                            *demo_args(demo_root, tmp_path, "optim.epochs=8")),
                   tmp_path, env={"PROBE_DIE_AFTER_EPOCH": "1"})
    assert_ok(proc)
    resumed = torch.load(tmp_path / "resumed_rank0.pt", weights_only=True)
    assert resumed["epoch"] == 1
    assert checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")["epoch"] == 2


def no_worker_traceback(stderr: str) -> bool:
    return "dist_free/" not in stderr and "pipelines/" not in stderr


def assert_user_error_exit(proc, under_torchrun: bool) -> None:
    """Exit status 2; under torchrun (which itself exits 1 and lists its workers), a worker's 2,
    and no other status than 2 or torchrun's own SIGTERM (-15) to a sibling still starting up."""
    if not under_torchrun:
        assert proc.returncode == 2, proc.stderr[-3000:]
        return
    assert proc.returncode == 1, proc.stderr[-3000:]
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr))
    assert "2" in codes and codes <= {"2", "-15"}, proc.stderr[-3000:]


@pytest.mark.parametrize("override, message", [
    ("method.eps=0", "method.eps must be > 0"),
    ("method.replays=0", "method.replays must be > 0"),
    ("method.epss=1", "unknown config key 'method.epss'"),
    ("data.batch_size=many", "data.batch_size: expected a number"),
])
def test_bad_config_stops_before_any_worker_starts_training(override, message, tmp_path):
    # Under torchrun once (the workers' path); the parser is the same code for the rest.
    launcher = torchrun("--nproc_per_node=2", "--standalone") if "eps=0" in override else []
    proc = run_cmd([*(launcher or [sys.executable]), "-m", "dist_free.train", "--config",
                    "configs/demo.yaml", override], tmp_path, timeout=120)
    assert_user_error_exit(proc, under_torchrun=bool(launcher))
    assert message in proc.stderr
    assert no_worker_traceback(proc.stderr)


@pytest.mark.parametrize("root, message", [
    ("/nonexistent/imagenet", "/nonexistent/imagenet"),
])
def test_bad_data_root_gives_one_clear_error(root, message, tmp_path):
    proc = run_cmd(torchrun("--nproc_per_node=2", "--standalone", "-m", "dist_free.train",
                            "--config", "configs/demo.yaml", f"data.root={root}",
                            f"run.dir={tmp_path}"), tmp_path, timeout=120)
    assert_user_error_exit(proc, under_torchrun=True)
    assert message in proc.stderr and "DataError" in proc.stderr
    assert no_worker_traceback(proc.stderr)


def test_class_count_mismatch_with_the_model_is_refused(demo_root, tmp_path):
    proc = run_cmd([sys.executable, "-m", "dist_free.train",
                    *demo_args(demo_root, tmp_path, "model.num_classes=1000")], tmp_path)
    assert proc.returncode == 2 and "1000" in proc.stderr and no_worker_traceback(proc.stderr)


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_a_corrupt_jpeg_met_mid_epoch_is_named(demo_root, tmp_path, damage):
    """DALI either raises (we name the file at once) or, sometimes, segfaults: then the next
    start names it from the decoder's in-flight note. Either way the user learns which file."""
    import shutil
    root = tmp_path / "digits"
    shutil.copytree(demo_root, root)
    victim = sorted((root / "train" / "7").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:200] if damage == "truncate" else b"not a JPEG\n")
    cmd = [sys.executable, "-m", "dist_free.train", *demo_args(root, tmp_path / "runs")]
    proc = run_cmd(cmd, tmp_path)
    if proc.returncode != 2:                      # the decoder crashed: start again
        assert proc.returncode < 0, proc.stderr[-3000:]
        proc = run_cmd(cmd, tmp_path)
        assert "the previous run died while decoding" in proc.stderr
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(victim) in proc.stderr and "dist_free.data verify" in proc.stderr
    assert no_worker_traceback(proc.stderr)


def test_a_run_killed_while_decoding_a_damaged_file_names_it_at_the_next_start(demo_root, tmp_path):
    """A decoder segfault, made deterministic: SIGKILL (no Python code runs after it, as after a
    segfault) while the loader's in-flight note lists files being decoded; one of them is then
    damaged. The next start must name that file from the note, before training."""
    import json
    import shutil
    from pathlib import Path
    root = tmp_path / "digits"
    shutil.copytree(demo_root, root)
    cmd = [sys.executable, "-m", "dist_free.train", *demo_args(root, tmp_path / "runs")]
    note = tmp_path / "runs" / "demo" / ".decoding_train_rank0.json"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=probe_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_file(note, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    in_flight = [Path(p) for p in json.loads(note.read_text())]
    assert in_flight and all(root in p.parents for p in in_flight)
    victim = in_flight[len(in_flight) // 2]
    victim.write_bytes(victim.read_bytes()[:200])
    proc = run_cmd(cmd, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(victim) in proc.stderr and no_worker_traceback(proc.stderr)
    assert note.exists()                     # blamed again until the file is fixed
    assert not list((tmp_path / "runs" / "demo").glob("checkpoints/*.pt"))


def test_resuming_with_a_different_model_is_refused_clearly(demo_root, tmp_path):
    assert_ok(run_cmd([sys.executable, "-m", "dist_free.train",
                       *demo_args(demo_root, tmp_path)], tmp_path))
    proc = run_cmd([sys.executable, "-m", "dist_free.train",
                    *demo_args(demo_root, tmp_path, "model.name=preact_resnet18")], tmp_path)
    assert proc.returncode == 2 and "last.pt" in proc.stderr and no_worker_traceback(proc.stderr)
