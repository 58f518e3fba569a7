"""The uploader: sends one journal's lines to MLflow in file order, from the acknowledged offset on.

The live tracker's thread runs one over its own journal as it grows; `replay` (the CLI, or a new
session at start for the journals earlier ones left) runs one over a finished journal to its end,
then rewrites the file atomically to what is left (nothing, and it is removed). Torn or garbled
lines are skipped and reported; an item MLflow rejects, or an artifact outside the run folder,
is kept for the next `replay`; a failure a retry could cure stops the file there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dist_free.tracking.journal import (
    WAL_DIR,
    Ack,
    JournalError,
    Paths,
    encode,
    read_ack,
    read_header,
    remove,
    sessions,
    try_lock,
    write_atomic,
)
from dist_free.tracking.sender import Batch, RunTarget, is_permanent, open_run, send_batch
from dist_free.tracking.staging import remove_session
from dist_free.tracking.uri import TrackingConfigError, bound_http_retries, check_uri, redact, shown_uri

if TYPE_CHECKING:   # MLflow is imported where it is used: a run with tracking off never loads it
    from mlflow import MlflowClient

BATCH_ITEMS = 1000  # items held in memory at once: one batch
log = logging.getLogger("dist_free.tracking")


def parse(raw: bytes) -> tuple[dict | None, str]:
    """A journal line's item and "", or None and why it cannot be used."""
    torn = "" if raw.endswith(b"\n") else " (torn: a crash mid-append)"
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None, f"not a JSON line{torn}: {raw[:60]!r}"
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        return None, f"not a journal item (no kind){torn}"
    if obj["kind"] == "metrics" and not isinstance(obj.get("metrics"), list):
        return None, f"a metrics item without a list of metrics{torn}"
    obj.pop("seq", None)  # written by earlier versions; the offset is the position now
    return obj, ""


class Uploader:
    """Follows one journal by acknowledged offset; see the module docstring."""

    def __init__(self, paths: Paths, run_dir: Path, target: RunTarget, ack: Ack,
                 header: dict | None = None, live_run_id: str | None = None,
                 batch_items: int = BATCH_ITEMS, should_stop: Callable[[], bool] = lambda: False):
        self.paths, self.run_dir, self.target, self.ack = paths, Path(run_dir), target, ack
        self.header, self.live_run_id = header, live_run_id
        self.batch_items, self.should_stop = max(1, batch_items), should_stop
        self.cursor = self.first_pending()
        self.delivered = self.holding = 0
        self.rejected: list[str] = []
        self.problems: dict[int, str] = {}  # torn or garbled lines by offset, skipped

    @classmethod
    def of_file(cls, paths: Paths, run_dir: Path, uri: str | None = None, **kw) -> Uploader:
        """An uploader for a journal an earlier session left; `uri` overrides its header's."""
        header, header_end = read_header(paths.log)
        ack = read_ack(paths.ack, header, header_end)
        # A session that never reached MLflow has no run; its items belong to the run the live
        # session continues (the same training run), not to a second run made for them.
        run_id = ack.run_id or header.get("run_id") or kw.get("live_run_id")
        try:
            target = RunTarget(uri=uri or header["uri"], experiment=header["experiment"],
                               run_name=header["run_name"], start_ms=int(header["start_ms"]),
                               artifact_location=header.get("artifact_location"),
                               run_id=run_id)
        except (KeyError, TypeError, ValueError) as exc:
            raise JournalError(f"run header lacks or garbles {exc}") from None
        if not isinstance(target.uri, str) or not target.uri:
            raise JournalError("run header has no tracking URI; give one with --uri")
        check_uri(target.uri)  # the header is a file on disk: it could have been edited
        bound_http_retries(target.uri)
        return cls(paths, run_dir, target, ack, header=header, **kw)

    def open(self, client: MlflowClient) -> None:
        """Open (or create) the run; record its id first, so a crash cannot create a second."""
        open_run(client, self.target)
        if self.ack.run_id != self.target.run_id:
            self.ack.run_id = self.target.run_id
            write_atomic(self.paths.ack, [self.ack.encode()])

    def first_pending(self) -> int:
        return min([self.ack.offset, *(start for start, _ in self.ack.kept)])

    def lines(self, start: int, limit: int | None = None) -> Iterator[tuple[int, int, bytes]]:
        """(start, end, raw) of each pending line from byte `start` to `limit` (default EOF)."""
        kept = {s for s, _ in self.ack.kept}
        with open(self.paths.log, "rb") as f:
            f.seek(start)
            while limit is None or start < limit:
                raw = f.readline()
                if not raw:
                    return
                end = start + len(raw)
                if start >= self.ack.offset or start in kept:
                    yield start, end, raw
                start = end

    def step(self, client: MlflowClient, limit: int | None = None) -> bool:
        """Send the next batch of lines before byte `limit`; False when there is none. Raises
        when a retry may help (the lines stay); keeps the lines MLflow rejects."""
        batch, spans, end = Batch(self.batch_items), [], self.cursor
        for start, end_, raw in self.lines(self.cursor, limit):
            item, why = parse(raw)
            if why:
                self.problems.setdefault(start, f"{self.paths.log} byte {start}: {why}")
            elif not batch.add(item):
                break
            else:
                spans.append([start, end_])
            end = end_
        if end == self.cursor:
            return False
        if spans:
            self._send(client, batch.items, spans)
        self.cursor = end
        if not self.should_stop():  # abandoned by close(): the files are no longer ours
            self.ack.offset = max(self.ack.offset, end)
            write_atomic(self.paths.ack, [self.ack.encode()])
        return True

    def _send(self, client: MlflowClient, items: list[dict], spans: list[list[int]]) -> None:
        live_end = self.live_run_id is not None and self.target.run_id == self.live_run_id
        # An earlier session's end status must not end the run a live session continues.
        wanted = [i for i in items if not (live_end and i["kind"] == "end")]
        self.holding = len(items)
        try:
            if self.should_stop():
                raise ConnectionError("abandoned: the tracker closed")
            if wanted:
                send_batch(client, self.target, wanted, self.run_dir)
        except Exception as exc:
            if not is_permanent(exc):
                raise
            self._keep(items, spans, exc)
        else:
            self.delivered += len(items)
            self.ack.kept = [s for s in self.ack.kept if s not in spans]
        finally:
            self.holding = 0

    def _keep(self, items: list[dict], spans: list[list[int]], exc: Exception) -> None:
        self.rejected.append(f"{self.paths.log.name} byte {spans[0][0]} ({items[0]['kind']}): "
                             f"{exc}")
        log.warning("MLflow rejected %d item(s): %s; kept in %s for replay", len(items),
                    self.rejected[-1], self.paths.log)
        self.ack.kept += [s for s in spans if s not in self.ack.kept]

    def restart_at(self, offset: int) -> None:
        """The journal was cut back to its header (everything delivered): follow from there."""
        self.cursor = self.ack.offset = offset
        write_atomic(self.paths.ack, [self.ack.encode()])

    def finish(self, lock: int, compact: bool) -> int:
        """After a replay: remove the journal if nothing is pending, else (with `compact`)
        rewrite it to its header and the pending lines; releases the lock; the lines left."""
        left = [raw for _, _, raw in self.lines(self.first_pending()) if not parse(raw)[1]]
        if not left:
            remove(self.paths, lock)
            remove_session(self.run_dir, self.paths.sid)
            return 0
        if compact and (self.delivered or self.rejected or self.problems):
            header = {**self.header, "run_id": self.target.run_id,
                      "generation": self.ack.generation + 1}
            write_atomic(self.paths.log, [encode(header), *left])
            # An ack of the old generation now means "everything in the file is pending".
            self.ack = Ack(len(encode(header)), [], self.target.run_id, header["generation"])
            write_atomic(self.paths.ack, [self.ack.encode()])
        os.close(lock)
        return len(left)


# ---------------------------------------------------------------- replay

@dataclass
class FileResult:
    """What replaying one journal did."""
    path: Path
    delivered: int = 0
    left: int = 0
    problems: list[str] = field(default_factory=list)  # torn or garbled lines, skipped
    rejected: list[str] = field(default_factory=list)  # items MLflow or we refused, kept
    busy: bool = False  # a live tracker or another replay holds it
    error: str = ""  # why sending stopped early, or never started
    transient: bool = False  # the error may pass (server down): worth trying again later


def replay_command(run_dir: Path) -> str:
    return f"python -m dist_free.tracking replay {run_dir} [--uri URI]"


def replay(run_dir: Path, uri: str | None = None, retries: int = 2) -> list[FileResult]:
    """Replay every journal in RUN_DIR, oldest first; `uri` overrides the one each logged to."""
    check_uri(uri)
    found = sessions(run_dir)
    if not found:
        raise FileNotFoundError(f"no MLflow write-ahead log in {Path(run_dir) / WAL_DIR}: "
                                "nothing to replay")
    return [replay_file(paths, Path(run_dir), uri, retries=retries) for paths in found]


def replay_file(paths: Paths, run_dir: Path, uri: str | None = None, *,
                live_run_id: str | None = None, should_stop: Callable[[], bool] = lambda: False,
                retries: int = 0) -> FileResult:
    """Run an uploader over one journal to its end. `live_run_id`: the run a live session is
    logging to now (an old session's end status for it is skipped)."""
    result = FileResult(paths.log)
    lock = try_lock(paths.lock)
    if lock is None:
        result.busy = True
        return result
    try:
        up = Uploader.of_file(paths, run_dir, uri, live_run_id=live_run_id,
                              should_stop=should_stop)
    except (JournalError, TrackingConfigError, OSError) as exc:
        os.close(lock)
        result.error = str(exc)
        return result
    _run_to_end(up, result, retries)
    try:
        result.left = up.finish(lock, compact=not should_stop())
    except OSError as exc:
        result.error = result.error or f"could not rewrite the log: {exc}"
    result.delivered, result.rejected = up.delivered, up.rejected
    result.problems = list(up.problems.values())
    for problem in result.problems:
        log.warning("skipped %s", problem)
    log.info("replayed %d MLflow items from %s into run %s; %d left", up.delivered, paths.log,
             up.target.run_id, result.left)
    return result


def _run_to_end(up: Uploader, result: FileResult, retries: int) -> None:
    from mlflow import MlflowClient
    client = MlflowClient(up.target.uri)
    try:
        _retrying(lambda: up.open(client), retries)
    except Exception as exc:  # noqa: BLE001 - reported; every item stays for next time
        result.error = (f"cannot open the MLflow run at {shown_uri(up.target.uri)}: "
                        f"{redact(str(exc), up.target.uri)}")
        result.transient = not is_permanent(exc)
        return
    try:
        while not up.should_stop() and _retrying(lambda: up.step(client), retries):
            pass
    except Exception as exc:  # noqa: BLE001 - the rest stays for next time
        result.error, result.transient = f"sending stopped: {exc}", not is_permanent(exc)


def _retrying(call: Callable[[], object], retries: int):
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - re-raised when retrying cannot help
            if is_permanent(exc) or attempt == retries:
                raise
            time.sleep(min(2.0 ** attempt, 8.0))


def pending_max_step(run_dir: Path, key: str, run_id: str, skip: str = "") -> int:
    """The highest step of metric `key` that journals in RUN_DIR (but session `skip`) will
    still send to run `run_id`; -1 if none."""
    best = -1
    for paths in sessions(run_dir):
        if paths.sid == skip:
            continue
        try:
            up = Uploader.of_file(paths, run_dir)
            if up.target.run_id != run_id:
                continue
            for _, _, raw in up.lines(up.cursor):
                item, why = parse(raw)
                if not why and item["kind"] == "metrics":
                    best = max([best, *(int(r[3]) for r in item["metrics"] if r[0] == key)])
        except (OSError, ValueError, TypeError, IndexError, KeyError):
            continue  # an unreadable journal is reported when it is replayed
    return best
