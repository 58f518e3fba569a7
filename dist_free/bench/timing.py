"""Timing primitives for `python -m dist_free.bench`, and the two compute sections built on them.

Two-core machines and shared GPUs are noisy, so nothing here trusts a single run: the variants of
one comparison are *interleaved* (A, B, C, A, B, C, ...) so that a slow spell hits all of them, each
is repeated, and every figure is a median with its spread. A ratio is the median of the per-round
ratios (paired), not a ratio of medians. On CUDA every timed region is fenced by synchronize(),
because kernels run asynchronously; the trainer itself never syncs like that.

- `step_cost`: free replay vs natural / PGD-7 / FGSM-RS steps, and the replay broken into parts.
- `update_cost`: the fused (torch.compile) perturbation update vs its eager twin vs a plain copy.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dist_free import linf
from dist_free.methods import build_method
from dist_free.models import build_model

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of `calls` back-to-back calls, fenced on CUDA."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "n": len(samples)}


@dataclass
class Variant:
    fn: Callable[[], object]
    units: int = 1       # work units per call (a free train_step is `replays` replays)
    calls: int = 1       # calls per timed sample; raised so that a sample lasts min_sample_s


def interleaved(variants: dict[str, Variant], device: torch.device, repeats: int,
                warmup: int = 1, min_sample_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per unit for each variant, one sample per round, rounds interleaved.

    Warm-up calls (compilation, allocator, cuDNN autotuning) are not timed; their duration sets
    how many calls make one sample, so millisecond kernels are not lost in timer noise."""
    for v in variants.values():
        for _ in range(warmup):
            once = time_once(v.fn, device, v.calls)
        v.calls = max(v.calls, math.ceil(min_sample_s / max(once * v.calls, 1e-9) * v.calls))
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, v in variants.items():
            samples[name].append(time_once(v.fn, device, v.calls) / v.units)
    return samples


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> dict:
    return summary([a / b for a, b in zip(samples[num], samples[den])])


def target(measured: float, goal: str, met: bool) -> dict:
    return {"measured": measured, "target": goal, "met": bool(met)}


# ---------------------------------------------------------------- step cost

def make_batch(batch: int, size: int, classes: int, device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(classes, (batch,), generator=g).to(device)


def step_variants(model, images, labels, amp_dtype, replays: int, eps: float) -> dict[str, Variant]:
    """Every method on one model and optimizer; weights drift, which does not change the cost."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    common = dict(amp_dtype=amp_dtype)
    natural = build_method("natural", model, opt, **common)
    free = build_method("free", model, opt, eps=eps, replays=replays, **common)
    pgd = build_method("pgd", model, opt, eps=eps, steps=7, **common)
    fast = build_method("fast", model, opt, eps=eps, **common)
    x_in = images.to(natural.input_dtype)
    return {
        "natural_step": Variant(lambda: natural.train_step(images, labels)),
        "free_replay": Variant(lambda: free.train_step(images, labels), units=replays),
        "pgd7_step": Variant(lambda: pgd.train_step(images, labels)),
        "fgsm_rs_step": Variant(lambda: fast.train_step(images, labels)),
        "fwd_bwd": Variant(lambda: fwd_bwd(natural, x_in, labels, input_grad=False)),
        "fwd_bwd_input_grad": Variant(lambda: fwd_bwd(natural, x_in, labels, input_grad=True)),
        "perturbation_update": update_variant(images, natural.input_dtype, eps),
    }


def fwd_bwd(method, x, labels, input_grad: bool) -> None:
    """A replay's forward and backward without the optimizer step; optionally with dL/dx too."""
    method.optimizer.zero_grad(set_to_none=True)
    if input_grad:
        x = x.detach().requires_grad_(True)
    _, loss = method.forward_loss(x, labels)
    method.backward(loss)


def update_variant(images, input_dtype, eps: float) -> Variant:
    """The update exactly as FreeAdversarialTrainer picks it ("auto": fused on CUDA only)."""
    fused = linf.resolve_fused("auto", images.device)
    update = linf.compiled_free_update() if fused else linf.free_update
    delta = torch.zeros(images.shape, device=images.device)
    grad = torch.randn(images.shape, device=images.device).to(input_dtype)
    out = torch.empty(images.shape, device=images.device, dtype=input_dtype)
    found_inf = torch.zeros((), device=images.device)
    return Variant(lambda: update(images, delta, grad, found_inf, eps, eps, out), calls=5)


def step_cost(model_name: str, image_size: int, batch: int, dtype: str, device: torch.device,
              channels_last: bool, replays: int, repeats: int, eps: float = 4 / 255) -> dict:
    model = build_model(model_name, 1000, channels_last=channels_last).to(device).train()
    images, labels = make_batch(batch, image_size, 1000, device, channels_last)
    variants = step_variants(model, images, labels, DTYPES[dtype], replays, eps)
    samples = interleaved(variants, device, repeats)
    seconds = {name: summary(s) for name, s in samples.items()}
    ratios = {f"{name}/natural_step": paired_ratio(samples, name, "natural_step")
              for name in samples if name != "natural_step"}
    nat = seconds["natural_step"]["median"]
    parts = {  # the replay's extra cost over a natural step, split into its causes
        "input_grad_extra_s": seconds["fwd_bwd_input_grad"]["median"] - seconds["fwd_bwd"]["median"],
        "update_s": seconds["perturbation_update"]["median"],
        "optimizer_step_s": nat - seconds["fwd_bwd"]["median"],
    }
    r = {k: ratios[f"{k}/natural_step"]["median"] for k in ("free_replay", "pgd7_step", "fgsm_rs_step")}
    return {"model": model_name, "image_size": image_size, "batch": batch, "dtype": dtype,
            "channels_last": channels_last, "replays": replays, "repeats": repeats,
            "seconds": seconds, "ratios": ratios, "breakdown": parts,
            "images_per_s_natural": batch / nat,
            "targets": {"free_replay_vs_natural": target(r["free_replay"], "<= 1.05", r["free_replay"] <= 1.05),
                        "pgd7_vs_natural": target(r["pgd7_step"], "about 8 (7-9)", 7 <= r["pgd7_step"] <= 9),
                        "fgsm_rs_vs_natural": target(r["fgsm_rs_step"], "about 2 (1.7-2.3)",
                                                     1.7 <= r["fgsm_rs_step"] <= 2.3)}}


# ---------------------------------------------------------------- perturbation update

def update_operands(shape, device, grad_dtype):
    """fp32 clean batch and buffer, activation-dtype gradient and next-replay input."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).to(device)
    delta = (torch.rand(shape, generator=g) * 0.02 - 0.01).to(device)
    grad = torch.randn(shape, generator=g).to(device, grad_dtype)
    out = torch.empty(shape, device=device, dtype=grad_dtype)
    return x, delta, grad, out, torch.zeros((), device=device)


def essential_bytes(x, delta, grad, out) -> int:
    """Each operand touched once: read x, delta, grad; write delta and the next input."""
    return (x.numel() * x.element_size() + 2 * delta.numel() * delta.element_size()
            + grad.numel() * grad.element_size() + out.numel() * out.element_size())


def update_cost(shape: tuple[int, ...], grad_dtype: torch.dtype, device: torch.device,
                repeats: int, calls: int, eps: float = 4 / 255) -> dict:
    x, delta, grad, out, found_inf = update_operands(shape, device, grad_dtype)
    fused = linf.compiled_free_update()
    src, dst = torch.rand(shape, device=device), torch.empty(shape, device=device)
    t0 = time.perf_counter()
    fused(x, delta, grad, found_inf, eps, eps / 4, out)   # compile outside the timed rounds
    compile_s = time.perf_counter() - t0
    samples = interleaved({
        "eager": Variant(lambda: linf.free_update(x, delta, grad, found_inf, eps, eps / 4, out), calls=calls),
        "fused": Variant(lambda: fused(x, delta, grad, found_inf, eps, eps / 4, out), calls=calls),
        "copy": Variant(lambda: dst.copy_(src), calls=calls),
    }, device, repeats)
    moved = essential_bytes(x, delta, grad, out)
    copy_bytes = 2 * src.numel() * src.element_size()
    gbps = {"eager": moved, "fused": moved, "copy": copy_bytes}
    result = {name: {**summary(s), "gb_per_s": gbps[name] / statistics.median(s) / 1e9}
              for name, s in samples.items()}
    speedup = paired_ratio(samples, "eager", "fused")
    frac = result["fused"]["gb_per_s"] / result["copy"]["gb_per_s"]
    return {"shape": list(shape), "buffer_dtype": "fp32", "grad_and_output_dtype": str(grad_dtype),
            "bytes_per_update": moved, "copy_bytes": copy_bytes, "compile_s": compile_s,
            "seconds": result, "fused_speedup": speedup, "fused_fraction_of_copy": frac,
            "targets": {"fused_vs_eager": target(speedup["median"], ">= 5", speedup["median"] >= 5),
                        "fused_fraction_of_copy_bw": target(frac, ">= 0.60", frac >= 0.6)}}
