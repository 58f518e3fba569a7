"""Bench part "resident": the device-resident CIFAR loader against the JPEG path, same images.

The images are 32x32 crops of the two real photographs scikit-learn ships, written twice: as a
CIFAR-10 binary folder (read by the resident loader: uint8 on the device, pad + crop + flip
there) and as 32x32 JPEGs in class folders (decoded by DALI, and by the torchvision DataLoader).
Two measurements, epochs interleaved: the loaders alone (images/s over whole epochs), and free
training of a small CIFAR net fed by each (images/s and the fraction of time spent waiting for
data, as the trainer logs it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pipelines
from dist_free.bench.pipeline import epoch_rate, pipeline_kinds, train_rate
from dist_free.bench.timing import summary
from dist_free.engine.methods import build_method
from dist_free.engine.models import build_model
from pipelines.cifar_write import write_cifar

JPEG_QUALITY = 95


def photo_tiles(count: int, seed: int = 0) -> np.ndarray:
    """count random 32x32 crops (of 64-256 px squares, resized) of the sample photographs."""
    from sklearn.datasets import load_sample_images  # a dev dependency, needed only here
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    tiles = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(64, 257))
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        square = Image.fromarray(photo[top:top + side, left:left + side])
        tiles.append(np.asarray(square.resize((32, 32), Image.Resampling.BICUBIC)))
    return np.stack(tiles).transpose(0, 3, 1, 2).copy()


def write_both(workdir: Path, count: int, classes: int = 10) -> tuple[Path, Path]:
    """The same images as a CIFAR-10 binary folder and as a JPEG ImageFolder."""
    images = photo_tiles(count)
    labels = np.arange(count) % classes
    cifar = write_cifar(workdir / "cifar-10-batches-bin", "cifar10-bin",
                        {"train": (images, labels), "val": (images[:classes], labels[:classes])},
                        [f"class_{c}" for c in range(classes)])
    jpegs = workdir / "jpegs32"
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = jpegs / "train" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:05d}.jpg", quality=JPEG_QUALITY)
    return cifar, jpegs


def loaders(cifar: Path, jpegs: Path, batch: int, device, threads: int, dtype) -> dict:
    common = dict(batch_size=batch, image_size=32, val_resize=32, min_area=0.35, device=device,
                  dtype=dtype, num_threads=threads)
    kinds = {"resident": ("resident", cifar), **{
        name: (kind, jpegs) for name, kind in pipeline_kinds(device).items()}}
    return {name: (kind, pipelines.build_loader(kind, root, "train", **common))
            for name, (kind, root) in kinds.items()}


def resident_vs_jpeg(workdir: Path, count: int, batch: int, device, threads: int, repeats: int,
                     model_name: str = "wrn16_4", replays: int = 4, max_batches: int = 8) -> dict:
    cifar, jpegs = write_both(workdir, count)
    built = loaders(cifar, jpegs, batch, device, threads, torch.float32)
    for _, loader in built.values():      # first-use costs, page cache
        epoch_rate(loader, device)
    rates = {name: [] for name in built}
    for r in range(repeats):
        for name, (_, loader) in built.items():
            loader.set_epoch(r + 1)
            rates[name].append(epoch_rate(loader, device)[0])
    model = build_model(model_name, 10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    method = build_method("free", model, opt, eps=8 / 255, replays=replays)
    train = {name: [] for name in ("resident", "dali")}
    for r in range(repeats):
        for name in train:
            loader = built[name][1]
            loader.set_epoch(r + 10)
            train[name].append(train_rate(method, loader, device, max_batches))
    return {"images": count, "batch": batch, "threads": threads, "jpeg_quality": JPEG_QUALITY,
            "kinds": {name: kind for name, (kind, _) in built.items()},
            "loader_images_per_s": {n: summary(v) for n, v in rates.items()},
            "resident_vs_dali": summary([a / b for a, b in zip(rates["resident"], rates["dali"])]),
            "training": {"model": model_name, "replays": replays, "batches": max_batches, **{
                name: {"images_per_s": float(np.median([x["images_per_s"] for x in v])),
                       "data_wait_frac": float(np.median([x["data_wait_frac"] for x in v]))}
                for name, v in train.items()}}}


def resident_lines(p: dict) -> list[str]:
    ips = p["loader_images_per_s"]
    rows = [[f"{n} ({p['kinds'][n]})", f"{ips[n]['median']:.0f} ({ips[n]['min']:.0f}-"
             f"{ips[n]['max']:.0f})"] for n in ips]
    t = p["training"]
    train_rows = [[n, f"{t[n]['images_per_s']:.1f}", f"{100 * t[n]['data_wait_frac']:.1f}%"]
                  for n in ("resident", "dali")]
    head = (f"### {{n}}. Resident CIFAR loader vs JPEGs: the same {p['images']} 32x32 images "
            f"(CIFAR-10 binary vs JPEG q{p['jpeg_quality']}), crop + flip, batch {p['batch']}, "
            f"{p['threads']} threads for the JPEG loaders")
    table = ["| loader | images/s (median, min-max) |", "|---|---|"]
    table += [f"| {a} | {b} |" for a, b in rows]
    train = [f"| free m={t['replays']}, {t['model']}: input | images/s | data wait |",
             "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in train_rows]
    ratio = p["resident_vs_dali"]
    return [head, "", *table, "", f"resident / DALI: {ratio['median']:.1f}x "
            f"({ratio['min']:.1f}-{ratio['max']:.1f})", "", *train]
