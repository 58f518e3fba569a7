"""Input pipelines: one batch contract for DALI (GPU or CPU), torchvision and a synthetic source.

    loader = build_loader("auto", root, "train", batch_size=256, rank=r, world_size=w,
                          device=torch.device("cuda", r), dtype=torch.float16, channels_last=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:   # (B,3,H,W) in [0,1] on device; int64 labels
            ...

Epochs (see sharding.py): each training epoch is a fresh (seed, epoch) shuffle of the whole
training set split into world_size disjoint shards of equal length; the last partial *global*
batch is dropped, so every image is seen at most once per epoch, all but fewer than
world_size * batch_size images are seen, and every rank runs the same number of steps. Val
splits the sorted listing into contiguous, unpadded ranges: each image is counted exactly once.

Which images (fixed, seed-independent choices; see datasets.py for the order):
    holdout=N   split "train" leaves out N fixed training images; split "holdout" reads exactly
                those N with the val transforms (resize + centre crop), sharded like val.
    subset=N    split "val" or "holdout" reads only its first N images in the fixed order.
    whole_batches=True   val/holdout shards are whole global batches, so each batch holds the
                same images on any world size (see sharding.py).

CIFAR-10/100 roots, as distributed (cifar.py), are read by the device-resident loader
(resident.py, kind "resident", chosen by "auto"): the same epochs, shards and selections.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from . import cifar
from .crash_notes import check_crash_note
from .datasets import (
    SELECTION,
    Listing,
    holdout_split,
    list_split,
    prepare_flat_val,
    selection_sha256,
    take_subset,
)
from .errors import DataError
from .loader import Augment, BatchFormat
from .verify import check_dataset, scan

__all__ = ["build_loader", "check_dataset", "DataError", "KINDS", "resolve_kind", "scan",
           "list_split", "prepare_flat_val", "Listing", "split_listing", "selection_sha256",
           "SELECTION", "LOADER_SPLITS", "DATA_FORMATS"]

KINDS = ("auto", "dali-gpu", "dali-cpu", "torchvision", "synthetic", "resident")
DATA_FORMATS = ("auto", "imagefolder", *cifar.FORMATS)
# Sizes the synthetic source pretends to have when given no dataset root (ImageNet-1k).
IMAGENET_SIZES = {"train": 1_281_167, "val": 50_000}
LOADER_SPLITS = ("train", "val", "holdout")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_kind(kind: str, device: torch.device) -> str:
    """"auto" -> dali-gpu on a CUDA device, else dali-cpu, else torchvision (no DALI)."""
    if kind not in KINDS:
        raise DataError(f"unknown loader {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "auto":
        if not dali_available():
            return "torchvision"
        return "dali-gpu" if device.type == "cuda" and torch.cuda.is_available() else "dali-cpu"
    if kind == "resident" and device.type not in ("cuda", "cpu"):
        raise DataError(f"loader 'resident' runs on a cuda or cpu device, not {device}")
    if kind.startswith("dali") and not dali_available():
        raise DataError(f"loader {kind!r} needs nvidia-dali; install it or use 'torchvision'")
    if kind == "dali-gpu" and device.type != "cuda":
        raise DataError(f"loader 'dali-gpu' decodes on a GPU but the device is {device}; "
                        "use 'dali-cpu' or a cuda device")
    return kind


def default_threads(world_size: int) -> int:
    """CPU threads (DALI) or workers (DataLoader) per rank: this host's cores shared by its ranks."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", min(world_size, 8)))
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local)))


def build_loader(kind, root, split, *, batch_size, image_size=224, val_resize=256,
                 min_area=0.08, rank=0, world_size=1, seed=0, device=torch.device("cpu"),
                 dtype=torch.float32, channels_last=False, num_threads=None, num_classes=None,
                 class_to_idx=None, holdout: int = 0, subset: int | None = None,
                 whole_batches: bool = False, crash_note: Path | None = None,
                 data_format: str = "auto", pad: int = 4):
    """A loader of this rank's batches of ROOT's split; see the module docstring.

    crash_note: where a DALI loader notes the files in flight, so that a decoder crash (a
    segfault no Python survives) is blamed on its file at the next start: a note left by the
    last run is checked here first. Other loaders raise errors naming the file and need none.
    data_format / pad: a CIFAR root (see cifar.py) is read by the device-resident loader
    (resident.py), which pads each side by `pad` pixels before its random crop.
    """
    device = torch.device(device)
    found = cifar.find(root, data_format) if kind != "synthetic" else None
    if found or kind == "resident":
        kind = resident_kind(kind, found, root)
    kind = resolve_kind(kind, device)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    check_selection(split, holdout, subset)
    augment = Augment(image_size, val_resize, min_area)
    fmt = BatchFormat(device, dtype, channels_last)
    common = dict(rank=rank, world_size=world_size, seed=seed, augment=augment, fmt=fmt)
    if kind == "synthetic":
        return synthetic_loader(root, split, batch_size, num_classes, class_to_idx, common,
                                holdout, subset)
    if kind == "resident":
        return resident_loader(found, split, batch_size, class_to_idx, holdout, subset,
                               whole_batches, pad, common)
    listing = split_listing(root, split, num_classes, class_to_idx, holdout, subset)
    threads = num_threads or default_threads(world_size)
    common["whole_batches"] = whole_batches
    if kind == "torchvision":
        from .folder import FolderLoader
        return FolderLoader(listing, split, batch_size, num_workers=threads, **common)
    from .dali import DaliLoader  # DALI is imported only when it is used
    if crash_note is not None:
        check_crash_note(crash_note)
        crash_note.parent.mkdir(parents=True, exist_ok=True)
    return DaliLoader(listing, split, batch_size, gpu=kind == "dali-gpu", num_threads=threads,
                      crash_note=crash_note, **common)


def resident_kind(kind: str, found, root) -> str:
    """CIFAR roots are read by the resident loader; it reads nothing else."""
    if not found:
        raise DataError(f"loader 'resident' reads CIFAR folders ({', '.join(cifar.DISTRIBUTED)}); "
                        f"{root} is not one")
    if kind not in ("auto", "resident"):
        raise DataError(f"{root} is a CIFAR dataset ({found[1]}): it is read by loader "
                        f"'resident' (or 'auto'), not {kind!r}, which decodes JPEG folders")
    return "resident"


def resident_loader(found, split, batch_size, class_to_idx, holdout, subset, whole_batches,
                    pad, common):
    from .resident import ResidentLoader, cifar_listing
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= 16:
        raise DataError(f"pad must be a whole number of pixels in 0..16, got {pad!r}")
    folder, fmt = found
    data = cifar.read_split(folder, fmt, "val" if split == "val" else "train")
    listing = cifar_listing(data, "val" if split == "val" else "train")
    if class_to_idx is not None and dict(class_to_idx) != listing.class_to_idx:
        raise DataError(f"{folder}: its classes differ from the run's class map")
    listing = select_split(listing, split, holdout, subset)
    return ResidentLoader(listing, data.images, split, batch_size, pad=pad,
                          content={"format": fmt, "sha256": data.sha256},
                          whole_batches=whole_batches, **common)


def select_split(listing: Listing, split: str, holdout: int, subset: int | None) -> Listing:
    """The holdout and subset selections of datasets.py applied to a split's listing."""
    if split != "val" and holdout:
        train, held = holdout_split(listing, holdout)
        listing = held if split == "holdout" else train
    return take_subset(listing, subset, f"split {split!r}") if subset is not None else listing


def check_selection(split: str, holdout, subset) -> None:
    if split not in LOADER_SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {LOADER_SPLITS}")
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise DataError(f"holdout must be a whole number >= 0, got {holdout!r}")
    if split == "holdout" and holdout == 0:
        raise DataError("split 'holdout' needs holdout > 0 (how many training images to hold out)")
    if subset is not None and (isinstance(subset, bool) or not isinstance(subset, int)):
        raise DataError(f"subset must be a whole number or None, got {subset!r}")
    if subset is not None and split == "train":
        raise DataError("subset applies to the 'val' and 'holdout' splits, not 'train'")


def split_listing(root, split: str, num_classes=None, class_to_idx=None, holdout: int = 0,
                  subset: int | None = None) -> Listing:
    """The files a loader of `split` reads: checked, minus or restricted to the fixed
    held-out images, cut to the fixed subset; see the module docstring."""
    check_selection(split, holdout, subset)
    source = "train" if split == "holdout" else split
    listing = check_dataset(root, source, num_classes, class_to_idx)
    if source == "train" and holdout:
        train, held = holdout_split(listing, holdout)
        listing = held if split == "holdout" else train
    return take_subset(listing, subset, f"split {split!r}") if subset is not None else listing


def synthetic_loader(root, split, batch_size, num_classes, class_to_idx, common, holdout=0,
                     subset=None):
    from .synthetic import SyntheticLoader
    if root is not None and Path(root).exists():
        listing = split_listing(root, split, num_classes, class_to_idx, holdout, subset)
        size, classes = len(listing), listing.class_to_idx
    else:
        size = synthetic_size(split, holdout, subset)
        classes = class_to_idx or {str(i): i for i in range(num_classes or 1000)}
    return SyntheticLoader(size, classes, split, batch_size, **common)


def synthetic_size(split: str, holdout: int, subset: int | None) -> int:
    """The pretend ImageNet-1k split's size, after the same selection a real one would get."""
    train = IMAGENET_SIZES["train"]
    if holdout >= train:
        raise DataError(f"holdout={holdout} must be smaller than the {train} training images")
    size = {"train": train - holdout, "holdout": holdout}.get(split, IMAGENET_SIZES["val"])
    if subset is not None and not 0 < subset <= size:
        raise DataError(f"subset={subset} must be between 1 and the {size} images of "
                        f"split {split!r}")
    return subset if subset is not None else size
