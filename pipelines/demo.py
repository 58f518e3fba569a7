"""The demo dataset: scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package, so
nothing is downloaded), upscaled and tinted into real RGB JPEGs in ImageFolder layout.

Each image gets its own ink and paper colours, so the three channels carry information and
colour alone does not give the class away. The split is a fixed-seed, per-class ~80/20.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError

MARKER = ".dist_free_demo.json"  # the recipe a finished demo folder was written with
DEMO_SIZE = 48  # 8x8 digits x6; the demo trains at 32 px (val: shorter side 36, centre 32)


def tinted(pixels: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
    """An 8x8 digit (0..16 ink) -> size x size RGB with random ink and paper colours."""
    ink = pixels.astype(np.float32)[..., None] / 16.0
    paper, pen = rng.uniform(0.55, 1.0, 3), rng.uniform(0.0, 0.45, 3)
    rgb = (paper * (1 - ink) + pen * ink) * 255.0
    image = Image.fromarray(rgb.round().astype(np.uint8), "RGB")
    return image.resize((size, size), Image.Resampling.BICUBIC)


def split_indices(targets: np.ndarray, val_fraction: float, rng: np.random.Generator):
    """Per-class shuffle; the first val_fraction of each class goes to val."""
    val = np.zeros(len(targets), dtype=bool)
    for digit in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == digit))
        val[members[: round(len(members) * val_fraction)]] = True
    return val


def write_demo(out: str | Path, size: int = DEMO_SIZE, val_fraction: float = 0.2,
               seed: int = 0) -> dict[str, int]:
    """Write OUT/{train,val}/<digit>/NNNN.JPEG; return the number of images per split."""
    from sklearn.datasets import load_digits  # a dev dependency, needed only here

    out = Path(out)
    recipe = {"size": size, "val_fraction": val_fraction, "seed": seed}
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text())["recipe"] == recipe:
        return json.loads(marker.read_text())["counts"]     # already written: rerunning is safe
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; choose a new folder for the demo")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    is_val = split_indices(digits.target, val_fraction, rng)
    counts = {"train": 0, "val": 0}
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        split = "val" if is_val[index] else "train"
        folder = out / split / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        tinted(pixels, rng, size).save(folder / f"{index:04d}.JPEG", quality=95)
        counts[split] += 1
    # Written last: a folder without it is an interrupted write, not a finished demo.
    marker.write_text(json.dumps({"recipe": recipe, "counts": counts}))
    return counts
