"""The training loop: epochs of `method.train_step`, evaluation, checkpoints, metrics.

`Run.start` builds (or resumes) everything a run needs; `fit` runs it. The step loop reads
nothing back from the device except once per `run.log_every` steps, where one small all-reduce
carries the window's loss/accuracy sums and the preemption flag (window.py); a stop request
reaches every rank one step after it was made through a CPU-side vote (stop_vote.py), so every
rank stops at the same step, soon. A stop mid-epoch saves where everything stands, each rank's
RNGs included (resume/rank_local.py), and a probe it came before is run first at the next start:
resumed on the same ranks, the run goes on as if it had not stopped.
"""

from __future__ import annotations

import json
import logging

from dist_free import checkpoint, distributed, precision
from dist_free.config import SELECTION_FIGURES
from dist_free.engine import method_registry
from dist_free.progress import Progress
from dist_free.publish.export import export_checkpoint
from dist_free.trainer import augmentation, schedule, validation
from dist_free.trainer.resume import rank_local
from dist_free.trainer.run import Run

log = logging.getLogger("dist_free.train")


def fit(run: Run) -> str:
    """Train to the end or to a stop; returns FINISHED, KILLED (a stop signal: everything done
    is saved) or FAILED (a collapse stopped the run), the status MLflow records."""
    cfg = run.cfg
    log.info("%s training: %s, %d steps/epoch, %d ranks on %s, loader %s, %s", cfg.method.name,
             schedule.describe(cfg, len(run.train_loader), epoch=run.epoch,
                               done=run.done_before_epoch), len(run.train_loader),
             run.d.world_size, run.d.device, run.train_loader.kind,
             precision.resolve_amp(cfg.run.amp, run.d.device)[1])
    status = "FAILED"
    try:
        status = run_epochs(run)
        if status == "FINISHED":
            finish(run)
        return status
    finally:
        # After a stop request the tracking server may be the thing that is down: the tracker
        # writes what is unsent to disk at once instead of waiting for it (whatever the status:
        # a signal during the final export still leaves the run FINISHED).
        if run.preemption.requested:
            run.tracker.stop_soon()
        run.tracker.close(status=status)


def run_epochs(run: Run) -> str:
    cfg = run.cfg
    if run.eval_pending and not evaluate_epoch(run):     # stopped during it last time
        return "KILLED"
    epochs = run.real_epochs()
    while run.epoch < epochs:
        outcome = train_one_epoch(run)
        if outcome == "stopped":
            save(run, batch_in_epoch=run.start_batch)
            log.warning("stopped on %s at epoch %d batch %d; the next start resumes there",
                        run.preemption.signal_name or "request", run.epoch, run.start_batch)
            return "KILLED"
        if outcome == "collapsed":
            return stop_on_collapse(run)
        run.epoch, run.start_batch = run.epoch + 1, 0
        last = run.epoch == epochs
        due = last or run.epoch % cfg.eval.every == 0
        if due or run.epoch % cfg.run.checkpoint_every == 0:
            save(run, eval_pending=due)     # the epoch's work is on disk before the evaluation
        if due and not evaluate_epoch(run):
            return "KILLED"
    return "FINISHED"


def train_one_epoch(run: Run) -> str:
    """One epoch (or its remainder after a resume): "done", "stopped" (a stop signal) or
    "collapsed" (the probe saw robust accuracy collapse and eval.on_collapse is not warn)."""
    cfg, loader, window = run.cfg, run.train_loader, run.window
    loader.set_epoch(run.epoch, run.start_batch)
    steps = cfg.batches_in_epoch(run.done_before_epoch, len(loader))
    window.restart_clock()
    # A log line at every log point (run.log_every steps), as the metrics are logged.
    progress = Progress(f"epoch {run.epoch + 1}/{run.real_epochs()}", steps, done=run.start_batch,
                        enabled=run.d.is_main, mode=cfg.run.progress, log_every_s=0)
    probes = validation.probe_points(steps, cfg.eval.probes_per_epoch)
    augment = augmentation.build(cfg, run.d)        # data.mixup/cutmix/reprob; None: none
    if run.probe_pending and (outcome := probe_now(run)):   # the last session stopped before it
        return leave_epoch(run, progress, outcome)
    batches = iter(loader)
    for i in range(run.start_batch, steps):
        images, labels = window.wait_for(batches)
        if augment is not None:     # once per minibatch: every replay sees the same batch
            images, labels = augment(images, labels, run.epoch, i, len(loader))
        lr = schedule.lr_at(cfg, run.d.world_size, run.epoch + i / steps, run.global_step)
        schedule.set_lr(run.optimizer, lr)
        eps = schedule.eps_at(cfg, run.epoch + i / steps)
        if eps is not None:
            run.method.set_eps(eps)
        window.add(run.method.train_step(images, labels), images.shape[0])
        if run.ema is not None:      # free training took `replays` optimizer steps
            run.ema.update(run.model, cfg.replays)
        run.global_step, run.start_batch = run.global_step + 1, i + 1
        # Every rank learns of a stop one step after it was asked, not at the next log point.
        stop = run.stop_vote.poll(run.preemption.requested)
        log_point = run.global_step % cfg.run.log_every == 0 or i + 1 == steps
        if stop or log_point:
            passes = cfg.replays * method_registry.passes_per_step(cfg.method)
            metrics, stop = window.close(run.preemption.requested, passes, keep=not log_point)
            metrics["train/lr"] = lr
            if eps is not None:
                metrics["train/eps"] = eps
            run.log_metrics(metrics, run.global_step)
            progress.update(i + 1, progress_text(metrics))
            if stop:
                run.probe_pending = i + 1 in probes     # the next start probes before training
                return leave_epoch(run, progress, "stopped")
        if i + 1 in probes and (outcome := probe_now(run)):
            return leave_epoch(run, progress, outcome)
    return leave_epoch(run, progress, "done")


def probe_now(run: Run) -> str | None:
    """The probe due at this step: None to train on, else how the epoch ends ("stopped": it
    stays pending and the next start runs it first; "collapsed")."""
    run.probe_pending = True
    try:
        collapsed = run_probe(run)
    except validation.Stopped:      # a stop request met during the probe
        return "stopped"
    run.probe_pending = False
    return "collapsed" if collapsed else None


def leave_epoch(run: Run, progress: Progress, outcome: str) -> str:
    run.stop_vote.collect()     # every rank leaves the loop at the same step: none is left over
    progress.close()
    return outcome


def progress_text(metrics: dict) -> str:
    """The window's figures beside the progress bar (already on the host: no extra sync)."""
    return (f"loss {metrics['train/loss']:.3f} adv-acc {100 * metrics['train/adv_acc']:.1f}% "
            f"{metrics['perf/images_per_s']:.0f} img/s "
            f"data-wait {100 * metrics['perf/data_wait_frac']:.0f}%")


def run_probe(run: Run) -> bool:
    """Probe robust accuracy; True if it collapsed and the run should stop."""
    robust, clean = validation.probe(run)
    run.log_metrics({"probe/pgd_top1": robust, "probe/top1": clean}, run.global_step)
    if not run.guard.check(robust):
        return False
    message = (f"ROBUST ACCURACY COLLAPSED at epoch {run.epoch} step {run.global_step}: PGD-"
               f"{run.cfg.eval.probe_steps} probe {robust:.1%} against a best of {run.guard.best:.1%} "
               f"(clean {clean:.1%}). Catastrophic overfitting or gradient masking: the robustness "
               "this run reports from here on cannot be trusted.")
    log.error(message)
    if run.d.is_main:
        run.tracker.set_tags({"collapse": f"epoch {run.epoch} step {run.global_step}: "
                                          f"probe {robust:.4f} vs best {run.guard.best:.4f}"})
    return run.cfg.eval.on_collapse != "warn"


def stop_on_collapse(run: Run) -> str:
    """stop: keep the collapsed state as last.pt (to inspect or resume); rollback: keep the last
    healthy checkpoint as last.pt and best.pt, and leave the collapsed weights unsaved."""
    if run.cfg.eval.on_collapse == "stop":
        save(run, batch_in_epoch=run.start_batch)
        log.error("eval.on_collapse=stop: saved the collapsed state at epoch %d batch %d and "
                  "stopped", run.epoch, run.start_batch)
    else:
        log.error("eval.on_collapse=rollback: stopped; %s is the last healthy checkpoint",
                  checkpoint.checkpoint_dir(run.run_dir) / "last.pt")
    return "FAILED"


def evaluate_epoch(run: Run) -> bool:
    """The epoch's evaluation, selection and final save; False if a stop request cut it short
    (the checkpoint saved before it stays, marked eval_pending, and the next start redoes it)."""
    try:
        report = validation.epoch_report(run)
    except validation.Stopped:
        log.warning("stopped on %s during the epoch %d evaluation; the next start redoes it",
                    run.preemption.signal_name or "request", run.epoch)
        return False
    log.info("epoch %d eval: val clean top-1 %.2f%%, PGD-%dx%d %.2f%% (eps %.4f, %s, %d images); "
             "best.pt selected on %s by %s: %.2f%%", run.epoch, 100 * report["top1"],
             report["pgd_steps"], report["pgd_restarts"], 100 * report["pgd"], report["eps"],
             report["dtype"], report["samples"], report["selected_on"],
             SELECTION_FIGURES[report["selected_by"]], 100 * report["selection_metric"])
    metrics = {"eval/top1": report["top1"], "eval/top5": report["top5"],
               "eval/pgd_top1": report["pgd"], "eval/epoch": run.epoch}
    if report["holdout"]:
        metrics.update({"holdout/top1": report["holdout"]["top1"],
                        "holdout/pgd_top1": report["holdout"]["pgd"]})
    run.log_metrics(metrics, run.global_step)
    if run.d.is_main:
        path = run.run_dir / "eval" / f"epoch_{run.epoch:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        run.tracker.log_artifact(path, "eval")
    save(run, report=report)
    return True


def save(run: Run, report: dict | None = None, batch_in_epoch: int = 0,
         eval_pending: bool = False) -> None:
    """All ranks send their own method state to rank 0, which writes last.pt (and best.pt when
    `report` beats the best selection metric so far)."""
    rank_states = gather_rank_states(run)
    local = rank_local.gather(run)
    is_best = report is not None and report["selection_metric"] > run.best_metric
    if is_best:
        run.best_metric = report["selection_metric"]
    if run.d.is_main:
        state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "method": run.method.state_dict(), "rank_states": rank_states, "epoch": run.epoch,
                 "batch_in_epoch": batch_in_epoch, "global_step": run.global_step,
                 # a step budget's length in epochs depends on it: the model card states it
                 "batches_per_epoch": len(run.train_loader), "length_since": run.length_since,
                 "best_metric": run.best_metric, "probe_best": run.guard.best,
                 "eval_pending": eval_pending, "probe_pending": run.probe_pending,
                 rank_local.KEY: local, "class_to_idx": run.train_loader.class_to_idx,
                 "config": run.cfg.to_dict(), "mlflow_run_id": run.tracker.run_id,
                 "git_commit": run.commit, "world_size": run.d.world_size, "eval": report,
                 "data": run.data, "ema": run.ema.state_dict() if run.ema is not None else None}
        run.hooks.before_write(run)
        last = checkpoint.save_atomic(state, checkpoint.checkpoint_dir(run.run_dir) / "last.pt")
        if is_best:
            checkpoint.copy_atomic(last, last.with_name("best.pt"))
    distributed.barrier()    # nobody races ahead (or exits) before the checkpoint is on disk
    run.hooks.after_save(run)


def gather_rank_states(run: Run) -> list[dict]:
    """Every rank's `method.rank_state()` on rank 0 (others get []), on the CPU."""
    mine = run.method.rank_state()
    gathered = {k: distributed.gather_to_main(v) for k, v in sorted(mine.items())}
    if not run.d.is_main:
        return []
    return [{k: ts[r].cpu() for k, ts in gathered.items()} for r in range(run.d.world_size)]


def finish(run: Run) -> None:
    """The end of a complete run: the final model and the checkpoints go to MLflow."""
    run.hooks.after_finish(run)
    if not run.d.is_main:
        return
    ckpts = checkpoint.checkpoint_dir(run.run_dir)
    for name in ("last.pt", "best.pt"):
        if (ckpts / name).is_file():
            run.tracker.log_artifact(ckpts / name, "checkpoints")
    # The final model as plain tensors plus a card that says how it was trained and measured,
    # never a pickled module: what users download must be safe to load.
    chosen = ckpts / "best.pt" if (ckpts / "best.pt").is_file() else ckpts / "last.pt"
    export_dir = run.run_dir / "export"
    export_checkpoint(chosen, export_dir, force=True)
    run.tracker.log_artifacts(export_dir, "model")
    log.info("done: %s (model exported from %s to %s)", run.run_dir, chosen.name, export_dir)
