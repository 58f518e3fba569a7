"""File checks behind ``python -m dist_free.data verify`` and the fast start-up checks.

``scan`` decodes every image with Pillow and reports what a pipeline would choke on or has to
convert. ``check_dataset`` only lists files (no decoding), so training start-up stays fast.

Reading one image (``decode``, shared by ``verify`` and the torchvision loader) reads only what
it needs, in this order:
  1. the header: for PNG the first 32 bytes, for JPEG the markers up to the frame header (segment
     bodies are skipped by seeking, not read), giving the claimed width x height;
  2. refusals before any pixel is allocated: a claim over MAX_PIXELS (a decompression bomb), and
     a file with fewer bytes than the claimed size needs (truncated, however large the claim);
  3. Pillow's decode, bounded by MAX_PIXELS, with Pillow's DecompressionBombWarning raised as an
     error (Pillow's header check is the only one for other formats, e.g. a BMP named .png);
  4. for JPEG, the last 64 bytes, to check the end-of-image marker.
"""

from __future__ import annotations

import os
import struct
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

from .datasets import SPLITS, Listing, class_dirs, file_list_path, is_image, list_split
from .errors import DataError

# Kinds of problem. The first four stop a decoder (or would exhaust its memory); the last three
# decode in DALI (it converts to RGB) but take slow fallback paths or break other tools, so they
# are listed too.
UNREADABLE, TRUNCATED, NOT_IMAGE, TOO_LARGE = "unreadable", "truncated", "not-an-image", "too-large"
WRONG_FORMAT, CMYK, GRAYSCALE = "wrong-format", "cmyk", "grayscale"
EMPTY_CLASS = "empty-class"
FATAL = (UNREADABLE, TRUNCATED, NOT_IMAGE, TOO_LARGE)  # what stops a decoder mid-epoch
JPEG_SUFFIXES = (".jpg", ".jpeg")

# The most pixels an image may claim: Pillow's default MAX_IMAGE_PIXELS (2**30 // 4 // 3, i.e.
# 256 MiB as 8-bit RGB), pinned here so that raising Pillow's global elsewhere does not raise ours.
# It is ~3.7 times ImageNet's largest photos (~6000 x 4000 = 24 M pixels), so no real training
# photo is refused, while one decode at the limit costs 256 MiB per decoding process: a stricter
# limit would buy little, a looser one would let one file cost gigabytes in every worker.
MAX_PIXELS = 89_478_485

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey+A, RGBA
# Deflate's best ratio: a 258-byte match coded in 2 bits. No PNG's data can be smaller than this.
DEFLATE_MAX_RATIO = 1032
# JPEG frame headers (SOFn); C4, C8 and CC are other markers in that range. Huffman-coded frames
# (C0-C2) spend at least one bit per MCU, and an MCU covers at most 32 x 32 pixels; arithmetic
# coding has no such floor, so those frames get no size bound.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)
MAX_SEGMENTS = 1000  # markers before the frame header; real files have a few dozen


@dataclass(frozen=True)
class Header:
    """What a PNG or JPEG header claims, and the fewest bytes a whole file of that claim has."""

    format: str
    width: int
    height: int
    min_bytes: int


class Refused(Exception):
    """An image refused before or while decoding; the caller adds the file's name."""

    def __init__(self, kind: str, detail: str):
        super().__init__(kind, detail)  # both in args, so it pickles across processes
        self.kind, self.detail = kind, detail

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def png_header(start: bytes) -> Header | None:
    if len(start) < 26 or start[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", start[16:26])
    row = 1 + -(-width * depth * PNG_CHANNELS.get(colour, 1) // 8)  # filter byte + packed pixels
    return Header("PNG", width, height, height * row // DEFLATE_MAX_RATIO)


def jpeg_header(f) -> Header | None:
    """Walk the markers after SOI to the frame header; None leaves the file to Pillow."""
    f.seek(2)
    for _ in range(MAX_SEGMENTS):
        if f.read(1) != b"\xff":
            return None
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes may pad a marker
            marker = f.read(1)
        if not marker or marker[0] in (0xD9, 0xDA):  # end of file, EOI or SOS before a frame
            return None
        if 0xD0 <= marker[0] <= 0xD7 or marker[0] == 0x01:  # markers without a segment
            continue
        length = int.from_bytes(f.read(2), "big")
        if length < 2:
            return None
        if marker[0] in SOF_MARKERS:
            body = f.read(5)
            if len(body) < 5:
                return None
            _, height, width = struct.unpack(">BHH", body)
            mcus = -(-width // 32) * -(-height // 32)
            return Header("JPEG", width, height, mcus // 8 if marker[0] in HUFFMAN_SOF else 0)
        f.seek(length - 2, os.SEEK_CUR)
    return None


def read_header(f) -> Header | None:
    """The claim of a PNG or JPEG header; None for other formats, or for headers Pillow judges."""
    start = f.read(32)
    if start.startswith(PNG_SIGNATURE):
        return png_header(start)
    if start.startswith(b"\xff\xd8"):
        return jpeg_header(f)
    return None


def check_claim(width: int, height: int, what: str) -> None:
    if width * height > MAX_PIXELS:
        raise Refused(TOO_LARGE, f"{what} claims {width} x {height} = {width * height:,} pixels, "
                                 f"over the limit of {MAX_PIXELS:,}; not decoded (a "
                                 "decompression bomb or a corrupt header)")


def check_header(header: Header | None, size: int) -> None:
    """Refuse, before anything is decoded, a claim too large or one the file is too short for."""
    if header is None:
        return
    check_claim(header.width, header.height, f"its {header.format} header")
    if size < header.min_bytes:
        raise Refused(TRUNCATED, f"its {header.format} header claims {header.width} x "
                                 f"{header.height} pixels, which need at least "
                                 f"{header.min_bytes:,} bytes, but the file has {size:,}")


def decode(f) -> Image.Image:
    """The image in the open binary file ``f``, fully decoded; raises Refused for anything the
    checks or the decoder refuse (see the module docstring for what is read)."""
    size = os.fstat(f.fileno()).st_size
    try:
        header = read_header(f)
    except OSError as err:
        raise Refused(UNREADABLE, said(err)) from None
    check_header(header, size)
    f.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning still decodes
        try:
            image = Image.open(f)
            check_claim(*image.size, f"its {image.format} header")  # if Pillow's limit was raised
            image.load()
        except Image.UnidentifiedImageError:
            raise Refused(NOT_IMAGE, f"not a readable image ({size:,} bytes)") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise Refused(TOO_LARGE, f"not decoded: {said(err)}") from None
        except Refused:
            raise
        except Exception as err:  # Pillow's plugins raise many types on malformed data
            raise Refused(TRUNCATED, f"cannot be decoded: {said(err)}") from None
    return image


def said(err: Exception) -> str:
    """An exception's message for the middle of a sentence (some have none, some end in '.')."""
    return str(err).rstrip(".") or type(err).__name__


@dataclass(frozen=True)
class Problem:
    path: Path
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind:13s} {self.path}: {self.detail}"


def check_file(path: str | Path) -> Problem | None:
    """Check one image (header, then a bounded full decode); return what is wrong, or None."""
    path = Path(path)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail here, not decode grey
    try:
        f = open(path, "rb")
    except OSError as err:
        return Problem(path, UNREADABLE, str(err))
    with f:
        try:
            image = decode(f)
        except Refused as err:
            return Problem(path, err.kind, err.detail)
        return check_decoded(path, f, image.format, image.mode)


def check_decoded(path: Path, f, fmt: str, mode: str) -> Problem | None:
    if path.suffix.lower() in JPEG_SUFFIXES and fmt != "JPEG":
        return Problem(path, WRONG_FORMAT, f"a {fmt} file named {path.suffix}; convert to JPEG")
    if fmt == "JPEG" and b"\xff\xd9" not in read_tail(f, 64):
        return Problem(path, TRUNCATED, "JPEG data ends without its end-of-image marker")
    if mode == "CMYK":
        return Problem(path, CMYK, "CMYK JPEG; convert to RGB")
    if mode in ("L", "LA", "1", "I", "I;16"):
        return Problem(path, GRAYSCALE, f"single-channel ({mode}) image; convert to RGB")
    return None


def read_tail(f, n: int) -> bytes:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - n))
    return f.read(n)


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
