"""`python -m dist_free.bench --gpu-check`: every GPU path of the project, checked and measured in one run.

    python -m dist_free.bench --gpu-check                      # on a CUDA host: full sizes, < 6 min
    python -m dist_free.bench --gpu-check --device cpu         # tiny sizes, gloo, CPU decoder (tests)
    python -m dist_free.bench --gpu-check --out gpu.json --only update_fused_vs_eager,step_speed

It needs only torch and torchvision (plus scikit-learn and Pillow for the generated JPEGs): no
MLflow, no DALI, no network. DALI's `mixed` decoder is measured when DALI is importable; otherwise
torchvision's `decode_jpeg` on the device stands in and the result says so. Each check prints one
line, PASS / FAIL / SKIP with its figure; the JSON is rewritten after every check, so a run cut
short still leaves what it measured. A check that raises is a FAIL naming the exception, and the
run goes on with the next one.

Checks (see README, "Checking a GPU host"):
  correctness: update_fused_vs_eager, free_vs_algorithm1, fp16_scaler_skip, bf16_autocast_step,
               channels_last, process_group, memory_and_nvml
  speed:       step_speed, update_bandwidth, memory_free_vs_natural, compiled_model
  input:       decode, data_wait
  end to end:  trainer_e2e (train, checkpoint, resume, PGD evaluation, as subprocesses)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import pipelines
from dist_free import environment
from dist_free.bench import timing
from dist_free.bench.algorithm1 import algorithm1
from dist_free.engine.free import FreeAdversarialTrainer, UpdateWork, compiled_free_update, free_update
from dist_free.engine.methods import build_method
from dist_free.engine.models import build_model
from dist_free.precision import DTYPES


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
    update_shape: tuple[int, int, int, int]
    jpegs: int                  # generated 500x375 JPEGs for the decode checks
    decode_batch: int
    wait_steps: int
    e2e: dict
    budget_s: float             # checks left when this is spent are skipped, not started


GPU_SIZES = Sizes(model="resnet50", image_size=224, batch=256, dtype="bf16", channels_last=True,
                  repeats=5, small_model="resnet18", small_size=64, small_batch=16,
                  update_shape=(256, 3, 224, 224), jpegs=512, decode_batch=128, wait_steps=8,
                  e2e=dict(model="resnet50", image_size=224, batch=64, train_images=768,
                           val_images=128, channels_last=True, amp="bf16", threads=8),
                  budget_s=330)
CPU_SIZES = Sizes(model="small_cnn", image_size=32, batch=8, dtype="fp32", channels_last=False,
                  repeats=2, small_model="small_cnn", small_size=32, small_batch=8,
                  update_shape=(8, 3, 32, 32), jpegs=16, decode_batch=8, wait_steps=2,
                  e2e=dict(model="small_cnn", image_size=32, batch=8, train_images=48,
                           val_images=16, channels_last=False, amp="off", threads=1),
                  budget_s=600)


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

def check_step_speed(s: Sizes, device) -> Result:
    """Natural step images/s, free replay / natural, PGD-7 / natural (timing.step_cost)."""
    r = timing.step_cost(s.model, s.image_size, s.batch, s.dtype, device, s.channels_last,
                         replays=4, repeats=s.repeats)
    ratio = {k: r["ratios"][f"{k}/natural_step"]["median"] for k in timing.STEP_METHODS}
    return Result("PASS", f"{s.model} {s.image_size}px b{s.batch} {s.dtype}: natural "
                  f"{r['images_per_s_natural']:.0f} img/s; free replay/natural {ratio['free_replay']:.3f}, "
                  f"PGD-7/natural {ratio['pgd7_step']:.2f}, FGSM-RS/natural {ratio['fgsm_rs_step']:.2f}, "
                  f"N-FGSM/natural {ratio['nfgsm_step']:.2f}", r)


def check_update_bandwidth(s: Sizes, device) -> Result:
    """The fused update's GB/s against the device's own copy bandwidth (timing.update_cost)."""
    x_dtype = torch.float16 if device.type == "cuda" else torch.float32
    r = timing.update_cost(s.update_shape, x_dtype, device, max(3, s.repeats), calls=3)
    sec = r["seconds"]
    return Result("PASS", f"fused {sec['fused']['gb_per_s']:.0f} GB/s = {r['fused_fraction_of_copy']:.2f} "
                  f"of copy ({sec['copy']['gb_per_s']:.0f} GB/s); {r['fused_speedup']['median']:.1f}x "
                  f"eager", r)


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


def check_memory_free_vs_natural(s: Sizes, device) -> Result:
    if device.type != "cuda":
        return Result("SKIP", "the process's peak RSS cannot separate two steps in one process; "
                      "the bench's memory part measures it in workers")
    nat = peak_of("natural", s, device)
    free = peak_of("free", s, device, eps=4 / 255, replays=4)
    ratio = free["peak_bytes"] / nat["peak_bytes"]
    return Result("PASS", f"peak free {free['peak_bytes'] / 2**30:.2f} GiB vs natural "
                  f"{nat['peak_bytes'] / 2**30:.2f} GiB ({ratio:.3f}x)",
                  {"natural": nat, "free": free, "free_vs_natural_peak": ratio})


def check_compiled_model(s: Sizes, device) -> Result:
    """Natural step and free replay with model.compile (torch.compile of the model, as
    runtime.wrap does), timed against the same eager model, interleaved."""
    torch.manual_seed(0)
    model = build_model(s.model, 1000, channels_last=s.channels_last).to(device).train()
    images, labels = timing.make_batch(s.batch, s.image_size, 1000, device, s.channels_last)
    amp, opt = DTYPES[s.dtype], sgd(model)
    compiled = torch.compile(model)
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
    speedup = {k: med[f"{k}_eager"] / med[f"{k}_compiled"] for k in ("natural", "free")}
    replay_ratio = med["free_compiled"] / med["natural_compiled"]
    rate = s.batch / med["natural_compiled"]
    return Result("PASS", f"compile {compile_s:.0f} s; compiled natural {rate:.0f} "
                  f"img/s ({speedup['natural']:.2f}x eager), free replay/natural {replay_ratio:.3f} "
                  f"compiled", {"compile_s": compile_s, "seconds": {k: timing.summary(v)
                                                                     for k, v in samples.items()},
                                "speedup_vs_eager": speedup, "free_replay_vs_natural": replay_ratio})


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


def check_trainer_e2e(s: Sizes, device, work: Path) -> Result:
    """The real trainer on the device: one real epoch (m = 4), a checkpoint, a resume that runs
    the second epoch, and `python -m dist_free.evaluate` with PGD on the result."""
    root = write_folder(work / "imagefolder", s.e2e["train_images"], s.e2e["val_images"])
    runs = work / "runs"
    overrides = e2e_config(s, device, root, runs)
    steps, t0 = {}, time.perf_counter()
    for name, epochs in (("train", 4), ("resume", 8)):
        p = run_cli(["-m", "dist_free.train", *overrides, f"optim.epochs={epochs}"], timeout=240)
        steps[name] = {"rc": p.returncode, "s": time.perf_counter() - t0, "tail": p.stderr[-1500:],
                       "resumed": "resumed from" in p.stderr}
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
    ok = p.returncode == 0 and bool(reports) and resumed
    tr, re_ = steps["train"], steps["resume"]
    return verdict(ok, f"train epoch {tr['epoch']} (step {tr['global_step']}), "
                       f"resumed to epoch {re_['epoch']} (step {re_['global_step']}), "
                       f"evaluate exit {p.returncode} with {len(reports)} report(s), "
                       f"{time.perf_counter() - t0:.0f} s", **steps)


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
    "memory_and_nvml": check_memory_and_nvml,
    "step_speed": check_step_speed,
    "update_bandwidth": check_update_bandwidth,
    "memory_free_vs_natural": check_memory_free_vs_natural,
    "decode": check_decode,
    "data_wait": check_data_wait,
    "trainer_e2e": check_trainer_e2e,
    "compiled_model": check_compiled_model,     # last: its compile is the slowest single item
}
NEEDS_WORKDIR = {"decode", "data_wait", "trainer_e2e"}


def record(device) -> dict:
    v = environment.versions()
    commit, dirty = environment.git_commit()
    return {"device": environment.device_label(device), "torch": v["torch"], "cuda": v["cuda"],
            "dali": v["dali"] if pipelines.dali_available() else None, "python": v["python"],
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
    result = {"environment": record(device), "sizes": dataclasses.asdict(s), "checks": {}}
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
            result["checks"][name] = {"status": r.status, "figure": r.figure,
                                      "seconds": time.perf_counter() - t0, **r.data}
            log(f"{r.status:4}  {name:24} {r.figure}  [{time.perf_counter() - t0:.1f} s]", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2, default=str))
    result["total_s"] = time.perf_counter() - start
    result["summary"] = {k: sum(c["status"] == k for c in result["checks"].values())
                         for k in ("PASS", "FAIL", "SKIP")}
    out.write_text(json.dumps(result, indent=2, default=str))
    log(f"gpu-check: {result['summary']['PASS']} PASS, {result['summary']['FAIL']} FAIL, "
        f"{result['summary']['SKIP']} SKIP in {result['total_s']:.0f} s; wrote {out}", flush=True)
    return result


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
