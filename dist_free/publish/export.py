"""A training checkpoint exported as weights plus a model card: nothing in it needs unpickling.

`export_checkpoint(checkpoint, out, report=None, force=False)` is what the trainer calls at the
end of a run and what `python -m dist_free.export` (dist_free/export.py) runs. OUT receives:
    model.safetensors  the net's weights under "1." (see below), safetensors format
    model.pt           the same state_dict via torch.save; torch.load(..., weights_only=True)
    model_card.json    architecture, classes, input spec, mean/std, eps, recipe, accuracy with
                       its protocol, provenance (checkpoint sha256, commit), the files' sha256
    MODEL_CARD.md      the same for people, with the loader to paste
    model_info.json    the figures in RobustBench's model-info layout (dist_free.publish.model_info)

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

import hashlib
import io
import json
import secrets
import shutil
from pathlib import Path

import torch

from dist_free import atomic, checkpoint
from dist_free.publish import load, model_info
from dist_free.publish.card import (
    CARD_JSON,
    CARD_MD,
    TORCH_WEIGHTS,
    WEIGHTS,
    ExportError,
    build_card,
    in_training_eval,
    read_checkpoint,
    read_report,
    report_eval,
)
from dist_free.publish.markdown import render_markdown

EXPORT_FILES = (WEIGHTS, TORCH_WEIGHTS, CARD_JSON, CARD_MD, model_info.FILE)

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
    files = weight_files(load.export_state_dict(model.state_dict()),   # the EMA's, if kept
                         {"architecture": cfg.model.name, "num_classes": str(cfg.model.num_classes)})
    hashes.update({n: hashlib.sha256(files[n]).hexdigest() for n in (WEIGHTS, TORCH_WEIGHTS)})
    card = build_card(src, state, cfg, model, ev, hashes)
    files[CARD_JSON] = (json.dumps(card, indent=2) + "\n").encode()
    files[CARD_MD] = render_markdown(card).encode()
    files[model_info.FILE] = (json.dumps(model_info.robustbench_info(card), indent=2) + "\n").encode()
    return write_folder(out, files, force)
