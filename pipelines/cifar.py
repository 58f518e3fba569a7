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
read by ``safe_load``: every global the pickle names is checked against a short allow-list (the
numpy array and dtype constructors under their old and new module names, and ``_codecs.encode``
restricted to latin-1, which a protocol-2 pickle written by Python 3 uses for bytes) while the
opcodes are scanned, before anything is unpickled, and again by the unpickler itself. Anything
else is refused with ``UnsafePickleError`` naming the global; a pickle that would run code never
runs it. Python 2 ``str`` records are decoded as latin-1, as numpy documents for its Python 2
pickles; dictionary keys are compared as text whether they arrive as bytes or str.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

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


class UnsafePickleError(DataError):
    """A pickle names a global outside the allow-list: refused before anything is built."""


@dataclass(frozen=True)
class CifarSplit:
    images: np.ndarray          # (N, 3, 32, 32) uint8, read-only
    labels: np.ndarray          # (N,) int64
    class_names: tuple[str, ...]
    sha256: str = ""            # of the pixels and labels: the split's identity for a resume

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------ the restricted unpickler

def _numpy_core(module: str):
    core = getattr(np, "_core", None) or np.core     # numpy 2 renamed numpy.core to numpy._core
    return getattr(core, module)


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles use it for bytes, and for nothing else."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise UnsafePickleError(f"_codecs.encode called with {encoding!r}; only latin-1 text "
                                "(a protocol-2 pickle's bytes) is accepted")
    return codecs.encode(text, "latin-1", errors)


def _plain_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(f"numpy dtype {dtype} holds Python objects; refused")
    return dtype


# (module, name) -> the object it stands for. Old and new numpy module names both map to today's.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray")._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray")._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_core("numeric")._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_core("numeric")._frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _plain_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}
# Opcodes that build objects without naming a global the allow-list could check.
REFUSED_OPCODES = {"INST", "OBJ", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"}
STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                  "BINSTRING", "STRING"}


def _check_global(module: str, name: str, source) -> None:
    if (module, name) not in ALLOWED:
        raise UnsafePickleError(f"{source}: the pickle names {module}.{name}, which a CIFAR file "
                                "never does; refused without unpickling anything (allowed: "
                                f"{', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED))})")


def scan_globals(data: bytes, source) -> None:
    """Check every global a pickle names, from its opcodes alone (nothing is built).

    STACK_GLOBAL (protocol 4+) takes its two names from the stack: the strings are tracked
    through the memo, and a name that cannot be known from the opcodes is refused.
    """
    pushed: list[str | None] = []
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in REFUSED_OPCODES:
                raise UnsafePickleError(f"{source}: the pickle uses opcode {op.name}, which "
                                        "builds objects outside the allow-list; refused")
            if op.name == "GLOBAL":
                _check_global(*arg.split(" ", 1), source)
            elif op.name == "STACK_GLOBAL":
                module, name = pushed[-2:] if len(pushed) >= 2 else (None, None)
                if module is None or name is None:
                    raise UnsafePickleError(f"{source}: the pickle names a global through a "
                                            "computed value; refused")
                _check_global(module, name, source)
            if op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.name in STRING_OPCODES:
                pushed.append(arg if isinstance(arg, str) else None)
            elif op.name not in ("FRAME", "PROTO"):
                pushed.append(None)
    except (ValueError, EOFError) as e:   # genops' word for a damaged or truncated pickle
        raise DataError(f"{source}: not a readable pickle ({e})") from None


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals, to today's objects; refuses every other one."""

    def __init__(self, file, source):
        super().__init__(file, encoding="latin1")
        self.source = source

    def find_class(self, module, name):
        _check_global(module, name, self.source)
        return ALLOWED[(module, name)]()

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: the pickle asks for a persistent object; refused")


def safe_load(path: Path):
    """Unpickle a CIFAR file through the allow-list (see the module docstring)."""
    data = Path(path).read_bytes()
    scan_globals(data, path)
    try:
        return RestrictedUnpickler(io.BytesIO(data), path).load()
    except UnsafePickleError:
        raise
    except Exception as e:   # a damaged file: pickle raises many types
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None


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
        names = [n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names]
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
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise DataError(f"{path}: {key!r} must list one label per image ({len(data)})")
    return data, np.asarray(labels, dtype=np.int64)


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
    folder = Path(folder)
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
