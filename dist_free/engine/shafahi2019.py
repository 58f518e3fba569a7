"""Shafahi et al.'s CIFAR network as their TensorFlow code builds it (`model.name:
shafahi2019_wrn32_10`).

The authors (github.com/ashafahi/free_adv_train, free_model.py) train Madry et al.'s TF ResNet
(MadryLab/cifar10_challenge, model.py), a WideResNet with 5 residual units per stage and widths
16 -> 160 -> 320 -> 640. What sets it apart from a torch WRN such as `wrn32_10`:

- the first layer standardises each image by its own mean and std on 0-255 pixels
  (tf.image.per_image_standardization); `build_model` puts a fixed x 255 in front, so the model
  takes [0, 1] images and eps stays in pixel units;
- leaky ReLU with slope 0.1 everywhere;
- a unit that changes width takes its shortcut by average pooling (kernel = stride, VALID) and
  zero channel padding, split evenly on both sides. The first unit of stage 1
  (`activate_before_residual`) shares its BatchNorm + leaky ReLU between the branch and the
  shortcut; every other unit's shortcut is its un-activated input;
- BatchNorm as tf.contrib.layers.batch_norm with decay 0.9 and its default eps 1e-3 (torch
  momentum 0.1; both average the Bessel-corrected batch variance into the running one);
- TF's padding="SAME": a stride-2 3x3 convolution on an even size pads one pixel after (bottom,
  right) and none before, where torch's padding=1 pads one on each side;
- convolution weights ~ N(0, 2 / (k * k * out_channels)), no conv biases; the FC weight
  uniform in +-sqrt(3 / in_features) (uniform_unit_scaling, factor 1), its bias zero; BatchNorm
  gamma 1, beta 0.

Their weight decay covers the "DW" variables only, conv and FC weights: `optim.wd_exempt: true`
exempts exactly the rest here (BatchNorm weights and biases, the FC bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LEAK = 0.1            # free_model.py's _relu(x, 0.1)
BN_EPS = 1e-3         # tf.contrib.layers.batch_norm's default epsilon
BN_MOMENTUM = 0.1     # its decay=.9: running = 0.9 running + 0.1 batch
PIXEL_SCALE = 255.0   # their placeholder holds 0-255 pixels


def per_image_standardization(x: torch.Tensor) -> torch.Tensor:
    """tf.image.per_image_standardization on a batch: each image minus its own mean, divided by
    max(its std, 1 / sqrt(N)), N = pixels x channels. The floor is in the input's units (TF
    applies it to 0-255 pixels) and keeps a constant image finite (it maps to zeros). The std
    is the population one, computed in two passes (TF's E[x^2] - E[x]^2 is the same number).
    The floor is applied to the variance, before the square root: max(sqrt(v), f) is
    sqrt(max(v, f^2)), and sqrt's backward at a constant image's v = 0 would be 0 / 0 (NaN in
    the input gradient, so in free training's perturbation); TF's relu on v zeroes it there."""
    floor = 1.0 / math.sqrt(math.prod(x.shape[1:]))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    variance = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / variance.clamp(min=floor * floor).sqrt()


class PerImageStandardization(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_image_standardization(x)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF's padding="SAME" along one axis: (before, after) so the output is ceil(size / stride);
    an odd total puts the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded as TF's "SAME", initialised as their `_conv`."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__(cin, cout, kernel, stride, padding=0, bias=False)
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (kernel * kernel * cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = (same_padding(n, k, s) for n, k, s in
                                        zip(x.shape[-2:], self.kernel_size, self.stride))
        if top == bottom and left == right:       # symmetric (every stride-1 conv here)
            return F.conv2d(x, self.weight, None, self.stride, (top, left))
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, None, self.stride)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAK)


class ResidualUnit(nn.Module):
    """free_model.py's `_residual`: BN, leaky ReLU, conv (stride), BN, leaky ReLU, conv, plus the
    shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.init_bn, self.conv1 = batch_norm(cin), SameConv2d(cin, cout, 3, stride)
        self.bn2, self.conv2 = batch_norm(cout), SameConv2d(cout, cout, 3, 1)
        self.stride, self.activate_before_residual = stride, activate_before_residual
        self.pad_channels = (cout - cin) // 2 if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = leaky_relu(self.init_bn(x))
        shortcut = activated if self.activate_before_residual else x
        out = self.conv2(leaky_relu(self.bn2(self.conv1(activated))))
        if self.pad_channels is not None:
            if self.stride > 1:
                shortcut = F.avg_pool2d(shortcut, self.stride, self.stride)
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad_channels, self.pad_channels))
        return out + shortcut


class ShafahiWideResNet(nn.Module):
    """Takes 0-255 pixels (NCHW), as their graph's placeholder does; returns logits."""

    # What a model card says of the net's first layer (dist_free.publish.card).
    input_standardization = ("per-image standardisation of 0-255 pixels inside the net "
                             "(tf.image.per_image_standardization: each image's own mean and "
                             "std, the std floored at 1/sqrt(pixels x channels))")

    def __init__(self, num_classes: int, units_per_stage: int = 5, widen: int = 10):
        super().__init__()
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.standardize = PerImageStandardization()
        self.init_conv = SameConv2d(3, widths[0], 3, 1)
        units = []
        for stage, stride in enumerate((1, 2, 2)):
            cin, cout = widths[stage], widths[stage + 1]
            units.append(ResidualUnit(cin, cout, stride, activate_before_residual=stage == 0))
            units += [ResidualUnit(cout, cout, 1, False) for _ in range(units_per_stage - 1)]
        self.units = nn.Sequential(*units)
        self.final_bn = batch_norm(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        limit = math.sqrt(3.0 / widths[-1])        # uniform_unit_scaling_initializer(1.0)
        nn.init.uniform_(self.fc.weight, -limit, limit)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.units(self.init_conv(self.standardize(x)))
        out = leaky_relu(self.final_bn(out)).mean(dim=(2, 3))
        return self.fc(out)


def wrn32_10(num_classes: int) -> ShafahiWideResNet:
    return ShafahiWideResNet(num_classes, units_per_stage=5, widen=10)


# The fixed Normalize in front of the net (build_model): x 255, so the net sees 0-255 pixels as
# their graph does, and the standardisation's 1 / sqrt(N) floor is in those units.
INPUT_MEAN = (0.0, 0.0, 0.0)
INPUT_STD = (1.0 / PIXEL_SCALE,) * 3
