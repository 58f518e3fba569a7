"""Input-pipeline sections of `python -m dist_free.bench`: decode throughput and end to end.

The JPEGs are cut from the two real photographs scikit-learn ships (china.jpg, flower.jpg), not
noise: noise compresses badly and decodes at a very different speed from natural images. Each file
is a random crop, resized to about ImageNet's typical 500x375 (either orientation), re-encoded at
quality 90, which is close to what ImageNet's train JPEGs look like to a decoder.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pipelines
from dist_free.bench.timing import summary, sync, target
from dist_free.engine.methods import build_method
from dist_free.engine.models import build_model
from dist_free.precision import DTYPES

JPEG_QUALITY = 90
BASE_SIZE = (500, 375)   # ImageNet's most common train-image size, landscape


def photo_crop(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop of 50-100% of each side, resized to ~500x375 or 375x500 (+-10%)."""
    h, w = photo.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    size = BASE_SIZE if rng.random() < 0.7 else BASE_SIZE[::-1]
    size = tuple(int(s * rng.uniform(0.9, 1.1)) for s in size)
    image = Image.fromarray(photo[top:top + ch, left:left + cw])
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize(size, Image.Resampling.BICUBIC)


def write_photo_jpegs(root: str | Path, count: int, classes: int = 4, seed: int = 0) -> Path:
    """ROOT/train/<class>/NNNNN.jpg, `count` files; returns ROOT. Reuses a complete earlier set."""
    from sklearn.datasets import load_sample_images  # a dev dependency, needed only here
    root = Path(root)
    existing = list(root.glob("train/*/*.jpg"))
    if len(existing) == count:
        return root
    if existing:
        raise ValueError(f"{root} holds {len(existing)} JPEGs, not {count}; use an empty folder")
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_crop(photos[i % len(photos)], rng).save(folder / f"{i:05d}.jpg", quality=JPEG_QUALITY)
    return root


def dataset_stats(root: Path) -> dict:
    files = sorted(root.glob("train/*/*.jpg"))
    sizes = [Image.open(f).size for f in files[:50]]
    return {"files": len(files), "mean_kb": sum(f.stat().st_size for f in files) / len(files) / 1024,
            "example_sizes": sorted(set(sizes))[:4], "quality": JPEG_QUALITY,
            "source": "sklearn.datasets.load_sample_images (china.jpg, flower.jpg)"}


# ---------------------------------------------------------------- decode throughput

def make_loader(kind: str, root: Path, batch: int, image_size: int, device, threads: int, dtype):
    return pipelines.build_loader(kind, root, "train", batch_size=batch, image_size=image_size,
                                  device=device, dtype=dtype, num_threads=threads)


def epoch_rate(loader, device) -> tuple[float, int]:
    """Images per second over one full epoch, pipeline start-up included (as in training)."""
    sync(device)
    start, images = time.perf_counter(), 0
    for batch, _ in loader:
        images += batch.shape[0]
    sync(device)
    return images / (time.perf_counter() - start), images


def pipeline_kinds(device: torch.device) -> dict[str, str]:
    dali = "dali-gpu" if device.type == "cuda" else "dali-cpu"
    return {"dali": dali, "dataloader": "torchvision"}


def pipeline_throughput(root: Path, batch: int, image_size: int, device, threads: int,
                        repeats: int) -> dict:
    """DALI vs the torchvision DataLoader, same files, crop, flip, threads; epochs interleaved."""
    kinds = pipeline_kinds(device)
    loaders = {name: make_loader(kind, root, batch, image_size, device, threads, torch.float32)
               for name, kind in kinds.items()}
    for loader in loaders.values():   # warm the page cache and the libraries' first-use costs
        epoch_rate(loader, device)
    rates = {name: [] for name in loaders}
    for r in range(repeats):
        for name, loader in loaders.items():
            loader.set_epoch(r + 1)
            rates[name].append(epoch_rate(loader, device)[0])
    med = {name: float(np.median(v)) for name, v in rates.items()}
    ratios = [a / b for a, b in zip(rates["dali"], rates["dataloader"])]
    ratio = float(np.median(ratios))
    return {"kinds": kinds, "threads": threads, "batch": batch, "image_size": image_size,
            "images_per_s": {n: summary(v) for n, v in rates.items()},
            "images_per_s_per_thread": {n: m / threads for n, m in med.items()},
            "dali_vs_dataloader": {"median": ratio, "min": min(ratios), "max": max(ratios)},
            "dataset": dataset_stats(root),
            "targets": {"dali_vs_dataloader": target(ratio, ">= 1.5", ratio >= 1.5)}}


# ---------------------------------------------------------------- end to end

def train_rate(method, batches, device, max_batches: int) -> dict:
    """Free training over up to max_batches minibatches; the first (start-up) is not timed."""
    it = iter(batches)
    images, labels = next(it)
    method.train_step(images, labels)
    sync(device)
    start, waited, seen = time.perf_counter(), 0.0, 0
    for _ in range(max_batches):
        t = time.perf_counter()
        try:
            images, labels = next(it)
        except StopIteration:
            break
        waited += time.perf_counter() - t
        method.train_step(images, labels)
        seen += images.shape[0]
    sync(device)
    elapsed = time.perf_counter() - start
    return {"images_per_s": seen / elapsed, "data_wait_frac": waited / elapsed, "images": seen}


def end_to_end(root: Path, model_name: str, image_size: int, batch: int, dtype: str, device,
               channels_last: bool, replays: int, threads: int, max_batches: int,
               repeats: int) -> dict:
    """Free training fed by real JPEGs (DALI) vs by the synthetic on-device source."""
    model = build_model(model_name, 1000, channels_last=channels_last).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    method = build_method("free", model, opt, eps=4 / 255, replays=replays, amp_dtype=DTYPES[dtype])
    kinds = {"jpeg": pipeline_kinds(device)["dali"], "synthetic": "synthetic"}
    runs = {name: [] for name in kinds}
    for r in range(repeats):
        for name, kind in kinds.items():
            # The synthetic source gets no root: it then stands for ImageNet (1000 classes).
            loader = pipelines.build_loader(
                kind, None if kind == "synthetic" else root, "train", batch_size=batch,
                image_size=image_size, device=device, dtype=method.input_dtype,
                channels_last=channels_last, num_threads=threads,
                num_classes=1000 if kind == "synthetic" else None)
            loader.set_epoch(r)
            runs[name].append(train_rate(method, loader, device, max_batches))
    out = {name: {"images_per_s": float(np.median([x["images_per_s"] for x in v])),
                  "data_wait_frac": float(np.median([x["data_wait_frac"] for x in v])),
                  "runs": v} for name, v in runs.items()}
    return {"model": model_name, "image_size": image_size, "batch": batch, "dtype": dtype,
            "replays": replays, "loader_threads": threads, "kinds": kinds, **out,
            "jpeg_vs_synthetic": out["jpeg"]["images_per_s"] / out["synthetic"]["images_per_s"]}


# ---------------------------------------------------------------- against the authors' loop

def steady_rate(step, loader, max_batches: int) -> dict:
    """Images/s of step() over up to max_batches batches of a fresh epoch, in steady state: the
    clock starts when the first batch has arrived (both loaders prefetch from then on), so neither
    side pays for its workers' or pipeline's start-up; every batch's step is counted."""
    it = iter(loader)
    x, y = next(it)
    start, images = time.perf_counter(), 0
    for i in range(max_batches):
        step(x, y)
        images += x.shape[0]
        if i + 1 == max_batches:
            break
        try:
            x, y = next(it)
        except StopIteration:
            break
    seconds = time.perf_counter() - start
    del it
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds}


def reference_vs_trainer(root: Path, model_name: str, image_size: int, batch: int, replays: int,
                         device, threads: int, max_batches: int, rounds: int,
                         channels_last: bool, eps: float = 4 / 255) -> dict:
    """The authors' loop (dist_free.bench.reference: ImageFolder + DataLoader, fp32) against our
    trainer's loader and step with the recommended settings (DALI, run.amp=auto), and against our
    trainer in fp32 (same precision as the reference: the implementation alone); same JPEGs,
    model, batch, m, eps, threads; the three interleaved round by round."""
    from dist_free import precision
    from dist_free.bench import reference
    amp_dtype, amp_reason = precision.resolve_amp("auto", device)
    torch.manual_seed(0)
    net = build_model(model_name, 1000).net          # the bare torchvision network
    ref = reference.ReferenceFree(net, batch=batch, image_size=image_size, eps=eps, replays=replays)
    ref_loader = reference.imagefolder_loader(root, batch, image_size, threads)

    def ours(dtype, cl):
        torch.manual_seed(0)
        model = build_model(model_name, 1000, channels_last=cl).to(device).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        method = build_method("free", model, opt, eps=eps, replays=replays, amp_dtype=dtype)
        loader = pipelines.build_loader("dali-cpu", root, "train", batch_size=batch,
                                        image_size=image_size, device=device, channels_last=cl,
                                        num_threads=threads)
        return method.train_step, loader

    variants = {"reference": (ref.train_batch, ref_loader),
                "ours_fp32": ours(None, False),
                "ours_recommended": ours(amp_dtype, channels_last)}
    for step, loader in variants.values():            # warm-up: first-use costs, page cache
        steady_rate(step, loader, 2)
    runs = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, loader = variants[name]
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(r + 1)
            runs[name].append(steady_rate(step, loader, max_batches))

    def ratio(num, den):
        return summary([a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[num], runs[den])])
    rec = ratio("ours_recommended", "reference")
    return {"model": model_name, "image_size": image_size, "batch": batch, "replays": replays,
            "eps": eps, "threads": threads, "batches_per_run": max_batches, "rounds": rounds,
            "reference": "dist_free.bench.reference: ImageFolder + DataLoader "
                         f"({threads} workers), fp32, NCHW, normalisation in the loop",
            "ours_recommended": f"DALI CPU ({threads} threads), {precision.NAMES[amp_dtype]} "
                                f"({amp_reason}), channels_last={channels_last}",
            "ours_fp32": f"DALI CPU ({threads} threads), fp32, NCHW",
            "runs": runs,
            "images_per_s": {name: summary([x["images_per_s"] for x in v]) for name, v in runs.items()},
            "ratios": {"ours_recommended/reference": rec,
                       "ours_fp32/reference": ratio("ours_fp32", "reference"),
                       "ours_recommended/ours_fp32": ratio("ours_recommended", "ours_fp32")},
            "targets": {"recommended_vs_reference": target(rec["median"], ">= 1.5", rec["median"] >= 1.5)}}
