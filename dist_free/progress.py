"""Progress of a long job on rank 0: a tqdm bar on a terminal, periodic log lines elsewhere.

Used by the training loop (one display per epoch, in batches) and by `python -m
dist_free.evaluate` (images evaluated, naming the attack and eps being run). Each shows what is
being done, how much of it is done, the rate and the time left.

The caller feeds it numbers the host already holds (a batch index, a batch's shape): nothing here
reads a device tensor, so showing progress never synchronises the device. On a terminal the bar
is redrawn in place; in a log file or a Slurm output a redrawn bar is noise, so there a line is
logged at most every `log_every_s` seconds, and at the end.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("dist_free.progress")


def is_bar(mode: str) -> bool:
    """mode "bar", "log", or "auto" (a bar when stderr is a terminal)."""
    return mode == "bar" or (mode == "auto" and sys.stderr.isatty())


class Progress:
    def __init__(self, title: str, total: int, *, unit: str = "batch", done: int = 0,
                 enabled: bool = True, mode: str = "auto", log_every_s: float = 30.0):
        """`enabled`: False on every rank but 0 (then it shows nothing); `done`: work already
        done when a resumed job starts (not counted in the rate)."""
        self.title, self.total, self.unit, self.enabled = title, total, unit, enabled
        self.done, self.status, self.postfix = done, "", ""
        self.log_every_s = log_every_s
        self.started, self.done_at_start, self.logged_at = time.perf_counter(), done, None
        self.bar = None
        if enabled and is_bar(mode):
            self.bar = tqdm(total=total, initial=done, desc=title, unit=unit, file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.5)

    def describe(self, status: str) -> None:
        """What is being done now (e.g. the attack and eps), shown beside the title."""
        self.status = status
        if self.bar is not None:
            self.bar.set_description(f"{self.title}: {status}", refresh=False)

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        self.update(self.done + n, postfix)

    def update(self, done: int, postfix: str | None = None) -> None:
        """`done` units of `total` are finished; `postfix` adds the caller's figures (loss...)."""
        if not self.enabled:
            return
        self.done = done
        if postfix is not None:
            self.postfix = postfix
        if self.bar is not None:
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.perf_counter()
        if self.logged_at is None or now - self.logged_at >= self.log_every_s or done >= self.total:
            self.logged_at = now
            log.info(self.line(now))

    def line(self, now: float) -> str:
        """title[: status]: done/total unit (percent), rate, elapsed, time left[; postfix]."""
        elapsed = now - self.started
        rate = (self.done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        left = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
        status = f": {self.status}" if self.status else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = (f"{self.title}{status}: {self.done}/{self.total} {self.unit}{share}, "
                f"{rate:.3g} {self.unit}/s, elapsed {tqdm.format_interval(elapsed)}, "
                f"{left} left")
        return f"{text}; {self.postfix}" if self.postfix else text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
