"""Sending what earlier sessions left in their write-ahead logs (see wal.py for the files).

Used by `python -m dist_free.tracking replay RUN_DIR [--uri URI]` and by a new tracker session
at start. For each WAL no one else holds: open (or create) the run it was logging to, send the
pending items in order, record each delivered batch in the ack file, and finally rewrite the
WAL atomically to what is left (nothing, and it is removed). Torn or garbled lines are skipped
and reported; an item MLflow rejects, or an artifact outside the run folder, is reported and
kept; a failure a retry could cure stops the file there, keeping the rest.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # MLflow is imported where it is used: a run with tracking off never loads it
    from mlflow import MlflowClient

from dist_free.tracking.sender import RunTarget, batches, is_permanent, open_run, send_batch
from dist_free.tracking.staging import remove_session
from dist_free.tracking.uri import TrackingConfigError, bound_http_retries, check_uri
from dist_free.tracking.wal import (
    WAL_DIR,
    Ack,
    Problem,
    WalError,
    WalPaths,
    atomic_write,
    header_of,
    pending_items,
    read_ack,
    remove,
    rewrite,
    sessions,
    try_lock,
)

log = logging.getLogger("dist_free.tracking")


@dataclass
class FileResult:
    """What replaying one WAL did."""
    path: Path
    delivered: int = 0
    left: int = 0
    problems: list[Problem] = field(default_factory=list)  # torn or garbled lines, skipped
    rejected: list[str] = field(default_factory=list)  # items MLflow or we refused, kept
    busy: bool = False  # a live tracker or another replay holds it
    error: str = ""  # why sending stopped early, or never started
    transient: bool = False  # the error may pass (server down): worth trying again later


def replay_command(run_dir: Path) -> str:
    return f"python -m dist_free.tracking replay {run_dir} [--uri URI]"


def replay(run_dir: Path, uri: str | None = None, retries: int = 2) -> list[FileResult]:
    """Replay every WAL in RUN_DIR, oldest first; `uri` overrides the one each was logging to."""
    check_uri(uri)
    found = sessions(run_dir)
    if not found:
        raise FileNotFoundError(f"no MLflow write-ahead log in {Path(run_dir) / WAL_DIR}: "
                                "nothing to replay")
    return [replay_file(paths, Path(run_dir), uri, retries=retries) for paths in found]


def replay_file(paths: WalPaths, run_dir: Path, uri: str | None = None, *,
                live_run_id: str | None = None, should_stop: Callable[[], bool] = lambda: False,
                retries: int = 0) -> FileResult:
    """Send one WAL's pending items. `live_run_id`: the run a live session is logging to right
    now; an old session's end status for it is skipped, or it would end the running run."""
    result = FileResult(paths.log)
    lock = try_lock(paths.lock)
    if lock is None:
        result.busy = True
        return result
    try:
        _replay_locked(paths, run_dir, uri, live_run_id, should_stop, retries, result, lock)
        lock = None  # closed (or the files removed) by _replay_locked
    except (WalError, TrackingConfigError, OSError) as exc:
        result.error = str(exc)
    finally:
        if lock is not None:
            os.close(lock)
    for problem in result.problems:
        log.warning("skipped %s", problem)
    return result


def _replay_locked(paths: WalPaths, run_dir: Path, uri: str | None, live_run_id: str | None,
                   should_stop: Callable[[], bool], retries: int, result: FileResult,
                   lock: int) -> None:
    ack = read_ack(paths.ack)
    header = header_of(paths.log, result.problems)
    target = _target(header, uri, ack)
    from mlflow import MlflowClient
    client = MlflowClient(target.uri)
    try:
        _retrying(lambda: open_run(client, target), retries)
    except Exception as exc:  # noqa: BLE001 - reported; every item stays for next time
        result.error = f"cannot open the MLflow run at {target.uri}: {exc}"
        result.transient = not is_permanent(exc)
    else:
        if ack.run_id != target.run_id:  # a crash from here on must not create a second run
            ack.run_id = target.run_id
            atomic_write(paths.ack, ack.text())
        _send_pending(paths, run_dir, client, target, ack, live_run_id, should_stop, retries,
                      result)
    # Rewriting costs a copy of the file: only worth it when something changed.
    changed = result.delivered or result.rejected or result.problems
    _finish(paths, run_dir, {**header, "run_id": target.run_id}, ack, lock, result,
            compact=bool(changed) and not should_stop())


def _target(header: dict, uri: str | None, ack: Ack) -> RunTarget:
    try:
        target = RunTarget(uri=uri or header["uri"], experiment=header["experiment"],
                           run_name=header["run_name"], start_ms=int(header["start_ms"]),
                           artifact_location=header.get("artifact_location"),
                           run_id=ack.run_id or header.get("run_id"))
    except (KeyError, TypeError, ValueError) as exc:
        raise WalError(f"run header lacks or garbles {exc}") from None
    if not isinstance(target.uri, str) or not target.uri:
        raise WalError("run header has no tracking URI; give one with --uri")
    check_uri(target.uri)  # the header is a file on disk: it could have been edited
    bound_http_retries(target.uri)
    return target


def _send_pending(paths: WalPaths, run_dir: Path, client: MlflowClient, target: RunTarget,
                  ack: Ack, live_run_id: str | None, should_stop: Callable[[], bool],
                  retries: int, result: FileResult) -> None:
    for batch in batches(pending_items(paths.log, ack, result.problems)):
        if should_stop():
            return
        seqs = [seq for seq, _ in batch]
        items = [item for _, item in batch
                 if not (item["kind"] == "end" and target.run_id == live_run_id)]
        try:
            if items:
                _retrying(lambda: send_batch(client, target, items, run_dir), retries)
        except Exception as exc:  # noqa: BLE001 - sorted below: stop, or keep and go on
            if not is_permanent(exc):
                result.error, result.transient = f"sending stopped: {exc}", True
                return
            result.rejected.append(f"{paths.log.name} seq {seqs[0]} ({batch[0][1]['kind']}): "
                                   f"{exc}")
            log.error("kept, not sent: %s", result.rejected[-1])
            ack.kept = sorted(set(ack.kept) | set(seqs))
        else:
            result.delivered += len(seqs)
            ack.kept = [seq for seq in ack.kept if seq not in seqs]
        ack.seq = max(ack.seq, seqs[-1])
        atomic_write(paths.ack, ack.text())


def _finish(paths: WalPaths, run_dir: Path, header: dict, ack: Ack, lock: int,
            result: FileResult, compact: bool) -> None:
    """Rewrite the WAL to what is left, or remove it if nothing is; releases the lock."""
    if compact:
        result.left = rewrite(paths.log, header, ack)
    else:  # unchanged, or stopping in a hurry: the ack already says what is done
        result.left = sum(1 for _ in pending_items(paths.log, ack, []))
    if result.left == 0:
        remove(paths, lock)
        remove_session(run_dir, paths.sid)
    else:
        os.close(lock)
    log.info("replayed %d MLflow items from %s into run %s; %d left", result.delivered,
             paths.log, header["run_id"], result.left)


def _retrying(call: Callable[[], None], retries: int) -> None:
    for attempt in range(retries + 1):
        try:
            call()
            return
        except Exception as exc:  # noqa: BLE001 - re-raised when retrying cannot help
            if is_permanent(exc) or attempt == retries:
                raise
            time.sleep(min(2.0 ** attempt, 8.0))


def pending_max_step(run_dir: Path, key: str, run_id: str, skip: str = "") -> int:
    """The highest step of metric `key` that WALs in RUN_DIR (but session `skip`) will still
    send to run `run_id`; -1 if none."""
    best = -1
    for paths in sessions(run_dir):
        if paths.sid == skip:
            continue
        try:
            ack = read_ack(paths.ack)
            if (ack.run_id or header_of(paths.log, []).get("run_id")) != run_id:
                continue
            for _, item in pending_items(paths.log, ack, []):
                if item["kind"] == "metrics":
                    best = max([best, *(int(r[3]) for r in item["metrics"] if r[0] == key)])
        except (OSError, WalError, ValueError, TypeError, IndexError, KeyError):
            continue  # an unreadable WAL is reported when it is replayed
    return best
