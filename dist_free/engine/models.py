"""Model registry. Every model takes images in [0, 1]; `Normalize` inside it does mean/std.

Keeping normalisation in the model means eps, attacks and the perturbation buffer all live in
pixel units, exactly as the paper states them.

- torchvision ImageNet models by name (resnet50 is the paper's): resnet18/34/50/101/152,
  wide_resnet50_2, ... any `torchvision.models.get_model` name.
- CIFAR-size nets: preact_resnet18, wrn32_10 (a pre-activation WideResNet 32-10, = WRN-34-10),
  wrn28_10, wrn16_4; shafahi2019_wrn32_10, the paper's CIFAR network exactly as the authors'
  TensorFlow code builds it (per-image standardisation inside: see dist_free.engine.shafahi2019).
- small_cnn: a few-layer CNN for the digits demo and tests.
- timm architectures as "timm/<name>" (ConvNeXt, ViT/DeiT, Swin, XCiT, ...), with their
  arguments (img_size, patch_size, drop_path_rate): see dist_free.engine.timm_models.

`from_checkpoint(path)` rebuilds a trained model from a training checkpoint or from an export
(`python -m dist_free.export`), whose weights load without unpickling anything.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from dist_free.engine import shafahi2019, timm_models

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
    # ~46 M parameters; the same net is also called WRN-34-10 (6n + 4). wrn32_10 has its depth
    # and widths as a pre-activation torch WRN; shafahi2019_wrn32_10 is the net itself.
    "wrn32_10": lambda n: wide_resnet(5, 10, n),
    "wrn34_10": lambda n: wide_resnet(5, 10, n),
    "wrn28_10": lambda n: wide_resnet(4, 10, n),
    "wrn16_4": lambda n: wide_resnet(2, 4, n),
    "shafahi2019_wrn32_10": shafahi2019.wrn32_10,
}
# The fixed Normalize in front of a net, where it is not ImageNet's mean/std: Shafahi et al.'s net
# standardises each image itself and takes 0-255 pixels, so its Normalize only scales by 255.
INPUT_NORMALIZATION = {
    "shafahi2019_wrn32_10": (shafahi2019.INPUT_MEAN, shafahi2019.INPUT_STD),
}


def available_models() -> list[str]:
    return sorted(SMALL_MODELS) + sorted(torchvision.models.list_models(torchvision.models))


def build_model(name: str, num_classes: int, *, mean=None, std=None,
                channels_last: bool = False, kwargs: dict | None = None) -> NormalizedModel:
    """Weights are initialised fresh (nothing is downloaded). `mean`/`std`: the Normalize in
    front (default: the architecture's, ImageNet's for most). `kwargs`: a timm architecture's
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
    default_mean, default_std = INPUT_NORMALIZATION.get(name, (IMAGENET_MEAN, IMAGENET_STD))
    model = NormalizedModel(net, default_mean if mean is None else mean,
                            default_std if std is None else std)
    # NHWC lets cuDNN's tensor-core convolutions skip layout transposes under autocast.
    return model.to(memory_format=torch.channels_last) if channels_last else model
