"""`python -m dist_free.bench`: what free training costs, measured on the machine it runs on.

    python -m dist_free.bench                    # full suite for this device (CPU or CUDA)
    python -m dist_free.bench --quick            # tiny sizes, one repeat: a smoke test (< 1 min)
    python -m dist_free.bench --parts step,update --model resnet50 --image-size 224 --batch 64
    python -m dist_free.bench --results-md bench/RESULTS.md   # also refresh this device's table

Parts: step (free replay vs natural, PGD-7, FGSM-RS; the replay broken down; a free replay vs a
natural step on a timm ConvNeXt and a timm ViT), floor (the replay
against its floor: natural step + input gradient + fused update, to 1%), update (fused vs eager
perturbation update vs a plain copy), pipeline (DALI vs the torchvision DataLoader on real JPEGs),
e2e (free training on JPEGs vs the synthetic source), reference (our trainer vs a restatement of
the authors' loop, end to end on the same JPEGs), memory (free vs natural peak), scaling (DDP
images/s per rank at world size 1 and 2, same threads per rank; all-reduced bytes and share of
time), eval (PGD and AutoAttack images/s per rank at world size 1 and 2), resident (the
device-resident CIFAR loader vs DALI and the DataLoader on the same 32x32 images as JPEGs).

Every figure is a median over interleaved repeats, with its spread, and names the device it ran
on. Ratios measured side by side are the portable result; absolute times only compare between
machines of the same kind. Defaults follow the device: on CUDA ResNet-50, 224 px, batch 256, bf16,
channels_last; on a CPU ResNet-18 at 112 px, batch 32, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dist_free import environment, precision
from dist_free.bench import pipeline, timing, workers
from dist_free.bench.report import format_table, update_results_md

PARTS = ("step", "floor", "update", "pipeline", "e2e", "reference", "memory", "scaling", "eval",
         "resident")


@dataclass
class BenchConfig:
    model: str
    image_size: int
    batch: int
    dtypes: list[str]
    device: str
    channels_last: bool
    parts: list[str]
    quick: bool = False
    repeats: int = 5
    replays: int = 4
    update_shape: list[int] = field(default_factory=lambda: [64, 3, 224, 224])
    jpegs: int = 512
    e2e_batches: int = 8
    floor_rounds: int = 30
    reference: dict = field(default_factory=lambda: dict(batches=8, rounds=3))
    scaling: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    threads: int = 0
    # The step table's architecture rows: timm models, free replay vs natural step.
    architectures: list[dict] = field(default_factory=list)


# The demo's model and evaluation settings (configs/demo.yaml): small_cnn, 10 classes, 32 px,
# PGD-10 at eps 8/255 with one restart.
DEMO_EVAL = dict(model="small_cnn", image_size=32, batch=64, classes=10, eps=8 / 255, pgd_steps=10,
                 pgd_restarts=1, aa_batch_never=16, rounds=3)


def arch_rows(convnext: str, vit: str, image_size: int, batch: int, vit_kwargs: dict,
              convnext_kwargs: dict | None = None) -> list[dict]:
    return [dict(label="ConvNeXt", model=f"timm/{convnext}", image_size=image_size, batch=batch,
                 channels_last=True, kwargs=convnext_kwargs or {}),
            dict(label="ViT", model=f"timm/{vit}", image_size=image_size, batch=batch,
                 channels_last=False, kwargs=vit_kwargs)]


def cuda_defaults() -> dict:
    return dict(model="resnet50", image_size=224, batch=256, dtypes=["bf16"], channels_last=True,
                architectures=arch_rows("convnext_tiny", "vit_small_patch16_224", 224, 128, {}),
                jpegs=4096, e2e_batches=30, floor_rounds=100,
                scaling=dict(model="resnet50", image_size=224, batch=128, threads=4, rounds=5),
                eval=dict(DEMO_EVAL, batch=256, aa_batch_never=64))


def cpu_defaults() -> dict:
    # ConvNeXt-T and ViT-S/16 themselves, at the ResNet-18 row's 112 px and batch 32.
    return dict(model="resnet18", image_size=112, batch=32, dtypes=["fp32", "bf16"],
                channels_last=False, e2e_batches=4, floor_rounds=150,
                architectures=arch_rows("convnext_tiny", "vit_small_patch16_224", 112, 32,
                                        {"img_size": 112}),
                scaling=dict(model="small_cnn", image_size=32, batch=64, threads=1, rounds=9),
                eval=dict(DEMO_EVAL))


def quick_defaults() -> dict:
    return dict(model="small_cnn", image_size=32, batch=8, dtypes=["fp32"], channels_last=False,
                # A smoke test of the rows: one block per stage, one transformer block.
                architectures=arch_rows("convnext_atto", "vit_tiny_patch16_224", 32, 4,
                                        {"img_size": 32, "patch_size": 8, "depth": 1,
                                         "embed_dim": 48, "num_heads": 2},
                                        {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}),
                repeats=1, update_shape=[8, 3, 32, 32], jpegs=24, e2e_batches=2, floor_rounds=2,
                reference=dict(batches=2, rounds=1),
                scaling=dict(model="small_cnn", image_size=32, batch=8, threads=1, rounds=1),
                eval=dict(DEMO_EVAL, batch=4, aa_batch_never=2, pgd_steps=2, rounds=1))


class BenchOptionError(ValueError):
    """A command-line option the bench cannot use: a message and exit status 2."""


def resolve_device(name: str) -> torch.device:
    try:
        return environment.resolve_device(name)
    except RuntimeError as e:
        raise BenchOptionError(f"--device {name}: {e}") from None


def build_config(a: argparse.Namespace) -> BenchConfig:
    device = resolve_device(a.device)
    base = quick_defaults() if a.quick else cuda_defaults() if device.type == "cuda" else cpu_defaults()
    chosen = {k: v for k, v in dict(model=a.model, image_size=a.image_size, batch=a.batch,
                                    repeats=a.repeats, jpegs=a.jpegs,
                                    floor_rounds=a.floor_rounds).items() if v is not None}
    if a.dtype:
        chosen["dtypes"] = a.dtype.split(",")
    unknown = [d for d in chosen.get("dtypes", []) if d not in precision.DTYPES]
    if unknown:
        raise BenchOptionError(f"--dtype {unknown} not one of {sorted(precision.DTYPES)}")
    parts = a.parts.split(",") if a.parts else list(PARTS)
    if set(parts) - set(PARTS):
        raise BenchOptionError(f"--parts {sorted(set(parts) - set(PARTS))} not among {PARTS}")
    if a.channels_last is not None:
        chosen["channels_last"] = a.channels_last
    cfg = BenchConfig(**{**base, **chosen}, device=str(device), parts=parts, quick=a.quick)
    cfg.threads = torch.get_num_threads()
    return cfg


# ---------------------------------------------------------------- environment

def environment_record(device: torch.device) -> dict:
    commit, dirty = environment.git_commit()
    v = environment.versions()
    return {"device": environment.device_label(device), "device_type": device.type,
            "cpu": environment.cpu_model(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": v["torch"], "dali": v["dali"], "python": v["python"],
            "commit": commit[:12] + ("+dirty" if dirty else ""),
            "command": "python -m dist_free.bench " + shlex.join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------- sections

def part_step(cfg: BenchConfig, device, _workdir) -> dict:
    rows = {dtype: timing.step_cost(cfg.model, cfg.image_size, cfg.batch, dtype, device,
                                    cfg.channels_last, cfg.replays, cfg.repeats)
            for dtype in cfg.dtypes}
    rows["architectures"] = {
        a["label"]: {dtype: timing.arch_step_cost(a["model"], a["image_size"], a["batch"], dtype,
                                                  device, a["channels_last"], cfg.replays,
                                                  cfg.repeats, kwargs=a["kwargs"])
                     for dtype in cfg.dtypes}
        for a in cfg.architectures}
    return rows


def part_floor(cfg: BenchConfig, device, _workdir) -> dict:
    return {dtype: timing.replay_floor(cfg.model, cfg.image_size, cfg.batch, dtype, device,
                                       cfg.channels_last, cfg.replays, cfg.floor_rounds,
                                       cfg.repeats)
            for dtype in cfg.dtypes}


def part_update(cfg: BenchConfig, device, _workdir) -> dict:
    # The trainer's operands: the clean batch as the loader hands it (fp16 on CUDA, fp32 on a
    # CPU), fp32 buffer, gradient and replay input.
    x_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return timing.update_cost(tuple(cfg.update_shape), x_dtype, device, cfg.repeats, calls=1)


def part_pipeline(cfg: BenchConfig, device, workdir: Path) -> dict:
    root = pipeline.write_photo_jpegs(workdir / "jpegs", cfg.jpegs)
    return pipeline.pipeline_throughput(root, cfg.batch, cfg.image_size, device,
                                        os.cpu_count() or 1, max(1, min(cfg.repeats, 3)))


def part_e2e(cfg: BenchConfig, device, workdir: Path) -> dict:
    root = pipeline.write_photo_jpegs(workdir / "jpegs", cfg.jpegs)
    return pipeline.end_to_end(root, cfg.model, cfg.image_size, cfg.batch, cfg.dtypes[0], device,
                               cfg.channels_last, cfg.replays, os.cpu_count() or 1,
                               cfg.e2e_batches, max(1, min(cfg.repeats, 2)))


def part_reference(cfg: BenchConfig, device, workdir: Path) -> dict:
    if device.type != "cpu":
        return {"skipped": "the reference comparison runs on the CPU (DALI CPU vs DataLoader)"}
    root = pipeline.write_photo_jpegs(workdir / "jpegs", cfg.jpegs)
    r = cfg.reference
    # Recommended CPU settings: DALI's CPU pipeline, run.amp=auto and channels_last (oneDNN's
    # convolutions and max-pooling run faster in NHWC on the CPUs measured here).
    return pipeline.reference_vs_trainer(root, cfg.model, cfg.image_size, cfg.batch, cfg.replays,
                                         device, os.cpu_count() or 1, r["batches"], r["rounds"],
                                         channels_last=True)


def worker_cfg(cfg: BenchConfig, **overrides) -> dict:
    return {"model": cfg.model, "image_size": cfg.image_size, "batch": cfg.batch,
            "dtype": cfg.dtypes[0], "device": cfg.device, "replays": cfg.replays,
            "steps": 2 if cfg.quick else 3, "channels_last": cfg.channels_last, **overrides}


def part_memory(cfg: BenchConfig, device, workdir: Path) -> dict:
    w = worker_cfg(cfg)
    runs = workers.spawn_memory(["natural", "free"], w, workdir, cfg.threads)
    free, natural = runs["free"], runs["natural"]
    return {**runs, "settings": w, "free_vs_natural_peak": free["peak_bytes"] / natural["peak_bytes"],
            "buffer_share_of_peak": free["buffer_bytes"] / free["peak_bytes"],
            "buffer_share_of_training_memory":
                free["buffer_bytes"] / max(1, free["peak_bytes"] - free["baseline_bytes"])}


def world_sizes(device) -> list[int]:
    # One rank per GPU (NCCL will not put two on one GPU); a CPU runs two gloo ranks on its cores.
    gpus = torch.cuda.device_count() if device.type == "cuda" else 2
    return [1] + sorted({n for n in (2, gpus) if 1 < n <= gpus})


def part_scaling(cfg: BenchConfig, device, workdir: Path) -> dict:
    sc = dict(cfg.scaling)
    threads = sc.pop("threads")
    w = worker_cfg(cfg, steps=2 if cfg.quick else 10, **sc)
    # Every world size under torchrun with the same threads per rank: what changes is DDP alone.
    # World size 1 runs before and after the others, so a machine that slows down (or speeds up)
    # meanwhile does not bias the comparison; the baseline is the mean of the two.
    runs = {str(n): workers.spawn_ranks("ddp", n, w, workdir, threads) for n in world_sizes(device)}
    runs["1 (again)"] = workers.spawn_ranks("ddp", 1, w, workdir, threads)
    base = statistics.mean(runs[k]["ranks"][0]["free"]["images_per_s_per_rank"]
                           for k in ("1", "1 (again)"))
    for run in runs.values():
        per_rank = [r["free"]["images_per_s_per_rank"] for r in run["ranks"]]
        run["free_images_per_s_total"] = sum(per_rank)
        run["free_per_rank_vs_world1"] = (sum(per_rank) / len(per_rank)) / base
    return {"settings": {**w, "threads_per_rank": threads}, "runs": runs}


def part_eval(cfg: BenchConfig, device, workdir: Path) -> dict:
    e = dict(cfg.eval)
    w = worker_cfg(cfg, **e)
    runs = {str(n): workers.spawn_ranks("eval", n, w, workdir, 1) for n in world_sizes(device)}
    for run in runs.values():
        for key in ("pgd", "autoattack_fresh", "autoattack_unbreakable"):
            run[f"{key}_images_per_s_total"] = sum(r[key]["images_per_s"] for r in run["ranks"])
    return {"settings": {**w, "threads_per_rank": 1}, "runs": runs}


def part_resident(cfg: BenchConfig, device, workdir: Path) -> dict:
    from dist_free.bench.resident import resident_vs_jpeg
    count = 64 if cfg.quick else 2048
    return resident_vs_jpeg(workdir, count, 8 if cfg.quick else 128, device,
                            os.cpu_count() or 1, max(1, min(cfg.repeats, 3)),
                            model_name="small_cnn" if cfg.quick else "wrn16_4",
                            max_batches=2 if cfg.quick else 8)


SECTIONS = {"step": part_step, "floor": part_floor, "update": part_update,
            "pipeline": part_pipeline, "e2e": part_e2e, "reference": part_reference,
            "memory": part_memory, "scaling": part_scaling, "eval": part_eval,
            "resident": part_resident}


def run_suite(cfg: BenchConfig, log=print) -> dict:
    device = torch.device(cfg.device)
    result = {"environment": environment_record(device), "config": asdict(cfg)}
    with tempfile.TemporaryDirectory(prefix="dist_free_bench_") as tmp:
        for part in cfg.parts:
            log(f"bench: {part} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            measured = SECTIONS[part](cfg, device, Path(tmp))
            result[part] = {"device": environment.device_label(device), **measured}
            result[part]["wall_s"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- CLI

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dist_free.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="any dist_free.engine.models name, e.g. resnet50, small_cnn")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--dtype", help="comma list of fp32, bf16, fp16 (autocast)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--parts", help=f"comma list of {', '.join(PARTS)} (default: all)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--repeats", type=int, help="interleaved rounds per comparison")
    p.add_argument("--floor-rounds", type=int, help="interleaved rounds of the floor part")
    p.add_argument("--jpegs", type=int, help="generated JPEGs for the pipeline parts")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke test)")
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/<device>.json)")
    p.add_argument("--results-md", type=Path, help="refresh this device's table in this file")
    p.add_argument("--gpu-check", action="store_true",
                   help="check and measure every GPU path instead (dist_free.bench.gpu_check)")
    p.add_argument("--only", help="with --gpu-check: comma list of checks to run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.gpu_check:
        from dist_free.bench import gpu_check
        return gpu_check.main(a.device, a.out, a.only)
    try:
        cfg = build_config(a)
    except BenchOptionError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    result = run_suite(cfg)
    table = format_table(result)
    print(table)
    name = slug(result["environment"]["device"]) + ("-quick" if cfg.quick else "")
    out = a.out or environment.REPO / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}", file=sys.stderr)
    if a.results_md:
        repo = environment.REPO
        shown = out.resolve().relative_to(repo) if out.resolve().is_relative_to(repo) else out
        update_results_md(a.results_md, result, table, shown)
    return 0
