"""Evaluation during training: the epoch's report, model selection, the collapse probe.

- Selection: with `eval.holdout` > 0 a fixed set of training images is never trained on; best.pt
  is chosen on those, and the val set only reports. Without a holdout best.pt is chosen on val,
  and every report says so (`selected_on`). The figure compared is `eval.select_on`: PGD
  accuracy (robust, ours) or clean top-1 (clean, the authors' ImageNet model_best), recorded as
  `selected_by`.
- Attacks run in fp32 unless `eval.amp` asks otherwise, whatever precision training uses.
- The probe: a cheap PGD on a few held-out batches, several times an epoch. Robust accuracy that
  falls far below its best so far is the signature of catastrophic overfitting (FGSM-RS training
  is known to do it within an epoch) or of gradient masking; `eval.on_collapse` says what to do.
- Every evaluation checks, between batches, whether a stop was requested on any rank, and a
  rank asked to stop leaves a batch at its attack's next forward, so a SIGTERM during an
  evaluation is answered within one attack step.
- What these functions read of a run is `Evaluated`, and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from dist_free import distributed, precision
from dist_free.config import Config
from dist_free.distributed import DistInfo
from dist_free.engine.ema import ModelEMA
from dist_free.evaluation.robust_eval import evaluate
from dist_free.trainer.stops.preemption import Preemption


class Evaluated(Protocol):
    """What evaluation during training reads of a run (dist_free.trainer.run.Run is one)."""

    cfg: Config                       # eval.* and eval_eps: the protocol
    d: DistInfo                       # its device carries the stop votes
    model: torch.nn.Module            # the bare model
    ema: ModelEMA | None              # evaluated instead of `model` when the run keeps one
    val_loader: Iterable              # reported on
    holdout_loader: Iterable | None   # selected on, when eval.holdout is set
    preemption: Preemption            # `requested`: polled between batches and at every forward
    epoch: int                        # the report's epoch and step
    global_step: int


class Stopped(Exception):
    """A stop was requested (on some rank) while an evaluation was running."""


def stop_checked(batches: Iterable, stop_requested: Callable[[], bool], device: torch.device,
                 max_batches: int | None = None):
    """The first `max_batches` batches, with all ranks agreeing before each one whether any was
    asked to stop (one tiny all-reduce per batch: nothing next to the attack it precedes).

    Val shards are unpadded, so ranks may hold different numbers of batches: a rank that has run
    out keeps taking part in the all-reduce until every rank has, or the collective would hang.
    """
    world = distributed.world_size()
    it, done = iter(batches), 0
    while True:
        batch = next(it, None) if max_batches is None or done < max_batches else None
        flags = torch.tensor([float(stop_requested()), float(batch is None)], device=device)
        stop, finished = distributed.all_reduce_sum(flags).tolist()
        if stop > 0:
            raise Stopped
        if batch is not None:
            done += 1
            yield batch
        elif finished >= world:
            return


class _StopMidBatch(Exception):
    """This rank was asked to stop during an attack (raised at its next forward)."""


def pgd_accuracy(run: Evaluated, loader: Iterable, *, steps: int, restarts: int,
                 max_batches: int | None, model: torch.nn.Module | None = None) -> dict:
    """Clean and PGD accuracy of the bare model (or `model`) on `loader`, with rank 0's
    BatchNorm statistics (each rank's running stats drift apart between DDP's broadcasts).

    One batch of a long attack can take longer than a grace period on a loaded machine, so a
    rank asked to stop also leaves mid-batch, at its next forward; it then meets the other
    ranks at their next between-batch check with a stop vote, so every rank stops alike."""
    cfg = run.cfg
    model = run.model if model is None else model
    distributed.broadcast_buffers(model)
    batches = stop_checked(loader, lambda: run.preemption.requested, run.d.device, max_batches)

    def check(module, args):
        if run.preemption.requested:
            raise _StopMidBatch

    hook = model.register_forward_pre_hook(check)
    try:
        return evaluate(model, batches, eps_values=[cfg.eval_eps], steps=steps,
                        step_size=cfg.eval.step_size, restarts=restarts,
                        amp_dtype=precision.attack_dtype(cfg.eval.amp))
    except _StopMidBatch:
        # The same all-reduce as stop_checked's (stop, finished), saying "stop".
        distributed.all_reduce_sum(torch.tensor([1.0, 0.0], device=run.d.device))
        raise Stopped from None
    finally:
        hook.remove()


def epoch_report(run: Evaluated) -> dict:
    """PGD evaluation on val (reported) and on the holdout (selection), with its protocol; of
    the EMA weights when the run keeps them (optim.ema): those are what best.pt ships."""
    cfg, ema, start = run.cfg, run.ema, time.perf_counter()
    kw = dict(steps=cfg.eval.steps, restarts=cfg.eval.restarts, max_batches=cfg.eval.max_batches,
              model=ema.module if ema is not None else None)
    val = pgd_accuracy(run, run.val_loader, **kw)
    held = pgd_accuracy(run, run.holdout_loader, **kw) if run.holdout_loader else None
    chosen = held or val
    eps = cfg.eval_eps
    figure = chosen["pgd"][eps] if cfg.eval.select_on == "robust" else chosen["top1"]
    return {"epoch": run.epoch, "global_step": run.global_step, "samples": val["samples"],
            "top1": val["top1"], "top5": val["top5"], "pgd": val["pgd"][eps], "eps": eps,
            "attack": "pgd", "pgd_steps": cfg.eval.steps, "pgd_restarts": cfg.eval.restarts,
            "dtype": precision.NAMES[precision.attack_dtype(cfg.eval.amp)],
            "holdout": None if held is None else {"samples": held["samples"], "top1": held["top1"],
                                                  "pgd": held["pgd"][eps]},
            "selected_on": "holdout" if held else "val", "selected_by": cfg.eval.select_on,
            "selection_metric": figure,
            "weights": "ema" if ema is not None else "model",
            "seconds": time.perf_counter() - start}


def probe(run: Evaluated) -> tuple[float, float]:
    """(PGD, clean) accuracy on the first eval.probe_batches held-out batches per rank."""
    cfg = run.cfg
    r = pgd_accuracy(run, run.holdout_loader or run.val_loader, steps=cfg.eval.probe_steps,
                     restarts=1, max_batches=cfg.eval.probe_batches)
    return r["pgd"][cfg.eval_eps], r["top1"]


def probe_points(steps: int, probes: int) -> set[int]:
    """Batch counts within an epoch after which to probe: evenly spread, the last at the end."""
    return {max(1, round(steps * k / probes)) for k in range(1, probes + 1)} if probes else set()


@dataclass
class CollapseGuard:
    """Remembers the best probe; once it has reached `armed_at`, a probe below (1 - drop) x best
    is a collapse."""

    drop: float
    armed_at: float = 0.0
    best: float = -1.0

    def check(self, robust: float) -> bool:
        armed = self.best > 0 and self.best >= self.armed_at
        collapsed = armed and robust < (1 - self.drop) * self.best
        self.best = max(self.best, robust)
        return collapsed
