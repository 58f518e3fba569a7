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

factory.py builds the loaders; selection.py checks a split's selection and applies it. This file
only re-exports the public names.
"""

from .datasets import SELECTION, Listing, list_split, prepare_flat_val, selection_sha256
from .errors import DataError
from .factory import DATA_FORMATS, KINDS, build_loader, dali_available, resolve_kind
from .selection import LOADER_SPLITS, split_listing
from .verify import check_dataset, scan

__all__ = ["build_loader", "check_dataset", "DataError", "KINDS", "resolve_kind", "scan",
           "list_split", "prepare_flat_val", "Listing", "split_listing", "selection_sha256",
           "SELECTION", "LOADER_SPLITS", "DATA_FORMATS", "dali_available"]
