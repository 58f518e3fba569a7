"""Tiny generated datasets whose pixels say which file and class they came from.

Every image is one flat colour: red and green encode the image's id (0..143), blue its class
(0..5). Flat colours survive random crops, flips, resizing and JPEG almost exactly, so a test
can read back from a batch which file each sample was and check shards, labels and coverage.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

STEP = 20  # colour levels apart: far beyond JPEG's error on a flat image


def code_colour(image_id: int, label: int) -> tuple[int, int, int]:
    return (10 + STEP * (image_id % 12), 10 + STEP * (image_id // 12), 10 + STEP * label)


def decode_batch(images: torch.Tensor) -> tuple[list[int], list[int]]:
    """(B,3,H,W) in [0,1] -> (image ids, labels) read back from the flat colours."""
    mean = images.float().mean(dim=(2, 3)) * 255.0
    levels = ((mean - 10) / STEP).round().long()
    return (levels[:, 0] + 12 * levels[:, 1]).tolist(), levels[:, 2].tolist()


def write_coded_split(root: Path, split: str, counts: list[int], size=(40, 40),
                      classes=None) -> dict[int, tuple[Path, int]]:
    """ImageFolder ROOT/split/<class>/<id>.JPEG with counts[c] images in class c."""
    classes = classes or [f"class{c}" for c in range(len(counts))]
    files, image_id = {}, 0
    for label, (name, count) in enumerate(zip(sorted(classes), counts)):
        folder = Path(root) / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            pixels = np.full((size[1], size[0], 3), code_colour(image_id, label), np.uint8)
            path = folder / f"{image_id:04d}.JPEG"
            Image.fromarray(pixels).save(path, quality=95)
            files[image_id] = (path, label)
            image_id += 1
    return files


def write_textured(path: Path, width: int, height: int, seed: int, mode="RGB", fmt="JPEG"):
    """A smooth, non-flat image (so resize and crop offsets matter) of the given size."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    channels = [np.sin(xx / 6 + phase[0]), np.cos(yy / 8 + phase[1]),
                np.sin((xx + yy) / 10 + phase[2])]
    pixels = ((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt, quality=95)
    return path


def collect(loader) -> tuple[list[int], list[int], list[int]]:
    """Run one epoch: (ids, labels from the pixels, labels the loader gave)."""
    ids, pixel_labels, labels = [], [], []
    for images, targets in loader:
        batch_ids, batch_labels = decode_batch(images)
        ids += batch_ids
        pixel_labels += batch_labels
        labels += targets.tolist()
    return ids, pixel_labels, labels


# Crafted files whose headers lie: a few dozen or hundred bytes that claim any size.

def png_claiming(width: int, height: int) -> bytes:
    """A PNG (8-bit RGB) whose header claims width x height over one tiny zlib stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real 16 x 16 baseline JPEG whose frame header is patched to claim width x height."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0\x00\x11")  # SOF0 of a 3-component image
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A bare 24-bit BMP header claiming width x height (a format only Pillow's checks parse)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info
