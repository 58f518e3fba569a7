"""Child processes of `python -m dist_free.bench`: peak memory and DDP scaling.

Each measurement needs a process of its own: a CPU process's peak RSS only ever grows, so free and
natural training must not share one; DDP needs torchrun's ranks. The parent starts them with
`spawn_memory` / `spawn_ddp` and reads back one JSON file each.

    python -m dist_free.bench.workers memory --method free --model resnet18 ... --out F.json
    torchrun --nproc_per_node=2 -m dist_free.bench.workers ddp --model small_cnn ... --out F.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dist_free import distributed, environment
from dist_free.bench.timing import DTYPES, make_batch, sync
from dist_free.methods import build_method
from dist_free.models import build_model

REPO = Path(__file__).resolve().parents[1]


def child_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start_child(cmd: list[str], threads: int) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=child_env(threads), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_child(proc: subprocess.Popen, out: Path, timeout: float) -> dict:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"bench worker timed out after {timeout} s: {' '.join(proc.args)}")
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"bench worker failed ({' '.join(proc.args)}):\n{stderr[-3000:]}")
    return json.loads(out.read_text())


def run_child(cmd: list[str], out: Path, threads: int, timeout: float) -> dict:
    return finish_child(start_child(cmd, threads), out, timeout)


def method_options(name: str, replays: int) -> dict:
    return {"eps": 4 / 255, "replays": replays} if name == "free" else {}


# ---------------------------------------------------------------- memory

def rss_bytes() -> int:
    """Current resident set size (Linux /proc; the peak comes from getrusage)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_worker(a: argparse.Namespace) -> dict:
    device = torch.device(a.device)
    model = build_model(a.model, 1000, channels_last=a.channels_last).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    method = build_method(a.method, model, opt, amp_dtype=DTYPES[a.dtype],
                          **method_options(a.method, a.replays))
    images, labels = make_batch(a.batch, a.image_size, 1000, device, a.channels_last)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(a.steps):
        method.train_step(images, labels)
    sync(device)
    buffers = [getattr(method, "_delta", None), getattr(method, "_x_adv", None)]
    buffer_bytes = sum(t.numel() * t.element_size() for t in buffers if t is not None)
    peak = environment.peak_memory_bytes(device)
    return {"method": a.method, "peak_bytes": peak, "baseline_bytes": baseline,
            "buffer_bytes": buffer_bytes,
            "measure": "max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)"}


def spawn_memory(methods: list[str], cfg: dict, workdir: Path, threads: int) -> dict:
    """One child per method, run at the same time: peak memory does not mind sharing the cores."""
    outs = {m: workdir / f"memory_{m}.json" for m in methods}
    procs = {m: start_child([sys.executable, "-m", "dist_free.bench.workers", "memory", "--method",
                             m, "--out", str(out)] + worker_flags(cfg), threads)
             for m, out in outs.items()}
    return {m: finish_child(procs[m], outs[m], timeout=600) for m in methods}


def worker_flags(cfg: dict) -> list[str]:
    flags = ["--model", cfg["model"], "--image-size", str(cfg["image_size"]), "--batch",
             str(cfg["batch"]), "--dtype", cfg["dtype"], "--device", cfg["device"],
             "--replays", str(cfg["replays"]), "--steps", str(cfg["steps"])]
    return flags + (["--channels-last"] if cfg["channels_last"] else [])


# ---------------------------------------------------------------- DDP scaling

class CommCounter:
    """Bytes DDP all-reduces, counted in a comm hook that then does DDP's usual all-reduce."""

    def __init__(self):
        self.bytes, self.calls = 0, 0

    @staticmethod
    def hook(state: "CommCounter", bucket):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        buf = bucket.buffer()
        state.bytes += buf.numel() * buf.element_size()
        state.calls += 1
        return default_hooks.allreduce_hook(None, bucket)


def timed_steps(method, images, labels, steps: int, device) -> float:
    method.train_step(images, labels)      # start-up: DDP's first-iteration bucket rebuild
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        method.train_step(images, labels)
    sync(device)
    return time.perf_counter() - start


def ddp_method(name: str, model, a, d, counter):
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = model
    if d.distributed:
        net = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        net.register_comm_hook(counter, CommCounter.hook)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    return build_method(name, net, opt, amp_dtype=DTYPES[a.dtype], **method_options(name, a.replays))


def measure_method(name: str, a, d) -> dict:
    torch.manual_seed(0)   # every rank starts from the same weights, as DDP requires
    model = build_model(a.model, 1000, channels_last=a.channels_last).to(d.device).train()
    counter = CommCounter()
    method = ddp_method(name, model, a, d, counter)
    torch.manual_seed(1 + d.rank)
    images, labels = make_batch(a.batch, a.image_size, 1000, d.device, a.channels_last)
    elapsed = timed_steps(method, images, labels, a.steps, d.device)
    passes = a.steps * (a.replays if name == "free" else 1)
    before = counter.bytes
    counter.bytes = 0
    method.train_step(images, labels)    # count exactly one train_step
    sync(d.device)
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    delta = getattr(method, "perturbation", None)
    return {"images_per_s_per_rank": a.steps * a.batch / elapsed,
            "passes_per_s_per_rank": passes / elapsed,
            "allreduce_bytes_per_train_step": counter.bytes,
            "allreduce_bytes_per_pass": counter.bytes / (a.replays if name == "free" else 1),
            "allreduce_bytes_timed": before, "param_bytes": params,
            "perturbation_bytes": 0 if delta is None else delta.numel() * delta.element_size()}


def measure_rank(a, d) -> dict:
    return {name: measure_method(name, a, d) for name in ("free", "natural")}


def single_process(cfg: dict) -> dict:
    """World size 1 in this very process (no DDP, no launcher): the baseline per-rank rate."""
    a = parse_args(["ddp", "--out", "-"] + worker_flags(cfg))
    device = environment.resolve_device(a.device)
    return {"world_size": 1, "ranks": [measure_rank(a, distributed.DistInfo(device=device))],
            "threads_per_rank": torch.get_num_threads(), "backend": None}


def ddp_worker(a: argparse.Namespace) -> dict | None:
    d = distributed.init(a.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world_size))
    try:
        result = measure_rank(a, d)
        gathered = [None] * d.world_size if d.distributed else [result]
        if d.distributed:
            dist.all_gather_object(gathered, result)
        return {"world_size": d.world_size, "ranks": gathered,
                "threads_per_rank": torch.get_num_threads(),
                "backend": dist.get_backend() if d.distributed else None} if d.is_main else None
    finally:
        distributed.shutdown()


def spawn_ddp(world_size: int, cfg: dict, workdir: Path, cores: int) -> dict:
    out = workdir / f"ddp_{world_size}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world_size}", "-m", "dist_free.bench.workers", "ddp",
           "--out", str(out)] + worker_flags(cfg)
    return run_child(cmd, out, max(1, cores // world_size), timeout=600)


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_free.bench.workers")
    p.add_argument("kind", choices=["memory", "ddp"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", default="free")
    p.add_argument("--model", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--replays", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--channels-last", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = memory_worker(a) if a.kind == "memory" else ddp_worker(a)
    if result is not None:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
