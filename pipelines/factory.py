"""The loader factory: `build_loader` picks a loader kind for the root and device, checks the
selection and builds that loader; see the package docstring (pipelines/__init__.py) for the batch
contract, the epochs and the selections."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from . import cifar
from .augment_policy import PolicyError, RandAugment, parse_policy
from .crash_notes import check_crash_note
from .errors import DataError
from .loader import Augment, BatchFormat
from .selection import check_selection, select_split, split_listing

KINDS = ("auto", "dali-gpu", "dali-cpu", "torchvision", "synthetic", "resident")
DATA_FORMATS = ("auto", "imagefolder", *cifar.FORMATS)
# Sizes the synthetic source pretends to have when given no dataset root (ImageNet-1k).
IMAGENET_SIZES = {"train": 1_281_167, "val": 50_000}


def dali_available() -> bool:
    """Whether nvidia.dali is installed, found without importing it. find_spec imports the parent
    `nvidia` package first: one that is absent, or present but unimportable (a broken install,
    an import blocked on purpose), means no DALI as well, not an error."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:
        return False


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
                 data_format: str = "auto", pad: int = 4, auto_augment: str | None = None):
    """A loader of this rank's batches of ROOT's split; see the package docstring.

    crash_note: where a DALI loader notes the files in flight, so that a decoder crash (a
    segfault no Python survives) is blamed on its file at the next start: a note left by the
    last run is checked here first. Other loaders raise errors naming the file and need none.
    data_format / pad: a CIFAR root (see cifar.py) is read by the device-resident loader
    (resident.py), which pads each side by `pad` pixels before its random crop.
    auto_augment: a policy string (augment_policy.py) for the training split's images, after
    the crop and flip (the other splits are never augmented).
    """
    device = torch.device(device)
    found = cifar.find(root, data_format) if kind != "synthetic" else None
    if found or kind == "resident":
        kind = resident_kind(kind, found, root)
    kind = resolve_kind(kind, device)
    if batch_size < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")
    check_selection(split, holdout, subset)
    policy = train_policy(kind, split, auto_augment)
    augment = Augment(image_size, val_resize, min_area, policy=policy)
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


def train_policy(kind: str, split: str, text: str | None):
    """The parsed policy for a training split, or a DataError where this loader cannot run it."""
    try:
        policy = parse_policy(text) if split == "train" else None
    except PolicyError as e:
        raise DataError(f"auto_augment: {e}") from None
    if policy is None:
        return None
    if kind == "resident":
        raise DataError(
            f"auto_augment={text!r}: the resident loader cannot run it. RandAugment and "
            "TrivialAugment draw an op and a magnitude per image, and torchvision's tensor ops "
            "apply one op to a whole batch, so on the device-resident batch they would take a "
            "Python loop over the images, which this loader does not run. Use mixup, cutmix "
            "and reprob (applied to the device batch with every loader), or train from an "
            "image folder with loader torchvision, dali-cpu or dali-gpu")
    if kind == "synthetic":
        raise DataError(f"auto_augment={text!r}: the synthetic loader has no images to augment")
    if kind == "torchvision" and isinstance(policy, RandAugment) and not policy.increasing:
        raise DataError(
            f"auto_augment={text!r}: inc0 (timm's default: posterize, solarize and the enhance "
            "ops not growing stronger with m) has no torchvision suite; write inc1, or use "
            "loader dali-cpu or dali-gpu (DALI's non-monotonic suite)")
    return policy


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
