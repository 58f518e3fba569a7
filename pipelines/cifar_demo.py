"""The CIFAR demo dataset: scikit-learn's digits, tinted as in demo.py, at CIFAR's 32x32, written
in a CIFAR format (by default cifar10-py, pickled as Python 2 wrote the real files).

It is small (1,437 train / 360 test images) but read by the same reader, restricted unpickler
and device-resident loader as the real CIFAR-10, so every CI run exercises them on real images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cifar import find
from .cifar_write import write_cifar
from .demo import split_indices, tinted
from .errors import DataError

CIFAR_SIZE = 32


def digits_arrays(val_fraction: float = 0.2, seed: int = 0):
    """{"train": (images, labels), "val": ...}: images (N, 3, 32, 32) uint8, in digits order."""
    from sklearn.datasets import load_digits  # a dev dependency, needed only here

    digits = load_digits()
    rng = np.random.default_rng(seed)
    is_val = split_indices(digits.target, val_fraction, rng)
    images = np.stack([np.asarray(tinted(p, rng, CIFAR_SIZE)) for p in digits.images])
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    labels = digits.target.astype(np.int64)
    return {"train": (images[~is_val], labels[~is_val]), "val": (images[is_val], labels[is_val])}


def write_cifar_demo(out, fmt: str = "cifar10-py", val_fraction: float = 0.2,
                     seed: int = 0) -> dict[str, int]:
    """Write OUT as a CIFAR-10-format folder of the digits; return images per split."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if find(out, fmt):
            from .cifar import read_split
            return {s: len(read_split(out, fmt, s)) for s in ("train", "val")}
        raise DataError(f"{out} exists and is not empty; choose a new folder for the demo")
    if not fmt.startswith("cifar10-"):
        raise DataError(f"the digits demo has 10 classes: write it as cifar10-py or cifar10-bin, "
                        f"not {fmt}")
    splits = digits_arrays(val_fraction, seed)
    write_cifar(out, fmt, splits, [str(d) for d in range(10)])
    return {s: len(labels) for s, (_, labels) in splits.items()}
