"""`data.auto_augment` in the torchvision loader: torchvision.transforms.v2's RandAugment and
TrivialAugmentWide on the cropped, flipped uint8 image tensor.

TrivialAugment Wide is torchvision's own (31 magnitude bins). RandAugment takes timm's semantics
(augment_policy.py), which torchvision's `RandAugment(num_ops, magnitude)` lacks in part: it
applies every op at one magnitude. So `TimmRandAugment` runs torchvision's RandAugment one op at a
time, n times, each applied with probability p at its own magnitude bin (m, m + N(0, mstd) or
U(0, m), clipped to [0, 10]). torchvision has only the ops whose strength grows with m (timm's
inc1); inc0 is refused when the loader is built (factory.check_policy).

Every draw comes from torch's global RNG, which `ShardDataset` seeds per sample from its position
in the shard (folder.py): a seed repeats each image's ops as it repeats its crop.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

from .augment_policy import BINS_PER_UNIT, MAGNITUDE_BINS, MAX_MAGNITUDE, Policy, RandAugment

FILL = 128                  # as DALI's and timm's: the grey affine ops leave behind
INTERPOLATION = v2.InterpolationMode.BILINEAR   # DALI's warp_affine default (torchvision's is nearest)


def policy_transform(policy: Policy | None) -> torch.nn.Module | None:
    if policy is None:
        return None
    if not isinstance(policy, RandAugment):
        return v2.TrivialAugmentWide(interpolation=INTERPOLATION, fill=FILL)
    return TimmRandAugment(policy)


class TimmRandAugment(torch.nn.Module):
    """timm's RandAugment layers over torchvision's RandAugment suite (module docstring)."""

    def __init__(self, policy: RandAugment):
        super().__init__()
        self.policy = policy
        self.op = v2.RandAugment(num_ops=1, magnitude=policy.magnitude * BINS_PER_UNIT,
                                 num_magnitude_bins=MAGNITUDE_BINS, interpolation=INTERPOLATION,
                                 fill=FILL)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for _ in range(self.policy.num_ops):
            if self.policy.prob < 1 and float(torch.rand(())) > self.policy.prob:
                continue                            # timm: the layer's op is skipped
            self.op.magnitude = self.magnitude_bin()   # read by the op's forward
            image = self.op(image)
        return image

    def magnitude_bin(self) -> int:
        m, std = self.policy.magnitude, self.policy.magnitude_std
        if std == 0:
            return m * BINS_PER_UNIT
        drawn = float(torch.rand(())) * m if math.isinf(std) else m + std * float(torch.randn(()))
        # Half away from zero, as DALI's cast rounds (dali_augment.py).
        return int(min(max(drawn, 0.0), MAX_MAGNITUDE) * BINS_PER_UNIT + 0.5)
