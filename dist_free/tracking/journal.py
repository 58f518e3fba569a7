"""The journal: every tracking item on disk before anything is sent, one file per tracker session.

Files in RUN_DIR/mlflow_wal/ (the write-ahead log; a session id such as 20250301T101500-4242-a1b2
sorts by start time):

    <sid>.jsonl  line 1: the run header {"kind": "run", "uri", "experiment", "run_name",
                 "start_ms", "artifact_location", "run_id", "session", "generation"}; then one
                 JSON item per line in the order logged: metrics, params, tags, artifact, end
    <sid>.ack    {"offset": O, "kept": [[start, end], ...], "run_id": R, "generation": G},
                 replaced atomically after every batch: each line starting before byte O was
                 delivered, except the "kept" ones (MLflow rejected them; `replay` tries again).
                 An ack whose generation differs from the header's predates a compaction, and
                 a compacted file holds only pending lines: everything in it is pending.
    <sid>.lock   flock held by whoever sends the file (the live tracker, a later session or
                 `replay`), so no two ever send the same lines; a SIGKILL releases it.

Nothing lost: a log call appends its line with one write() before it returns, which a SIGKILL
cannot undo (lines are not fsynced one by one, so a power cut can lose the last ones). Nothing
sent twice: the uploader sends lines in file order and moves the ack past each batch it sent;
the only duplicate a crash can cause is the batch in flight, which MLflow's SQL stores ignore
for metrics (params, tags, artifacts and end status are idempotent).

Disk: a session's journal holds at most DIST_FREE_MLFLOW_WAL_BYTES (default 1 GiB; K, M or G
suffixes). When everything in it was delivered and it passes RESET_BYTES it is cut back to its
header. Past the budget, new items are lost and counted; the loss is logged when it starts and
again at close. Memory: the uploader holds one batch at a time; nothing else is queued.
Torn lines (a crash mid-append) and garbled ones are skipped and reported when read.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from dist_free import atomic
from dist_free.tracking.uri import TrackingConfigError

WAL_DIR = "mlflow_wal"
BUDGET_ENV = "DIST_FREE_MLFLOW_WAL_BYTES"
DEFAULT_BUDGET = 1 << 30
RESET_BYTES = 1 << 20  # a fully delivered journal this big is cut back to its header
log = logging.getLogger("dist_free.tracking")


class JournalError(ValueError):
    """A journal that cannot be used as it is (no header, garbled ack); the message says how."""


def budget_bytes() -> int:
    """The per-session budget from DIST_FREE_MLFLOW_WAL_BYTES, else 1 GiB."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return DEFAULT_BUDGET
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(raw[-1].upper(), 1)
    digits = raw[:-1] if scale > 1 else raw
    if not digits.isdigit() or int(digits) == 0:
        raise TrackingConfigError(f"{BUDGET_ENV}={raw!r}: expected a positive number of bytes, "
                                  "optionally with a K, M or G suffix (e.g. 512M)")
    return int(digits) * scale


# ---------------------------------------------------------------- files

@dataclass(frozen=True)
class Paths:
    log: Path
    ack: Path
    lock: Path

    @property
    def sid(self) -> str:
        return self.log.stem


def session_paths(run_dir: Path, sid: str) -> Paths:
    folder = Path(run_dir) / WAL_DIR
    return Paths(folder / f"{sid}.jsonl", folder / f"{sid}.ack", folder / f"{sid}.lock")


def sessions(run_dir: Path) -> list[Paths]:
    """Every session in RUN_DIR that left a journal, oldest first."""
    folder = Path(run_dir) / WAL_DIR
    if not folder.is_dir():
        return []
    return [session_paths(run_dir, p.stem) for p in sorted(folder.glob("*.jsonl"))]


def write_atomic(path: Path, chunks: list[bytes]) -> None:
    """Replace `path` by `chunks` atomically (dist_free.atomic: temporary file, fsync, rename,
    fsync of the folder). Every rewrite of a journal file goes through here."""
    atomic.write_atomic(path, lambda f: f.writelines(chunks))


def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if needed); None if someone has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def remove(paths: Paths, lock_fd: int | None) -> None:
    """Delete a fully delivered session's files; the lock goes last, while still held."""
    for path in (paths.log, paths.ack, paths.lock):
        path.unlink(missing_ok=True)
    if lock_fd is not None:
        os.close(lock_fd)


def encode(obj: dict) -> bytes:
    return (json.dumps(obj) + "\n").encode()


# ---------------------------------------------------------------- header and ack

def read_header(path: Path) -> tuple[dict, int]:
    """The run header on line 1 and the offset where the items start."""
    with open(path, "rb") as f:
        raw = f.readline()
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        header = None
    if not (raw.endswith(b"\n") and isinstance(header, dict) and header.get("kind") == "run"):
        raise JournalError(f"{path}: no run header on line 1; its items cannot be sent anywhere")
    return header, len(raw)


@dataclass
class Ack:
    offset: int
    kept: list[list[int]] = field(default_factory=list)  # [start, end] of rejected lines
    run_id: str | None = None
    generation: int = 0

    def encode(self) -> bytes:
        return encode({"offset": self.offset, "kept": sorted(self.kept), "run_id": self.run_id,
                       "generation": self.generation})


def read_ack(path: Path, header: dict, header_end: int) -> Ack:
    """What was delivered of the journal whose header is given (nothing if no ack)."""
    generation = header.get("generation", 0)
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        return Ack(header_end, run_id=header.get("run_id"), generation=generation)
    except (ValueError, UnicodeDecodeError):
        obj = None
    try:
        ack = Ack(int(obj["offset"]), [[int(s), int(e)] for s, e in obj["kept"]],
                  obj["run_id"], int(obj["generation"]))
        assert ack.run_id is None or isinstance(ack.run_id, str)
    except (TypeError, KeyError, ValueError, AssertionError):
        # Written atomically, so garbage here means tampering: sending anything could repeat.
        raise JournalError(f"{path}: garbled; cannot tell what was delivered, so nothing is "
                           "sent (fix or delete it: deleting it sends the whole log again)") from None
    if ack.generation != generation:  # the journal was compacted after this ack was written
        return Ack(header_end, run_id=ack.run_id or header.get("run_id"), generation=generation)
    ack.offset = max(ack.offset, header_end)
    return ack


# ---------------------------------------------------------------- the live session's journal

class Journal:
    """The live session's journal: log calls append (from any thread, under one lock), the
    uploader follows. Created with its lock at construction; an unwritable folder makes every
    item count as lost, with an error naming why."""

    def __init__(self, paths: Paths, budget: int, header: dict):
        self.paths, self.budget = paths, budget
        self._lock = threading.Lock()
        self._file = self._lock_fd = None
        self.size = self.header_end = self.appended = self.lost = 0
        self.full_reason = self.lost_reason = ""
        try:
            self._lock_fd = try_lock(paths.lock)
            self._file = open(paths.log, "ab")
            self._file.write(encode(header))
            self._file.flush()
            self.size = self.header_end = self._file.tell()
        except OSError as exc:
            self._refuse(f"the write-ahead log cannot be written ({exc})")

    def append(self, item: dict) -> bool:
        """Write one item; False (counted as lost) if the budget or the disk refuses it.
        Once refused, later items are refused too until `reset`, so no item follows a hole."""
        line = encode(item)
        with self._lock:
            if self._file is None or self.full_reason:
                self.lost += 1
                return False
            if self.size + len(line) > self.budget:
                self._refuse(f"the budget of {self.budget} bytes ({BUDGET_ENV})")
                self.lost += 1
                return False
            try:
                self._file.write(line)
                self._file.flush()  # in the kernel now: a SIGKILL cannot lose it
            except OSError as exc:
                self._cut_back()
                self._refuse(f"the write-ahead log cannot be written ({exc})")
                self.lost += 1
                return False
            self.size += len(line)
            self.appended += 1
            return True

    def _refuse(self, reason: str) -> None:
        self.full_reason = self.lost_reason = reason
        log.error("MLflow items cannot go to the write-ahead log %s: %s. New items are LOST "
                  "until it has room again", self.paths.log, reason)

    def _cut_back(self) -> None:
        # A half-written line would glue itself to the next one: back to the last whole line.
        try:
            self._file.seek(self.size)
            self._file.truncate(self.size)
        except (OSError, ValueError):
            log.exception("could not cut %s back to its last whole line", self.paths.log)

    def reset(self, delivered_to: int, write_ack) -> bool:
        """Cut the file back to its header if everything in it (up to `delivered_to`) was
        delivered and it is big or full; `write_ack(offset)` records that under the same lock,
        so no line is appended between the cut and the ack."""
        with self._lock:
            big = self.size > min(RESET_BYTES, self.budget // 2) or self.full_reason
            if self._file is None or self.size != delivered_to or not big:
                return False
            self._file.truncate(self.header_end)
            self.size = self.header_end
            write_ack(self.header_end)
            self.full_reason = ""
            return True

    def close(self, delivered_all: bool) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if delivered_all:
                remove(self.paths, self._lock_fd)
            elif self._lock_fd is not None:
                os.close(self._lock_fd)
            self._lock_fd = None
