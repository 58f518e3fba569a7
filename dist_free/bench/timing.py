"""Timing primitives for `python -m dist_free.bench`, and the two compute sections built on them.

Two-core machines and shared GPUs are noisy, so nothing here trusts a single run: the variants of
one comparison are *interleaved* (A, B, C, A, B, C, ...) so that a slow spell hits all of them, each
is repeated, and every figure is a median with its spread. A ratio is the median of the per-round
ratios (paired), not a ratio of medians. On CUDA every timed region is fenced by synchronize(),
because kernels run asynchronously; the trainer itself never syncs like that.

- `step_cost`: free replay vs natural / PGD-7 / FGSM-RS steps, and the replay broken into parts.
- `replay_floor`: the trainer's replay against its floor (a natural step plus the input gradient
  plus the perturbation update), with enough rounds to resolve 1%, and where any gap goes.
- `update_cost`: the fused (torch.compile) perturbation update vs its eager twin vs a plain copy.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dist_free.engine import linf
from dist_free.engine.free import UpdateWork, compiled_free_update, free_update, resolve_fused
from dist_free.engine.methods import build_method
from dist_free.engine.models import build_model
from dist_free.engine.step_base import batch_stats
from dist_free.precision import DTYPES


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


def median_ci(samples: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median: the order statistics whose ranks
    a Binomial(n, 1/2) count brackets (normal approximation; the full range for tiny n)."""
    xs, n = sorted(samples), len(samples)
    half = z * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return xs[lo], xs[hi]


def spread_summary(samples: list[float]) -> dict:
    """summary() plus the quartiles, IQR / median and the median's confidence interval."""
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    med = statistics.median(samples)
    lo, hi = median_ci(samples)
    return {**summary(samples), "q1": q1, "q3": q3, "iqr_over_median": (q3 - q1) / med,
            "median_ci95": [lo, hi]}


@dataclass
class Variant:
    fn: Callable[[], object]
    units: int = 1       # work units per call (a free train_step is `replays` replays)
    calls: int = 1       # calls per timed sample; raised so that a sample lasts min_sample_s


def interleaved(variants: dict[str, Variant], device: torch.device, repeats: int,
                warmup: int = 1, min_sample_s: float = 0.05,
                rotate: bool = False) -> dict[str, list[float]]:
    """Seconds per unit for each variant, one sample per round, rounds interleaved.

    Warm-up calls (compilation, allocator, cuDNN autotuning) are not timed; their duration sets
    how many calls make one sample, so millisecond kernels are not lost in timer noise. rotate:
    round r starts with variant r mod n, so no variant always runs first (or after the same one)."""
    for v in variants.values():
        for _ in range(warmup):
            once = time_once(v.fn, device, v.calls)
        if warmup and min_sample_s > 0:
            v.calls = max(v.calls, math.ceil(min_sample_s / max(once * v.calls, 1e-9) * v.calls))
    samples = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)] if rotate else names
        for name in order:
            v = variants[name]
            samples[name].append(time_once(v.fn, device, v.calls) / v.units)
    return samples


def paired_ratio(samples: dict[str, list[float]], num: str, den: str) -> dict:
    return summary([a / b for a, b in zip(samples[num], samples[den])])


def paired_spread(samples: dict[str, list[float]], num: str, den: str) -> dict:
    return spread_summary([a / b for a, b in zip(samples[num], samples[den])])


def target(measured: float, goal: str, met: bool) -> dict:
    return {"measured": measured, "target": goal, "met": bool(met)}


# ---------------------------------------------------------------- step cost

def make_batch(batch: int, size: int, classes: int, device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(classes, (batch,), generator=g).to(device)


# The step table's methods, each timed against a natural step on the same model and optimizer.
STEP_METHODS = ("free_replay", "pgd7_step", "fgsm_rs_step", "nfgsm_step")


def step_variants(model, images, labels, amp_dtype, replays: int, eps: float) -> dict[str, Variant]:
    """Every method on one model and optimizer; weights drift, which does not change the cost."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    common = dict(amp_dtype=amp_dtype)
    natural = build_method("natural", model, opt, **common)
    free = build_method("free", model, opt, eps=eps, replays=replays, **common)
    pgd = build_method("pgd", model, opt, eps=eps, steps=7, **common)
    fast = build_method("fast", model, opt, eps=eps, **common)
    nfgsm = build_method("nfgsm", model, opt, eps=eps, **common)
    x_in = images.to(natural.input_dtype)
    return {
        "natural_step": Variant(lambda: natural.train_step(images, labels)),
        "free_replay": Variant(lambda: free.train_step(images, labels), units=replays),
        "pgd7_step": Variant(lambda: pgd.train_step(images, labels)),
        "fgsm_rs_step": Variant(lambda: fast.train_step(images, labels)),
        "nfgsm_step": Variant(lambda: nfgsm.train_step(images, labels)),
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


def trainer_update(device: torch.device, like: torch.Tensor):
    """The update and its scratch exactly as FreeAdversarialTrainer picks them ("auto": fused on
    CUDA, eager with reused scratch elsewhere)."""
    if resolve_fused("auto", device):
        return compiled_free_update(), None
    return free_update, UpdateWork.like(like)


def update_variant(images, input_dtype, eps: float) -> Variant:
    """One perturbation update (no scaler), between two replays: the next input is written."""
    update, work = trainer_update(images.device, images)
    delta = torch.zeros(images.shape, device=images.device)
    grad = torch.randn(images.shape, device=images.device)
    x_adv = linf.perturb(images, delta)
    return Variant(lambda: update(images, delta, grad, None, eps, eps, x_adv, True, work), calls=5)


def step_cost(model_name: str, image_size: int, batch: int, dtype: str, device: torch.device,
              channels_last: bool, replays: int, repeats: int, eps: float = 4 / 255) -> dict:
    model = build_model(model_name, 1000, channels_last=channels_last).to(device).train()
    images, labels = make_batch(batch, image_size, 1000, device, channels_last)
    variants = step_variants(model, images, labels, DTYPES[dtype], replays, eps)
    samples = interleaved(variants, device, repeats, rotate=True)
    seconds = {name: summary(s) for name, s in samples.items()}
    ratios = {f"{name}/natural_step": paired_ratio(samples, name, "natural_step")
              for name in samples if name != "natural_step"}
    nat = seconds["natural_step"]["median"]
    parts = {  # the replay's extra cost over a natural step, split into its causes
        "input_grad_extra_s": seconds["fwd_bwd_input_grad"]["median"] - seconds["fwd_bwd"]["median"],
        "update_s": seconds["perturbation_update"]["median"],
        "optimizer_step_s": nat - seconds["fwd_bwd"]["median"],
    }
    r = {k: ratios[f"{k}/natural_step"]["median"] for k in STEP_METHODS}
    return {"model": model_name, "image_size": image_size, "batch": batch, "dtype": dtype,
            "channels_last": channels_last, "replays": replays, "repeats": repeats,
            "seconds": seconds, "ratios": ratios, "breakdown": parts,
            "images_per_s_natural": batch / nat,
            "targets": {"free_replay_vs_natural": target(r["free_replay"], "<= 1.05",
                                                         r["free_replay"] <= 1.05),
                        "pgd7_vs_natural": target(r["pgd7_step"], "about 8 (7-9)", 7 <= r["pgd7_step"] <= 9),
                        "fgsm_rs_vs_natural": target(r["fgsm_rs_step"], "about 2 (1.7-2.3)",
                                                     1.7 <= r["fgsm_rs_step"] <= 2.3),
                        # two passes per SGD step, like FGSM-RS
                        "nfgsm_vs_natural": target(r["nfgsm_step"], "about 2 (1.7-2.3)",
                                                   1.7 <= r["nfgsm_step"] <= 2.3)}}


def arch_step_cost(model_name: str, image_size: int, batch: int, dtype: str, device: torch.device,
                   channels_last: bool, replays: int, repeats: int, kwargs: dict | None = None,
                   eps: float = 4 / 255) -> dict:
    """The step table's architecture rows (timm ConvNeXt, ViT): a free replay against a natural
    step on the same model and optimizer, interleaved; the ratio is the portable figure."""
    model = build_model(model_name, 1000, channels_last=channels_last,
                        kwargs=kwargs).to(device).train()
    images, labels = make_batch(batch, image_size, 1000, device, channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    natural = build_method("natural", model, opt, amp_dtype=DTYPES[dtype])
    free = build_method("free", model, opt, eps=eps, replays=replays, amp_dtype=DTYPES[dtype])
    variants = {"natural_step": Variant(lambda: natural.train_step(images, labels)),
                "free_replay": Variant(lambda: free.train_step(images, labels), units=replays)}
    samples = interleaved(variants, device, repeats, rotate=True)
    ratio = paired_spread(samples, "free_replay", "natural_step")
    return {"model": model_name, "kwargs": dict(kwargs or {}), "image_size": image_size,
            "batch": batch, "dtype": dtype, "channels_last": channels_last, "replays": replays,
            "repeats": repeats, "params": sum(p.numel() for p in model.parameters()),
            "seconds": {name: summary(s) for name, s in samples.items()},
            "ratios": {"free_replay/natural_step": ratio},
            "images_per_s_natural": batch / summary(samples["natural_step"])["median"],
            "targets": {"free_replay_vs_natural": target(ratio["median"], "<= 1.05",
                                                         ratio["median"] <= 1.05)}}


# ---------------------------------------------------------------- replay vs its floor

def floor_pass(natural, images, labels, delta, x_adv, eps: float) -> None:
    """The least a replay can cost: a natural step (with its stats) on x_adv that also takes
    dL/d x_adv, then the perturbation update as one fused kernel (torch.compile: one pass over
    its operands, on a CPU too), writing the next input in place."""
    leaf = x_adv.detach().requires_grad_(True)
    logits, loss, found_inf = natural.sgd_step(leaf, labels)
    with torch.no_grad():
        batch_stats(loss.detach(), (logits.argmax(1) == labels).sum(), 1, images.shape[0])
        compiled_free_update()(images, delta, leaf.grad,
                                    found_inf if natural.scaler is not None else None, eps, eps,
                                    x_adv, True)


@dataclass
class FloorSetup:
    natural: object           # NaturalTrainer
    replay: object            # FreeAdversarialTrainer, m = 1: exactly one replay per train_step
    free: object              # FreeAdversarialTrainer, the configured m (profile, parts)
    delta: torch.Tensor       # the floor's own perturbation and replay input
    x_adv: torch.Tensor


def floor_setup(model, amp_dtype, images, replays: int, eps: float) -> FloorSetup:
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    delta = torch.zeros(images.shape, device=images.device)
    return FloorSetup(build_method("natural", model, opt, amp_dtype=amp_dtype),
                      build_method("free", model, opt, eps=eps, replays=1, amp_dtype=amp_dtype),
                      build_method("free", model, opt, eps=eps, replays=replays, amp_dtype=amp_dtype),
                      delta, linf.perturb(images, delta))


def floor_variants(f: FloorSetup, images, labels, eps: float) -> dict[str, Variant]:
    """One pass each, on one model, optimizer and batch. The replay is a train_step of a trainer
    with m = 1: one replay plus its minibatch's set-up (the first input, the stats), the same
    element-wise work per replay as at any m (m - 1 updates write the next input, the set-up
    writes the first), and Python's per-minibatch bookkeeping charged to a single replay."""
    return {"natural_step": Variant(lambda: f.natural.train_step(images, labels)),
            "floor": Variant(lambda: floor_pass(f.natural, images, labels, f.delta, f.x_adv, eps)),
            "free_replay": Variant(lambda: f.replay.train_step(images, labels))}


def replay_parts(f: FloorSetup, images, eps: float, repeats: int, device) -> dict:
    """Bottom up: the only work a replay does that its floor does not is its element-wise
    bookkeeping; time that alone, on the trainer's own buffers, with many calls per sample.
    Per replay at m: (first input + (m-1) updates writing the next input + 1 that does not) / m;
    the floor's: one fused update writing the next input."""
    t = f.free
    delta, x_adv, work = t.buffers(images)                       # allocates them
    m = t.replays
    grad = torch.randn(images.shape, device=device)
    fused = compiled_free_update()
    args = (images, delta, grad, None, eps, eps, x_adv)
    samples = interleaved({
        "first_input": Variant(lambda: torch.add(images, delta, out=x_adv).clamp_(0.0, 1.0)),
        "update_next": Variant(lambda: t.update(*args, True, work)),
        "update_last": Variant(lambda: t.update(*args, False, work)),
        "fused_update": Variant(lambda: fused(*args, True)),
    }, device, repeats, warmup=2, min_sample_s=0.05, rotate=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    per_replay = (med["first_input"] + (m - 1) * med["update_next"] + med["update_last"]) / m
    return {"seconds": {k: spread_summary(v) for k, v in samples.items()},
            "replay_elementwise_s": per_replay, "floor_elementwise_s": med["fused_update"],
            "gap_s": per_replay - med["fused_update"]}


def op_profile(fn: Callable[[], object], passes: int, repeats: int) -> dict:
    """torch.profiler (CPU) over `repeats` calls of fn: per aten op, self CPU ms per pass (median
    of the calls) and calls per pass; and the bytes and number of allocations per pass that
    top-level ops keep (net of what they free before returning)."""
    from torch.profiler import ProfilerActivity, profile
    times, calls, alloc = collections.defaultdict(list), {}, []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                times[e.key].append(e.self_cpu_time_total / 1e3 / passes)
                calls[e.key] = e.count / passes
        kept = [e.cpu_memory_usage for e in prof.events()
                if e.cpu_parent is None and e.cpu_memory_usage > 0]
        alloc.append((sum(kept) / passes, len(kept) / passes))
    ops = {k: {"self_ms": statistics.median(v + [0.0] * (repeats - len(v))), "calls": calls[k]}
           for k, v in times.items()}
    return {"ops": ops, "alloc_bytes": statistics.median(a for a, _ in alloc),
            "allocations": statistics.median(n for _, n in alloc),
            "self_ms": sum(o["self_ms"] for o in ops.values())}


def profile_gap(f: FloorSetup, images, labels, eps: float, repeats: int = 3, top: int = 8) -> dict:
    """Where the replay's time goes beyond the floor's: totals per pass, and the aten ops whose
    per-pass self time differs most. Profiles one train_step at the configured m against m floor
    passes; calls and bytes are exact, times as noisy as the machine."""
    m = f.free.replays

    def floors():
        for _ in range(m):
            floor_pass(f.natural, images, labels, f.delta, f.x_adv, eps)
    rep = op_profile(lambda: f.free.train_step(images, labels), m, repeats)
    flo = op_profile(floors, m, repeats)
    zero = {"self_ms": 0.0, "calls": 0}
    names = set(rep["ops"]) | set(flo["ops"])
    gap = {n: rep["ops"].get(n, zero)["self_ms"] - flo["ops"].get(n, zero)["self_ms"] for n in names}
    ranked = sorted(names, key=lambda n: -abs(gap[n]))[:top]
    return {"totals": {name: {k: p[k] for k in ("self_ms", "alloc_bytes", "allocations")}
                       for name, p in (("free_replay", rep), ("floor", flo))},
            "largest_differences": {n: {"free_replay": rep["ops"].get(n, zero),
                                        "floor": flo["ops"].get(n, zero)} for n in ranked}}


def replay_floor(model_name: str, image_size: int, batch: int, dtype: str, device: torch.device,
                 channels_last: bool, replays: int, rounds: int, repeats: int,
                 eps: float = 4 / 255) -> dict:
    """Natural step, floor and the trainer's replay, one pass each per round, on the same batch
    (order rotated every round); ratios paired per round. Then the same gap bottom up (the
    element-wise work that differs, timed alone) and a profile. Target: replay within 1% of floor."""
    model = build_model(model_name, 1000, channels_last=channels_last).to(device).train()
    images, labels = make_batch(batch, image_size, 1000, device, channels_last)
    f = floor_setup(model, DTYPES[dtype], images, replays, eps)
    samples = interleaved(floor_variants(f, images, labels, eps), device, rounds, warmup=2,
                          min_sample_s=0, rotate=True)
    ratio = paired_spread(samples, "free_replay", "floor")
    parts = replay_parts(f, images, eps, repeats, device)
    floor_s = statistics.median(samples["floor"])
    parts["gap_over_floor"] = parts["gap_s"] / floor_s
    result = {"model": model_name, "image_size": image_size, "batch": batch, "dtype": dtype,
              "channels_last": channels_last, "replays": replays, "rounds": rounds,
              "threads": torch.get_num_threads(),
              "seconds": {name: spread_summary(v) for name, v in samples.items()},
              "ratios": {"free_replay/floor": ratio,
                         "floor/natural_step": paired_spread(samples, "floor", "natural_step"),
                         "free_replay/natural_step": paired_spread(samples, "free_replay",
                                                                   "natural_step")},
              "parts": parts,
              "targets": {"free_replay_vs_floor": target(ratio["median"], "<= 1.01",
                                                         ratio["median"] <= 1.01),
                          "bottom_up_gap": target(1 + parts["gap_over_floor"], "<= 1.01",
                                                  parts["gap_over_floor"] <= 0.01),
                          "spread_below_1pct": target(ratio["iqr_over_median"], "IQR/median < 0.01",
                                                      ratio["iqr_over_median"] < 0.01)}}
    if device.type == "cpu":
        result["profile"] = profile_gap(f, images, labels, eps)
    return result


# ---------------------------------------------------------------- perturbation update

def update_operands(shape, device, x_dtype=torch.float32):
    """The trainer's operands: the clean batch in the loader's dtype (fp16 on CUDA, fp32 on a
    CPU), fp32 buffer, gradient and replay input (= clamp(x + delta, 0, 1), rewritten in place)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g).to(device, x_dtype)
    delta = (torch.rand(shape, generator=g) * 0.02 - 0.01).to(device)
    grad = torch.randn(shape, generator=g).to(device)
    return x, delta, grad, linf.perturb(x, delta)


def essential_bytes(x, delta, grad, x_adv) -> int:
    """Each operand touched once: read x, delta, grad, x_adv; write delta and x_adv."""
    return sum(t.numel() * t.element_size() for t in (x, delta, delta, grad, x_adv, x_adv))


def update_cost(shape: tuple[int, ...], x_dtype: torch.dtype, device: torch.device,
                repeats: int, calls: int, eps: float = 4 / 255) -> dict:
    x, delta, grad, x_adv = update_operands(shape, device, x_dtype)
    fused = compiled_free_update()
    work = UpdateWork.like(delta)
    src, dst = torch.rand(shape, device=device), torch.empty(shape, device=device)
    args = (x, delta, grad, None, eps, eps / 4, x_adv, True)
    t0 = time.perf_counter()
    fused(*args)   # compile outside the timed rounds
    compile_s = time.perf_counter() - t0
    samples = interleaved({
        "eager": Variant(lambda: free_update(*args, work), calls=calls),
        "eager_alloc": Variant(lambda: free_update(*args), calls=calls),
        "fused": Variant(lambda: fused(*args), calls=calls),
        "copy": Variant(lambda: dst.copy_(src), calls=calls),
    }, device, repeats)
    moved = essential_bytes(x, delta, grad, x_adv)
    copy_bytes = 2 * src.numel() * src.element_size()
    gbps = {"eager": moved, "eager_alloc": moved, "fused": moved, "copy": copy_bytes}
    result = {name: {**summary(s), "gb_per_s": gbps[name] / statistics.median(s) / 1e9}
              for name, s in samples.items()}
    speedup = paired_ratio(samples, "eager", "fused")
    frac = result["fused"]["gb_per_s"] / result["copy"]["gb_per_s"]
    return {"shape": list(shape), "buffer_dtype": "fp32", "x_dtype": str(x_dtype).removeprefix("torch."),
            "bytes_per_update": moved, "copy_bytes": copy_bytes, "compile_s": compile_s,
            "seconds": result, "fused_speedup": speedup,
            "scratch_speedup": paired_ratio(samples, "eager_alloc", "eager"),
            "fused_fraction_of_copy": frac,
            "targets": {"fused_vs_eager": target(speedup["median"], ">= 5", speedup["median"] >= 5),
                        "fused_fraction_of_copy_bw": target(frac, ">= 0.60", frac >= 0.6)}}
