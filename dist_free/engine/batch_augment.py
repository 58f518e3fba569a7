"""Mixup, cutmix and random erasing on the device batch, once per minibatch, before the method's
step: tensors in, tensors out, no loop over samples and no read back from the device.

Semantics are timm 1.0's (`timm.data.mixup.Mixup` in "batch" mode, `RandomErasing`):
- a minibatch is mixed with probability `prob`; with both alphas set, it is cutmix with
  probability `switch_prob`, else mixup; lam ~ Beta(alpha, alpha) of the one chosen.
- the partner of image i is image B-1-i (the batch reversed), for the whole batch.
- mixup: lam x + (1 - lam) x_partner. cutmix: a box of area (1 - lam) H W centred uniformly,
  clipped to the image, pasted from the partner; lam is then corrected to 1 - box area / (H W).
- targets: lam onehot(y) + (1 - lam) onehot(y_partner), soft rows that sum to 1. Label smoothing
  is not folded in here but by the weight step's loss (torch's cross-entropy with
  label_smoothing on probability targets is (1 - a) t + a / K, which is exactly timm's
  mixup_target with smoothing a), so the attacks can see the unsmoothed target (below).
- random erasing (before mixing, as timm erases in the loader): each image with probability
  `reprob` gets one box of area U(0.02, 1/3) H W and log-uniform aspect in [0.3, 1/0.3], the
  first of 10 drawn attempts that fits (none fits: no box), at a uniform position. The box is
  filled with uniform noise in [0, 1] per pixel and channel: timm's "pixel" mode draws N(0, 1)
  after normalisation, but here the batch is pixels in [0, 1] (normalisation is inside the model)
  and must stay in that box, which the eps-ball and the attacks clamp to.
Mixing keeps labels as class indices when only erasing is on; once mixup or cutmix is set every
minibatch gets soft targets (lam = 1 rows when it is not mixed), as timm's does.

Randomness: the per-batch draws (mixed or not, which, lam, the box) come from numpy's RandomState
(a stream numpy keeps fixed across versions) and the per-image ones (erasing) from a torch
generator on the batch's device, both seeded from `key`, which the trainer makes (run seed, rank,
epoch, batch index): a batch's augmentation is a function of where it is in the run, so a
mid-epoch resume draws exactly what the interrupted run would have, with no state to save.

With the perturbation: the mixing happens once per minibatch, before the method's step, so free
training adds its buffer to the mixed batch and all m replays see the same mixed images; the
weight step's loss is the soft-target cross-entropy. The attacks' rule (attacks.attack_loss:
never a smoothed loss) extends to mixed targets: every attack ascends the plain cross-entropy on
the unsmoothed mixed target, lam CE(y) + (1 - lam) CE(y_partner), the mixed image's own label,
not on its dominant label alone. That is what free training's perturbation must ascend anyway
(its one backward is the weight step's, whose loss is that cross-entropy, free training refusing
label smoothing), so free, PGD, FGSM-RS and N-FGSM attack one objective, the same as ARES's
attack_criterion "mixup" without its smoothing. Its ascent, like the smoothed one, raises a class
the model already rates above its share of the target; but here the target is what the mixed
image shows (label smoothing is a change of loss, mixing a change of data), and a dominant label
would leave the partner's share out of the objective the weights train on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ERASE_AREA = (0.02, 1 / 3)      # timm's RandomErasing defaults, fractions of H W
ERASE_ASPECT = 0.3              # aspect h/w log-uniform in [0.3, 1/0.3]
ERASE_ATTEMPTS = 10


@dataclass(frozen=True)
class MixSpec:
    mixup: float = 0.0          # Beta alpha; 0: off
    cutmix: float = 0.0         # Beta alpha; 0: off
    prob: float = 1.0           # probability that a minibatch is mixed
    switch_prob: float = 0.5    # with both on: probability of cutmix
    reprob: float = 0.0         # random erasing, per image

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass(frozen=True)
class BatchDraw:
    """One minibatch's mixing: lam (1: not mixed) and the cutmix box (top, bottom, left, right)."""

    lam: float = 1.0
    box: tuple[int, int, int, int] | None = None


def batch_rngs(key: Sequence[int]) -> tuple[np.random.RandomState, int]:
    """The host RNG of the per-batch draws and the seed of the per-image ones, from `key`
    (non-negative ints; each is split into 32-bit words, as RandomState takes them)."""
    words = [w for k in key for w in (int(k) & 0xFFFFFFFF, int(k) >> 32)]
    return np.random.RandomState(words), int(np.random.SeedSequence(words).generate_state(
        1, np.uint64)[0])


def draw_mixing(spec: MixSpec, rng: np.random.RandomState, height: int, width: int) -> BatchDraw:
    """timm's per-batch parameters, drawn in timm's order from `rng`."""
    if not spec.mixes or rng.rand() >= spec.prob:
        return BatchDraw()
    cutmix = spec.cutmix > 0 and (spec.mixup <= 0 or rng.rand() < spec.switch_prob)
    lam = float(rng.beta(spec.cutmix, spec.cutmix) if cutmix else rng.beta(spec.mixup, spec.mixup))
    if not cutmix or lam == 1.0:
        return BatchDraw(lam)
    return cutmix_box(rng, lam, height, width)


def cutmix_box(rng: np.random.RandomState, lam: float, height: int, width: int) -> BatchDraw:
    """A box of sides sqrt(1 - lam) x (H, W), centred uniformly, clipped; lam of its true area."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.randint(0, height)), int(rng.randint(0, width))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
    area = (bottom - top) * (right - left)
    return BatchDraw(1.0 - area / (height * width), (top, bottom, left, right))


def mix_images(images: torch.Tensor, draw: BatchDraw) -> torch.Tensor:
    """The batch mixed with its reverse as `draw` says (a new tensor; the input is untouched)."""
    if draw.lam == 1.0:
        return images
    partner = images.flip(0)
    if draw.box is None:
        # timm's order of operations; the clamp undoes a rounding past 1 (pixels stay in [0, 1]).
        return images.mul(draw.lam).add_(partner.mul_(1.0 - draw.lam)).clamp_(0.0, 1.0)
    top, bottom, left, right = draw.box
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
    return mixed


def mixed_targets(labels: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """(B, K) float rows lam onehot(y) + (1 - lam) onehot(y reversed); each sums to 1."""
    onehot = F.one_hot(labels, num_classes).to(torch.float32)
    if lam == 1.0:
        return onehot
    return onehot.mul(lam).add_(onehot.flip(0).mul_(1.0 - lam))


def erase_mask(shape: torch.Size, prob: float, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, H, W) bool: each image's erased box (module docstring), all drawn at once."""
    batch, _, height, width = shape
    dev = generator.device

    def uniform(*size, low=0.0, high=1.0):
        return torch.empty(size, device=dev).uniform_(low, high, generator=generator)
    chosen = uniform(batch) < prob
    area = uniform(batch, ERASE_ATTEMPTS, low=ERASE_AREA[0], high=ERASE_AREA[1]) * height * width
    aspect = uniform(batch, ERASE_ATTEMPTS, low=math.log(ERASE_ASPECT),
                     high=-math.log(ERASE_ASPECT)).exp()
    h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (h < height) & (w < width)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)     # the first attempt that fits
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    top = (uniform(batch) * (height - h + 1)).floor()
    left = (uniform(batch) * (width - w + 1)).floor()
    ys = torch.arange(height, device=dev)
    xs = torch.arange(width, device=dev)
    rows = (ys >= top[:, None]) & (ys < (top + h)[:, None])
    cols = (xs >= left[:, None]) & (xs < (left + w)[:, None])
    keep = chosen & fits.any(1)
    return keep[:, None, None, None] & rows[:, None, :, None] & cols[:, None, None, :]


def random_erase(images: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Each image's box (erase_mask) replaced by uniform noise in [0, 1]; a new tensor."""
    mask = erase_mask(images.shape, prob, generator)
    noise = torch.empty_like(images).uniform_(0.0, 1.0, generator=generator)
    return torch.where(mask, noise, images)


class BatchAugment:
    """The configured augmentation of one rank's minibatches (the thin stateful wrapper: the
    device generator it reseeds for every batch)."""

    def __init__(self, spec: MixSpec, num_classes: int, device: torch.device):
        self.spec, self.num_classes = spec, num_classes
        self.generator = torch.Generator(device=device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, key: Sequence[int],
                 mixing: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) -> (augmented images, targets): soft (B, K) rows when mixup or
        cutmix is configured (unmixed rows when `mixing` is False: after the off epoch), else
        the labels as given. `key` decides every draw."""
        host, device_seed = batch_rngs(key)
        if self.spec.reprob > 0:
            images = random_erase(images, self.spec.reprob, self.generator.manual_seed(device_seed))
        if not self.spec.mixes:
            return images, labels
        draw = draw_mixing(self.spec, host, *images.shape[-2:]) if mixing else BatchDraw()
        return mix_images(images, draw), mixed_targets(labels, draw.lam, self.num_classes)
