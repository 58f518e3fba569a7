"""The write-ahead log (WAL): every item MLflow has not acknowledged, on disk, per tracker session.

Design
------
Each tracker session (one `build_tracker` call, named by a session id such as
20250301T101500-4242-a1b2, which sorts by start time) may own three files in RUN_DIR/mlflow_wal/:

    <sid>.jsonl  line 1: the run header (URI, experiment, run name, run id or null); then one
                 item per line, in the order logged, each with its sequence number "seq"
    <sid>.ack    {"seq": S, "kept": [...], "run_id": ...}, replaced atomically: every item with
                 seq <= S has been delivered, except the seqs in "kept" (MLflow rejected them;
                 they stay in the file for `replay`); run_id is the run the items went to
    <sid>.lock   held (flock) by whoever sends the file's items: the live tracker, a later
                 session, or `replay`. No two of them ever send the same file, and a SIGKILL
                 releases it.

The tracker keeps new items in memory and appends to its WAL every item not yet delivered
SPILL_AFTER_S (0.2 s) after it was logged; its WAL thread looks every 0.2 s, and `close` or
`stop_soon` spill everything at once. So a healthy run writes nothing, and a SIGKILL (during an
outage or not) loses at most the undelivered items of the last ~0.5 s (longer only if the
machine is too loaded to schedule the WAL thread). Lines go to the kernel with one write() and
a flush, which a killed process cannot lose; they are not fsynced one by one, so a power cut can
lose more.

Items are delivered strictly in seq order, so one number (the ack) records progress; it is
written after every delivered batch that the WAL holds. The only duplicate a crash can cause is
the batch in flight when it happened (sent, not yet acknowledged on disk); MLflow's SQL stores
ignore an identical metric, and params, tags, artifacts and the end status are idempotent.

Memory: the tracker holds at most `memory_items` items (default 10 000); older ones are evicted
once written and read back from the WAL, in order, when the server answers again. When every
written item has been delivered the WAL is truncated back to its header.

Disk: each session's WAL holds at most DIST_FREE_MLFLOW_WAL_BYTES bytes (default 1 GiB; K, M or
G suffixes allowed). Past it, new items stay in memory while there is room there and are then
counted as lost; the loss is logged as an error when it starts and again by `close`.

Next start: a new session sends what older sessions' WALs still hold (those logging to the same
URI; others are left for `replay`) to the run each was logging to, before its own items; a
session that never reached the server gets its run created then. An older session's end status
is skipped when it names the run now being continued. `python -m dist_free.tracking replay
RUN_DIR` does the same for every WAL in RUN_DIR (see replay.py). Artifacts in a WAL are staged
copies inside RUN_DIR (staging.py); replay uploads nothing from outside RUN_DIR.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dist_free.tracking.uri import TrackingConfigError

WAL_DIR = "mlflow_wal"
BUDGET_ENV = "DIST_FREE_MLFLOW_WAL_BYTES"
DEFAULT_BUDGET = 1 << 30
log = logging.getLogger("dist_free.tracking")


class WalError(ValueError):
    """A WAL file that cannot be used as it is (no header, garbled ack); the message says how."""


def budget_bytes() -> int:
    """The per-session WAL budget from DIST_FREE_MLFLOW_WAL_BYTES, else 1 GiB."""
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

def atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text`: a temporary file beside it, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")  # one writer per file: its lock holder
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    # Makes a rename or a new file survive a power cut, not only a process crash.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class WalPaths:
    log: Path
    ack: Path
    lock: Path

    @property
    def sid(self) -> str:
        return self.log.stem


def session_paths(run_dir: Path, sid: str) -> WalPaths:
    folder = Path(run_dir) / WAL_DIR
    return WalPaths(folder / f"{sid}.jsonl", folder / f"{sid}.ack", folder / f"{sid}.lock")


def sessions(run_dir: Path) -> list[WalPaths]:
    """Every session in RUN_DIR that left a WAL, oldest first."""
    folder = Path(run_dir) / WAL_DIR
    if not folder.is_dir():
        return []
    return [session_paths(run_dir, p.stem) for p in sorted(folder.glob("*.jsonl"))]


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


def remove(paths: WalPaths, lock_fd: int | None) -> None:
    """Delete a fully delivered session's files; the lock goes last, while still held."""
    for path in (paths.log, paths.ack, paths.lock):
        path.unlink(missing_ok=True)
    if lock_fd is not None:
        os.close(lock_fd)


# ---------------------------------------------------------------- the ack

@dataclass
class Ack:
    seq: int = 0
    kept: list[int] = field(default_factory=list)
    run_id: str | None = None

    def text(self) -> str:
        return json.dumps({"seq": self.seq, "kept": sorted(self.kept), "run_id": self.run_id})


def read_ack(path: Path) -> Ack:
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Ack()
    try:
        obj = json.loads(raw)
        ack = Ack(int(obj["seq"]), [int(s) for s in obj.get("kept", [])], obj.get("run_id"))
    except (ValueError, KeyError, TypeError):
        # Written atomically, so garbage here means tampering: sending anything could repeat.
        raise WalError(f"{path}: garbled; cannot tell what was delivered, so nothing is sent "
                       "(fix or delete it: deleting it sends the whole log again)") from None
    if ack.run_id is not None and not isinstance(ack.run_id, str):
        raise WalError(f"{path}: run_id is not a string")
    return ack


# ---------------------------------------------------------------- reading

@dataclass
class Problem:
    """A line of a WAL that cannot be used: reported, then left out."""
    path: Path
    lineno: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.reason}"


def records(path: Path, problems: list[Problem]) -> Iterator[tuple[int, dict]]:
    """(lineno, object) for each usable line; torn or garbled lines go to `problems`.

    A crash mid-append leaves a partial last line (no newline); tampering may leave anything.
    Line 1 must be the run header; every other line an item with an integer seq and a kind.
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            obj, reason = _parse(raw, lineno)
            if reason:
                problems.append(Problem(path, lineno, reason))
            else:
                yield lineno, obj


def _parse(raw: bytes, lineno: int) -> tuple[dict | None, str]:
    """The line's object and "", or None and why it cannot be used."""
    torn = "" if raw.endswith(b"\n") else " (torn: a crash mid-append)"
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, f"not a JSON line{torn}: {raw[:60]!r}"
    if not isinstance(obj, dict):
        return None, f"not a JSON object{torn}"
    if lineno == 1:
        return (obj, "") if obj.get("kind") == "run" else (None, "line 1 is not the run header")
    if not isinstance(obj.get("seq"), int) or not isinstance(obj.get("kind"), str):
        return None, f"not a WAL item (no integer seq or no kind){torn}"
    return obj, ""


def header_of(path: Path, problems: list[Problem]) -> dict:
    for lineno, obj in records(path, problems):
        if lineno == 1:
            return obj
        break
    raise WalError("no run header on line 1; its items cannot be sent anywhere")


def pending_items(path: Path, ack: Ack, problems: list[Problem]) -> Iterator[tuple[int, dict]]:
    """(seq, item) for every item not yet delivered, in file order."""
    kept = set(ack.kept)
    for lineno, obj in records(path, problems):
        if lineno > 1 and (obj["seq"] > ack.seq or obj["seq"] in kept):
            seq = obj.pop("seq")
            yield seq, obj


def rewrite(path: Path, header: dict, ack: Ack) -> int:
    """Replace the WAL atomically by its header and the items still pending; returns their
    number. Unusable lines are left out (they were reported when read)."""
    tmp = path.with_name(f".{path.name}.tmp")
    left = 0
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(json.dumps(header) + "\n")
        for seq, item in pending_items(path, ack, []):
            out.write(json.dumps({"seq": seq, **item}) + "\n")
            left += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return left


# ---------------------------------------------------------------- the live session's log

class SessionWal:
    """The live tracker's own WAL: appends, reads back, truncates. Not thread-safe: the tracker
    calls it under one lock. The file, and its lock, are created at the first append."""

    def __init__(self, paths: WalPaths, budget: int, header: Callable[[], dict]):
        self.paths, self.budget, self._header = paths, budget, header
        self._file = None
        self._lock_fd: int | None = None
        self.size = self.header_end = 0
        self.full_reason = ""
        self._done = False  # closed: a late call from an abandoned sender must not reopen it

    @property
    def exists(self) -> bool:
        return self._file is not None

    def append(self, entries: list[tuple[int, dict]]) -> list[int]:
        """Append items; the end offset of each line written. Stops at the first item that
        would pass the budget, or at a write error (`full_reason` says which)."""
        if self._done or (self._file is None and not self._create()):
            return []
        lines, ends, size = [], [], self.size
        for seq, item in entries:
            line = (json.dumps({"seq": seq, **item}) + "\n").encode()
            if size + len(line) > self.budget:
                self.full_reason = f"the WAL budget of {self.budget} bytes ({BUDGET_ENV})"
                break
            size += len(line)
            lines.append(line)
            ends.append(size)
        try:
            self._file.write(b"".join(lines))
            self._file.flush()  # in the kernel now: a SIGKILL cannot lose it
        except OSError as exc:
            self._undo_partial_write(exc)
            return []
        self.size = size
        return ends

    def _create(self) -> bool:
        try:
            self._lock_fd = try_lock(self.paths.lock)
            self._file = open(self.paths.log, "ab")
            self._file.write((json.dumps(self._header()) + "\n").encode())
            self._file.flush()
        except OSError as exc:
            self.full_reason = f"the WAL cannot be written ({exc})"
            return False
        self.size = self.header_end = self._file.tell()
        return True

    def _undo_partial_write(self, exc: OSError) -> None:
        # A half-written line would glue itself to the next one: cut back to the last whole line.
        self.full_reason = f"the WAL cannot be written ({exc})"
        try:
            self._file.truncate(self.size)
        except OSError:
            log.exception("could not cut %s back to its last whole line", self.paths.log)

    def read_batch(self, offset: int, after: int, through: int,
                   add: Callable[[int, dict], bool]) -> int:
        """Pass items with after < seq <= through, from byte `offset` on, to `add` until it
        refuses one; returns the offset just past the last one it took."""
        offset = max(offset, self.header_end)
        with open(self.paths.log, "rb") as f:
            f.seek(offset)
            while offset < self.size:
                raw = f.readline()
                obj = json.loads(raw)
                seq = obj.pop("seq")
                if seq > through:
                    break
                # Lines at or below `after` went out from memory already: step over them.
                if seq > after and not add(seq, obj):
                    break
                offset += len(raw)
        return offset

    def truncate(self) -> None:
        """Back to the header: every written item was delivered (and that is on disk)."""
        self._file.truncate(self.header_end)
        self.size = self.header_end
        self.full_reason = ""

    def write_ack(self, ack: Ack) -> None:
        atomic_write(self.paths.ack, ack.text())

    def close(self, delivered_all: bool) -> None:
        self._done = True
        if self._file is None:
            return
        self._file.close()
        if delivered_all:
            remove(self.paths, self._lock_fd)
        elif self._lock_fd is not None:
            os.close(self._lock_fd)
        self._file = self._lock_fd = None
