"""`data.auto_augment` in the DALI graph: RandAugment and TrivialAugment Wide from DALI's own
`nvidia.dali.auto_aug`, on the decoded, cropped uint8 HWC images, on the GPU or the CPU.

TrivialAugment Wide is DALI's `trivial_augment_wide` as it stands (torchvision's suite and
ranges: 31 magnitude bins, translations up to 32 pixels).

RandAugment follows timm's semantics (augment_policy.py), which DALI's `rand_augment` does not
have in full: it applies every chosen op at one fixed magnitude. So each of the n layers is
built here from DALI's public parts: an op drawn from DALI's RandAugment suite
(`get_rand_augment_suite` for inc1, `get_rand_augment_non_monotonic_suite` for inc0; translations
up to 0.45 of the image as timm's) with probability p (else none), at a per-image magnitude bin
of m (+ Gaussian noise of std mstd, or uniform in [0, m]) clipped to [0, 10] as timm clips it,
signed at random for the ops that take a sign (`signed_bin`), and dispatched with `select`, whose
conditionals need `enable_conditionals=True` on the pipeline.

All draws come from DALI's random operators, seeded by the pipeline's seed: a seed repeats them.
"""

from __future__ import annotations

import math

import nvidia.dali.math as dmath
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import augmentations, rand_augment, trivial_augment
from nvidia.dali.auto_aug.core import select, signed_bin

from .augment_policy import BINS_PER_UNIT, MAGNITUDE_BINS, MAX_MAGNITUDE, Policy, RandAugment

FILL = 128                  # timm's fill for pixels an affine op uncovers (DALI's default too)
TRANSLATE_REL = 0.45        # timm's translate_pct: the largest shift, as a fraction of the side


def apply_policy(images, policy: Policy | None, image_size: int):
    """The policy applied to a batch of uint8 HWC images of image_size x image_size (unchanged
    when there is none)."""
    if policy is None:
        return images
    if not isinstance(policy, RandAugment):
        return trivial_augment.trivial_augment_wide(images, fill_value=FILL)
    suite = (rand_augment.get_rand_augment_suite if policy.increasing else
             rand_augment.get_rand_augment_non_monotonic_suite)(
        use_shape=True, max_translate_rel=TRANSLATE_REL)
    for _ in range(policy.num_ops):
        images = rand_augment_layer(images, suite, policy, (image_size, image_size))
    return images


def rand_augment_layer(images, suite, policy: RandAugment, shape):
    """One of timm's RandAugment layers: with probability p an op drawn uniformly from `suite`,
    else none. The skip is one more outcome of the op draw (an identity after the suite, of
    weight 1 - p), not a conditional around the draw: nesting `select`'s conditionals inside
    another made the graph take seconds longer to define (DALI's AutoGraph)."""
    ops = [*suite, augmentations.identity]
    weights = [policy.prob / len(suite)] * len(suite) + [1.0 - policy.prob]
    op = fn.random.choice(len(ops), p=weights)
    return select(ops, op, images, magnitude_bin=signed_bin(magnitude_bin(policy)),
                  num_magnitude_bins=MAGNITUDE_BINS, shape=shape, fill_value=FILL)


def magnitude_bin(policy: RandAugment):
    """Each image's magnitude bin (an int without noise, else a batch of them): m, m + N(0, mstd)
    or U(0, m), clipped to [0, 10], on the grid of MAGNITUDE_BINS (DALI's cast rounds)."""
    m = policy.magnitude * BINS_PER_UNIT
    if policy.magnitude_std == 0:
        return m
    if math.isinf(policy.magnitude_std):
        drawn = fn.random.uniform(range=[0.0, float(m)])
    else:
        drawn = fn.random.normal(mean=float(m), stddev=policy.magnitude_std * BINS_PER_UNIT)
    top = float(MAX_MAGNITUDE * BINS_PER_UNIT)
    return fn.cast(dmath.clamp(drawn, 0.0, top), dtype=types.INT32)
