"""Model registry. Every model takes images in [0, 1]; `Normalize` inside it does mean/std.

Keeping normalisation in the model means eps, attacks and the perturbation buffer all live in
pixel units, exactly as the paper states them.

- torchvision ImageNet models by name (resnet50 is the paper's): resnet18/34/50/101/152,
  wide_resnet50_2, ... any `torchvision.models.get_model` name.
- CIFAR-size nets: preact_resnet18, wrn32_10 (the paper's CIFAR WideResNet 32-10, = WRN-34-10),
  wrn28_10, wrn16_4.
- small_cnn: a few-layer CNN for the digits demo and tests.
- timm architectures as "timm/<name>" (ConvNeXt, ViT/DeiT, Swin, XCiT, ...), with their
  arguments (img_size, patch_size, drop_path_rate): see dist_free.timm_models.

`from_checkpoint(path)` rebuilds a trained model from a training checkpoint or from an export
(`python -m dist_free.export`), whose weights load without unpickling anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dist_free import timm_models
from dist_free.checkpoint import CheckpointError, load

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class NormalizedModel(nn.Sequential):
    """Normalize followed by the network: `model.net` is the bare network."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout:
            out = F.dropout(out, self.dropout, self.training)
        return self.conv2(out) + skip


class PreActResNet(nn.Module):
    """Pre-activation ResNet / WideResNet for 32x32 inputs: stages of PreActBlocks."""

    def __init__(self, widths: list[int], depths: list[int], num_classes: int, stem: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        blocks, cin = [], stem
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                blocks.append(PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wide_resnet(blocks: int, widen: int, num_classes: int) -> PreActResNet:
    """`blocks` residual blocks in each of 3 stages, widths 16/32/64 x widen."""
    n = blocks
    return PreActResNet([16 * widen, 32 * widen, 64 * widen], [n, n, n], num_classes)


def small_cnn(num_classes: int, width: int = 32) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


SMALL_MODELS = {
    "small_cnn": small_cnn,
    "preact_resnet18": lambda n: PreActResNet([64, 128, 256, 512], [2, 2, 2, 2], n, stem=64),
    # The paper's CIFAR "WRN-32-10" is Madry et al.'s net: 5 blocks per stage (6n + 2 = 32),
    # ~46 M parameters; the same net is also called WRN-34-10 (6n + 4).
    "wrn32_10": lambda n: wide_resnet(5, 10, n),
    "wrn34_10": lambda n: wide_resnet(5, 10, n),
    "wrn28_10": lambda n: wide_resnet(4, 10, n),
    "wrn16_4": lambda n: wide_resnet(2, 4, n),
}


def available_models() -> list[str]:
    return sorted(SMALL_MODELS) + sorted(torchvision.models.list_models(torchvision.models))


def build_model(name: str, num_classes: int, *, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                channels_last: bool = False, kwargs: dict | None = None) -> NormalizedModel:
    """Weights are initialised fresh (nothing is downloaded). `kwargs`: a timm architecture's
    arguments (only timm names take any)."""
    if timm_models.is_timm(name):
        net = timm_models.create_net(name, num_classes, kwargs)
    elif kwargs:
        raise ValueError(f"{name!r} takes no architecture arguments (got {kwargs})")
    elif name in SMALL_MODELS:
        net = SMALL_MODELS[name](num_classes)
    elif name in torchvision.models.list_models(torchvision.models):
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {available_models()}")
    model = NormalizedModel(net, mean, std)
    # NHWC lets cuDNN's tensor-core convolutions skip layout transposes under autocast.
    return model.to(memory_format=torch.channels_last) if channels_last else model


# ------------------------------------------------------------------ loading trained models

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
    state = _read_weights(weights)
    net_state = {k[len(EXPORT_PREFIX):]: v for k, v in state.items() if k.startswith(EXPORT_PREFIX)}
    model = _build(weights, name, num_classes, norm, kwargs)
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
