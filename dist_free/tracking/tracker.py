"""Rank 0's MLflow run behind a queue: asynchronous, survives server outages and kill -9.

    tracker = build_tracker(enabled=True, uri=None, experiment="dist-free", run_name="r50",
                            run_dir=Path("runs/r50"), rank=rank, run_id=ckpt.get("mlflow_run_id"))
    tracker.log_params(flatten(config)); tracker.set_tags(environment_tags(world_size))
    tracker.log_metrics({"train/loss": 2.3}, step=global_step)   # enqueues, returns at once
    tracker.log_artifacts(export_dir, "model")       # a folder: weights and model card
    tracker.close()                                  # or close(status="FAILED") on a crash

Every log call only appends to an in-memory queue. The "mlflow-sender" thread delivers items in
order with `MlflowClient`, keeping each until MLflow accepts it and retrying with bounded backoff
while the server is down; the "mlflow-wal" thread appends to the write-ahead log
RUN_DIR/mlflow_wal/<session>.jsonl every item still unsent SPILL_AFTER_S after it was logged.
wal.py describes the design: the files, what a kill -9 can lose, the memory and disk bounds, and
what the next start or `python -m dist_free.tracking replay RUN_DIR` sends.

Stopping on SIGTERM/SIGINT: call `stop_soon()` (safe inside a signal handler; from then on
every item goes to the WAL at once), then `close(status="KILLED")`, which waits at most
STOP_TIMEOUT_S for a server that may be dead. Whatever is unsent is in the WAL by then.

With no URI (argument or MLFLOW_TRACKING_URI) runs go to MLflow's embedded store in the working
directory: ./mlflow.db (SQLite) and ./mlartifacts; `launch/mlflow_ui.sh` opens the UI on it.
A URI holding credentials is refused (see uri.py).
"""

from __future__ import annotations

import logging
import os
import posixpath
import secrets
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dist_free.tracking.replay import pending_max_step, replay_command, replay_file
from dist_free.tracking.sender import METRICS_PER_BATCH, Batch, RunTarget, is_permanent, open_run, send_batch
from dist_free.tracking.staging import remove_session, stage
from dist_free.tracking.system_metrics import SystemSampler
from dist_free.tracking.uri import bound_http_retries, check_uri, resolve_uri
from dist_free.tracking.wal import (
    Ack,
    SessionWal,
    WalError,
    WalPaths,
    budget_bytes,
    header_of,
    session_paths,
    sessions,
)

log = logging.getLogger("dist_free.tracking")

# MLflow's per-request limits (mlflow.utils.validation); fixed here so importing this module
# stays cheap and the numbers are visible.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
MAX_BACKOFF_S = 15.0
SPILL_AFTER_S = 0.2  # an item unsent this long goes to the WAL
WAL_TICK_S = 0.2  # how often the WAL thread looks: together, < 0.5 s from log call to disk
MEMORY_ITEMS = 10_000  # queued items held in memory; older ones wait in the WAL only
CLOSE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 2.0  # close() after stop_soon() or with status KILLED: the server may be dead


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------- params and tags

def _clip(text: str, limit: int, what: str) -> str:
    if len(text) <= limit:
        return text
    log.warning("MLflow %s longer than %d characters, truncated: %s...", what, limit, text[:60])
    return text[: limit - 3] + "..."


def _stringify(values: Mapping, value_limit: int, what: str) -> dict[str, str]:
    return {_clip(str(k), MAX_KEY, f"{what} key"): _clip(str(v), value_limit, f"{what} {k}")
            for k, v in values.items()}


# ---------------------------------------------------------------- trackers

class NullTracker:
    """What ranks other than 0, and disabled tracking, get: every call does nothing."""

    run_id = None

    def log_params(self, flat: Mapping) -> None: ...
    def set_tags(self, tags: Mapping) -> None: ...
    def log_metrics(self, metrics: Mapping, step: int, timestamp_ms: int | None = None) -> None: ...
    def log_artifact(self, path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, folder, artifact_path: str | None = None) -> None: ...
    def stop_soon(self) -> None: ...
    def close(self, timeout: float | None = None, status: str = "FINISHED") -> None: ...
    def logged_through(self, key: str, timeout: float = 5.0) -> int: return -1
    def backlog(self) -> dict[str, int]: return {"in_memory": 0, "unsent": 0, "wal_bytes": 0,
                                                 "lost": 0}

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(status="FAILED" if exc_type else "FINISHED")


@dataclass(slots=True)
class _Entry:
    seq: int
    item: dict
    born: float  # time.monotonic() when logged
    end: int | None = None  # byte offset just past its WAL line, once written


class Tracker(NullTracker):
    """Rank 0's MLflow run behind a queue and a write-ahead log; see the module docstring."""

    def __init__(self, target: RunTarget, run_dir: Path, system_metrics: bool = True,
                 start_timeout: float = 10.0, memory_items: int = MEMORY_ITEMS,
                 wal_budget: int | None = None):
        self._target, self._run_dir = target, Path(run_dir)
        self._sid = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
        self._wal = SessionWal(session_paths(self._run_dir, self._sid),
                               wal_budget or budget_bytes(), self._header)
        self._cap = max(1, memory_items)
        self._memory: deque[_Entry] = deque()
        self._next_seq, self._acked, self._written, self._evicted = 1, 0, 0, 0
        self._kept: list[int] = []  # seqs MLflow rejected: in the WAL, for `replay`
        self._persisted = Ack()  # what the ack file on disk says
        self._read_offset = self._lost = self._staged = 0
        self._wal_full = self._closed = self._abandoned = False
        self._cond, self._io = threading.Condition(), threading.Lock()  # io: the WAL's files
        self._closing, self._stopping = threading.Event(), threading.Event()
        self._wake, self._writer_done = threading.Event(), threading.Event()
        self._opened, self._first_try = threading.Event(), threading.Event()
        self._want_system, self._sampler = system_metrics, None
        self._older = self._older_logs()
        self._writer = threading.Thread(target=self._write_loop, name="mlflow-wal", daemon=True)
        self._worker = threading.Thread(target=self._work, name="mlflow-sender", daemon=True)
        self._writer.start()
        self._worker.start()
        # Wait briefly so the run id is known before the first checkpoint; a dead server
        # answers at once, a black-holed one costs at most start_timeout, once.
        self._first_try.wait(start_timeout)

    @property
    def run_id(self) -> str | None:
        """The run being continued or created; None while a new run could not be created yet."""
        return self._target.run_id

    # -- the calls the trainer makes: each only enqueues

    def log_params(self, flat: Mapping) -> None:
        params = _stringify(flat, MAX_PARAM_VALUE, "param")
        keys = list(params)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            self._enqueue({"kind": "params",
                           "params": {k: params[k] for k in keys[i:i + PARAMS_PER_BATCH]}})

    def set_tags(self, tags: Mapping) -> None:
        tags = _stringify(tags, MAX_TAG_VALUE, "tag")
        keys = list(tags)
        for i in range(0, len(keys), PARAMS_PER_BATCH):
            self._enqueue({"kind": "tags",
                           "tags": {k: tags[k] for k in keys[i:i + PARAMS_PER_BATCH]}})

    def log_metrics(self, metrics: Mapping, step: int, timestamp_ms: int | None = None) -> None:
        """Values should be Python numbers: float() of a CUDA tensor would sync the device."""
        ts = _now_ms() if timestamp_ms is None else timestamp_ms
        rows = [[str(k), float(v), ts, int(step)] for k, v in metrics.items()]
        for i in range(0, len(rows), METRICS_PER_BATCH):
            self._enqueue({"kind": "metrics", "metrics": rows[i:i + METRICS_PER_BATCH]})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """Upload file `path` (as it is now: it is hard-linked at once) under `artifact_path`."""
        path = Path(path)
        if path.is_dir():  # as MLflow does: the folder itself, by name, under artifact_path
            sub = posixpath.join(artifact_path, path.name) if artifact_path else path.name
            self.log_artifacts(path, sub)
        else:
            self._enqueue(self._artifact_item(path, artifact_path, folder=False))

    def log_artifacts(self, folder, artifact_path: str | None = None) -> None:
        """Upload the files in `folder` (recursively, as they are now) under `artifact_path`,
        e.g. log_artifacts(export_dir, "model") for exported weights and their model card."""
        folder = Path(folder)
        if not folder.is_dir():
            log.warning("MLflow artifact folder %s does not exist; it will be reported as "
                        "rejected", folder)
        self._enqueue(self._artifact_item(folder, artifact_path, folder=True))

    def stop_soon(self) -> None:
        """We are stopping and the server may be dead: write every queued item to the WAL now,
        and make close() wait at most STOP_TIMEOUT_S by default. Only sets events, so it is
        safe inside a signal handler."""
        self._stopping.set()
        self._wake.set()

    def backlog(self) -> dict[str, int]:
        """Items held in memory, items not yet delivered, WAL size in bytes, items lost."""
        with self._cond:
            return {"in_memory": len(self._memory),
                    "unsent": self._next_seq - 1 - self._acked + len(self._kept),
                    "wal_bytes": self._wal.size, "lost": self._lost}

    def close(self, timeout: float | None = None, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED). Whatever is unsent after
        SPILL_AFTER_S goes to the WAL, then delivery gets the rest of `timeout` s (default
        CLOSE_TIMEOUT_S; STOP_TIMEOUT_S after stop_soon() or with KILLED, as the server may be
        what is down). Logs what is left and how to send it, and what was lost."""
        if self._closed:
            return
        if timeout is None:
            hurry = status == "KILLED" or self._stopping.is_set()
            timeout = STOP_TIMEOUT_S if hurry else CLOSE_TIMEOUT_S
        deadline = time.monotonic() + timeout
        if self._sampler is not None:
            self._sampler.stop(timeout=min(1.0, timeout))
        self._enqueue({"kind": "end", "status": status, "end_ms": _now_ms()})
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._closing.set()
        # A healthy server takes the last items within milliseconds, and then nothing need be
        # written; otherwise spill everything now, before waiting any longer.
        self._worker.join(min(SPILL_AFTER_S, timeout))
        self._flush(everything=True)
        self._persist_ack()
        self._worker.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._abandoned = True  # the sender stops touching the queue from here on
            self._cond.notify_all()
        self._writer_done.set()
        self._wake.set()
        self._writer.join(5.0)
        self._persist_ack()
        self._finish()

    def logged_through(self, key: str, timeout: float = 5.0) -> int:
        """The highest step of metric `key` this run holds or will receive, or -1 if unknown.

        A resumed run re-runs the steps after its checkpoint; the trainer skips logging those
        MLflow already has, or an earlier session's WAL will still send, so no step appears
        twice. The server is asked once, at resume, in a helper thread so an unreachable one
        costs at most `timeout` s (then nothing is skipped: a duplicate is better than a gap).
        """
        if self._target.run_id is None:
            return -1
        answer = []

        def ask():
            from mlflow import MlflowClient
            history = MlflowClient(self._target.uri).get_metric_history(self._target.run_id, key)
            answer.append(max((m.step for m in history), default=-1))

        thread = threading.Thread(target=ask, name="mlflow-resume-query", daemon=True)
        thread.start()
        thread.join(timeout)
        if not answer:
            log.warning("could not ask MLflow which steps run %s already has; steps re-run "
                        "after the checkpoint may be logged twice", self._target.run_id)
            return -1
        return max(answer[0], pending_max_step(self._run_dir, key, self._target.run_id,
                                               skip=self._sid))

    # -- enqueueing (the caller's thread)

    def _enqueue(self, item: dict) -> None:
        with self._cond:
            if self._closed:
                log.warning("MLflow tracker already closed; dropped a %s item", item["kind"])
                return
            self._memory.append(_Entry(self._next_seq, item, time.monotonic()))
            self._next_seq += 1
            self._trim()
            burst = len(self._memory) > self._cap  # the cap is full of items not yet written
            if burst and self._wal_full and item["kind"] != "end":
                self._memory.pop()  # no room in memory or on disk: counted, reported at close
                self._next_seq -= 1
                self._lost += 1
                burst = False
            self._cond.notify_all()
        if burst:  # rare: more than the cap logged within SPILL_AFTER_S
            self._flush(everything=True)

    def _artifact_item(self, path: Path, artifact_path: str | None, folder: bool) -> dict:
        # A hard link freezes the file as it is now (the trainer replaces checkpoints by
        # rename), costs no copy, and keeps it for the WAL if the upload has to wait.
        self._staged += 1
        staged = stage(self._run_dir, self._sid, self._staged, path)
        return {"kind": "artifact", "path": str(staged if staged else path.absolute()),
                "artifact_path": artifact_path, "staged": staged is not None, "folder": folder}

    def _trim(self) -> None:
        """Drop written items from memory beyond the cap (oldest first); call under _cond."""
        while len(self._memory) > self._cap and self._memory[0].end is not None:
            self._evicted = self._memory.popleft().seq

    # -- the write-ahead log (the mlflow-wal thread, and close)

    def _header(self) -> dict:
        return {**self._target.describe(), "session": self._sid}

    def _write_loop(self) -> None:
        while not self._writer_done.is_set():
            self._wake.wait(WAL_TICK_S)
            self._wake.clear()
            try:
                self._flush(everything=self._stopping.is_set())
                self._persist_ack()
                self._truncate_if_delivered()
            except Exception:  # noqa: BLE001 - the thread must outlive a bad moment (disk full)
                log.exception("MLflow write-ahead log %s: write failed", self._wal.paths.log)

    def _flush(self, everything: bool) -> None:
        """Append to the WAL the items not yet written that are due (all, with everything)."""
        with self._io:
            with self._cond:
                due, cutoff = [], time.monotonic() - SPILL_AFTER_S
                crowded = len(self._memory) >= self._cap
                for entry in self._memory:
                    if entry.end is None:
                        if not (everything or crowded or entry.born <= cutoff):
                            break  # the rest are younger
                        due.append(entry)
            if not due:
                return
            ends = self._wal.append([(e.seq, e.item) for e in due])
            with self._cond:
                for entry, end in zip(due, ends):
                    entry.end, self._written = end, entry.seq
                if len(ends) < len(due):
                    self._note_full()
                self._trim()

    def _note_full(self) -> None:
        if not self._wal_full:
            log.error("MLflow items cannot go to the write-ahead log %s: %s. New items are kept "
                      "in memory while there is room (%d items) and are LOST after that",
                      self._wal.paths.log, self._wal.full_reason, self._cap)
        self._wal_full = True

    def _persist_ack(self) -> None:
        """Record on disk which written items were delivered (or kept), if that changed."""
        with self._io:
            with self._cond:
                if not self._wal.exists:
                    return
                ack = Ack(min(self._acked, self._written), sorted(self._kept),
                          self._target.run_id)
            if ack != self._persisted:
                self._wal.write_ack(ack)
                self._persisted = ack

    def _truncate_if_delivered(self) -> None:
        with self._io:
            with self._cond:
                done = (self._wal.exists and self._wal.size > self._wal.header_end
                        and self._acked >= self._written and not self._kept)
                if done:  # nothing in the file is still needed: start it afresh
                    self._wal.truncate()
                    self._read_offset = self._wal.header_end
                    self._wal_full = False

    # -- delivery (the mlflow-sender thread)

    def _work(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self._target.uri)
        failures = 0
        while self._wait_for_work(failures):
            try:
                if not self._opened.is_set():
                    self._open(client)
                elif self._older:
                    self._replay_older()
                else:
                    self._send_next(client)
                if failures:
                    log.warning("MLflow at %s reachable again; sending the %d queued items",
                                self._target.uri, self.backlog()["unsent"])
                failures = 0
            except Exception as exc:  # noqa: BLE001 - any failure here means: keep, retry later
                failures += 1
                if failures == 1:
                    log.warning("MLflow at %s unreachable or failing (%s); training goes on, "
                                "items are kept and retried", self._target.uri, exc)
            finally:
                self._first_try.set()

    def _wait_for_work(self, failures: int) -> bool:
        """Back off after failures, sleep while idle; False when the sender should stop."""
        if failures:
            delay = min(0.25 * 2 ** failures, MAX_BACKOFF_S)
            if self._closing.is_set():  # flushing at exit: retry often, the clock is short
                time.sleep(min(delay, 0.5))
            else:
                self._closing.wait(delay)
        with self._cond:
            while (self._opened.is_set() and not self._older and not self._unsent()
                   and not self._closing.is_set() and not self._abandoned):
                self._cond.wait()
            idle = not self._unsent() and not self._older
            return not self._abandoned and not (self._closing.is_set() and idle)

    def _unsent(self) -> bool:
        return self._acked < self._next_seq - 1

    def _open(self, client) -> None:
        open_run(client, self._target)
        self._opened.set()
        self._persist_ack()  # a WAL written before the run existed learns its id
        log.info("MLflow run %s at %s%s", self._target.run_id, self._target.uri,
                 " (resumed)" if self._target.resumed else "")
        if self._want_system and self._sampler is None and not self._closing.is_set():
            self._sampler = SystemSampler(self, self._target.start_ms)

    def _send_next(self, client) -> None:
        batch, end = self._next_batch()
        if not batch:
            return
        items = [item for _, item in batch]
        try:
            send_batch(client, self._target, items, self._run_dir)
        except Exception as exc:
            if not is_permanent(exc):
                raise
            self._keep(batch, exc)
        with self._cond:
            if self._abandoned:  # close() gave up on us: the WAL says what is left
                return
            self._acked = batch[-1][0]
            if isinstance(end, _Entry):
                end = end.end  # set if the WAL thread wrote it meanwhile
            if end is not None:
                self._read_offset = end
            while self._memory and self._memory[0].seq <= self._acked:
                self._memory.popleft()
        self._persist_ack()

    def _next_batch(self) -> tuple[list[tuple[int, dict]], int | _Entry | None]:
        """The next items in seq order: from the WAL while evicted ones remain, else from
        memory; and where the last one ends in the WAL (an offset, or its entry)."""
        batch = Batch()
        with self._cond:
            if self._abandoned:
                return [], None
            if self._evicted <= self._acked:
                last = None
                for entry in self._memory:
                    if not batch.add(entry.seq, entry.item):
                        break
                    last = entry
                return batch.items, last
            after, through, offset = self._acked, self._evicted, self._read_offset
        with self._io:
            end = self._wal.read_batch(offset, after, through, batch.add)
        return batch.items, end

    def _keep(self, batch: list[tuple[int, dict]], exc: Exception) -> None:
        """MLflow rejected these: a retry cannot help, so they wait in the WAL for `replay`."""
        self._flush(everything=True)  # they may still be only in memory
        seqs = [seq for seq, _ in batch]
        with self._cond:
            if self._written >= seqs[-1]:
                self._kept.extend(seqs)
                where = f"kept in {self._wal.paths.log}"
            else:
                self._lost += len(seqs)
                where = "LOST: the write-ahead log is full"
        log.warning("MLflow rejected %d item(s) of kind %s (%s); %s", len(seqs),
                    batch[0][1]["kind"], exc, where)

    def _older_logs(self) -> list[WalPaths]:
        """Earlier sessions' WALs this session sends first: those logging to the same URI."""
        same, other = [], []
        for paths in sessions(self._run_dir):
            try:
                uri = header_of(paths.log, []).get("uri")
            except (OSError, WalError):
                uri = None
            (same if uri == self._target.uri else other).append(paths)
        if same:
            log.warning("%d MLflow write-ahead log(s) from earlier sessions in %s: sending "
                        "them first", len(same), self._run_dir)
        if other:
            log.warning("%d MLflow write-ahead log(s) in %s were logging to another URI (or "
                        "are damaged); send them with: %s", len(other), self._run_dir,
                        replay_command(self._run_dir))
        return same

    def _replay_older(self) -> None:
        result = replay_file(self._older[0], self._run_dir, live_run_id=self._target.run_id,
                             should_stop=lambda: self._abandoned)
        if result.transient and not self._abandoned:
            raise ConnectionError(result.error)  # back off, then try this log again
        self._older.pop(0)
        if result.left or result.error or result.busy:
            log.warning("%s: %d MLflow items left (%s); send them with: %s", result.path,
                        result.left, result.error or ("in use" if result.busy else "rejected"),
                        replay_command(self._run_dir))

    # -- the end

    def _finish(self) -> None:
        """Close the WAL (removing it if everything arrived) and say what is left or lost."""
        with self._io, self._cond:
            unsent = self._next_seq - 1 - self._acked + len(self._kept)
            unwritten = sum(1 for e in self._memory if e.end is None and e.seq > self._acked)
            lost, kept = self._lost + unwritten, len(self._kept)
            self._wal.close(delivered_all=unsent == 0)
        if unsent == 0:
            remove_session(self._run_dir, self._sid)
        elif unsent > unwritten:
            log.warning("MLflow at %s did not accept %d items before exit (%d rejected); they "
                        "are in %s. The next run in %s sends them, or now: %s",
                        self._target.uri, unsent - unwritten, kept, self._wal.paths.log,
                        self._run_dir, replay_command(self._run_dir))
        if lost:
            log.error("%d MLflow items were LOST: %s", lost,
                      self._wal.full_reason or "the write-ahead log could not take them")


# ---------------------------------------------------------------- construction

def build_tracker(enabled: bool, uri: str | None, experiment: str, run_name: str,
                  run_dir: Path, rank: int, run_id: str | None = None,
                  system_metrics: bool = True, artifact_location: str | None = None,
                  start_timeout: float = 10.0, memory_items: int = MEMORY_ITEMS) -> NullTracker:
    """Rank 0's tracker, or a NullTracker; never raises for network trouble.

    Raises TrackingConfigError (on every rank, so all stop alike) for a URI holding
    credentials or a bad DIST_FREE_MLFLOW_WAL_BYTES. `artifact_location` applies only when the
    experiment is created; with the embedded store it defaults to ./mlartifacts.
    """
    if not enabled:
        return NullTracker()
    check_uri(uri or os.environ.get("MLFLOW_TRACKING_URI"))
    budget = budget_bytes()
    if rank != 0:
        return NullTracker()
    if artifact_location is None and not (uri or os.environ.get("MLFLOW_TRACKING_URI")):
        artifact_location = str(Path.cwd() / "mlartifacts")  # beside ./mlflow.db
    uri = resolve_uri(uri)
    bound_http_retries(uri)
    target = RunTarget(uri=uri, experiment=experiment, run_name=run_name, start_ms=_now_ms(),
                       artifact_location=artifact_location, run_id=run_id)
    return Tracker(target, Path(run_dir), system_metrics=system_metrics,
                   start_timeout=start_timeout, memory_items=memory_items, wal_budget=budget)
