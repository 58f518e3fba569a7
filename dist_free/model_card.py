"""A training checkpoint exported as weights plus a model card: nothing in it needs unpickling.

`export_checkpoint(checkpoint, out, report=None, force=False)` is what the trainer calls at the
end of a run and what `python -m dist_free.export` (dist_free/export.py) runs. OUT receives:
    model.safetensors  the net's weights under "1." (see below), safetensors format
    model.pt           the same state_dict via torch.save; torch.load(..., weights_only=True)
    model_card.json    architecture, classes, input spec, mean/std, eps, recipe, accuracy with
                       its protocol, provenance (checkpoint sha256, commit), the files' sha256
    MODEL_CARD.md      the same for people, with the loader to paste
    model_info.json    the figures in RobustBench's model-info layout (dist_free.model_info)

The weights are the EMA's when the run kept one (optim.ema), else the trained model's.

The keys fit nn.Sequential(torchvision.transforms.Normalize(mean, std), net): that Normalize
holds no state, so a torchvision architecture loads with torch and torchvision alone (a timm one
with timm.create_model), and the model still takes [0, 1] pixels, so eps and attacks stay in
pixel units. The project's own architectures load with dist_free.models.from_checkpoint(OUT).

Robust accuracy comes from `--report` (the JSON `python -m dist_free.evaluate` writes, which
must name this checkpoint's sha256); without it the card shows the checkpoint's in-training PGD
evaluation, labelled as such. OUT is filled in a temporary folder and renamed into place.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import secrets
import shutil
from pathlib import Path

import torch
import torchvision

from dist_free import atomic, checkpoint, environment, masking, model_info, models, timm_models
from dist_free.config import Config, ConfigError, config_from_dict
from dist_free.report import eps_text, pct, protocol

WEIGHTS, TORCH_WEIGHTS = models.EXPORT_WEIGHTS
CARD_JSON, CARD_MD = models.CARD_FILE, "MODEL_CARD.md"
EXPORT_FILES = (WEIGHTS, TORCH_WEIGHTS, CARD_JSON, CARD_MD, model_info.FILE)
REPO = Path(__file__).resolve().parents[1]


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
    return state, cfg, models.from_training_state(state, path)


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
    return spec, {**norm, "inside_model": True}


def training_recipe(state: dict, cfg: Config) -> dict:
    o, world = cfg.optim, int(state.get("world_size") or 1)
    per_rank = cfg.per_rank_batch(world)
    global_batch = per_rank * world
    return {"method": cfg.method.name, "replays": cfg.replays, "sgd_steps_budget": o.steps,
            "eps": cfg.method.eps if cfg.method.name != "natural" else None,
            # The trainer's rules (config.py's module docstring, lr_schedule.base_lr): free runs
            # ceil(natural epochs / replays) real epochs; lr scales linearly with the batch.
            "epochs_natural": o.epochs, "epochs_real": math.ceil(o.epochs / cfg.replays),
            "epochs_completed_real": state["epoch"],
            "epochs_completed_natural": state["epoch"] * cfg.replays,
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
            "weights": models.weights_source(state),
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
                         "step_size": cfg.eval.step_size or 2.5 * eps / steps, "loss": "ce",
                         "robust_top1": ev["pgd"]}]}


def selection_text(ev: dict) -> str:
    """How best.pt was chosen, from the evaluation record itself (eval.holdout or not)."""
    held = ev.get("holdout")
    if ev.get("selected_on") == "holdout" and isinstance(held, dict):
        return (f"best.pt keeps the epoch with the best PGD accuracy on {held.get('samples')} "
                "held-out training images (never trained on); these val images took no part in "
                "the selection")
    if ev.get("selected_on") == "val":
        return ("selected on the same val images (best.pt keeps the epoch with the best val "
                "PGD accuracy), so optimistic")
    return "the checkpoint does not record how it was selected"


def report_eval(report: dict, path: Path | None) -> dict:
    keep = ("split", "images", "subset", "dtype", "world_size", "seconds", "clean", "results",
            "gradient_masking")
    return {"source": "report", "final": True, "report": str(path) if path else None,
            "checkpoint_sha256": report["checkpoint"]["sha256"],
            **{k: report.get(k) for k in keep}}


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
                    "source": models.weights_source(state),
                    WEIGHTS: {"sha256": hashes[WEIGHTS]},
                    TORCH_WEIGHTS: {"sha256": hashes[TORCH_WEIGHTS]}},
    }


# ------------------------------------------------------------------ the card for people

def loader_lines(card: dict) -> list[str]:
    """The loader to paste: torchvision architectures need only torch and torchvision, timm ones
    timm as well."""
    name, n, source = card["architecture"], card["num_classes"], card["architecture_source"]
    if source not in ("torchvision", "timm"):
        return ["from dist_free.models import from_checkpoint",
                'model = from_checkpoint(".")  # this folder; eval mode, normalisation inside']
    mean, std = (tuple(card["normalization"][k]) for k in ("mean", "std"))
    normalize = f"torchvision.transforms.Normalize({mean}, {std})"
    if source == "timm":
        args = "".join(f", {k}={v!r}" for k, v in (card.get("architecture_kwargs") or {}).items())
        net = f"timm.create_model({timm_models.arch(name)!r}, num_classes={n}{args})"
        imports = "import timm, torch, torchvision"
    else:
        net, imports = f"torchvision.models.{name}(num_classes={n})", "import torch, torchvision"
    return [imports, f"model = torch.nn.Sequential({normalize}, {net})",
            'model.load_state_dict(torch.load("model.pt", weights_only=True)); model.eval()']


def load_md(card: dict) -> list[str]:
    source = card["architecture_source"]
    if source not in ("torchvision", "timm"):
        return ["With dist_free installed, in this folder:", "",
                "```python", *loader_lines(card), "```"]
    only = "timm (with torch and torchvision)" if source == "timm" else "torch and torchvision"
    return [f"With {only} only, in this folder:", "",
            "```python", *loader_lines(card), "```", "",
            ("`model.safetensors` holds the same state_dict "
             "(`safetensors.torch.load_file`); `dist_free.models.from_checkpoint(\".\")` "
             "builds the same model.")]


def card_protocol(r: dict) -> str:
    """report.protocol, with the PGD step size in pixel units and x 255."""
    return protocol(r, step=eps_text(r["step_size"]) if r.get("step_size") else None)


def evaluation_md(ev: dict) -> list[str]:
    if ev["source"] == "none":
        return [f"**{ev['label']}.**"]
    if ev["source"] == "in_training":
        cap = ev["max_batches_per_rank"]
        cap = f"at most {cap} batches per rank" if cap else "the whole val split"
        where = (f"**In-training evaluation, not a final number: {ev['label']}.** Measured at "
                 f"epoch {ev['epoch']} on {ev['images']} val images ({cap}), {ev['dtype']}. "
                 "For final numbers run `python -m dist_free.evaluate` and export with "
                 "`--report`.")
    else:
        where = (f"From `{ev['report'] or 'a report'}` (python -m dist_free.evaluate): "
                 f"{ev['images']} {ev['split']} images ({subset_text(ev['subset'])}), "
                 f"{ev['dtype']}, {ev['world_size']} rank(s), checkpoint sha256 "
                 f"`{ev['checkpoint_sha256']}`.")
    clean = ev["clean"]
    lines = [where, "", f"Clean: top-1 {pct(clean.get('top1'))}, top-5 {pct(clean.get('top5'))}.",
             "", "| attack | protocol | eps | robust top-1 |", "|---|---|---|---|"]
    lines += [f"| {r['attack']} | {card_protocol(r)} | {eps_text(r['eps'])} | {pct(r['robust_top1'])} |"
              for r in ev["results"]]
    return lines + gradient_masking_md(ev.get("gradient_masking"))


def subset_text(subset: dict | None) -> str:
    if not subset:
        return "the whole split"
    return (f"subset of {subset.get('n')}: {subset.get('selection')}, file list sha256 "
            f"`{subset.get('files_sha256')}`")


def gradient_masking_md(gm: dict | None) -> list[str]:
    if gm and "checks" not in gm:     # a report written before dist_free.masking
        return legacy_masking_md(gm)
    lines = masking.summary(gm)
    if not lines:
        return []
    head = f"**Warning: {lines[0]}.**" if gm["flagged"] else f"Gradient masking: {lines[0]}."
    return ["", head, *(f"- {line}" for line in lines[1:])]


def legacy_masking_md(gm: dict) -> list[str]:
    gap = (f"PGD minus AutoAttack = {pct(gm['pgd_minus_autoattack'])} "
           f"(threshold {pct(gm['threshold'])})")
    if gm.get("flagged"):
        return ["", f"**Warning: {gap}: possible gradient masking.**"]
    return ["", f"{gap}: no sign of gradient masking."]


def schedule_text(t: dict) -> str:
    """The lr schedule as it ran: milestones only for the step schedule."""
    warm = t["warmup_epochs_natural"]
    if t["schedule"] == "step":
        unit = "SGD steps" if t.get("sgd_steps_budget") else "natural epochs"
        return (f"step schedule: x {t['gamma']} at {unit} {t['milestones_natural']}"
                + (f", after {warm} warm-up epochs" if warm else ""))
    if t["schedule"] == "warmup_cosine":
        return (f"linear warm-up over {warm} natural epochs from "
                f"{t.get('warmup_start', 0.0):g} x peak, then cosine to "
                f"{t.get('lr_floor', 0.0):g} x peak")
    return "cosine to 0" + (f" after {warm} warm-up epochs" if warm else "")


def optimizer_text(t: dict) -> str:
    name = t.get("optimizer", "sgd")
    extra = f"betas {tuple(t['betas'])}" if name == "adamw" else f"momentum {t['momentum']}"
    clip = t.get("clip_grad_norm")
    return (f"{name}: lr {t['lr']} per {t['lr_batch']} images -> peak {t['peak_lr']:.4g} at "
            f"global batch {t['global_batch']} ({t['world_size']} x {t['batch_per_rank']}); "
            f"{schedule_text(t)}; {extra}, weight decay {t['weight_decay']}, label smoothing "
            f"{t['label_smoothing']}" + (f", gradient norm clipped at {clip}" if clip else ""))


def training_md(t: dict) -> list[str]:
    eps = "none (natural training)" if t["eps"] is None else eps_text(t["eps"])
    epochs = (f"{t['epochs_natural']} natural-training epochs = {t['epochs_real']} real epochs; "
              f"this checkpoint: {t['epochs_completed_real']} real "
              f"({t['epochs_completed_natural']} natural), step {t['global_step']}")
    if t.get("sgd_steps_budget"):    # optim.steps: milestones are SGD steps too
        epochs = (f"{t['sgd_steps_budget']} SGD steps counting every replay; this checkpoint: "
                  f"{t['global_step']} minibatches x {t['replays']} = "
                  f"{(t['global_step'] or 0) * t['replays']} SGD steps, "
                  f"{t['epochs_completed_real']} epochs")
    weights = (f"the EMA of the weights (decay {t['ema_decay']} per optimizer step)"
               if t.get("weights") == "ema" else "the trained weights (no EMA)")
    return [f"- method: {t['method']}, replays m = {t['replays']}, training eps {eps} (L-inf)",
            f"- epochs: {epochs}", f"- optimizer: {optimizer_text(t)}",
            f"- exported weights: {weights}",
            "- the resolved config: `training.config` in model_card.json"]


def classes_md(class_to_idx: dict | None) -> list[str]:
    if not class_to_idx:
        return ["not recorded in the checkpoint"]
    if len(class_to_idx) > 20:
        return [f"{len(class_to_idx)} classes: `class_to_idx` in model_card.json"]
    return [", ".join(f"{i}: {c}" for c, i in sorted(class_to_idx.items(), key=lambda x: x[1]))]


def input_md(card: dict) -> list[str]:
    spec, norm = card["input"], card["normalization"]
    return [(f"RGB, NCHW float in [0, 1], {spec['image_size']} x {spec['image_size']}: "
             f"{spec['preprocessing']}. Normalisation (mean {norm['mean']}, std {norm['std']}) "
             "is the model's first module, so attacks and eps work on pixels.")]


def provenance_md(card: dict) -> list[str]:
    prov = card["provenance"]
    ckpt, commit = prov["checkpoint"], prov["training_commit"]
    return [f"- checkpoint `{ckpt['path']}`, sha256 `{ckpt['sha256']}`, epoch {ckpt['epoch']}",
            f"- commit {commit['commit']}: {commit['source']}",
            f"- MLflow run {prov['mlflow_run_id'] or 'not recorded'}; exported "
            f"{prov['exported_at']}",
            *[f"- `{n}` sha256 `{card['weights'][n]['sha256']}`" for n in (WEIGHTS, TORCH_WEIGHTS)]]


def render_markdown(card: dict) -> str:
    eps = card["threat_model"]["eps"]
    threat = "natural training (no eps)" if eps is None else f"L-inf eps {eps_text(eps)}"
    sections = [("Load", load_md(card)), ("Input", input_md(card)),
                ("Robustness", evaluation_md(card["evaluation"])),
                ("Training", training_md(card["training"])),
                ("Classes", classes_md(card["class_to_idx"])), ("Provenance", provenance_md(card))]
    lines = [f"# {card['architecture']}, {card['training']['method']} training (dist-free)", "",
             f"{card['num_classes']} classes; trained against {threat}, in pixel units of [0, 1]."]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ writing the folder

def weight_files(weights: dict, metadata: dict) -> dict[str, bytes]:
    from safetensors.torch import save
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return {WEIGHTS: save(weights, metadata=metadata), TORCH_WEIGHTS: buffer.getvalue()}


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise ExportError(f"{out} exists and is not empty; choose a new folder, or --force to "
                          "replace an earlier export")
    foreign = [e for e in entries if e not in EXPORT_FILES]
    if foreign:   # --force replaces an export, never a folder of someone's other files
        raise ExportError(f"{out} holds files an export does not write ({foreign[:3]}); "
                          "--force replaces only an earlier export")


def write_folder(out: Path, files: dict[str, bytes], force: bool) -> list[Path]:
    """Fill a temporary sibling folder, fsync, rename it to OUT: no half export under OUT."""
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its folder is private (0700), and rename would carry that mode into OUT.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    tmp.mkdir()
    old = tmp.with_suffix(".old")
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
            atomic.fsync_path(tmp / name)
        if out.is_dir() and any(out.iterdir()):
            out.rename(old)       # forced: the earlier export steps aside, then goes
        tmp.rename(out)           # rename replaces an empty folder
        atomic.fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return [out / name for name in files]


def export_checkpoint(checkpoint_path, out_dir, report: Path | dict | None = None,
                      force: bool = False) -> list[Path]:
    """Write the export of `checkpoint_path` to `out_dir`; returns the files written.

    Raises ExportError or checkpoint.CheckpointError, each naming the cause."""
    src, out = Path(checkpoint_path), Path(out_dir)
    check_target(out, force)               # fail before the (slow) reads
    state, cfg, model = read_checkpoint(src)
    hashes = {"checkpoint": checkpoint.sha256(src)}
    if report is not None:
        ev = report_eval(read_report(report, hashes["checkpoint"]),
                         None if isinstance(report, dict) else Path(report))
    else:
        ev = in_training_eval(state, cfg)
    files = weight_files(models.export_state_dict(model.state_dict()),   # the EMA's, if kept
                         {"architecture": cfg.model.name, "num_classes": str(cfg.model.num_classes)})
    hashes.update({n: hashlib.sha256(files[n]).hexdigest() for n in (WEIGHTS, TORCH_WEIGHTS)})
    card = build_card(src, state, cfg, model, ev, hashes)
    files[CARD_JSON] = (json.dumps(card, indent=2) + "\n").encode()
    files[CARD_MD] = render_markdown(card).encode()
    files[model_info.FILE] = (json.dumps(model_info.robustbench_info(card), indent=2) + "\n").encode()
    return write_folder(out, files, force)
