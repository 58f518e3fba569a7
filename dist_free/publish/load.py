"""Reading a training checkpoint or an export back into a model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from dist_free.checkpoint import CheckpointError, load
from dist_free.engine import timm_models
from dist_free.engine.models import NormalizedModel, build_model

# An export (dist_free.export) keeps only the net's weights, under "1.": they then load into
# nn.Sequential(torchvision.transforms.Normalize(mean, std), net), whose Normalize holds no
# state, so torch and torchvision alone can rebuild the model. mean/std live in the card.
EXPORT_PREFIX = "1."
CARD_FILE = "model_card.json"
EXPORT_WEIGHTS = ("model.safetensors", "model.pt")


def export_state_dict(model_state: dict) -> dict[str, torch.Tensor]:
    """A NormalizedModel's state_dict as an export holds it: net weights under "1.", on CPU,
    contiguous (safetensors refuses strided views such as channels_last weights)."""
    missing = {"normalize.mean", "normalize.std"} - set(model_state)
    if missing:
        raise KeyError(f"not a normalised model's state_dict (missing {sorted(missing)})")
    return {EXPORT_PREFIX + k[len("net."):]: v.detach().cpu().contiguous()
            for k, v in model_state.items() if k.startswith("net.")}


def from_checkpoint(path, map_location="cpu") -> NormalizedModel:
    """The trained model in eval mode, normalisation inside, from a training checkpoint (.pt
    with "model" and "config") or an export: its folder, model.safetensors or model.pt."""
    path = Path(path)
    if path.name == CARD_FILE:
        path = path.parent
    if path.is_dir():
        weights = [path / n for n in EXPORT_WEIGHTS if (path / n).is_file()]
        if not weights:
            raise CheckpointError(f"{path}: a folder without {' or '.join(EXPORT_WEIGHTS)}; "
                                  "not a dist-free export")
        model = _from_export(weights[0])
    elif (path.parent / CARD_FILE).is_file() and path.is_file():
        model = _from_export(path)
    else:
        model = from_training_state(load(path), path)
    return model.to(map_location).eval()


def from_training_state(state: dict, path) -> NormalizedModel:
    """The model a loaded training checkpoint describes, its weights (and mean/std) in place."""
    model_cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
    model_cfg = model_cfg.get("model") if isinstance(model_cfg.get("model"), dict) else {}
    if "name" not in model_cfg or "num_classes" not in model_cfg:
        raise CheckpointError(f"{path} has no config.model.name/num_classes: not a training "
                              "checkpoint")
    model = _build(path, model_cfg["name"], model_cfg["num_classes"], {},
                   model_cfg.get("kwargs") or {})
    _fit(path, model, eval_weights(state), model_cfg["name"], model_cfg["num_classes"])
    return model


def eval_weights(state: dict) -> dict:
    """The weights a checkpoint is evaluated and exported with: the EMA's when the run kept one
    (optim.ema), else the trained model's."""
    return state["ema"]["model"] if weights_source(state) == "ema" else state["model"]


def weights_source(state: dict) -> str:
    """Which weights `eval_weights` picks: "ema" or "model"."""
    ema = state.get("ema")
    return "ema" if isinstance(ema, dict) and isinstance(ema.get("model"), dict) else "model"


def _from_export(weights) -> NormalizedModel:
    """An export's weights plus the model_card.json beside them (architecture, mean/std)."""
    card_path = weights.parent / CARD_FILE
    try:
        card = json.loads(card_path.read_text())
        name, num_classes = card["architecture"], card["num_classes"]
        norm = {k: tuple(card["normalization"][k]) for k in ("mean", "std")}
        kwargs = dict(card.get("architecture_kwargs") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{card_path}: not a readable dist-free model card "
                              f"({type(e).__name__}: {e})") from None
    # Built first: the card's architecture and arguments are checked (timm_models refuses one
    # that would read weights) before any weights are read.
    model = _build(weights, name, num_classes, norm, kwargs)
    state = _read_weights(weights)
    net_state = {k[len(EXPORT_PREFIX):]: v for k, v in state.items() if k.startswith(EXPORT_PREFIX)}
    _fit(weights, model.net, net_state, name, num_classes)
    return model


def _read_weights(path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch.save'd plain state_dict read with weights_only=True."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for foreign files
        raise CheckpointError(f"cannot read weights {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def _build(path, name: str, num_classes: int, norm: dict, kwargs: dict | None = None
           ) -> NormalizedModel:
    try:
        return build_model(name, num_classes, **norm, kwargs=kwargs)
    except ValueError as e:
        if timm_models.is_timm(name):
            raise CheckpointError(f"{path}: cannot build architecture {name!r}: {e}") from None
        raise CheckpointError(f"{path}: unknown architecture {name!r} (the names "
                              "dist_free.models.available_models() lists)") from None


def _fit(path, module: nn.Module, state: dict, name: str, num_classes: int) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:   # wrong keys/shapes, or not a dict
        detail = " ".join(str(e).split())[:300]   # torch's message spans many lines
        raise CheckpointError(f"{path}: the weights do not fit {name} with {num_classes} "
                              f"classes: {detail}") from None
