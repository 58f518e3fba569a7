"""CIFAR-10 and CIFAR-100 read exactly as they are distributed: nothing is converted on disk.

Formats (recognised from their files, or named by ``data.format``):
  cifar10-py    cifar-10-batches-py/   data_batch_1..5, test_batch (pickles), batches.meta
  cifar10-bin   cifar-10-batches-bin/  data_batch_1..5.bin, test_batch.bin, batches.meta.txt
                                       records: 1 label byte + 3,072 pixel bytes
  cifar100-py   cifar-100-python/      train, test (pickles), meta
  cifar100-bin  cifar-100-binary/      train.bin, test.bin, fine_label_names.txt
                                       records: coarse label byte + fine label byte + 3,072 bytes
Pixels are stored as 1,024 red, then 1,024 green, then 1,024 blue bytes (row-major 32x32), i.e.
(3, 32, 32) per image. CIFAR-100 is trained on its 100 fine labels. "val" is the test split.
``data.root`` may be the folder itself or a folder holding one of the folder names above.

The python versions are pickles written by Python 2's cPickle (protocol 2): their arrays refer
to ``numpy.core.multiarray._reconstruct`` and their strings are Python 2 ``str`` records. They are
read by ``safe_load`` (cifar_pickle.py): a short allow-list of globals, checked from the opcodes
before anything is unpickled and again by the unpickler, resolves to placeholders that check
every array's and dtype's state before building the array themselves; numpy's own
``__setstate__`` never runs on the file's state, and no code the pickle names ever runs. Python 2
``str`` records are decoded as latin-1, as numpy documents for its Python 2 pickles; dictionary
keys are compared as text whether they arrive as bytes or str.

What a batch may hold: 'data' a uint8 (N, 3072) array and 'labels' (CIFAR-100: 'fine_labels')
N plain integers, a list or a 1-d integer array, each a class of the dataset; N x 3,072 bytes no
more than the file holds. Anything else is a DataError naming the file; so is running out of
memory while reading.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cifar_pickle import ALLOWED, RestrictedUnpickler, UnsafePickleError, safe_load, scan_globals
from .errors import DataError

__all__ = ["FORMATS", "FILES", "CifarSplit", "find", "read_split", "safe_load", "scan_globals",
           "RestrictedUnpickler", "UnsafePickleError", "ALLOWED"]

FORMATS = ("cifar10-py", "cifar10-bin", "cifar100-py", "cifar100-bin")
# The folder names of the four distributions (what their archives unpack to).
DISTRIBUTED = {"cifar-10-batches-py": "cifar10-py", "cifar-10-batches-bin": "cifar10-bin",
               "cifar-100-python": "cifar100-py", "cifar-100-binary": "cifar100-bin"}
FILES = {
    "cifar10-py": {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"],
                   "meta": "batches.meta"},
    "cifar10-bin": {"train": [f"data_batch_{i}.bin" for i in range(1, 6)],
                    "val": ["test_batch.bin"], "meta": "batches.meta.txt"},
    "cifar100-py": {"train": ["train"], "val": ["test"], "meta": "meta"},
    "cifar100-bin": {"train": ["train.bin"], "val": ["test.bin"], "meta": "fine_label_names.txt"},
}
PIXELS = 3 * 32 * 32
LABEL_BYTES = {"cifar10-bin": 1, "cifar100-bin": 2}   # the fine label is the last label byte
CLASSES = {"cifar10": 10, "cifar100": 100}


@dataclass(frozen=True)
class CifarSplit:
    images: np.ndarray          # (N, 3, 32, 32) uint8, read-only
    labels: np.ndarray          # (N,) int64
    class_names: tuple[str, ...]
    sha256: str = ""            # of the pixels and labels: the split's identity for a resume

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------ formats and readers

def text_keys(record, path) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a dict of arrays, found a {type(record).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in record.items()}


def has_files(folder: Path, fmt: str) -> bool:
    names = FILES[fmt]["train"] + FILES[fmt]["val"]
    return all((folder / n).is_file() for n in names)


def find(root, fmt: str = "auto") -> tuple[Path, str] | None:
    """(folder, format) when ROOT (or its one distributed sub-folder) holds a CIFAR dataset.

    fmt "auto" recognises the format from the files; a named format must be there. None: not
    CIFAR (an ImageFolder root, or fmt "imagefolder")."""
    if root is None or fmt == "imagefolder":
        return None
    root = Path(root)
    candidates = [root] + [root / name for name in DISTRIBUTED if (root / name).is_dir()]
    formats = FORMATS if fmt == "auto" else (fmt,)
    for folder in candidates:
        for name in formats:
            if has_files(folder, name):
                return folder, name
    if fmt != "auto":
        wanted = ", ".join(FILES[fmt]["train"] + FILES[fmt]["val"])
        raise DataError(f"data.format={fmt} but {root} does not hold {wanted} (nor does a "
                        f"{' / '.join(DISTRIBUTED)} folder inside it)")
    return None


def class_names(folder: Path, fmt: str) -> tuple[str, ...]:
    """The label names from the meta file; "0", "1", ... when it is absent."""
    count = CLASSES[fmt.split("-")[0]]
    meta = folder / FILES[fmt]["meta"]
    if not meta.is_file():
        return tuple(str(i) for i in range(count))
    if fmt.endswith("-bin"):
        names = [line.strip() for line in meta.read_text(encoding="latin-1").splitlines()]
        names = [n for n in names if n]
    else:
        record = text_keys(safe_load(meta), meta)
        names = record.get("label_names", record.get("fine_label_names"))
        if not isinstance(names, list):
            raise DataError(f"{meta}: no label_names / fine_label_names list")
        if not all(isinstance(n, (str, bytes)) for n in names):
            raise DataError(f"{meta}: the label names must be strings")
        names = [n.decode("latin-1") if isinstance(n, bytes) else n for n in names]
    if len(names) != count or len(set(names)) != count:
        raise DataError(f"{meta}: expected {count} distinct label names, found {len(names)}")
    return tuple(names)


def read_pickle_batch(path: Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    record = text_keys(safe_load(path), path)
    key = "labels" if fmt.startswith("cifar10-") else "fine_labels"
    data, labels = record.get("data"), record.get(key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != PIXELS:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {PIXELS}), found "
                        f"{getattr(data, 'dtype', type(data).__name__)} "
                        f"{getattr(data, 'shape', '')}")
    if data.nbytes > path.stat().st_size:    # the unpickler already ensures it: said here too
        raise DataError(f"{path}: 'data' claims {len(data):,} images, more than the file holds")
    return data, label_array(labels, len(data), CLASSES[fmt.split("-")[0]], f"{path}: {key!r}")


def label_array(labels, count: int, classes: int, where: str) -> np.ndarray:
    """`labels` (a list of ints, or a 1-d integer array) as int64, one per image, each a class."""
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{where} must be a 1-d integer array, found {labels.dtype} "
                            f"{labels.shape}")
        bad = np.flatnonzero((labels < 0) | (labels >= classes))
        values = labels.tolist() if bad.size else None
    elif isinstance(labels, list):
        wrong = next((i for i, v in enumerate(labels) if type(v) is not int), None)
        if wrong is not None:
            raise DataError(f"{where} must list integers, found a {type(labels[wrong]).__name__} "
                            f"at position {wrong}")
        values = labels
        bad = [i for i, v in enumerate(labels) if not 0 <= v < classes]
    else:
        raise DataError(f"{where} must be a list of integers, found a {type(labels).__name__}")
    if len(labels) != count:
        raise DataError(f"{where} must list one label per image ({count}), found {len(labels)}")
    if len(bad):
        raise DataError(f"{where}: label {values[bad[0]]} at position {bad[0]} is outside "
                        f"0..{classes - 1}")
    return np.array(labels, dtype=np.int64)


def read_binary_batch(path: Path, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    skip = LABEL_BYTES[fmt]
    raw = np.fromfile(path, dtype=np.uint8)
    record = skip + PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte "
                        f"records ({skip} label byte(s) + {PIXELS} pixels); truncated?")
    rows = raw.reshape(-1, record)
    return rows[:, skip:], rows[:, skip - 1].astype(np.int64)


@functools.lru_cache(maxsize=4)
def _read(folder: str, fmt: str, split: str, stamp: tuple) -> CifarSplit:
    try:
        return _read_split(Path(folder), fmt, split)
    except MemoryError:
        size = sum(s for _, s, _ in stamp)
        raise DataError(f"{folder} ({split}): out of memory reading the split's {size:,} bytes "
                        "of files") from None


def _read_split(folder: Path, fmt: str, split: str) -> CifarSplit:
    reader = read_binary_batch if fmt.endswith("-bin") else read_pickle_batch
    parts = [reader(folder / name, fmt) for name in FILES[fmt][split]]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    names = class_names(folder, fmt)
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataError(f"{folder} ({split}): labels outside 0..{len(names) - 1}")
    images.setflags(write=False)
    labels.setflags(write=False)
    # Of the arrays, not the files: the python and binary versions of a dataset agree.
    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.tobytes())
    return CifarSplit(images, labels, names, digest.hexdigest())


def read_split(folder, fmt: str, split: str) -> CifarSplit:
    """The whole split as uint8 arrays; a cached copy while the files are unchanged."""
    if split not in ("train", "val"):
        raise DataError(f"CIFAR splits are 'train' and 'val' (the test set), not {split!r}")
    folder = Path(folder)
    files = FILES[fmt][split] + [FILES[fmt]["meta"]]
    stamp = tuple((f, s.st_size, s.st_mtime_ns) for f in files
                  if (p := folder / f).is_file() and (s := p.stat()))
    return _read(str(folder), fmt, split, stamp)
