"""A run: everything `trainer/loop.py` trains with, built fresh by `Run.start` or restored from
the latest checkpoint (on the same or another world size, on data checked against the saved
identity), plus the metric marks that keep a restarted run from logging a step twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_free import checkpoint, environment, precision
from dist_free.config import SELECTION_FIGURES, Config, flatten, to_yaml
from dist_free.distributed import DistInfo
from dist_free.engine.ema import ModelEMA
from dist_free.engine.step_base import StepBase
from dist_free.tracking import build_tracker, environment_tags
from dist_free.trainer import runtime, validation
from dist_free.trainer.resume import data_guard, rank_local, redeal
from dist_free.trainer.stops.preemption import Preemption
from dist_free.trainer.stops.stop_vote import StopVote
from dist_free.trainer.window import Window

log = logging.getLogger("dist_free.train")


# One metric logged with each family's every log call: what MLflow holds of it marks the family.
RESUME_KEYS = {"train": "train/loss", "perf": "train/loss", "probe": "probe/pgd_top1",
               "eval": "eval/epoch", "holdout": "eval/epoch"}


class Hooks:
    """Points where a caller may look at the run (tests, instrumentation); each does nothing here."""

    def after_restore(self, run: Run) -> None: ...
    def before_write(self, run: Run) -> None: ...      # rank 0, just before a checkpoint write
    def after_save(self, run: Run) -> None: ...
    def after_finish(self, run: Run) -> None: ...


@dataclass
class Run:
    """Everything the loop trains with; what its evaluations read of it is validation.Evaluated."""

    cfg: Config
    d: DistInfo
    run_dir: Path
    model: torch.nn.Module            # the bare model: checkpoints and attacks use it
    method: StepBase                  # natural/free/pgd/fast trainer around the DDP model
    optimizer: torch.optim.Optimizer
    train_loader: object
    val_loader: Iterable
    holdout_loader: Iterable | None   # eval.holdout training images, never trained on
    tracker: object
    amp_dtype: torch.dtype | None
    epoch: int = 0                    # completed epochs
    start_batch: int = 0              # batches already done in `epoch` (after a preemption)
    global_step: int = 0              # minibatches done since the run began
    length_since: int = 0             # the first real epoch of len(train_loader) minibatches
                                      # (> 0: a resume changed the global batch)
    best_metric: float = -1.0         # best eval.select_on figure on the selection split
    eval_pending: bool = False        # the epoch's checkpoint is saved, its evaluation is not
    probe_pending: bool = False       # stopped at a probe point before (or during) its probe
    window: Window | None = None      # the open log window's sums (trainer/window.py)
    guard: validation.CollapseGuard | None = None
    ema: ModelEMA | None = None       # when optim.ema is set
    # Per metric family, the last step MLflow has (or an earlier session's journal will send):
    # a restart re-runs steps, so metrics at steps <= this are not logged again.
    logged_through: dict[str, int] = field(default_factory=dict)
    data: dict = field(default_factory=dict)    # the data's identity, saved in checkpoints
    preemption: Preemption = field(default_factory=Preemption)
    stop_vote: StopVote = field(default_factory=StopVote)
    hooks: Hooks = field(default_factory=Hooks)
    commit: str = field(default_factory=lambda: environment.git_commit()[0])

    @property
    def done_before_epoch(self) -> int:
        """Minibatches the run had taken when real epoch `epoch` began: what a step budget counts
        (Config.batches_in_epoch), whatever the length of the epochs that took them."""
        return self.global_step - self.start_batch

    def real_epochs(self) -> int:
        """Real epochs the run trains, the ones done as they were and the rest in this session's
        epochs (Config.real_epochs)."""
        return self.cfg.real_epochs(len(self.train_loader), epoch=self.epoch,
                                    done=self.done_before_epoch)

    @classmethod
    def start(cls, cfg: Config, d: DistInfo, hooks: Hooks | None = None) -> Run:
        run_dir = Path(cfg.run.dir) / cfg.run.name
        resume = checkpoint.latest(run_dir)
        state = checkpoint.load(resume) if resume else None
        environment.seed_everything(cfg.run.seed + d.rank)   # each rank its own augmentations/noise
        def loader(split, classes):
            note = run_dir / f".decoding_{split}_rank{d.rank}.json"
            return runtime.build_loader(cfg, d, split, classes, crash_note=note)

        train_loader = loader("train", None)    # its class map is checked against the saved one
        val_loader = loader("val", train_loader.class_to_idx)
        holdout_loader = loader("holdout", train_loader.class_to_idx) if cfg.eval.holdout else None
        data = data_guard.identity(cfg, train_loader, val_loader, holdout_loader)
        changes = data_guard.check(state, data, cfg.run.accept_data_changes, resume) \
            if state else {}
        model = runtime.build_bare_model(cfg, d.device)
        if state is None:
            runtime.apply_init(cfg, model)       # a resumed run has its own weights
        optimizer = runtime.build_optimizer(cfg, model, d.world_size)
        amp_dtype = precision.autocast_dtype(cfg.run.amp, d.device)
        method = runtime.build_method(cfg, model, optimizer, d, amp_dtype)
        tracker = build_tracker(cfg.tracking.enabled, cfg.tracking.uri, cfg.tracking.experiment,
                                cfg.run.name, run_dir, d.rank,
                                run_id=state and state.get("mlflow_run_id"),
                                system_metrics=cfg.tracking.system_metrics)
        run = cls(cfg, d, run_dir, model, method, optimizer, train_loader, val_loader,
                  holdout_loader, tracker, amp_dtype, hooks=hooks or Hooks(),
                  guard=validation.CollapseGuard(cfg.eval.collapse_drop,
                                                 cfg.eval.collapse_armed_at), data=data,
                  ema=runtime.build_ema(cfg, model), window=Window(d.device))
        if changes and d.is_main:
            tracker.set_tags({"resume.accepted_data_changes": "; ".join(changes.values())})
        if state is not None:
            run.restore(state, resume)
            run.hooks.after_restore(run)
        else:
            run.record_start()
        return run

    def record_start(self) -> None:
        """A fresh run: write and log what it is, before the first step."""
        if not self.d.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
        (self.run_dir / "class_map.json").write_text(json.dumps(self.train_loader.class_to_idx))
        self.tracker.log_params(flatten(self.cfg.to_dict()))
        self.tracker.set_tags({**environment_tags(self.d.world_size),
                               "loader": self.train_loader.kind})
        self.tracker.log_artifact(self.run_dir / "config.yaml")
        self.tracker.log_artifact(self.run_dir / "class_map.json")

    def restore(self, state: dict, path: Path) -> None:
        mine = own_rank_state(self, state)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state.get("method") or {})
            self.method.load_rank_state(mine)
            self.restore_ema(state.get("ema"))
        except (RuntimeError, ValueError, KeyError) as e:
            raise checkpoint.CheckpointError(
                f"{path} does not fit this run's config (model, method or batch size changed?): "
                f"{str(e).splitlines()[0]}. Use a new run.name to start afresh.") from None
        self.epoch, self.start_batch = state["epoch"], state.get("batch_in_epoch", 0)
        self.global_step = state["global_step"]
        saved_length = state.get("batches_per_epoch")
        self.length_since = state.get("length_since", 0) \
            if saved_length in (None, len(self.train_loader)) else self.epoch
        self.best_metric = resumed_best_metric(state, self.cfg)
        self.eval_pending = state.get("eval_pending", False)
        self.probe_pending = state.get("probe_pending", False)
        self.guard.best = state.get("probe_best", -1.0)
        if self.d.is_main:
            steps = self.tracker.steps_logged(RESUME_KEYS.values())
            self.logged_through = {family: steps[key] for family, key in RESUME_KEYS.items()}
        log.info("resumed from %s: epoch %d, batch %d, step %d", path, self.epoch,
                 self.start_batch, self.global_step)
        rank_local.restore(self, state, same_ranks(self, state), path)   # last: the RNGs

    def restore_ema(self, saved: dict | None) -> None:
        if self.ema is None:
            return
        if saved is None:
            log.warning("optim.ema is on but the checkpoint has no EMA: averaging starts from "
                        "the resumed weights")
            self.ema.module.load_state_dict(self.model.state_dict())
        else:
            self.ema.load_state_dict(saved)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Metrics for steps re-run after a restart were logged the first time: skip them. Each
        family has its own mark: a redone evaluation logs at a step whose training metrics
        MLflow already has, and a probe between two log points is not a training metric."""
        if not self.d.is_main:
            return
        fresh = {k: v for k, v in metrics.items()
                 if step > self.logged_through.get(k.split("/")[0], -1)}
        if fresh:
            self.tracker.log_metrics(fresh, step)


def resumed_best_metric(state: dict, cfg: Config) -> float:
    """The best selection figure so far, if the checkpoint's run compared the same figure
    (eval.select_on; checkpoints from before it compared PGD accuracy). Otherwise best.pt's
    figure is not comparable to the next evaluation's, and the comparison starts afresh."""
    saved = (state.get("config") or {}).get("eval", {}).get("select_on", "robust")
    if saved != cfg.eval.select_on:
        log.warning("eval.select_on changes from %s to %s: the next evaluation's %s starts "
                    "best.pt's comparison afresh", saved, cfg.eval.select_on,
                    SELECTION_FIGURES[cfg.eval.select_on])
        return -1.0
    return state.get("best_metric", state.get("best_pgd", -1.0))


def own_rank_state(run: Run, state: dict) -> dict:
    """This rank's saved method state; on another world size or global batch, its share of all
    ranks' saved state (resume/redeal.py), with the change logged and tagged."""
    saved_world = state.get("world_size", 1)
    before, now = global_batches(run, state)
    if same_ranks(run, state):
        return checkpoint.rank_state(state, run.d.rank)
    check_global_batch(run, state)
    saved = [checkpoint.rank_state(state, r) for r in range(saved_world)]
    mine, deal = redeal.redeal(saved, run.d.rank, run.d.world_size,
                               run.cfg.per_rank_batch(run.d.world_size))
    change = (f"{saved_world} -> {run.d.world_size} ranks at epoch {state['epoch']} batch "
              f"{state.get('batch_in_epoch', 0)} (step {state['global_step']})"
              + (f", global batch {before} -> {now}" if before != now else ""))
    log.warning("resuming on another world size or global batch, %s: %s", change,
                deal.describe() if deal else "no per-rank state saved")
    if run.d.is_main:
        run.tracker.set_tags({"world_size": str(run.d.world_size), "resume.world_size": change,
                              "resume.perturbations": deal.describe() if deal else "none"})
    return mine


def same_ranks(run: Run, state: dict) -> bool:
    """Whether this run has the checkpoint's ranks, each with its own batch: the same world
    size and global batch. Then each rank's saved state is its own to continue."""
    before, now = global_batches(run, state)
    return state.get("world_size", 1) == run.d.world_size and before == now


def global_batches(run: Run, state: dict) -> tuple[int, int]:
    """The global batch the checkpoint's run trained with, and this run's."""
    data, saved_world = state["config"]["data"], state.get("world_size", 1)
    before = data.get("global_batch") or data["batch_size"] * saved_world
    return before, run.cfg.per_rank_batch(run.d.world_size) * run.d.world_size


def check_global_batch(run: Run, state: dict) -> None:
    """Mid-epoch, the remaining batches are the same images only if the global batch is the
    same (pipelines/sharding.py); at an epoch's end a changed one is the config's choice."""
    saved_world = state.get("world_size", 1)
    before, now = global_batches(run, state)
    if before == now:
        return
    if state.get("batch_in_epoch", 0):
        elsewhere = f" or resume on {saved_world} ranks" if saved_world != run.d.world_size else ""
        raise checkpoint.CheckpointError(
            f"this run stopped mid-epoch on {saved_world} ranks with a global batch of {before}; "
            f"on {run.d.world_size} ranks it would be {now}, and the epoch could not go on with "
            f"the same images. Set data.global_batch={before} (then any world size that divides "
            f"it resumes exactly){elsewhere}")
    log.warning("the global batch changes from %d (%d ranks) to %d (%d ranks) at an epoch's end: "
                "the lr scales with it, a step budget still counts the minibatches done; "
                "data.batch_size is per rank, set data.global_batch to keep the batch", before,
                saved_world, now, run.d.world_size)
