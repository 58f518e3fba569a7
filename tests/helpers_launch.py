"""Launching the trainer and friends as a user does: torchrun subprocesses, ports, waits."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROBE = str(ROOT / "tests" / "train_probe.py")
# One short real epoch of free training (m=4): 4 natural-training epochs / 4 replays.
QUICK = ["optim.epochs=4", "eval.max_batches=2", "eval.steps=2", "data.batch_size=32",
         "run.log_every=5", "tracking.enabled=false"]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def probe_env(out: Path, **extra) -> dict:
    # PYTHONPATH: the probe script runs from tests/, and must import this checkout's packages.
    return {**os.environ, "PROBE_OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            **extra}


def run_cmd(cmd, out: Path, timeout=300, env=None, **kw) -> subprocess.CompletedProcess:
    env = probe_env(out, **(env or {}))
    kw.setdefault("cwd", ROOT)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def demo_args(demo_root, run_dir, *extra):
    return ["--config", "configs/demo.yaml", f"data.root={demo_root}", f"run.dir={run_dir}",
            *QUICK, *extra]


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def assert_same_weights(a: dict, b: dict) -> None:
    """Parameters must match exactly. BatchNorm running statistics are per rank between
    forwards (DDP broadcasts rank 0's at each forward; checkpoints keep rank 0's), so not those."""
    weights = [k for k in a if "running_" not in k and "num_batches_tracked" not in k]
    assert len(weights) >= 8
    for k in weights:
        assert torch.equal(a[k], b[k]), k


def wait_for_file(path: Path, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    """Until `path` exists (a checkpoint, a marker); fails early if `proc` has exited."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.2)


def stop_within(proc: subprocess.Popen, sig: int, grace_s: float) -> str:
    """Send `sig`; assert a clean exit (status 0, no traceback) within `grace_s`; the output."""
    sent = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    assert proc.returncode == 0, out[-3000:]
    assert took < grace_s, f"{took:.1f} s to stop after signal {sig}\n{out[-2000:]}"
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    print(f"stopped {took:.1f} s after signal {sig}")
    return out


def two_rank_states(out: Path) -> tuple[dict, dict]:
    """The two ranks' final weights and perturbations (train_probe writes them): the weights must
    agree, and each rank's warm-started perturbation is its own and non-zero."""
    import torch
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(r0["model"], r1["model"])
    assert r0["perturbation"].abs().sum() > 0 and r1["perturbation"].abs().sum() > 0
    assert not torch.equal(r0["perturbation"], r1["perturbation"])
    return r0, r1
