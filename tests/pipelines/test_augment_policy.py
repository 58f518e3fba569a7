"""data.auto_augment: timm's policy strings parsed into parameters, run by DALI (on its CPU
backend here, on real JPEGs) and by torchvision with those parameters, repeatable for a seed,
and refused by a loader that cannot run them."""

import math

import numpy as np
import pytest
import torch
from helpers_data import write_textured
from nvidia.dali import fn, pipeline_def

import pipelines
from pipelines import DataError
from pipelines.augment_policy import (
    BINS_PER_UNIT,
    PolicyError,
    RandAugment,
    TrivialAugmentWide,
    parse_policy,
)
from pipelines.cifar_write import write_cifar
from pipelines.dali_augment import apply_policy, magnitude_bin
from pipelines.torchvision_augment import TimmRandAugment

SIZE = 32


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """64 smooth, non-flat JPEGs in two classes: geometric and colour ops both show."""
    root = tmp_path_factory.mktemp("textured")
    for i in range(64):
        write_textured(root / "train" / f"c{i % 2}" / f"{i:03d}.JPEG", 44, 40, seed=i)
    return root


# ----------------------------------------------------------------------------- the strings

@pytest.mark.parametrize("text, policy", [
    ("rand-m9-mstd0.5-inc1", RandAugment(num_ops=2, magnitude=9, prob=0.5, magnitude_std=0.5,
                                         increasing=True)),
    ("rand", RandAugment(num_ops=2, magnitude=10, prob=0.5, magnitude_std=0.0, increasing=False)),
    ("rand-inc1-p1-n3-m5-mstd101", RandAugment(3, 5, 1.0, math.inf, True)),
    ("ta_wide", TrivialAugmentWide()), ("TrivialAugment", TrivialAugmentWide()),
    (None, None), ("", None)])
def test_timm_strings_parse_into_their_parameters_with_timms_defaults(text, policy):
    assert parse_policy(text) == policy


@pytest.mark.parametrize("text, message", [
    ("rand-m11", r"m must be a whole number in 0\.\.10, got '11'"),
    ("rand-m9.5", "m must be a whole number"),
    ("rand-n0", "n must be a whole number >= 1"),
    ("rand-p1.5", r"p must be a number in \[0, 1"),
    ("rand-mstd-1", "section 'mstd' is not one of"),
    ("rand-inc2", r"inc must be a whole number in 0\.\.1"),
    ("rand-mmax12", "magnitudes beyond 10 are not supported"),
    ("rand-tweights", "names an op set"),
    ("rand-m9-m5", "given twice"),
    ("rand-w3", "section 'w3' is not one of m, n, p, mstd, inc"),
    ("original-mstd0.5", "AutoAugment's v0/original and AugMix are not supported"),
    ("augmix-m5", "not a policy this trainer knows")])
def test_strings_timm_would_read_otherwise_or_not_at_all_are_refused(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


# ----------------------------------------------------------------------------- DALI

def dali_outputs(graph, *args, batch=64, seed=0):
    pipe = graph(*args, batch_size=batch, num_threads=1, device_id=None, seed=seed,
                 enable_conditionals=True)
    pipe.build()
    return [np.stack([np.array(sample) for sample in out]) for out in pipe.run()]


@pipeline_def
def before_and_after(files, policy):
    raw, _ = fn.readers.file(files=files, random_shuffle=False)
    images = fn.resize(fn.decoders.image(raw, device="cpu"), resize_x=SIZE, resize_y=SIZE)
    return images, apply_policy(images, policy, SIZE)


@pipeline_def
def magnitudes(policy):
    return magnitude_bin(policy)


def dali_changed(jpegs, text, seed=0):
    """Per image: did the policy change it, and the mean absolute change over the batch."""
    files = sorted(str(p) for p in (jpegs / "train").rglob("*.JPEG"))
    before, after = (torch.from_numpy(a).float()
                     for a in dali_outputs(before_and_after, files, parse_policy(text), seed=seed))
    return (before != after).flatten(1).any(1), (before - after).abs().mean().item()


def test_dali_draws_each_images_magnitude_as_m_plus_timms_noise():
    assert magnitude_bin(parse_policy("rand-m9-inc1")) == 9 * BINS_PER_UNIT    # no noise: m
    (gauss,) = dali_outputs(magnitudes, parse_policy("rand-m9-mstd0.5"), batch=4000)
    assert gauss.mean() == pytest.approx(9 * BINS_PER_UNIT, abs=0.1)
    assert gauss.std() == pytest.approx(0.5 * BINS_PER_UNIT, rel=0.15)
    (uniform,) = dali_outputs(magnitudes, parse_policy("rand-m8-mstd101"), batch=4000)
    assert (uniform.min(), uniform.max()) == (0, 8 * BINS_PER_UNIT)         # U(0, m)
    assert uniform.mean() == pytest.approx(4 * BINS_PER_UNIT, abs=0.3)
    (clipped,) = dali_outputs(magnitudes, parse_policy("rand-m10-mstd2"), batch=4000)
    assert clipped.max() == 10 * BINS_PER_UNIT and (clipped == 10 * BINS_PER_UNIT).mean() > 0.4


def test_dali_applies_each_of_n_layers_with_probability_p(jpegs):
    never, _ = dali_changed(jpegs, "rand-p0-inc1")
    assert not never.any()
    always, _ = dali_changed(jpegs, "rand-n1-p1-m10-inc1")
    half, _ = dali_changed(jpegs, "rand-n1-p0.5-m10-inc1")
    three, _ = dali_changed(jpegs, "rand-n3-p0.5-m10-inc1")
    assert always.float().mean() > 0.85          # all but the identity and a few no-ops
    assert 0.3 < half.float().mean() < 0.65      # ~ p of them
    assert three.float().mean() > half.float().mean() + 0.25     # 1 - (1 - p)^3 of them


def test_dali_inc0_is_its_non_monotonic_suite_where_m0_is_not_the_identity(jpegs):
    """At m0, inc1's ops are (nearly) the identity; inc0's enhance ops scale by 0.1 and its
    solarize inverts every pixel."""
    _, monotonic = dali_changed(jpegs, "rand-n1-p1-m0-inc1")
    _, original = dali_changed(jpegs, "rand-n1-p1-m0-inc0")
    assert original > 4 * monotonic and original > 10


def test_dali_trivial_augment_changes_the_images_and_repeats_for_a_seed(jpegs):
    changed, _ = dali_changed(jpegs, "ta_wide")
    assert changed.float().mean() > 0.7
    files = sorted(str(p) for p in (jpegs / "train").rglob("*.JPEG"))
    a, b, c = (dali_outputs(before_and_after, files, TrivialAugmentWide(), seed=s)[1]
               for s in (3, 3, 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def loader_batch(kind, root, text, seed=0, **kw):
    loader = pipelines.build_loader(kind, root, "train", batch_size=32, image_size=SIZE,
                                    val_resize=36, min_area=0.5, num_threads=1, seed=seed,
                                    auto_augment=text, **kw)
    loader.set_epoch(1)
    return next(iter(loader))


@pytest.mark.parametrize("kind", ["dali-cpu", "torchvision"])
def test_the_loaders_policy_changes_images_and_repeats_for_a_seed(jpegs, kind):
    plain, labels = loader_batch(kind, jpegs, None)
    skipped, _ = loader_batch(kind, jpegs, "rand-p0-inc1")
    strong, strong_labels = loader_batch(kind, jpegs, "rand-m9-mstd0.5-inc1")
    again, _ = loader_batch(kind, jpegs, "rand-m9-mstd0.5-inc1")
    other_seed, _ = loader_batch(kind, jpegs, "rand-m9-mstd0.5-inc1", seed=1)
    assert torch.equal(strong, again) and not torch.equal(strong, other_seed)
    assert torch.equal(strong_labels, labels)         # the same images, in the same order

    def as_plain(batch):       # each image equal to the unaugmented one, or to its mirror
        return torch.tensor([torch.equal(x, p) or torch.equal(x, p.flip(-1))
                             for x, p in zip(batch, plain)])
    # p0 applies no op (DALI's flips are drawn after the policy's ops, so they may differ).
    assert as_plain(skipped).all()
    assert (~as_plain(strong)).float().mean() > 0.5
    assert strong.min() >= 0 and strong.max() <= 1 and strong.shape == plain.shape


# ----------------------------------------------------------------------------- torchvision

class Recorder(torch.nn.Module):
    """Stands for torchvision's RandAugment op: notes the magnitude bin of each op applied."""

    def __init__(self):
        super().__init__()
        self.magnitude, self.applied = None, []

    def forward(self, image):
        self.applied.append(self.magnitude)
        return image


def test_torchvision_layers_apply_with_probability_p_at_timms_magnitudes():
    ra = TimmRandAugment(parse_policy("rand-n3-p0.25-m9-mstd0.5-inc1"))
    ra.op = Recorder()
    torch.manual_seed(0)
    for _ in range(2000):
        ra(torch.zeros(3, 8, 8, dtype=torch.uint8))
    applied = ra.op.applied
    assert len(applied) / 2000 == pytest.approx(3 * 0.25, abs=0.05)     # n p ops per image
    assert np.mean(applied) == pytest.approx(9 * BINS_PER_UNIT, abs=0.15)
    assert np.std(applied) == pytest.approx(0.5 * BINS_PER_UNIT, rel=0.15)
    uniform = TimmRandAugment(parse_policy("rand-m8-mstd101-inc1"))
    draws = [uniform.magnitude_bin() for _ in range(2000)]
    assert (min(draws), max(draws)) == (0, 8 * BINS_PER_UNIT)


def test_torchvision_augments_the_same_images_whatever_the_number_of_workers(jpegs):
    inline, _ = loader_batch("torchvision", jpegs, "ta_wide")
    forked = pipelines.build_loader("torchvision", jpegs, "train", batch_size=32,
                                    image_size=SIZE, val_resize=36, min_area=0.5, num_threads=2,
                                    auto_augment="ta_wide")     # two worker processes
    forked.set_epoch(1)
    assert torch.equal(next(iter(forked))[0], inline)


# ----------------------------------------------------------------------------- refusals

@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "cifar-10-batches-py", "cifar10-py",
                {"train": (images[:32], labels[:32]), "val": (images[32:], labels[32:])},
                [f"c{i}" for i in range(10)])
    return root


def test_the_resident_loader_refuses_a_policy_naming_what_to_do_instead(cifar):
    with pytest.raises(DataError, match=r"resident loader cannot run it.*Python loop over the "
                                        r"images.*mixup, cutmix and reprob.*loader torchvision"):
        pipelines.build_loader("auto", cifar, "train", batch_size=8, auto_augment="ta_wide")
    # Evaluation splits are never augmented, so they build whatever the string.
    assert len(pipelines.build_loader("auto", cifar, "val", batch_size=8,
                                      auto_augment="ta_wide")) == 1


@pytest.mark.parametrize("kind, text, message", [
    ("torchvision", "rand-m9-inc0", "inc0 .* has no torchvision suite; write inc1"),
    ("torchvision", "rand-m9", "inc0"),
    ("synthetic", "ta_wide", "no images to augment"),
    ("dali-cpu", "rand-m12", r"auto_augment: 'rand-m12': m must be")])
def test_a_loader_refuses_a_policy_it_cannot_run(jpegs, kind, text, message):
    with pytest.raises(DataError, match=message):
        pipelines.build_loader(kind, jpegs, "train", batch_size=8, auto_augment=text)


def test_dali_runs_inc0(jpegs):
    assert pipelines.build_loader("dali-cpu", jpegs, "train", batch_size=8,
                                  auto_augment="rand-m9-inc0").augment.policy.increasing is False
