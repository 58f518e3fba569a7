"""The model card as data: what an export states about the model, its training and its
evaluation, read from the checkpoint (and an evaluation report) and checked on the way.

The same card is written as model_card.json, rendered as MODEL_CARD.md (publish/markdown.py) and
summarised as model_info.json (publish/model_info.py); publish/export.py writes the folder.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import torchvision

from dist_free import checkpoint, environment
from dist_free.config import SELECTION_FIGURES, Config, ConfigError, config_from_dict
from dist_free.engine import models, timm_models
from dist_free.engine.attacks import default_step_size
from dist_free.publish import load

WEIGHTS, TORCH_WEIGHTS = load.EXPORT_WEIGHTS
CARD_JSON, CARD_MD = load.CARD_FILE, "MODEL_CARD.md"


class ExportError(ValueError):
    pass


def float32_text(value: float) -> float:
    """The shortest decimal that is the same float32: the card's mean/std reproduce the
    checkpoint's buffers bit for bit, so the torchvision loader's logits are exact."""
    target = torch.tensor(value, dtype=torch.float32)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if torch.tensor(short, dtype=torch.float32) == target:
            return short
    return value


# ------------------------------------------------------------------ reading the inputs

def read_checkpoint(path: Path) -> tuple[dict, Config, torch.nn.Module]:
    """The checkpoint, its validated config, and its model (proving the weights fit)."""
    state = checkpoint.load(path)
    if not isinstance(state.get("config"), dict):
        raise ExportError(f"{path} has no 'config': not a training checkpoint")
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as e:
        raise ExportError(f"{path}: its saved config does not validate: {e}") from None
    if not isinstance(state["model"], dict) or "normalize.mean" not in state["model"]:
        raise ExportError(f"{path}: 'model' is not a normalised model's state_dict "
                          "(no normalize.mean)")
    return state, cfg, load.from_training_state(state, path)


def read_report(report: Path | dict, ckpt_sha: str) -> dict:
    """`python -m dist_free.evaluate`'s JSON, refused unless it measured this checkpoint."""
    name = "the report" if isinstance(report, dict) else str(report)
    if not isinstance(report, dict):
        try:
            report = json.loads(Path(report).read_text())
        except OSError as e:
            raise ExportError(f"cannot read report {name}: {e.strerror or e}") from None
        except ValueError as e:
            raise ExportError(f"report {name} is not JSON: {e}") from None
    missing = [k for k in ("checkpoint", "clean", "results", "images", "dtype")
               if k not in report]
    if missing or not isinstance(report["checkpoint"], dict) or \
            "sha256" not in report["checkpoint"]:
        raise ExportError(f"report {name} is not a dist_free.evaluate report "
                          f"(missing {missing or ['checkpoint.sha256']})")
    if report["checkpoint"]["sha256"] != ckpt_sha:
        raise ExportError(f"report {name} evaluated checkpoint sha256 "
                          f"{report['checkpoint']['sha256'][:16]}..., not this one "
                          f"({ckpt_sha[:16]}...): evaluate this checkpoint")
    for i, r in enumerate(report["results"]):
        need = ("attack", "eps", "robust_top1") + (("steps", "restarts") if r.get("attack") == "pgd" else ())
        if any(k not in r for k in need):
            raise ExportError(f"report {name}: results[{i}] lacks one of {list(need)}")
    return report


def training_commit(state: dict) -> dict:
    """The commit the checkpoint records; else this checkout's, labelled as the exporter's."""
    for key in ("git_commit", "commit"):
        if state.get(key) and state[key] != "unknown":
            return {"commit": state[key], "source": "checkpoint"}
    commit, _ = environment.git_commit()
    if commit == "unknown":
        return {"commit": None, "source": "unknown: the checkpoint records none, no git"}
    return {"commit": commit, "source": "the exporting checkout's git HEAD; the checkpoint "
                                        "records none, so the training commit may differ"}


# ------------------------------------------------------------------ the card as data

def is_torchvision(name: str) -> bool:
    return name not in models.SMALL_MODELS and \
        name in torchvision.models.list_models(torchvision.models)


def architecture_source(name: str) -> str:
    if timm_models.is_timm(name):
        return "timm"
    return "torchvision" if is_torchvision(name) else "dist_free"


def input_spec(cfg: Config, model: torch.nn.Module) -> tuple[dict, dict]:
    d = cfg.data
    spec = {"layout": "NCHW float32", "range": [0.0, 1.0], "channels": "RGB",
            "image_size": d.image_size, "val_resize": d.val_resize,
            "preprocessing": f"decode RGB, resize the shorter side to {d.val_resize} "
                             f"(antialiased bilinear), centre crop {d.image_size}x{d.image_size}, "
                             "scale to [0, 1]; do not normalise: the model does"}
    norm = {k: [float32_text(v) for v in getattr(model.normalize, k).flatten().tolist()]
            for k in ("mean", "std")}
    # A net that standardises its input itself says how (shafahi2019_wrn32_10: per image).
    then = getattr(model.net, "input_standardization", None)
    return spec, {**norm, "inside_model": True, **({"then": then} if then else {})}


def training_recipe(state: dict, cfg: Config) -> dict:
    o, world = cfg.optim, int(state.get("world_size") or 1)
    per_rank = cfg.per_rank_batch(world)
    global_batch = per_rank * world
    per_epoch = state.get("batches_per_epoch")    # None: saved before the trainer recorded it
    epoch = state["epoch"]
    done = state["global_step"] - state.get("batch_in_epoch", 0) \
        if state.get("global_step") is not None else epoch * (per_epoch or 0)
    return {"method": cfg.method.name, "replays": cfg.replays, "sgd_steps_budget": o.steps,
            "minibatches_budget": cfg.minibatches,
            "eps": cfg.method.eps if cfg.method.name != "natural" else None,
            # eps rose linearly from eps_warmup_start x eps over these epochs (trainer/schedule)
            "eps_warmup_epochs_natural": cfg.method.eps_warmup_epochs,
            "eps_warmup_start": cfg.method.eps_warmup_start,
            # The trainer's rules (Config.real_epochs, trainer/schedule.base_lr): the run's real
            # epochs, those done as they were and the rest of the budget in the checkpoint's
            # epochs (None: a step budget whose epoch length the checkpoint does not record);
            # optim.epochs only counts without a step budget; lr scales linearly with the batch.
            "epochs_natural": o.epochs if o.steps is None else None,
            "epochs_real": cfg.real_epochs(per_epoch, epoch=epoch, done=done),
            "batches_per_epoch": per_epoch,
            # the first real epoch of that length (> 0: a resume changed the global batch)
            "batches_per_epoch_since": state.get("length_since", 0),
            "epochs_completed_real": epoch,
            "epochs_completed_natural": epoch * cfg.replays,
            "global_step": state.get("global_step"), "world_size": world,
            "batch_per_rank": per_rank, "global_batch": global_batch,
            "lr": o.lr, "lr_batch": o.lr_batch, "peak_lr": o.lr * global_batch / o.lr_batch,
            "schedule": o.schedule, "gamma": o.gamma,   # milestones: the step schedule's only
            "milestones_natural": list(o.milestones) if o.schedule == "step" else None,
            "warmup_epochs_natural": o.warmup_epochs, "momentum": o.momentum,
            "weight_decay": o.weight_decay, "label_smoothing": o.label_smoothing,
            "amp": cfg.run.amp, "optimizer": o.name, "betas": list(o.betas),
            "warmup_start": o.warmup_start, "lr_floor": o.lr_floor,
            "clip_grad_norm": o.clip_grad_norm, "ema_decay": o.ema,
            "weights": load.weights_source(state),
            "config": json.loads(json.dumps(cfg.to_dict()))}


def in_training_eval(state: dict, cfg: Config) -> dict:
    """The checkpoint's own val evaluation: a training-time PGD figure, never a final one."""
    ev = state.get("eval")
    if not isinstance(ev, dict) or "pgd" not in ev:
        return {"source": "none", "final": False,
                "label": "no evaluation recorded in the checkpoint; run python -m "
                         "dist_free.evaluate and export again with --report"}
    steps, restarts = ev.get("pgd_steps", cfg.eval.steps), ev.get("pgd_restarts", cfg.eval.restarts)
    eps = ev.get("eps", cfg.eval_eps)
    return {"source": "in_training", "final": False,
            "label": f"PGD-{steps} in training, not AutoAttack; {selection_text(ev)}",
            "epoch": ev.get("epoch", state["epoch"]), "split": "val", "images": ev.get("samples"),
            "max_batches_per_rank": cfg.eval.max_batches, "dtype": f"run.amp={cfg.run.amp}",
            "clean": {"top1": ev.get("top1"), "top5": ev.get("top5")},
            "results": [{"attack": "pgd", "eps": eps, "steps": steps, "restarts": restarts,
                         "step_size": cfg.eval.step_size or default_step_size(eps, steps), "loss": "ce",
                         "robust_top1": ev["pgd"]}]}


def selection_text(ev: dict) -> str:
    """How best.pt was chosen, from the evaluation record itself: on which split (eval.holdout
    or not) and by which figure (eval.select_on; records from before it were all PGD)."""
    held = ev.get("holdout")
    figure = SELECTION_FIGURES.get(ev.get("selected_by", "robust"), "an unrecorded figure")
    if ev.get("selected_on") == "holdout" and isinstance(held, dict):
        return (f"best.pt keeps the epoch with the best {figure} on {held.get('samples')} "
                "held-out training images (never trained on); these val images took no part in "
                "the selection")
    if ev.get("selected_on") == "val":
        return (f"selected on the same val images (best.pt keeps the epoch with the best val "
                f"{figure}), so optimistic")
    return "the checkpoint does not record how it was selected"


def report_eval(report: dict, path: Path | None) -> dict:
    keep = ("split", "images", "subset", "dtype", "world_size", "seconds", "clean", "results",
            "gradient_masking")
    named = {"protocol": report["protocol"]} if report.get("protocol") else {}
    return {"source": "report", "final": True, "report": str(path) if path else None,
            "checkpoint_sha256": report["checkpoint"]["sha256"],
            **named, **{k: report.get(k) for k in keep}}


def threat_model(cfg: Config) -> dict:
    eps = None if cfg.method.name == "natural" else cfg.method.eps
    return {"norm": "linf", "eps": eps, "eps_x255": None if eps is None else eps * 255,
            "eval_eps": cfg.eval_eps, "eval_eps_x255": cfg.eval_eps * 255}


def build_card(src: Path, state: dict, cfg: Config, model, evaluation: dict, hashes: dict) -> dict:
    spec, norm = input_spec(cfg, model)
    return {
        "format": "dist-free model card", "format_version": 1,
        "architecture": cfg.model.name,
        "architecture_source": architecture_source(cfg.model.name),
        "architecture_kwargs": dict(cfg.model.kwargs),
        "num_classes": cfg.model.num_classes, "class_to_idx": state.get("class_to_idx"),
        "input": spec, "normalization": norm,
        "threat_model": threat_model(cfg),
        "training": training_recipe(state, cfg), "evaluation": evaluation,
        "provenance": {
            "checkpoint": {"path": str(src), "sha256": hashes["checkpoint"],
                           "epoch": state["epoch"], "global_step": state.get("global_step")},
            "training_commit": training_commit(state),
            "mlflow_run_id": state.get("mlflow_run_id"),
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}},
        "weights": {"keys": "the net's state_dict under '1.': nn.Sequential(Normalize(mean, std), "
                            "net)",
                    "source": load.weights_source(state),
                    WEIGHTS: {"sha256": hashes[WEIGHTS]},
                    TORCH_WEIGHTS: {"sha256": hashes[TORCH_WEIGHTS]}},
    }
