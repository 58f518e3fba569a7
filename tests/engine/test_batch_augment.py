"""Mixup, cutmix and random erasing on the device batch (dist_free.engine.batch_augment): timm's
semantics (its own Mixup is the oracle, fed the same RandomState), rows that sum to 1, cutmix's
lam equal to the pasted box's area, erasing only inside its boxes, and every draw a function of
the (seed, rank, epoch, batch) key alone, so a resumed run draws the same."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

from dist_free.engine.batch_augment import (
    ERASE_AREA,
    BatchAugment,
    BatchDraw,
    MixSpec,
    batch_rngs,
    cutmix_box,
    draw_mixing,
    erase_mask,
    mix_images,
    mixed_targets,
)

K = 10
CPU = torch.device("cpu")


def batch(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Below 1, so a mixup of two images never rounds past the pixel box timm does not clamp.
    return 0.9 * torch.rand(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


def augment(**spec):
    return BatchAugment(MixSpec(**spec), K, CPU)


@pytest.mark.parametrize("spec, kinds", [
    (dict(mixup=0.8, cutmix=1.0, prob=0.7, switch_prob=0.5), {"none", "mixup", "cutmix"}),
    (dict(mixup=0.4), {"mixup"}), (dict(cutmix=1.0, prob=0.5), {"none", "cutmix"})],
    ids=["both", "mixup", "cutmix"])
def test_mixing_is_timms_batch_mixup_drawn_from_the_same_state(spec, kinds):
    """timm's Mixup, given our key's RandomState as numpy's global state, mixes the same
    batches the same way: which batches, which of the two, lam, the box, the targets."""
    timm_kw = {"mixup": "mixup_alpha", "cutmix": "cutmix_alpha", "switch_prob": "switch_prob",
               "prob": "prob"}
    seen = set()
    for i in range(40):
        x, y = batch(seed=i)
        key = (3, 1, 2, i)
        ours, targets = augment(**spec)(x, y, key)
        np.random.set_state(batch_rngs(key)[0].get_state())
        # timm's Mixup defaults to mixup_alpha=1: an alpha not given is 0 here, as in MixSpec.
        theirs = Mixup(**{"mixup_alpha": 0.0, **{timm_kw[k]: v for k, v in spec.items()}},
                       label_smoothing=0.0, num_classes=K)
        x_timm, t_timm = theirs(x.clone(), y)
        assert torch.equal(ours, x_timm) and torch.equal(targets, t_timm), i
        draw = draw_mixing(MixSpec(**spec), batch_rngs(key)[0], 16, 16)
        seen.add("none" if draw.lam == 1 else "cutmix" if draw.box else "mixup")
    assert seen == kinds            # every branch was compared


def test_label_smoothing_in_the_loss_is_timms_mixup_target_with_smoothing_folded_in():
    """The targets stay unsmoothed (for the attacks); the weight step's cross-entropy with
    label_smoothing a on them equals timm's soft-target loss on its smoothed mixed target."""
    x, y = batch()
    logits = torch.randn(len(y), K, generator=torch.Generator().manual_seed(1))
    for lam, smoothing in [(0.3, 0.1), (0.75, 0.2), (1.0, 0.1)]:
        ours = F.cross_entropy(logits, mixed_targets(y, lam, K), label_smoothing=smoothing)
        timm_loss = SoftTargetCrossEntropy()(logits, mixup_target(y, K, lam, smoothing))
        torch.testing.assert_close(ours, timm_loss, rtol=1e-6, atol=1e-6)


def test_mixup_blends_each_image_with_its_mirror_in_the_batch_and_rows_sum_to_one():
    x, y = batch(n=6)
    mixed = mix_images(x, BatchDraw(lam=0.3))
    torch.testing.assert_close(mixed, 0.3 * x + 0.7 * x.flip(0), rtol=0, atol=1e-6)
    targets = mixed_targets(y, 0.3, K)
    assert mixed.shape == x.shape and targets.shape == (6, K) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    for i in range(6):      # lam on the image's own class, 1 - lam on its partner's
        expected = 0.3 * F.one_hot(y[i], K) + 0.7 * F.one_hot(y[5 - i], K)
        torch.testing.assert_close(targets[i], expected.float())


def test_cutmix_pastes_one_box_from_the_partner_and_lam_is_the_area_left():
    x, y = batch(n=8, size=20)
    for i in range(30):
        rng = np.random.RandomState(i)
        draw = cutmix_box(rng, float(rng.beta(1.0, 1.0)), 20, 20)
        top, bottom, left, right = draw.box
        inside = torch.zeros(20, 20, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        mixed = mix_images(x, draw)
        assert torch.equal(mixed[..., inside], x.flip(0)[..., inside])
        assert torch.equal(mixed[..., ~inside], x[..., ~inside])
        assert draw.lam == pytest.approx(1 - inside.sum().item() / 400)
        targets = mixed_targets(y, draw.lam, K)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))


def test_cutmix_lam_is_corrected_when_the_box_is_clipped_at_the_border():
    """A box centred at a corner loses three quarters of itself: lam is 1 - what is left."""
    class Corner:
        def randint(self, low, high):
            return 0
    draw = cutmix_box(Corner(), lam=0.36, height=10, width=10)     # an 8x8 box around (0, 0)
    assert draw.box == (0, 4, 0, 4)
    assert draw.lam == pytest.approx(1 - 16 / 100)


def test_random_erasing_replaces_only_its_box_with_noise_in_the_pixel_range():
    x, _ = batch(n=64, size=24)
    aug = augment(reprob=0.5)
    out, labels = aug(x, torch.zeros(64, dtype=torch.long), (0, 0, 0, 7))
    mask = erase_mask(x.shape, 0.5, torch.Generator().manual_seed(batch_rngs((0, 0, 0, 7))[1]))
    m = mask.expand_as(x)
    assert torch.equal(out[~m], x[~m])                  # untouched outside the boxes
    assert (out[m] != x[m]).float().mean() > 0.99       # noise inside them
    assert out.min() >= 0 and out.max() <= 1
    assert labels.dtype == torch.long                   # erasing alone keeps class indices
    erased = mask.flatten(1).any(1)
    assert 0.3 < erased.float().mean() < 0.7            # ~ reprob of the images
    for image in mask[erased, 0]:                       # one axis-aligned box per image
        rows, cols = image.any(1), image.any(0)
        assert image.sum() == rows.sum() * cols.sum()
        assert rows.int().diff().abs().sum() <= 2 and cols.int().diff().abs().sum() <= 2
        area = image.sum().item() / 24 ** 2
        assert ERASE_AREA[0] - 0.02 <= area <= ERASE_AREA[1] + 0.05


def test_no_erasing_at_probability_zero_and_every_image_at_one():
    x, _ = batch(n=32)
    g = torch.Generator()
    assert not erase_mask(x.shape, 0.0, g.manual_seed(1)).any()
    assert erase_mask(x.shape, 1.0, g.manual_seed(1)).flatten(1).any(1).float().mean() > 0.9


def test_a_key_decides_every_draw_so_a_resume_recomputes_them():
    """Fresh objects (a restarted process) given the same (seed, rank, epoch, batch) draw the
    same images and targets; another batch index, epoch or rank draws others."""
    x, y = batch(n=16)
    spec = dict(mixup=0.8, cutmix=1.0, reprob=0.25)
    first = [augment(**spec)(x, y, (0, 0, 2, i)) for i in range(6)]
    resumed = [augment(**spec)(x, y, (0, 0, 2, i)) for i in range(3, 6)]   # mid-epoch resume
    for (a, ta), (b, tb) in zip(first[3:], resumed):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    others = [augment(**spec)(x, y, key)[0] for key in [(0, 0, 2, 6), (0, 0, 3, 5), (0, 1, 2, 5),
                                                         (1, 0, 2, 5)]]
    assert all(not torch.equal(first[5][0], o) for o in others)


def test_after_the_off_epoch_targets_stay_soft_but_nothing_is_mixed():
    x, y = batch()
    images, targets = augment(mixup=1.0, prob=1.0)(x, y, (0, 0, 0, 0), mixing=False)
    assert torch.equal(images, x)
    assert torch.equal(targets, F.one_hot(y, K).float())


def test_the_device_batch_keeps_its_memory_format_and_dtype():
    x, y = batch()
    x = x.to(memory_format=torch.channels_last)
    for key in range(5):
        out, targets = augment(mixup=0.8, cutmix=1.0, reprob=0.5)(x, y, (0, 0, 0, key))
        assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == x.dtype
        assert targets.shape == (len(y), K)
