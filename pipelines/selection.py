"""Which images a loader of a split reads: the split and its holdout / subset choices, checked,
then applied to the split's listing (the fixed selections themselves are datasets.py's)."""

from __future__ import annotations

from .datasets import Listing, holdout_split, take_subset
from .errors import DataError
from .verify import check_dataset

LOADER_SPLITS = ("train", "val", "holdout")


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


def select_split(listing: Listing, split: str, holdout: int, subset: int | None) -> Listing:
    """The holdout and subset selections of datasets.py applied to a split's listing."""
    if split != "val" and holdout:
        train, held = holdout_split(listing, holdout)
        listing = held if split == "holdout" else train
    return take_subset(listing, subset, f"split {split!r}") if subset is not None else listing


def split_listing(root, split: str, num_classes=None, class_to_idx=None, holdout: int = 0,
                  subset: int | None = None) -> Listing:
    """The files a loader of `split` reads: checked, minus or restricted to the fixed
    held-out images, cut to the fixed subset; see the package docstring (pipelines/__init__.py)."""
    check_selection(split, holdout, subset)
    source = "train" if split == "holdout" else split
    return select_split(check_dataset(root, source, num_classes, class_to_idx), split, holdout,
                        subset)
