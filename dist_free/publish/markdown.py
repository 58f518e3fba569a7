"""The model card for people: MODEL_CARD.md, rendered from the card's data."""

from __future__ import annotations

from dist_free.engine import timm_models
from dist_free.evaluation import masking
from dist_free.evaluation.report import eps_text, pct, protocol
from dist_free.publish.card import TORCH_WEIGHTS, WEIGHTS


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
        named = f", protocol `{ev['protocol']}`" if ev.get("protocol") else ""
        where = (f"From `{ev['report'] or 'a report'}` (python -m dist_free.evaluate{named}): "
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
    if gm and "checks" not in gm:     # a report written before dist_free.evaluation.masking
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


def step_budget_text(t: dict) -> str:
    """optim.steps as it ran: SGD steps, minibatches and real epochs (milestones are steps too)."""
    since = t.get("batches_per_epoch_since") or 0
    if t["epochs_real"] is None:
        length = "real epochs not recorded in the checkpoint"
    elif since:
        length = (f"{t['epochs_real']} real epochs: {since} of another length (a resume changed "
                  f"the global batch), then up to {t['batches_per_epoch']} minibatches each")
    else:
        length = f"{t['epochs_real']} real epochs of up to {t['batches_per_epoch']} minibatches"
    return (f"{t['sgd_steps_budget']} SGD steps counting every replay = "
            f"{t['minibatches_budget']} minibatches x {t['replays']}, {length}; this checkpoint: "
            f"{t['global_step']} minibatches x {t['replays']} = "
            f"{(t['global_step'] or 0) * t['replays']} SGD steps, "
            f"{t['epochs_completed_real']} epochs")


def training_md(t: dict) -> list[str]:
    eps = "none (natural training)" if t["eps"] is None else eps_text(t["eps"])
    epochs = (f"{t['epochs_natural']} natural-training epochs = {t['epochs_real']} real epochs; "
              f"this checkpoint: {t['epochs_completed_real']} real "
              f"({t['epochs_completed_natural']} natural), step {t['global_step']}")
    if t.get("sgd_steps_budget"):
        epochs = step_budget_text(t)
    weights = (f"the EMA of the weights (decay {t['ema_decay']} per optimizer step)"
               if t.get("weights") == "ema" else "the trained weights (no EMA)")
    if t.get("eps_warmup_epochs_natural"):
        eps += (f", warmed up linearly from {t['eps_warmup_start']:g} x eps over "
                f"{t['eps_warmup_epochs_natural']:g} natural-training epochs")
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
             f"{spec['preprocessing']}. Normalisation (mean {norm['mean']}, std {norm['std']}"
             f"{', then ' + norm['then'] if norm.get('then') else ''}) is the model's first "
             "module, so attacks and eps work on pixels.")]


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
