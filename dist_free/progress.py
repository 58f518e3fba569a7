"""Rank 0's progress display: a one-line bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("dist_free.train")


class Progress:
    def __init__(self, enabled: bool, mode: str, title: str, total: int, done: int = 0):
        self.enabled, self.title, self.total = enabled, title, total
        # A bar redrawn with \r is noise in a log file or a Slurm output: log lines there.
        self.bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.started, self.done = time.perf_counter(), done

    def update(self, done: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.done = done
        text = (f"{self.title} {done}/{self.total} loss {metrics['train/loss']:.3f} "
                f"adv-acc {100 * metrics['train/adv_acc']:.1f}% "
                f"{metrics['perf/images_per_s']:.0f} img/s "
                f"data-wait {100 * metrics['perf/data_wait_frac']:.0f}%")
        if self.bar:
            width = 24
            filled = int(width * done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            sys.stderr.flush()
        else:
            log.info(text)

    def close(self) -> None:
        if self.enabled and self.bar:
            sys.stderr.write("\n")
