"""What this process runs on and from: device, memory, commit, versions, the launch command.

One home for environment probing, shared by run tracking (MLflow tags), the trainer's metrics and
the benchmarks, so a figure and a run are labelled the same way. Nothing here imports DALI or
MLflow (their versions come from the installed distributions: importing DALI costs seconds).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda -> this process's device; CUDA requested but absent is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} asked for, but no CUDA device is visible; "
                           "use cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} "
                           "visible; lower --nproc_per_node")
    return torch.device("cuda", local_rank)


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global RNGs (the trainer passes run.seed + rank)."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Where the RNGs `seed_everything` seeds stand now: torch's CPU generator, `device`'s CUDA
    generator (draws on a GPU come from it: dropout, drop-path, random starts) and Python's.
    Tensors and tuples of ints only, so a checkpoint holding it loads with weights_only=True."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Put the RNGs back where `rng_state` found them (a CUDA state only on a CUDA device)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated tensors; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty) of the source this package runs from; DIST_FREE_GIT_COMMIT for images
    built without .git (dirty unknown: None)."""
    baked = os.environ.get("DIST_FREE_GIT_COMMIT")
    if baked:
        return baked, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO, capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, bool(status.strip())


def dali_version() -> str | None:
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def mlflow_version() -> str | None:
    try:
        return importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: torch.device) -> str:
    """What every figure and run is tagged with: the GPU's name, or the CPU model and cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{cpu_model()}, {os.cpu_count()} cores"


def device_names() -> str:
    """Every visible GPU, or the CPU."""
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return device_label(torch.device("cpu"))


def launch_command() -> str:
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: the agent holds the real command
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            command = shlex.join(a.decode() for a in raw.split(b"\0") if a)
        except OSError:
            pass
    return command


def versions() -> dict[str, str | None]:
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "dali": dali_version(),
            "mlflow": mlflow_version(), "python": platform.python_version()}
