"""`python -m dist_free.bench --gpu-check`: every GPU path of the project, checked and measured in one run.

    python -m dist_free.bench --gpu-check                      # on a CUDA host: full sizes
    python -m dist_free.bench --gpu-check --device cpu         # tiny sizes, gloo, CPU decoder (tests)
    python -m dist_free.bench --gpu-check --out gpu.json --only update_fused_vs_eager,step_speed

It needs only torch and torchvision (plus scikit-learn and Pillow for the generated JPEGs): no
MLflow, no network; DALI only for what DALI does. DALI's `mixed` decoder is measured when DALI is
importable; otherwise torchvision's `decode_jpeg` on the device stands in and the result says so,
and the dali-gpu trainer check says SKIP. Each check prints one line, PASS / FAIL / SKIP with its
figure; the JSON is rewritten after every check, so a run cut short still leaves what it
measured, and a Markdown table of the run (bench/report.py) is written beside it. A check that
raises is a FAIL naming the exception, and the run goes on with the next one. The exit status
is 1 when any check failed.

Speed and memory figures are judged against the floors in FLOORS (free replay <= 1.10x natural,
fused update >= 0.8x copy bandwidth, free peak memory <= 1.10x natural, compiled faster than
eager): a missed floor is a FAIL. They are judged on CUDA only; on a CPU the figure is printed
beside its floor with SKIP, as is every check that needs CUDA (NCCL, DALI's GPU decoder).

Checks (see README, "Checking a GPU host"):
  correctness: update_fused_vs_eager, free_vs_algorithm1, fp16_scaler_skip, bf16_autocast_step,
               channels_last, process_group, stop_vote_groups, adamw_scaler_ema,
               memory_and_nvml, compile_auto
  speed:       step_speed, update_bandwidth, memory_free_vs_natural, resident_cifar,
               compiled_model
  input:       decode, data_wait
  end to end:  trainer_dali (data.loader=dali-gpu), trainer_e2e (train, checkpoint, resume, PGD
               evaluation, as subprocesses)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import pipelines
from dist_free import environment, precision
from dist_free.bench import timing
from dist_free.bench.algorithm1 import algorithm1
from dist_free.bench.report import gpu_check_table
from dist_free.engine.free import FreeAdversarialTrainer, UpdateWork, compiled_free_update, free_update
from dist_free.engine.methods import build_method
from dist_free.engine.models import build_model
from dist_free.precision import DTYPES
from dist_free.trainer import runtime


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes per mode. Correctness runs small (exactness, not speed, is the question)."""
    model: str                  # speed checks
    image_size: int
    batch: int
    dtype: str
    channels_last: bool
    repeats: int
    small_model: str            # correctness checks
    small_size: int
    small_batch: int
    compile_model: str          # compile_auto: a net whose cold compile takes seconds, not minutes
    update_shape: tuple[int, int, int, int]
    jpegs: int                  # generated 500x375 JPEGs for the decode checks
    decode_batch: int
    wait_steps: int
    cifar: dict                 # resident_cifar: the CIFAR presets' net, batch and dtype
    e2e: dict
    budget_s: float             # checks left when this is spent are skipped, not started


# On an H200 the run is about 6 minutes with cold compiles (estimated from the parts measured at
# b2b401e; not yet run whole): the budget stops starting checks at 7, inside one 10-minute call.
GPU_SIZES = Sizes(model="resnet50", image_size=224, batch=256, dtype="bf16", channels_last=True,
                  repeats=5, small_model="resnet18", small_size=64, small_batch=16,
                  compile_model="small_cnn", update_shape=(256, 3, 224, 224), jpegs=512,
                  decode_batch=128, wait_steps=8,
                  cifar=dict(model="shafahi2019_wrn32_10", batch=128, dtype="fp32", replays=8,
                             steps=8, images=1280),
                  e2e=dict(model="resnet50", image_size=224, batch=64, train_images=768,
                           val_images=128, channels_last=True, amp="bf16", threads=8),
                  budget_s=420)
CPU_SIZES = Sizes(model="small_cnn", image_size=32, batch=8, dtype="fp32", channels_last=False,
                  repeats=2, small_model="small_cnn", small_size=32, small_batch=8,
                  compile_model="small_cnn", update_shape=(8, 3, 32, 32), jpegs=16, decode_batch=8,
                  wait_steps=2,
                  cifar=dict(model="small_cnn", batch=8, dtype="fp32", replays=4, steps=2,
                             images=40),
                  e2e=dict(model="small_cnn", image_size=32, batch=8, train_images=48,
                           val_images=16, channels_last=False, amp="off", threads=1),
                  budget_s=900)


@dataclasses.dataclass
class Result:
    status: str                 # PASS, FAIL or SKIP
    figure: str                 # one line for the console
    data: dict = dataclasses.field(default_factory=dict)


def verdict(ok: bool, figure: str, **data) -> Result:
    return Result("PASS" if ok else "FAIL", figure, data)


# ---------------------------------------------------------------- correctness

def update_operands(shape, device, x_dtype, channels_last: bool):
    x, delta, grad, x_adv = timing.update_operands(shape, device, x_dtype)
    if channels_last:
        x, delta, grad, x_adv = (t.contiguous(memory_format=torch.channels_last)
                                 for t in (x, delta, grad, x_adv))
    return x, delta, grad, x_adv


def check_update_fused_vs_eager(s: Sizes, device) -> Result:
    """The compiled update against the eager one, on the trainer's operands: delta and the next
    replay input bit-identical, the input still fp32, for each loader dtype and memory layout and
    with the scaler's skip flag both clear and set."""
    fused, cases, worst = compiled_free_update(), [], 0.0
    x_dtypes = (torch.float16, torch.float32) if device.type == "cuda" else (torch.float32,)
    for x_dtype in x_dtypes:
        for channels_last in (False, True):
            for inf in (0.0, 1.0):
                found_inf = torch.tensor(inf, device=device)
                a = update_operands(s.update_shape, device, x_dtype, channels_last)
                b = [t.clone() for t in a]
                eps = 4 / 255
                free_update(a[0], a[1], a[2], found_inf, eps, eps, a[3], True,
                                 UpdateWork.like(a[1]))
                fused(b[0], b[1], b[2], found_inf, eps, eps, b[3], True)
                same = torch.equal(a[1], b[1]) and torch.equal(a[3], b[3])
                worst = max(worst, float((a[1] - b[1]).abs().max()), float((a[3] - b[3]).abs().max()))
                cases.append(dict(x_dtype=str(x_dtype), channels_last=channels_last, found_inf=inf,
                                  identical=same, next_input_dtype=str(b[3].dtype)))
    ok = all(c["identical"] and c["next_input_dtype"] == "torch.float32" for c in cases)
    return verdict(ok, f"{sum(c['identical'] for c in cases)}/{len(cases)} cases bit-identical "
                       f"(max diff {worst:.1e})", cases=cases)


def small_setup(s: Sizes, device, seed: int = 0, channels_last: bool = False):
    torch.manual_seed(seed)
    model = build_model(s.small_model, 10, channels_last=channels_last).to(device).train()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.rand(s.small_batch, 3, s.small_size, s.small_size, generator=g),
                torch.randint(10, (s.small_batch,), generator=g)) for _ in range(3)]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model, [(x.to(device).contiguous(memory_format=fmt), y.to(device)) for x, y in batches]


def sgd(model) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                           foreach=False)


class Deterministic:
    """fp32 with TF32 off and deterministic kernels: the two restatements must then agree."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def __exit__(self, *exc):
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = self.saved


@torch.no_grad()
def param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def check_free_vs_algorithm1(s: Sizes, device) -> Result:
    eps, replays = 8 / 255, 4
    with Deterministic():
        model, batches = small_setup(s, device)
        ours_model, ref_model = model, copy.deepcopy(model)
        t = FreeAdversarialTrainer(ours_model, sgd(ours_model), eps=eps, replays=replays)
        for x, y in batches:
            t.train_step(x, y)
        ref_delta = algorithm1(ref_model, sgd(ref_model), batches, eps, replays)
    b = batches[0][0].shape[0]
    ours_delta = t.perturbation[:b]
    w_diff, d_diff = param_diff(ours_model, ref_model), float((ours_delta - ref_delta).abs().max())
    mismatch = float((ours_delta != ref_delta).float().mean())
    exact = w_diff == 0.0 and d_diff == 0.0
    ok = w_diff <= 1e-5 and mismatch <= 1e-3
    return verdict(ok, f"weights max diff {w_diff:.1e}, delta differs at {mismatch:.1e} of elements "
                       f"(bit-identical: {exact}), fused={t.fused}",
                   weight_max_diff=w_diff, delta_max_diff=d_diff, delta_mismatch_fraction=mismatch,
                   bit_identical=exact, fused=t.fused)


def check_fp16_scaler_skip(s: Sizes, device) -> Result:
    """A loss scale so large that fp16 gradients overflow: every replay's weight step and
    perturbation step must be skipped. The same trainer at the default scale must move both."""
    model, batches = small_setup(s, device)
    x, y = batches[0]
    before = copy.deepcopy(model.state_dict())
    huge = torch.amp.GradScaler(device.type, init_scale=2.0 ** 100)
    t = FreeAdversarialTrainer(model, sgd(model), eps=8 / 255, replays=2,
                               amp_dtype=torch.float16, scaler=huge)
    t.train_step(x, y)
    frozen = all(torch.equal(before[k], v) for k, v in model.state_dict().items()
                 if v.dtype.is_floating_point and "running" not in k)
    delta_zero = not bool(t.perturbation.abs().sum())
    t2 = FreeAdversarialTrainer(model, sgd(model), eps=8 / 255, replays=2, amp_dtype=torch.float16)
    t2.train_step(x, y)
    moved = param_diff(model, _module_from(before, model)) > 0
    delta_moved = bool(t2.perturbation.abs().sum() > 0)
    ok = frozen and delta_zero and moved and delta_moved
    return verdict(ok, f"overflowing scale: weights frozen={frozen}, delta zero={delta_zero}; "
                       f"default scale: weights moved={moved}, delta moved={delta_moved}",
                   frozen=frozen, delta_zero=delta_zero, moved=moved, delta_moved=delta_moved,
                   scale_after=float(huge.get_scale()))


def _module_from(state: dict, like: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(like)
    m.load_state_dict(state)
    return m


def check_bf16_autocast_step(s: Sizes, device) -> Result:
    """bf16 autocast: the loss of one forward within 2% of fp32's on the same weights and batch;
    then three free steps: finite losses, weights move, delta inside the eps-ball and non-zero,
    the replay input fp32."""
    eps = 8 / 255
    model, batches = small_setup(s, device)
    x, y = batches[0]
    with torch.no_grad():
        fp32_loss = float(F.cross_entropy(copy.deepcopy(model)(x), y))
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16_loss = float(F.cross_entropy(copy.deepcopy(model)(x).float(), y))
    start = copy.deepcopy(model)
    t = FreeAdversarialTrainer(model, sgd(model), eps=eps, replays=2, amp_dtype=torch.bfloat16)
    losses = [t.train_step(bx, by)["loss"] for bx, by in batches]
    delta = t.perturbation
    replay_dtype = t.buffers(batches[0][0]).replay_input.dtype
    inside = float(delta.abs().max()) <= eps + 1e-7
    close = abs(bf16_loss - fp32_loss) <= 0.02 * max(1.0, fp32_loss)
    ok = (all(v == v and abs(v) < 1e4 for v in losses) and param_diff(model, start) > 0
          and inside and float(delta.abs().sum()) > 0 and replay_dtype == torch.float32 and close)
    return verdict(ok, f"forward loss bf16 {bf16_loss:.4f} vs fp32 {fp32_loss:.4f}; step losses "
                       f"{', '.join(f'{v:.3f}' for v in losses)}, |delta| <= eps: {inside}",
                   losses=losses, fp32_loss=fp32_loss, bf16_loss=bf16_loss, delta_inside=inside,
                   x_adv_dtype=str(replay_dtype))


def check_channels_last(s: Sizes, device) -> Result:
    """One free replay in NCHW and in NHWC agrees to rounding (fp32, TF32 off), and the buffer
    follows the batch's layout. One replay, not several: the two layouts run different
    convolution kernels, and the sign step turns their last-bit differences into whole-eps
    differences of delta within a few replays (seen on an H200: 1e-7 after one replay, 9e-2
    after six, the eager and fused updates alike), which says nothing about either layout."""
    eps = 8 / 255
    with Deterministic():
        runs = {}
        for cl in (False, True):
            model, batches = small_setup(s, device, channels_last=cl)
            t = FreeAdversarialTrainer(model, sgd(model), eps=eps, replays=1)
            t.train_step(*batches[0])
            runs[cl] = (model, t.perturbation)
    w_diff = param_diff(runs[False][0], runs[True][0])
    mismatch = float((runs[False][1] != runs[True][1]).float().mean())
    nhwc = runs[True][1].is_contiguous(memory_format=torch.channels_last)
    ok = w_diff <= 1e-5 and mismatch <= 1e-3 and nhwc
    return verdict(ok, f"one replay NCHW vs NHWC: weights max diff {w_diff:.1e}, delta differs at "
                       f"{mismatch:.1e} of elements, buffer channels_last={nhwc}",
                   weight_max_diff=w_diff, delta_mismatch_fraction=mismatch,
                   buffer_channels_last=nhwc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_process_group(s: Sizes, device) -> Result:
    """A world-size-1 process group (NCCL on CUDA, gloo on a CPU), one all-reduce, and one DDP
    free step whose weights match the same step without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return Result("SKIP", "a process group already exists in this process")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, **(dict(device_id=device) if device.type == "cuda" else {}))
    try:
        v = torch.full((4,), 3.0, device=device)
        dist.all_reduce(v)
        reduced = v.tolist() == [3.0] * 4
        with Deterministic():
            model, batches = small_setup(s, device)
            plain = copy.deepcopy(model)
            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
            FreeAdversarialTrainer(ddp, sgd(model), eps=8 / 255, replays=2).train_step(*batches[0])
            FreeAdversarialTrainer(plain, sgd(plain), eps=8 / 255, replays=2).train_step(*batches[0])
        diff = param_diff(model, plain)
    finally:
        dist.destroy_process_group()
    return verdict(reduced and diff <= 1e-5, f"{backend}: all-reduce ok={reduced}, DDP vs plain "
                   f"weights max diff {diff:.1e}", backend=backend, all_reduce_ok=reduced,
                   ddp_weight_max_diff=diff)


def stop_vote_beside(device, backend: str) -> Result:
    """A one-process group on `backend` with the trainer's stop vote (trainer/stops/stop_vote.py)
    beside it: on NCCL the vote makes its own gloo group, so its flags stay on the CPU. Three
    polls (no vote in flight, a stop asked, the stop agreed one step later) around an all-reduce
    on the default group."""
    import torch.distributed as dist

    from dist_free.trainer.stops.stop_vote import StopVote
    if dist.is_initialized():
        return Result("SKIP", "a process group already exists in this process")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, **(dict(device_id=device) if device.type == "cuda" else {}))
    try:
        vote = StopVote()
        group = dist.get_backend(vote.group) if vote.group is not None else dist.get_backend()
        polls = [vote.poll(False), vote.poll(True)]
        v = torch.full((4,), 2.0, device=device)
        dist.all_reduce(v)                             # the default group, between two votes
        polls.append(vote.poll(False))
        vote.collect()
        reduced = v.tolist() == [2.0] * 4
    finally:
        dist.destroy_process_group()
    own_group = vote.group is not None
    ok = polls == [False, False, True] and group == "gloo" and reduced and \
        own_group == (backend != "gloo")
    return verdict(ok, f"default group {backend}, stop vote on {group}"
                       f"{' (its own group)' if own_group else ''}: polls {polls} (expected "
                       f"[False, False, True]), all-reduce ok={reduced}",
                   backend=backend, vote_backend=group, own_group=own_group, polls=polls,
                   all_reduce_ok=reduced)


def check_stop_vote_groups(s: Sizes, device) -> Result:
    if device.type != "cuda":
        return Result("SKIP", "NCCL needs CUDA (the vote's gloo group beside NCCL is the question)")
    return stop_vote_beside(device, "nccl")


def trainer_config(device, *overrides: str):
    """A Config as the trainer builds it, for the checks that build live objects through
    trainer/runtime.py (the path a user's run takes)."""
    from dist_free.config import config_from_dict
    return config_from_dict({}, [f"run.device={device.type}", "tracking.enabled=false", *overrides])


def check_adamw_scaler_ema(s: Sizes, device) -> Result:
    """AdamW (fused on CUDA) under fp16 autocast with the GradScaler, gradient clipping and an
    EMA, built from the config by trainer/runtime.py: three free steps stay finite, the weights
    and the EMA move, and the scaler's scale stays a sane power of two."""
    from dist_free.distributed import DistInfo
    cfg = trainer_config(device, f"model.name={s.small_model}", "model.num_classes=10",
                         "model.compile=false", "optim.name=adamw", "optim.lr=1e-3",
                         "optim.weight_decay=0.05", "optim.clip_grad_norm=1.0", "optim.ema=0.9",
                         "run.amp=fp16", "method.name=free", "method.replays=2")
    torch.manual_seed(0)
    model = runtime.build_bare_model(cfg, device).train()
    start = copy.deepcopy(model)
    optimizer = runtime.build_optimizer(cfg, model, world_size=1)
    method = runtime.build_method(cfg, model, optimizer, DistInfo(device=device),
                                  precision.autocast_dtype(cfg.run.amp, device))
    ema = runtime.build_ema(cfg, model)
    _, batches = small_setup(s, device)
    losses = []
    for x, y in batches:
        losses.append(method.train_step(x, y)["loss"])
        ema.update(model, cfg.replays)
    scale = float(method.scaler.get_scale())
    finite = all(math.isfinite(v) for v in losses) and all(
        bool(torch.isfinite(p).all()) for p in (*model.parameters(), *ema.module.parameters()))
    moved, ema_moved = param_diff(model, start), param_diff(ema.module, start)
    ema_lags = param_diff(ema.module, model) > 0
    sane = 1.0 <= scale <= 2.0 ** 24 and math.log2(scale).is_integer()
    fused = bool(optimizer.defaults.get("fused")) == (device.type == "cuda")
    ok = finite and moved > 0 and ema_moved > 0 and ema_lags and sane and fused
    return verdict(ok, f"AdamW fused={optimizer.defaults.get('fused')}, fp16 + GradScaler (scale "
                       f"{scale:g}), clip 1.0, EMA 0.9: losses {', '.join(f'{v:.3f}' for v in losses)}, "
                       f"weights moved {moved:.1e}, EMA moved {ema_moved:.1e} and lags={ema_lags}",
                   losses=losses, scale=scale, scale_sane=sane, finite=finite, weights_moved=moved,
                   ema_moved=ema_moved, ema_lags=ema_lags, fused=optimizer.defaults.get("fused"),
                   ema_updates=ema.updates)


def compile_and_evaluate(s: Sizes, device, backend) -> dict:
    """Free steps through runtime's CompiledModel, a PGD evaluation of the bare model (eval mode,
    batches of other sizes, a partial last one), more steps: the graphs dynamo compiled after each."""
    from torch._dynamo.utils import counters

    from dist_free.evaluation.robust_eval import evaluate
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(s.compile_model, 10).to(device).train()
    net = runtime.CompiledModel(model, backend)
    t = FreeAdversarialTrainer(net, sgd(model), eps=4 / 255, replays=2)
    _, batches = small_setup(s, device)
    for x, y in batches[:2]:
        t.train_step(x, y)
    graphs = {"training": counters["stats"]["unique_graphs"]}
    b = s.small_batch
    val = [(x[:b - 1], y[:b - 1]) for x, y in batches[:1]] + [(batches[1][0][:3], batches[1][1][:3])]
    evaluate(model, val, eps_values=[4 / 255], steps=2, step_size=None, restarts=1, amp_dtype=None)
    graphs["after_evaluation"] = counters["stats"]["unique_graphs"]
    t.train_step(*batches[2])
    graphs["after_more_training"] = counters["stats"]["unique_graphs"]
    return {"backend": backend, "stage": net.stage, "first_step_s": net.first_step_s,
            "graphs": graphs, "training_mode_kept": model.training}


def check_compile_auto(s: Sizes, device) -> Result:
    """model.compile's default (auto) as trainer/runtime.py resolves it: on for CUDA, off on a
    CPU. Then the trainer's CompiledModel (inductor on CUDA; the cheap aot_eager on a CPU, where
    auto leaves compilation off): compiled, its first step timed, and an evaluation of the bare
    model afterwards adding no graph."""
    from dist_free.distributed import DistInfo
    cfg = trainer_config(device, f"model.name={s.compile_model}", "model.num_classes=10")
    resolved = runtime.compile_wanted(cfg, device)
    wrapped = runtime.wrap(cfg, torch.nn.Linear(2, 2).to(device), DistInfo(device=device))
    expected = device.type == "cuda"
    r = compile_and_evaluate(s, device, "inductor" if expected else "aot_eager")
    g = r["graphs"]
    ok = (cfg.model.compile == "auto" and resolved == expected
          and isinstance(wrapped, runtime.CompiledModel) == expected and r["stage"] == "compiled"
          and g["training"] >= 1 and g["after_evaluation"] == g["after_more_training"] == g["training"]
          and r["training_mode_kept"])
    return verdict(ok, f"model.compile=auto resolves {'on' if resolved else 'off'} on "
                       f"{device.type} (expected {'on' if expected else 'off'}); CompiledModel with "
                       f"{r['backend']}: {r['stage']}, first step {r['first_step_s'] or 0:.1f} s, "
                       f"graphs {g['training']} -> {g['after_evaluation']} after an evaluation -> "
                       f"{g['after_more_training']} after more training",
                   resolved=resolved, expected=expected, **r)


def check_memory_and_nvml(s: Sizes, device) -> Result:
    """Peak memory as the trainer reports it; on CUDA, what NVML (MLflow's GPU metrics) reads."""
    model, batches = small_setup(s, device)
    FreeAdversarialTrainer(model, sgd(model), eps=8 / 255, replays=1).train_step(*batches[0])
    peak = environment.peak_memory_bytes(device)
    data = {"peak_bytes": peak}
    if device.type == "cuda":
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            data.update(nvml_used_bytes=pynvml.nvmlDeviceGetMemoryInfo(h).used,
                        nvml_utilization=pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception as e:  # noqa: BLE001 - nvidia-ml-py is MLflow's optional GPU collector
            data["nvml"] = f"unavailable: {type(e).__name__}: {e}"
    ok = peak > 0 and ("nvml" in data or data.get("nvml_used_bytes", 0) > 0 or device.type != "cuda")
    return verdict(ok, f"peak {peak / 2**20:.0f} MiB" + (f", NVML used {data['nvml_used_bytes'] / 2**30:.1f}"
                   " GiB" if "nvml_used_bytes" in data else f", NVML: {data.get('nvml', 'n/a (CPU)')}"),
                   **data)


# ---------------------------------------------------------------- speed

@dataclasses.dataclass(frozen=True)
class Floor:
    """A speed or memory figure's stated bound: missing it is a FAIL."""
    figure: str                 # what is measured, as the console says it
    op: str                     # "<=", ">=" or ">"
    limit: float

    def met(self, value: float) -> bool:
        return {"<=": value <= self.limit, ">=": value >= self.limit, ">": value > self.limit}[self.op]

    @property
    def text(self) -> str:
        return f"{self.op} {self.limit:g}"


# The floors, as data. Judged on CUDA only: the CPU mode's tiny sizes on a shared CPU say nothing
# about speed, so there each figure is printed beside its floor with SKIP.
FLOORS = {
    "free_replay_vs_natural": Floor("free replay / natural step time", "<=", 1.10),
    "fused_update_vs_copy": Floor("fused update / device copy bandwidth", ">=", 0.8),
    "free_vs_natural_peak": Floor("free / natural peak memory", "<=", 1.10),
    "compiled_speedup_natural": Floor("eager / compiled natural step time", ">", 1.0),
    "compiled_speedup_free": Floor("eager / compiled free replay time", ">", 1.0),
    "resident_free_replay_vs_natural": Floor("free replay / natural step time, CIFAR WRN fed by "
                                             "the resident loader", "<=", 1.10),
}


def judged(device, figure: str, measured: dict[str, float], data: dict) -> Result:
    """PASS when every measured figure meets its floor (FLOORS), FAIL when one misses; SKIP off
    CUDA. Each floor is printed beside its figure and kept in the JSON."""
    floors = {name: {"measured": value, "floor": FLOORS[name].text, "figure": FLOORS[name].figure,
                     "met": FLOORS[name].met(value)} for name, value in measured.items()}
    text = figure + "; " + ", ".join(
        f"{name} {f['measured']:.3f} (floor {f['floor']}{'' if f['met'] else ': MISSED'})"
        for name, f in floors.items())
    data = {**data, "floors": floors}
    if device.type != "cuda":
        return Result("SKIP", f"{text} [floors judged on CUDA only]", data)
    return Result("PASS" if all(f["met"] for f in floors.values()) else "FAIL", text, data)


def step_cost(s: Sizes, device) -> dict:
    return timing.step_cost(s.model, s.image_size, s.batch, s.dtype, device, s.channels_last,
                            replays=4, repeats=s.repeats)


def check_step_speed(s: Sizes, device, measure: Callable = step_cost) -> Result:
    """Natural step images/s, free replay / natural, PGD-7 / natural (timing.step_cost)."""
    r = measure(s, device)
    ratio = {k: r["ratios"][f"{k}/natural_step"]["median"] for k in timing.STEP_METHODS}
    return judged(device, f"{s.model} {s.image_size}px b{s.batch} {s.dtype}: natural "
                  f"{r['images_per_s_natural']:.0f} img/s; PGD-7/natural {ratio['pgd7_step']:.2f}, "
                  f"FGSM-RS/natural {ratio['fgsm_rs_step']:.2f}, "
                  f"N-FGSM/natural {ratio['nfgsm_step']:.2f}",
                  {"free_replay_vs_natural": ratio["free_replay"]}, r)


def update_cost(s: Sizes, device) -> dict:
    x_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return timing.update_cost(s.update_shape, x_dtype, device, max(3, s.repeats), calls=3)


def check_update_bandwidth(s: Sizes, device, measure: Callable = update_cost) -> Result:
    """The fused update's GB/s against the device's own copy bandwidth (timing.update_cost)."""
    r = measure(s, device)
    sec = r["seconds"]
    return judged(device, f"fused {sec['fused']['gb_per_s']:.0f} GB/s, copy {sec['copy']['gb_per_s']:.0f} "
                  f"GB/s, {r['fused_speedup']['median']:.1f}x eager",
                  {"fused_update_vs_copy": r["fused_fraction_of_copy"]}, r)


def peak_of(method_name: str, s: Sizes, device, **options) -> dict:
    """Peak memory of one training step of a fresh model (CUDA: allocator peak above baseline)."""
    torch.manual_seed(0)
    model = build_model(s.model, 1000, channels_last=s.channels_last).to(device).train()
    images, labels = timing.make_batch(s.batch, s.image_size, 1000, device, s.channels_last)
    m = build_method(method_name, model, sgd(model), amp_dtype=DTYPES[s.dtype], **options)
    timing.sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(2):          # the second step holds the optimizer's momentum too
        m.train_step(images, labels)
    timing.sync(device)
    peak = environment.peak_memory_bytes(device)
    return {"peak_bytes": peak, "baseline_bytes": base, "training_bytes": peak - base}


def peaks(s: Sizes, device) -> dict:
    return {"natural": peak_of("natural", s, device),
            "free": peak_of("free", s, device, eps=4 / 255, replays=4)}


def check_memory_free_vs_natural(s: Sizes, device, measure: Callable = peaks) -> Result:
    if device.type != "cuda":
        return Result("SKIP", "the process's peak RSS cannot separate two steps in one process; "
                      "the bench's memory part measures it in workers")
    r = measure(s, device)
    nat, free = r["natural"], r["free"]
    ratio = free["peak_bytes"] / nat["peak_bytes"]
    return judged(device, f"peak free {free['peak_bytes'] / 2**30:.2f} GiB vs natural "
                  f"{nat['peak_bytes'] / 2**30:.2f} GiB", {"free_vs_natural_peak": ratio},
                  {**r, "free_vs_natural_peak": ratio})


def resident_rates(s: Sizes, device, work: Path) -> dict:
    """Natural and free training of the CIFAR net fed by the resident loader (uint8 images on
    the device, pad + crop + flip there), rounds interleaved: images/s and the data wait."""
    from dist_free.bench.pipeline import train_rate
    from dist_free.bench.resident import photo_tiles
    from pipelines.cifar_write import write_cifar
    c = s.cifar
    images = photo_tiles(c["images"])
    labels = np.arange(len(images)) % 10
    root = write_cifar(work / "cifar-10-batches-bin", "cifar10-bin",
                       {"train": (images, labels), "val": (images[:10], labels[:10])},
                       [f"class_{i}" for i in range(10)])
    loader = pipelines.build_loader("resident", root, "train", batch_size=c["batch"],
                                    image_size=32, val_resize=32, device=device,
                                    dtype=precision.loader_dtype(device),
                                    channels_last=s.channels_last, pad=4)
    torch.manual_seed(0)
    model = build_model(c["model"], 10, channels_last=s.channels_last).to(device).train()
    amp = DTYPES[c["dtype"]]
    methods = {"natural": build_method("natural", model, sgd(model), amp_dtype=amp),
               "free": build_method("free", model, sgd(model), eps=8 / 255, replays=c["replays"],
                                    amp_dtype=amp)}
    runs = {name: [] for name in methods}
    for r in range(max(2, s.repeats)):
        for name, method in methods.items():
            loader.set_epoch(r)
            runs[name].append(train_rate(method, loader, device, c["steps"]))
    ips = {n: [x["images_per_s"] for x in v] for n, v in runs.items()}
    # A free minibatch is m replays: per replay it takes m times its images' time.
    ratios = [nat / (free * c["replays"]) for nat, free in zip(ips["natural"], ips["free"])]
    return {"kind": loader.kind, "model": c["model"], "batch": c["batch"], "dtype": c["dtype"],
            "replays": c["replays"], "steps": c["steps"], "images": len(images),
            "images_per_s": {n: timing.summary(v) for n, v in ips.items()},
            "data_wait_frac": {n: timing.summary([x["data_wait_frac"] for x in v])
                               for n, v in runs.items()},
            "free_replay_vs_natural": timing.summary(ratios)}


def check_resident_cifar(s: Sizes, device, work: Path, measure: Callable = resident_rates) -> Result:
    """The resident CIFAR loader feeding the paper's CIFAR net: free replay against natural."""
    r = measure(s, device, work)
    ips, wait = r["images_per_s"], r["data_wait_frac"]
    return judged(device, f"{r['model']} b{r['batch']} {r['dtype']}, loader {r['kind']}: natural "
                  f"{ips['natural']['median']:.0f} img/s (data wait {wait['natural']['median']:.1%}), "
                  f"free m={r['replays']} {ips['free']['median']:.0f} img/s",
                  {"resident_free_replay_vs_natural": r["free_replay_vs_natural"]["median"]}, r)


def compiled_timing(s: Sizes, device) -> dict:
    """Natural step and free replay through runtime's CompiledModel (what model.compile trains
    with), timed against the same eager model, interleaved."""
    torch.manual_seed(0)
    model = build_model(s.model, 1000, channels_last=s.channels_last).to(device).train()
    images, labels = timing.make_batch(s.batch, s.image_size, 1000, device, s.channels_last)
    amp, opt = DTYPES[s.dtype], sgd(model)
    compiled = runtime.CompiledModel(model)
    methods = {}
    for tag, net in (("eager", model), ("compiled", compiled)):
        methods[f"natural_{tag}"] = build_method("natural", net, opt, amp_dtype=amp)
        methods[f"free_{tag}"] = build_method("free", net, opt, eps=4 / 255, replays=4, amp_dtype=amp)
    t0 = time.perf_counter()
    for name in ("natural_compiled", "free_compiled"):
        methods[name].train_step(images, labels)          # compile outside the timed rounds
    timing.sync(device)
    compile_s = time.perf_counter() - t0
    variants = {name: timing.Variant(lambda m=m: m.train_step(images, labels),
                                     units=4 if name.startswith("free") else 1)
                for name, m in methods.items()}
    samples = timing.interleaved(variants, device, s.repeats, rotate=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"compile_s": compile_s, "first_step_s": compiled.first_step_s,
            "stage": compiled.stage, "seconds": {k: timing.summary(v) for k, v in samples.items()},
            "speedup_vs_eager": {k: med[f"{k}_eager"] / med[f"{k}_compiled"]
                                 for k in ("natural", "free")},
            "free_replay_vs_natural": med["free_compiled"] / med["natural_compiled"],
            "images_per_s_compiled": s.batch / med["natural_compiled"]}


def check_compiled_model(s: Sizes, device, measure: Callable = compiled_timing) -> Result:
    r = measure(s, device)
    if r["stage"] != "compiled":
        return Result("FAIL", f"torch.compile failed and the model ran eagerly (stage {r['stage']})", r)
    sp = r["speedup_vs_eager"]
    return judged(device, f"compile {r['compile_s']:.0f} s (first step {r['first_step_s'] or 0:.0f} s); "
                  f"compiled natural {r['images_per_s_compiled']:.0f} img/s, free replay/natural "
                  f"{r['free_replay_vs_natural']:.3f} compiled",
                  {"compiled_speedup_natural": sp["natural"], "compiled_speedup_free": sp["free"]}, r)


# ---------------------------------------------------------------- input

def write_fixed_jpegs(folder: Path, count: int) -> list[Path]:
    """`count` ImageNet-sized (500x375) JPEGs cut from scikit-learn's two sample photographs:
    one size, so a decoded batch stacks and is cropped in one call."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    from dist_free.bench.pipeline import BASE_SIZE, JPEG_QUALITY, photo_crop
    folder.mkdir(parents=True, exist_ok=True)
    photos, rng, files = load_sample_images().images, np.random.default_rng(0), []
    for i in range(count):
        f = folder / f"{i:05d}.jpg"
        photo_crop(photos[i % len(photos)], rng).resize(BASE_SIZE).save(f, quality=JPEG_QUALITY)
        files.append(f)
    return files


def random_resized_crop(images: torch.Tensor, size: int, min_area: float = 0.08) -> torch.Tensor:
    """ImageNet's train crop for a whole uint8 batch at once (roi_align), with random flips;
    returns [0, 1] floats of (N, 3, size, size)."""
    from torchvision.ops import roi_align
    n, _, h, w = images.shape
    dev = images.device
    area = torch.empty(n, device=dev).uniform_(min_area, 1.0) * h * w
    ratio = torch.exp(torch.empty(n, device=dev).uniform_(-0.2877, 0.2877))   # log(3/4), log(4/3)
    cw = torch.sqrt(area * ratio).clamp(max=w)
    ch = torch.sqrt(area / ratio).clamp(max=h)
    x0 = torch.rand(n, device=dev) * (w - cw)
    y0 = torch.rand(n, device=dev) * (h - ch)
    boxes = torch.stack([torch.arange(n, device=dev, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(images.float(), boxes, output_size=size, sampling_ratio=2, aligned=True) / 255
    flip = torch.rand(n, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out).clamp_(0, 1)


class TorchvisionDecoder:
    """The stand-in for DALI's `mixed` decoder: torchvision.io.decode_jpeg on the device."""

    def __init__(self, files: list[Path], device, batch: int, size: int):
        from torchvision.io import read_file
        self.data = [read_file(str(f)) for f in files]
        self.device, self.batch, self.size = device, batch, size

    def __call__(self, i: int) -> torch.Tensor:
        from torchvision.io import decode_jpeg
        start = (i * self.batch) % max(1, len(self.data) - self.batch + 1)
        chunk = self.data[start:start + self.batch]
        decoded = decode_jpeg(chunk, device=self.device)
        return random_resized_crop(torch.stack(decoded), self.size)


def check_decode(s: Sizes, device, work: Path) -> Result:
    """Decode + random-resized-crop images/s on generated ImageNet-sized JPEGs."""
    files = write_fixed_jpegs(work / "fixed_jpegs", s.jpegs)
    if device.type == "cuda" and pipelines.dali_available():
        from dist_free.bench import pipeline
        root = pipeline.write_photo_jpegs(work / "folder_jpegs", s.jpegs)
        loader = pipeline.make_loader("dali-gpu", root, s.decode_batch, s.image_size, device,
                                      os.cpu_count() or 1, torch.float16)
        pipeline.epoch_rate(loader, device)
        rates = [pipeline.epoch_rate(loader, device)[0] for _ in range(3)]
        decoder = "DALI mixed (pipelines dali-gpu)"
    else:
        dec = TorchvisionDecoder(files, device, s.decode_batch, s.image_size)
        batches = max(1, s.jpegs // s.decode_batch)
        dec(0)                                            # first-use costs (nvjpeg handles)
        rates = []
        for _ in range(3):
            seconds = timing.time_once(lambda: [dec(i) for i in range(batches)], device)
            rates.append(batches * s.decode_batch / seconds)
        decoder = f"torchvision.io.decode_jpeg(device={device.type!r}) (stand-in: DALI not importable)"
    rate = statistics.median(rates)
    return Result("PASS", f"{rate:.0f} img/s, {decoder}",
                  {"decoder": decoder, "images_per_s": timing.summary(rates), "batch": s.decode_batch,
                   "jpeg_size": "500x375", "crop": s.image_size})


def check_data_wait(s: Sizes, device, work: Path) -> Result:
    """Free training (m = 4) fed batch by batch by the decoder above, against the same steps on a
    batch already on the device: the share of wall time the input adds."""
    files = write_fixed_jpegs(work / "fixed_jpegs", s.jpegs)
    dec = TorchvisionDecoder(files, device, s.decode_batch, s.image_size)
    torch.manual_seed(0)
    model = build_model(s.model, 1000, channels_last=s.channels_last).to(device).train()
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    t = build_method("free", model, sgd(model), eps=4 / 255, replays=4,
                     amp_dtype=DTYPES[s.dtype])
    labels = torch.randint(1000, (s.decode_batch,), device=device)
    resident = dec(0).contiguous(memory_format=fmt)

    def fed():
        for i in range(s.wait_steps):
            t.train_step(dec(i).contiguous(memory_format=fmt), labels)

    def on_device():
        for _ in range(s.wait_steps):
            t.train_step(resident, labels)
    samples = timing.interleaved({"fed": timing.Variant(fed), "resident": timing.Variant(on_device)},
                                 device, max(2, s.repeats // 2), min_sample_s=0)
    fractions = [1 - r / f for f, r in zip(samples["fed"], samples["resident"])]
    frac = statistics.median(fractions)
    return Result("PASS", f"data wait {frac:.1%} of a free-training run fed by the decoder "
                  f"({s.wait_steps} steps of {s.decode_batch}, decoder on the same stream)",
                  {"data_wait_fraction": timing.summary(fractions),
                   "seconds": {k: timing.summary(v) for k, v in samples.items()}})


# ---------------------------------------------------------------- end to end

def write_folder(root: Path, train: int, val: int) -> Path:
    """An ImageNet-shaped ImageFolder: root/train/<class>/*.jpg and root/val/<class>/*.jpg."""
    from dist_free.bench.pipeline import write_photo_jpegs
    write_photo_jpegs(root, train)
    write_photo_jpegs(root / "_val", val, seed=1)
    (root / "_val" / "train").rename(root / "val")
    (root / "_val").rmdir()
    return root


def e2e_config(s: Sizes, device, root: Path, runs: Path) -> list[str]:
    e = s.e2e
    small = e["image_size"] < 64
    return [f"model.name={e['model']}", "model.num_classes=4",
            f"model.channels_last={str(e['channels_last']).lower()}",
            f"data.root={root}", "data.loader=torchvision", f"data.batch_size={e['batch']}",
            f"data.image_size={e['image_size']}", f"data.val_resize={36 if small else 256}",
            f"data.threads={e['threads']}", "method.name=free", "method.eps=4/255",
            "method.replays=4", "optim.lr=0.1", "optim.lr_batch=256", "optim.schedule=cosine",
            "eval.every=1", "eval.steps=3", "eval.max_batches=2", f"run.dir={runs}",
            "run.name=gpu-check", f"run.device={device.type}", f"run.amp={e['amp']}",
            "run.log_every=4", "run.progress=log", "tracking.enabled=false"]


def run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(environment.REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=environment.REPO)


COMPILED_LINE = re.compile(r"model\.compile: the first forward and backward took ([0-9.]+) s")
DATA_WAIT = re.compile(r"data-wait (\d+)%")


def train_log_facts(stderr: str) -> dict:
    """What the trainer's log says of model.compile (auto: on CUDA) and of the data wait."""
    compiled = COMPILED_LINE.search(stderr)
    waits = DATA_WAIT.findall(stderr)
    return {"compiled": compiled is not None,
            "first_step_s": float(compiled.group(1)) if compiled else None,
            "compile_fell_back": "model.compile: torch.compile failed" in stderr,
            "last_data_wait_pct": int(waits[-1]) if waits else None}


def check_trainer_e2e(s: Sizes, device, work: Path) -> Result:
    """The real trainer on the device: one real epoch (m = 4), a checkpoint, a resume that runs
    the second epoch, and `python -m dist_free.evaluate` with PGD on the result. model.compile is
    left at its default (auto), so on CUDA the trainer compiles and says how long it took."""
    root = write_folder(work / "imagefolder", s.e2e["train_images"], s.e2e["val_images"])
    runs = work / "runs"
    overrides = e2e_config(s, device, root, runs)
    steps, t0 = {}, time.perf_counter()
    for name, epochs in (("train", 4), ("resume", 8)):
        p = run_cli(["-m", "dist_free.train", *overrides, f"optim.epochs={epochs}"], timeout=240)
        steps[name] = {"rc": p.returncode, "s": time.perf_counter() - t0, "tail": p.stderr[-1500:],
                       "resumed": "resumed from" in p.stderr, **train_log_facts(p.stderr)}
        if p.returncode != 0:
            return Result("FAIL", f"{name}: exit {p.returncode}: {last_line(p.stderr)}", steps)
        state = torch.load(runs / "gpu-check" / "checkpoints" / "last.pt", map_location="cpu",
                           weights_only=True)
        steps[name].update(epoch=state["epoch"], global_step=state["global_step"])
    resumed = steps["resume"]["resumed"] and steps["resume"]["epoch"] == 2
    out = work / "eval"
    p = run_cli(["-m", "dist_free.evaluate", "--checkpoint",
                 str(runs / "gpu-check" / "checkpoints" / "last.pt"), "--attack", "pgd",
                 "--steps", "5", "--restarts", "1", "--out", str(out)], timeout=240)
    reports = sorted(out.glob("*.json")) if out.exists() else []
    steps["evaluate"] = {"rc": p.returncode, "reports": [r.name for r in reports],
                         "tail": p.stderr[-1500:], "stdout": p.stdout[-1500:]}
    tr, re_ = steps["train"], steps["resume"]
    compiled_as_auto = all(x["compiled"] == (device.type == "cuda") and not x["compile_fell_back"]
                           for x in (tr, re_))
    ok = p.returncode == 0 and bool(reports) and resumed and compiled_as_auto
    compile_text = f"compiled, first step {tr['first_step_s']:.0f} s" if tr["compiled"] else \
        "fell back to eager" if tr["compile_fell_back"] else "eager"
    return verdict(ok, f"train epoch {tr['epoch']} (step {tr['global_step']}), "
                       f"resumed to epoch {re_['epoch']} (step {re_['global_step']}), "
                       f"evaluate exit {p.returncode} with {len(reports)} report(s); model.compile "
                       f"auto: {compile_text}; {time.perf_counter() - t0:.0f} s", **steps)


def check_trainer_dali(s: Sizes, device, work: Path) -> Result:
    """The trainer fed by DALI's GPU decoder (`data.loader=dali-gpu`), one process: one real
    epoch, its checkpoint, and the data wait the trainer logged."""
    if device.type != "cuda":
        return Result("SKIP", "data.loader=dali-gpu decodes on a CUDA device")
    if not pipelines.dali_available():
        return Result("SKIP", "DALI is not importable here (no nvidia.dali): the dali-gpu trainer "
                      "is not checked")
    root = write_folder(work / "imagefolder_dali", s.e2e["train_images"], s.e2e["val_images"])
    runs = work / "runs_dali"
    overrides = [*e2e_config(s, device, root, runs), "data.loader=dali-gpu", "run.name=gpu-check-dali"]
    t0 = time.perf_counter()
    p = run_cli(["-m", "dist_free.train", *overrides, "optim.epochs=4"], timeout=240)
    facts = {"rc": p.returncode, "tail": p.stderr[-1500:], **train_log_facts(p.stderr),
             "loader_dali_gpu": "loader dali-gpu" in p.stderr}
    if p.returncode != 0:
        return Result("FAIL", f"exit {p.returncode}: {last_line(p.stderr)}", facts)
    state = torch.load(runs / "gpu-check-dali" / "checkpoints" / "last.pt", map_location="cpu",
                       weights_only=True)
    facts.update(epoch=state["epoch"], global_step=state["global_step"])
    ok = facts["loader_dali_gpu"] and state["epoch"] == 1
    return verdict(ok, f"dali-gpu loader={facts['loader_dali_gpu']}, epoch {state['epoch']} (step "
                       f"{state['global_step']}), last logged data wait "
                       f"{facts['last_data_wait_pct']}%, {time.perf_counter() - t0:.0f} s", **facts)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


# ---------------------------------------------------------------- the run

CHECKS: dict[str, Callable] = {
    "update_fused_vs_eager": check_update_fused_vs_eager,
    "free_vs_algorithm1": check_free_vs_algorithm1,
    "fp16_scaler_skip": check_fp16_scaler_skip,
    "bf16_autocast_step": check_bf16_autocast_step,
    "channels_last": check_channels_last,
    "process_group": check_process_group,
    "stop_vote_groups": check_stop_vote_groups,
    "adamw_scaler_ema": check_adamw_scaler_ema,
    "memory_and_nvml": check_memory_and_nvml,
    "compile_auto": check_compile_auto,
    "step_speed": check_step_speed,
    "update_bandwidth": check_update_bandwidth,
    "memory_free_vs_natural": check_memory_free_vs_natural,
    "resident_cifar": check_resident_cifar,
    "decode": check_decode,
    "data_wait": check_data_wait,
    "trainer_dali": check_trainer_dali,
    "trainer_e2e": check_trainer_e2e,
    "compiled_model": check_compiled_model,     # last: its compile is the slowest single item
}
NEEDS_WORKDIR = {"decode", "data_wait", "trainer_e2e", "trainer_dali", "resident_cifar"}

def driver_version() -> str | None:
    """The NVIDIA driver's version: NVML when nvidia-ml-py is installed, else nvidia-smi."""
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - optional; nvidia-smi below
        pass
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = p.stdout.strip().splitlines()
    return lines[0].strip() if p.returncode == 0 and lines else None


def record(device, s: Sizes) -> dict:
    """What every figure of the run depends on: GPU, driver, torch, CUDA, DALI, the speed checks'
    batch and dtype, the commit."""
    v = environment.versions()
    commit, dirty = environment.git_commit()
    cuda = device.type == "cuda"
    return {"device": environment.device_label(device),
            "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "driver": driver_version() if cuda else None, "torch": v["torch"], "cuda": v["cuda"],
            "dali": v["dali"] if pipelines.dali_available() else None, "python": v["python"],
            "batch": s.batch, "dtype": s.dtype, "model": s.model,
            "commit": commit[:12] + ("+dirty" if dirty else ""), "cpu": environment.cpu_model(),
            "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run_checks(device: torch.device, out: Path, only: list[str] | None = None,
               sizes: Sizes | None = None, log=print, checks: dict[str, Callable] | None = None) -> dict:
    """Run the checks in order, one line each; the JSON at `out` is rewritten after each.
    checks: the table to run (default CHECKS)."""
    s = sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    table = CHECKS if checks is None else checks
    names = only or list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {list(table)}")
    result = {"environment": record(device, s), "sizes": dataclasses.asdict(s), "checks": {}}
    log(f"gpu-check on {result['environment']['device']}, torch {result['environment']['torch']}, "
        f"commit {result['environment']['commit']}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dist_free_gpu_check_") as tmp:
        for name in names:
            t0 = time.perf_counter()
            if t0 - start > s.budget_s:
                r = Result("SKIP", f"time budget of {s.budget_s:.0f} s spent")
            else:
                r = run_one(table[name], name in NEEDS_WORKDIR, s, device, Path(tmp))
            # The check's own duration under a name no measurement uses ("seconds" is timing's).
            result["checks"][name] = {**r.data, "status": r.status, "figure": r.figure,
                                      "check_s": time.perf_counter() - t0}
            log(f"{r.status:4}  {name:24} {r.figure}  [{time.perf_counter() - t0:.1f} s]", flush=True)
            write(result, out)
    result["total_s"] = time.perf_counter() - start
    result["summary"] = {k: sum(c["status"] == k for c in result["checks"].values())
                         for k in ("PASS", "FAIL", "SKIP")}
    write(result, out)
    log(f"gpu-check: {result['summary']['PASS']} PASS, {result['summary']['FAIL']} FAIL, "
        f"{result['summary']['SKIP']} SKIP in {result['total_s']:.0f} s; wrote {out} and "
        f"{out.with_suffix('.md').name}", flush=True)
    return result


def write(result: dict, out: Path) -> None:
    """The JSON, and its Markdown table beside it (`out` with .md), after every check."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text(gpu_check_table(result))


def run_one(fn: Callable, needs_workdir: bool, s: Sizes, device, work: Path) -> Result:
    try:
        r = fn(s, device, work) if needs_workdir else fn(s, device)
    except Exception as e:  # noqa: BLE001 - a failing check is a FAIL line, and the run goes on
        r = Result("FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                   {"traceback": traceback.format_exc()[-3000:]})
    finally:
        # Each check starts from a fresh compiler state, as a training process does: one process
        # compiling the update for every dtype, layout and shape here would hit dynamo's
        # recompile limit, which a trainer (one batch shape, one smaller last batch) never nears.
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
    return r


def main(device_name: str, out: Path | None, only: str | None) -> int:
    try:
        device = environment.resolve_device(device_name)
    except RuntimeError as e:
        print(f"bench: --device {device_name}: {e}", file=sys.stderr)
        return 2
    if only and set(only.split(",")) - set(CHECKS):
        print(f"bench: --only: unknown checks {sorted(set(only.split(',')) - set(CHECKS))}; "
              f"choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    out = out or environment.REPO / "bench" / "results" / f"gpu-check-{device.type}.json"
    result = run_checks(device, out, only.split(",") if only else None)
    return 1 if result["summary"]["FAIL"] else 0
