"""Writing CIFAR-format folders: the digits demo, the tests and the bench use them.

``write_cifar`` writes any of the four distributed formats (see cifar.py). The python formats are
written the way the distributed files were, by Python 2's cPickle at protocol 2: globals as
``GLOBAL numpy.core.multiarray _reconstruct`` (not today's ``numpy._core``), text and pixel data
as Python 2 ``str`` records (SHORT_BINSTRING / BINSTRING, not ``_codecs.encode`` calls), so the
reader is exercised on files shaped like the real ones. ``style="numpy"`` instead writes what
today's Python and numpy write (``pickle.dump`` at the default protocol).
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

from .cifar import FILES, LABEL_BYTES, PIXELS
from .errors import DataError


class Py2Global:
    """Stands for a global the way Python 2 named it (pickled as a GLOBAL opcode)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):   # save_reduce insists on a callable; this one is never called
        raise TypeError(f"{self.module}.{self.name} is only a name to pickle")


class Py2Pickler(pickle._Pickler):
    """Python's pure-Python pickler, made to write bytes and numpy objects as cPickle did."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_global(self, obj: Py2Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else \
            pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[Py2Global] = save_py2_global
    dispatch[bytes] = save_py2_str

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, obj.tobytes())
            return (Py2Global("numpy.core.multiarray", "_reconstruct"),
                    (Py2Global("numpy", "ndarray"), (0,), b"b"), state)
        if isinstance(obj, np.dtype):
            kind, order = obj.str[1:].encode(), obj.str[0].encode()   # py2 str, as all text
            return (Py2Global("numpy", "dtype"), (kind, 0, 1),
                    (3, order, None, None, None, -1, -1, 0))
        return NotImplemented


def py2_pickle(obj) -> bytes:
    """obj as Python 2's cPickle.dump(obj, f, 2) wrote it (str keys and text as py2 str)."""
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def as_py2(value):
    """Python 2 had no separate text type in these files: every str becomes a py2 str."""
    if isinstance(value, str):
        return value.encode("latin-1")
    if isinstance(value, dict):
        return {as_py2(k): as_py2(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_py2(v) for v in value]
    return value


def batch_record(fmt: str, images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    record = {"batch_label": name, "data": images.reshape(len(images), PIXELS),
              "filenames": [f"image_{i:05d}.png" for i in range(len(images))]}
    if fmt.startswith("cifar10-"):
        record["labels"] = [int(v) for v in labels]
    else:
        record["fine_labels"] = [int(v) for v in labels]
        record["coarse_labels"] = [int(v) // 5 for v in labels]
    return record


def write_pickle(path: Path, record: dict, style: str) -> None:
    data = py2_pickle(as_py2(record)) if style == "py2" else pickle.dumps(record)
    path.write_bytes(data)


def write_binary(path: Path, fmt: str, images: np.ndarray, labels: np.ndarray) -> None:
    n = len(images)
    rows = np.empty((n, LABEL_BYTES[fmt] + PIXELS), dtype=np.uint8)
    rows[:, -1 - PIXELS] = labels                      # the (fine) label
    if LABEL_BYTES[fmt] == 2:
        rows[:, 0] = labels // 5                       # a coarse label, as the real files have
    rows[:, -PIXELS:] = images.reshape(n, PIXELS)
    rows.tofile(path)


def write_meta(folder: Path, fmt: str, names: list[str], style: str) -> None:
    meta = folder / FILES[fmt]["meta"]
    if fmt.endswith("-bin"):
        meta.write_text("\n".join(names) + "\n\n")     # the real file ends in blank lines
    elif fmt == "cifar10-py":
        write_pickle(meta, {"label_names": names, "num_cases_per_batch": 10000,
                            "num_vis": PIXELS}, style)
    else:
        write_pickle(meta, {"fine_label_names": names,
                            "coarse_label_names": [f"coarse_{i}" for i in range(20)]}, style)


def write_cifar(folder, fmt: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                names: list[str], style: str = "py2") -> Path:
    """Write FOLDER in format `fmt` from {"train": (images, labels), "val": ...}: images
    (N, 3, 32, 32) uint8. Train is spread over the format's train files like the real ones."""
    if fmt not in FILES:
        raise DataError(f"unknown CIFAR format {fmt!r}; expected one of {', '.join(FILES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        files = FILES[fmt][split]
        for part, name in enumerate(files):
            chunk = slice(part * len(images) // len(files), (part + 1) * len(images) // len(files))
            if fmt.endswith("-bin"):
                write_binary(folder / name, fmt, images[chunk], labels[chunk])
            else:
                record = batch_record(fmt, images[chunk], labels[chunk], f"{split} batch {part + 1}")
                write_pickle(folder / name, record, style)
    write_meta(folder, fmt, names, style)
    return folder
