"""Child processes of `python -m dist_free.bench`: peak memory, DDP scaling, evaluation speed.

Each measurement needs a process of its own: a CPU process's peak RSS only ever grows, so free and
natural training must not share one; DDP needs torchrun's ranks. The parent starts them with
`spawn_memory` / `spawn_ranks` and reads back one JSON file each. Every world size, 1 included,
runs under torchrun with the same threads per rank, so world sizes compare like for like.

Both sides are here, to be imported: the parent's (spawn_*) and the children's (*_worker). What
a child process runs is worker_main.py:

    python -m dist_free.bench.worker_main memory --method free --model resnet18 ... --out F.json
    torchrun --nproc_per_node=2 -m dist_free.bench.worker_main ddp --threads 1 ... --out F.json
    torchrun --nproc_per_node=2 -m dist_free.bench.worker_main eval --threads 1 ... --out F.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dist_free import distributed, environment
from dist_free.bench.timing import make_batch, summary, sync
from dist_free.engine import attacks, method_registry
from dist_free.engine.free import FreeAdversarialTrainer
from dist_free.engine.methods import build_method
from dist_free.engine.models import build_model
from dist_free.precision import DTYPES

REPO = environment.REPO


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
    """The bench's eps and replays, passed to the methods the registry says take them."""
    offered = {"eps": 4 / 255, "replays": replays}
    return {key: value for key, value in offered.items() if method_registry.takes(name, key)}


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
    # The perturbation, the replay input and the eager update's scratch: all free training adds.
    buffers = method.buffer_tensors() if isinstance(method, FreeAdversarialTrainer) else []
    buffer_bytes = sum(t.numel() * t.element_size() for t in buffers)
    peak = environment.peak_memory_bytes(device)
    return {"method": a.method, "peak_bytes": peak, "baseline_bytes": baseline,
            "buffer_bytes": buffer_bytes,
            "measure": "max_memory_allocated" if device.type == "cuda" else "peak RSS (ru_maxrss)"}


def spawn_memory(methods: list[str], cfg: dict, workdir: Path, threads: int) -> dict:
    """One child per method, run at the same time: peak memory does not mind sharing the cores."""
    outs = {m: workdir / f"memory_{m}.json" for m in methods}
    procs = {m: start_child([sys.executable, "-m", "dist_free.bench.worker_main", "memory", "--method",
                             m, "--out", str(out)] + worker_flags(cfg), threads)
             for m, out in outs.items()}
    return {m: finish_child(procs[m], outs[m], timeout=600) for m in methods}


OPTIONAL_FLAGS = ("rounds", "classes", "eps", "pgd_steps", "pgd_restarts", "aa_batch_never")


def worker_flags(cfg: dict) -> list[str]:
    flags = ["--model", cfg["model"], "--image-size", str(cfg["image_size"]), "--batch",
             str(cfg["batch"]), "--dtype", cfg["dtype"], "--device", cfg["device"],
             "--replays", str(cfg["replays"]), "--steps", str(cfg["steps"])]
    for key in OPTIONAL_FLAGS:
        if key in cfg:
            flags += ["--" + key.replace("_", "-"), str(cfg[key])]
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


def local_hook(_state, bucket):
    """DDP with the all-reduce taken out: each rank keeps its own gradient. Everything else DDP
    does (bucketing, hooks, the reducer) stays, so the time it saves is communication's."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def timed_steps(method, images, labels, steps: int, device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        method.train_step(images, labels)
    sync(device)
    return time.perf_counter() - start


def ddp_method(name: str, model, a, d, hook, state):
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = model
    if d.distributed:
        net = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        net.register_comm_hook(state, hook)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    return build_method(name, net, opt, amp_dtype=DTYPES[a.dtype], **method_options(name, a.replays))


def measure_method(name: str, a, d) -> dict:
    """Images/s per rank of DDP training, and (world size > 1) the share of its time that the
    all-reduce costs: the same steps with the all-reduce taken out, interleaved round by round."""
    torch.manual_seed(0)   # every rank starts from the same weights, as DDP requires
    model = build_model(a.model, 1000, channels_last=a.channels_last).to(d.device).train()
    local_model = copy.deepcopy(model)
    counter = CommCounter()
    method = ddp_method(name, model, a, d, CommCounter.hook, counter)
    local = ddp_method(name, local_model, a, d, local_hook, None) if d.distributed else None
    torch.manual_seed(1 + d.rank)
    images, labels = make_batch(a.batch, a.image_size, 1000, d.device, a.channels_last)
    for m in filter(None, (method, local)):   # start-up: DDP's first-iteration bucket rebuild
        m.train_step(images, labels)
    counter.bytes = 0
    method.train_step(images, labels)         # count exactly one train_step
    sync(d.device)
    per_step = counter.bytes
    times, local_times = [], []
    for _ in range(a.rounds):
        distributed.barrier()
        times.append(timed_steps(method, images, labels, a.steps, d.device))
        if local is not None:
            distributed.barrier()
            local_times.append(timed_steps(local, images, labels, a.steps, d.device))
    elapsed = statistics.median(times)
    replays = a.replays if method_registry.takes(name, "replays") else 1
    passes = a.steps * replays
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    delta = getattr(method, "perturbation", None)
    out = {"images_per_s_per_rank": a.steps * a.batch / elapsed,
           "passes_per_s_per_rank": passes / elapsed,
           "round_seconds": times,
           "allreduce_bytes_per_train_step": per_step,
           "allreduce_bytes_per_pass": per_step / replays,
           "param_bytes": params,
           "perturbation_bytes": 0 if delta is None else delta.numel() * delta.element_size()}
    if local is not None:
        shares = [1 - b / t for t, b in zip(times, local_times)]
        out.update(local_round_seconds=local_times,
                   images_per_s_per_rank_without_allreduce=a.steps * a.batch / statistics.median(local_times),
                   allreduce_share=summary(shares))
    return out


def measure_rank(a, d) -> dict:
    return {name: measure_method(name, a, d) for name in ("free", "natural")}


def gather(result: dict, d) -> list:
    gathered = [None] * d.world_size if d.distributed else [result]
    if d.distributed:
        dist.all_gather_object(gathered, result)
    return gathered


def ddp_worker(a: argparse.Namespace) -> dict | None:
    torch.set_num_threads(a.threads)
    d = distributed.init(a.device)
    try:
        ranks = gather(measure_rank(a, d), d)
        return {"world_size": d.world_size, "ranks": ranks, "threads_per_rank": torch.get_num_threads(),
                "backend": dist.get_backend() if d.distributed else None} if d.is_main else None
    finally:
        distributed.shutdown()


def spawn_ranks(kind: str, world_size: int, cfg: dict, workdir: Path, threads: int,
                timeout: float = 1800) -> dict:
    """`world_size` ranks of a worker under torchrun, `threads` torch threads each."""
    out = workdir / f"{kind}_{world_size}.json"
    out.unlink(missing_ok=True)      # a rerun must not read an earlier run's file
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={world_size}", "-m", "dist_free.bench.worker_main", kind,
           "--out", str(out), "--threads", str(threads)] + worker_flags(cfg)
    return run_child(cmd, out, threads, timeout=timeout)


# ---------------------------------------------------------------- evaluation throughput

def unbreakable(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with its last layer shrunk a million-fold and one class given a margin of
    10: no eps-bounded input change can move the prediction, so every attack spends its whole
    budget on every image (AutoAttack's worst case; its cost is the network's, unchanged)."""
    model = copy.deepcopy(model)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e-6)
        last.bias.zero_()
        last.bias[0] = 10.0
    return model


def rate(fn, images: int, rounds: int, warmup: bool = True) -> dict:
    """Images/s over `rounds` calls (median), after one untimed call if `warmup`. fn returns the
    per-image robust flags, or (flags, robust count after each attack)."""
    if warmup:
        fn()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
    robust, after = result if isinstance(result, tuple) else (result, None)
    out = {"images_per_s": images / statistics.median(seconds), "seconds": seconds,
           "images": images, "robust": int(robust.sum())}
    return out if after is None else {**out, "robust_after": after}


def eval_worker(a: argparse.Namespace) -> dict | None:
    """PGD (attacks.robust_correct) and AutoAttack (standard) images/s on this rank's batch."""
    torch.set_num_threads(a.threads)
    d = distributed.init(a.device)
    try:
        torch.manual_seed(0)
        model = build_model(a.model, a.classes).to(d.device).eval()
        g = torch.Generator().manual_seed(1 + d.rank)
        images = torch.rand(a.batch, 3, a.image_size, a.image_size, generator=g).to(d.device)
        with torch.no_grad():
            # Labels = the model's own predictions: every image starts correctly classified, so
            # every one is attacked (a wrong clean prediction would skip it).
            labels = model(images).argmax(1)
        eps = a.eps
        result = {"pgd": rate(lambda: attacks.robust_correct(
            model, images, labels, eps=eps, steps=a.pgd_steps, restarts=a.pgd_restarts),
            a.batch, a.rounds)}
        aa_run, aa_source = autoattack_runner()
        # AutoAttack's cost grows with robust accuracy: each attack runs only on the images the
        # earlier ones left robust. Two ends: the fresh network, which it breaks almost entirely,
        # and the same network made unbreakable, on which all four attacks run in full.
        # (Deterministic seeds: one timed run each; the PGD runs above warmed the kernels up.)
        for regime, net, n in (("fresh", model, a.batch),
                               ("unbreakable", unbreakable(model), a.aa_batch_never)):
            x = images[:n]
            with torch.no_grad():
                y = net(x).argmax(1)
            result[f"autoattack_{regime}"] = rate(lambda: aa_run(net, x, y, eps), n, 1, warmup=False)
        result["autoattack_source"] = aa_source
        ranks = gather(result, d)
        return {"world_size": d.world_size, "ranks": ranks,
                "threads_per_rank": torch.get_num_threads()} if d.is_main else None
    finally:
        distributed.shutdown()


def autoattack_runner():
    """dist_free.evaluation.autoattack.run_standard (the evaluator's own path) where it exists; else the
    authors' package called directly, the same standard L-inf version."""
    try:
        from dist_free.evaluation import autoattack
        def run(net, x, y, eps):
            r = autoattack.run_standard(net, x, y, eps=eps)
            return r.robust, r.robust_after
        return run, "dist_free.evaluation.autoattack.run_standard"
    except ImportError:
        from pyautoattack import AutoAttack

        def run(net, x, y, eps):
            aa = AutoAttack(net, norm="Linf", eps=eps, version="standard", seed=0, device=x.device)
            _, y_adv = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
            return y_adv == y
        return run, "pyautoattack.AutoAttack (standard) directly"
