"""Dataset listings: ImageFolder splits, ImageNet's flat val folder via file lists, the class map.

A *listing* is the sorted list of (file, label) pairs of one split. Everything downstream (DALI,
torchvision, sharding, verify) works from a listing, so every loader sees the same files in the
same order and the class map never depends on which loader built it.

Layouts understood under a dataset root:
  ImageFolder    ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG
  Prepared list  ROOT/<split>_list.txt, one "relative/path label" line per image (paths relative to
                 ROOT, label the class index); written by ``python -m dist_free.data prepare`` for
                 ImageNet's flat ILSVRC2012_val_*.JPEG folder. A list takes precedence over folders.
                 Every entry must resolve (symlinks followed) to a file under ROOT.
The class map is always the sorted class-folder names of ROOT/train (or of the split itself when
there is no train folder), so train and val agree and a checkpoint can store and check it.

Fixed selections (``holdout_split``, ``take_subset``): images are ranked by the SHA-1 of their
file name, ties (the same name in two class folders) broken by the label, and the first N are
taken. The rank depends on nothing else (no seed, no world size, no folder layout: ImageNet's
flat val folder and its class-folder form give the same images), so a held-out set or an
evaluation subset is the same for every run, checkpoint and machine. ``selection_sha256``
fingerprints a selection (its "name label" lines, in order) so a report can prove which it used.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

# The extensions a pipeline reads; anything else in a class folder is ignored (a README, a .txt).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Listing:
    """The files of one split, sorted, with their class indices and the class map."""

    files: tuple[Path, ...]
    labels: tuple[int, ...]
    class_to_idx: dict[str, int]

    def __len__(self) -> int:
        return len(self.files)


SELECTION = ("the first N in order of sha1(file name), ties by label; "
             "independent of seed, world size and folder layout")


def fixed_order(listing: Listing) -> list[int]:
    """Indices of the listing in the fixed selection order (see the module docstring)."""
    keys = [(hashlib.sha1(f.name.encode()).hexdigest(), label)
            for f, label in zip(listing.files, listing.labels)]
    return sorted(range(len(listing)), key=keys.__getitem__)


def select(listing: Listing, indices) -> Listing:
    return Listing(tuple(listing.files[i] for i in indices),
                   tuple(listing.labels[i] for i in indices), listing.class_to_idx)


def holdout_split(train: Listing, holdout: int) -> tuple[Listing, Listing]:
    """(train without the held-out images, the `holdout` held-out images in the fixed order)."""
    if not 0 <= holdout < len(train):
        raise DataError(f"holdout={holdout} must be at least 0 and smaller than the "
                        f"{len(train)} training images")
    held = fixed_order(train)[:holdout]
    kept = sorted(set(range(len(train))) - set(held))
    return select(train, kept), select(train, held)


def take_subset(listing: Listing, n: int, what: str) -> Listing:
    """The first n images of the listing in the fixed selection order."""
    if not 0 < n <= len(listing):
        raise DataError(f"subset={n} must be between 1 and the {len(listing)} images of {what}")
    return select(listing, fixed_order(listing)[:n])


def selection_sha256(listing: Listing) -> str:
    """SHA-256 of the listing's "file-name label" lines, in order: which images, which labels."""
    text = "".join(f"{f.name} {label}\n" for f, label in zip(listing.files, listing.labels))
    return hashlib.sha256(text.encode()).hexdigest()


def file_list_path(root: Path, split: str) -> Path:
    return Path(root) / f"{split}_list.txt"


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def class_dirs(split_dir: Path) -> list[Path]:
    """Class folders of an ImageFolder split, sorted by name (the stable class order)."""
    return sorted((p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def class_map(root: Path, split: str) -> dict[str, int]:
    """Sorted class-folder names of ROOT/train (else of ROOT/<split>) -> index."""
    root = Path(root)
    source = root / "train" if (root / "train").is_dir() else root / split
    if not source.is_dir():
        raise DataError(f"no class folders: neither {root / 'train'} nor {source} is a directory")
    names = [p.name for p in class_dirs(source)]
    if not names:
        raise DataError(f"{source} has no class folders (expected {source}/<class>/*.JPEG)")
    return {name: i for i, name in enumerate(names)}


def list_split(root: str | Path, split: str) -> Listing:
    """The listing of ROOT's split, from its prepared file list or its class folders."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not root.is_dir():
        raise DataError(f"dataset root {root} does not exist or is not a directory")
    if file_list_path(root, split).is_file():
        return read_file_list(root, split)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is missing: expected {split_dir}/<class>/*.JPEG "
                        f"or a prepared {file_list_path(root, split).name}")
    return list_image_folder(root, split)


def list_image_folder(root: Path, split: str) -> Listing:
    classes = class_map(root, split)
    files, labels = [], []
    for folder in class_dirs(root / split):
        if folder.name not in classes:
            raise DataError(f"class folder {folder} is not a class of {root / 'train'}; "
                            "train and val must have the same class folders")
        images = sorted(p for p in folder.iterdir() if is_image(p))
        files += images
        labels += [classes[folder.name]] * len(images)
    if not files:
        raise DataError(f"{root / split} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Listing(tuple(files), tuple(labels), classes)


def read_file_list(root: Path, split: str) -> Listing:
    """Parse ROOT/<split>_list.txt ("relative/path label" per line), checking every line: a
    label in range, and a path that stays under ROOT (see ``InsideRoot``)."""
    path = file_list_path(root, split)
    classes = class_map(root, split)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable UTF-8 text file ({err})") from None
    inside = InsideRoot(root)
    files, labels = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        name, label = parse_list_line(line, len(classes), where)
        files.append(inside.check(name, where))
        labels.append(label)
    if not files:
        raise DataError(f"{path} lists no images")
    return Listing(tuple(files), tuple(labels), classes)


LIST_LINE = re.compile(r"(.*\S)\s+(\S+)")  # the path may hold spaces; the label is the last word


def parse_list_line(line: str, num_classes: int, where: str) -> tuple[str, int]:
    match = LIST_LINE.fullmatch(line.strip())
    if match is None:
        raise DataError(f"{where}: {line.strip()!r} has no label; expected 'relative/path label'")
    name, label = match.groups()
    if not (label.isascii() and label.isdigit()):
        raise DataError(f"{where}: label {label!r} of {name!r} is not a class index "
                        f"(a whole number in 0..{num_classes - 1})")
    if int(label) >= num_classes:
        raise DataError(f"{where}: label {label} of {name!r} is out of range: the dataset has "
                        f"{num_classes} classes (0..{num_classes - 1})")
    return name, int(label)


class InsideRoot:
    """Checks that list entries resolve (symlinks followed) to files under the dataset root.

    A list must not reach files the dataset does not hold: an absolute path elsewhere, a ``../``
    escape or a symlink out would train or evaluate on whatever it points to. ROOT itself may be
    a symlink. Each folder is resolved once: a list names many files in few folders.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.real_root = Path(os.path.realpath(root))
        self.real_dirs: dict[Path, Path] = {}

    def check(self, name: str, where: str) -> Path:
        """ROOT/name, as listed, if it resolves under ROOT; else a DataError naming the line."""
        path = self.root / name  # an absolute name replaces the root: caught below
        target = self.resolve(path)
        if not target.is_relative_to(self.real_root):
            raise DataError(f"{where}: entry {name!r} resolves to {target}, outside the dataset "
                            f"root {self.real_root}; a list may name only files under its root "
                            "(a symlink must point inside it too)")
        return path

    def resolve(self, path: Path) -> Path:
        parent = self.real_dirs.get(path.parent)
        if parent is None:
            parent = self.real_dirs[path.parent] = Path(os.path.realpath(path.parent))
        target = parent / path.name
        if path.name == ".." or os.path.islink(target):
            return Path(os.path.realpath(target))
        return target


def write_file_list(root: Path, split: str, files: list[Path], labels: list[int]) -> Path:
    """Write a DALI-style file list with paths relative to ROOT; images are not copied."""
    path = file_list_path(root, split)
    lines = [f"{Path(f).relative_to(root).as_posix()} {label}" for f, label in zip(files, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_val_labels(labels_file: Path, images: list[Path], classes: dict[str, int]) -> list[int]:
    """Class indices for ``images`` (sorted) from a label file; see ``prepare_flat_val``."""
    lines = [ln.split() for ln in Path(labels_file).read_text().splitlines() if ln.strip()]
    if all(len(tokens) == 2 for tokens in lines):
        by_name = {name: token for name, token in lines}
        missing = [p.name for p in images if p.name not in by_name]
        if missing:
            raise DataError(f"{labels_file} has no label for {missing[0]} ({len(missing)} missing)")
        tokens = [by_name[p.name] for p in images]
    elif all(len(tokens) == 1 for tokens in lines):
        if len(lines) != len(images):
            raise DataError(f"{labels_file} has {len(lines)} labels for {len(images)} images")
        tokens = [t[0] for t in lines]
    else:
        raise DataError(f"{labels_file}: every line must be 'label' or 'filename label'")
    return [parse_label(token, classes, labels_file) for token in tokens]


def parse_label(token: str, classes: dict[str, int], source: Path) -> int:
    if token in classes:
        return classes[token]
    if token.isdigit() and int(token) < len(classes):
        return int(token)
    raise DataError(f"{source}: label {token!r} is neither a class folder name (synset) "
                    f"nor a class index in 0..{len(classes) - 1}")


def prepare_flat_val(root: str | Path, labels_file: str | Path, split: str = "val") -> Path:
    """Write ROOT/<split>_list.txt for a flat folder of images (ImageNet's ILSVRC2012_val_*.JPEG).

    The label file has one line per image, either ``label`` (lines in sorted-file-name order) or
    ``filename label``. A label is a class folder name of ROOT/train (a synset such as
    n01440764) or a 0-based index into the sorted class folders. Note: the devkit's
    ILSVRC2012_validation_ground_truth.txt holds 1-based devkit IDs in a different order; convert
    it to synsets first (e.g. from LOC_val_solution.csv).
    """
    root = Path(root)
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: expected the flat validation images there")
    images = sorted(p for p in folder.iterdir() if is_image(p))
    if not images:
        raise DataError(f"{folder} holds no images directly (is it already in class folders?)")
    labels = read_val_labels(Path(labels_file), images, class_map(root, "train"))
    return write_file_list(root, split, images, labels)
