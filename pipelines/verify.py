"""File checks behind ``python -m dist_free.data verify`` and the fast start-up checks.

``scan`` decodes every image with Pillow and reports what a pipeline would choke on or has to
convert. ``check_dataset`` only lists files (no decoding), so training start-up stays fast.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from .datasets import SPLITS, Listing, class_dirs, file_list_path, is_image, list_split
from .errors import DataError

# Kinds of problem. The first three stop a decoder; the last three decode in DALI (it converts to
# RGB) but take slow fallback paths or break other tools, so they are listed too.
UNREADABLE, TRUNCATED, NOT_IMAGE = "unreadable", "truncated", "not-an-image"
WRONG_FORMAT, CMYK, GRAYSCALE = "wrong-format", "cmyk", "grayscale"
EMPTY_CLASS = "empty-class"
FATAL = (UNREADABLE, TRUNCATED, NOT_IMAGE)  # what stops a decoder mid-epoch
JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass(frozen=True)
class Problem:
    path: Path
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:13s} {self.path}: {self.detail}"


def check_file(path: str | Path) -> Problem | None:
    """Decode one image fully; return what is wrong with it, or None."""
    path = Path(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, not decode grey
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return Problem(path, UNREADABLE, str(err))
    try:
        with Image.open(path) as image:
            image.load()
            fmt, mode = image.format, image.mode
    except Image.UnidentifiedImageError:
        return Problem(path, NOT_IMAGE, f"not a readable image ({len(data)} bytes)")
    except (OSError, SyntaxError, ValueError) as err:
        return Problem(path, TRUNCATED, f"cannot be decoded: {err}")
    return check_decoded(path, data, fmt, mode)


def check_decoded(path: Path, data: bytes, fmt: str, mode: str) -> Problem | None:
    if path.suffix.lower() in JPEG_SUFFIXES and fmt != "JPEG":
        return Problem(path, WRONG_FORMAT, f"a {fmt} file named {path.suffix}; convert to JPEG")
    if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
        return Problem(path, TRUNCATED, "JPEG data ends without its end-of-image marker")
    if mode == "CMYK":
        return Problem(path, CMYK, "CMYK JPEG; convert to RGB")
    if mode in ("L", "LA", "1", "I", "I;16"):
        return Problem(path, GRAYSCALE, f"single-channel ({mode}) image; convert to RGB")
    return None


def empty_class_folders(root: Path, split: str) -> list[Problem]:
    folder = root / split
    if file_list_path(root, split).is_file() or not folder.is_dir():
        return []
    return [Problem(d, EMPTY_CLASS, "class folder holds no images") for d in class_dirs(folder)
            if not any(is_image(p) for p in d.iterdir())]


def scan(root: str | Path, splits=SPLITS, workers: int | None = None) -> list[Problem]:
    """Every problem in ROOT's splits (those present), files decoded in parallel processes."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory")
    present = [s for s in splits if (root / s).is_dir() or file_list_path(root, s).is_file()]
    if not present:
        raise DataError(f"{root} has none of the splits {', '.join(splits)}")
    problems, files = [], []
    for split in present:
        problems += empty_class_folders(root, split)
        try:
            files += list_split(root, split).files
        except DataError as err:
            problems.append(Problem(root / split, "layout", str(err)))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return problems + [p for p in map(check_file, files) if p]
    with ProcessPoolExecutor(workers) as pool:
        found = pool.map(check_file, files, chunksize=64)
        return problems + [p for p in found if p]


def check_dataset(root: str | Path, split: str, num_classes: int | None = None,
                  class_to_idx: dict[str, int] | None = None) -> Listing:
    """Fast start-up checks (no decoding): root, split, non-empty, class count and class map."""
    listing = list_split(root, split)
    classes = listing.class_to_idx
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(f"{root} has {len(classes)} classes but the model has {num_classes} "
                        "outputs; set the model's num_classes or point data.root elsewhere")
    if class_to_idx is not None and dict(class_to_idx) != classes:
        differ = sorted(set(class_to_idx.items()) ^ set(classes.items()))[:3]
        raise DataError(f"the class map of {root} differs from the checkpoint's "
                        f"(first differences: {differ}); resume on the same dataset")
    return listing
