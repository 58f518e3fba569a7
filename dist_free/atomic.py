"""Atomic file writes: a reader finds the old content or the new, never a part of either.

The content goes to a temporary file in the target's folder, is fsynced, and is renamed over the
target (rename is atomic on POSIX file systems); then the folder is fsynced, so the rename
survives a power cut, not only a crash. Used by checkpoints, exports and the tracking journal.
(pipelines/crash_notes.py keeps its own two-line rename: pipelines may not import dist_free,
and its notes, rewritten every batch, need to survive a crashed process only, not a power cut.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(file)` fills a temporary file that then replaces `path`; on any error the
    temporary file is removed, `path` is left as it was, and the error propagates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda f: f.write(data))


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes a rename or a new entry durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
