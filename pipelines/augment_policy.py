"""The augmentation policy strings of `data.auto_augment`, in timm's vocabulary, parsed once.

    rand-m9-mstd0.5-inc1     RandAugment (Cubuk et al. 2020) as timm writes it: sections after
                             "rand", in any order: m (magnitude 0..10, default 10), n (ops per
                             image, default 2), p (probability that each op applies, default
                             0.5), mstd (std of Gaussian noise on m per op; > 100: m uniform in
                             [0, m]), inc (1: ops whose strength grows with m; default 0)
    ta_wide, trivialaugment  TrivialAugment Wide (Mueller and Hutter 2021): one op per image at a
                             uniformly drawn magnitude (torchvision's and DALI's name and suite)

The semantics are timm 1.0's (`timm.data.auto_augment.rand_augment_transform`): each of the n
layers picks one op uniformly, applies it with probability p at magnitude m (plus the noise), and
a magnitude is a fraction m / 10 of each op's range. Refused rather than ignored: timm's `mmax`
(magnitudes beyond 10) and `t` (another op set), m outside 0..10, n < 1, and any other section.

What differs from timm and cannot be written in the string: the ops and their ranges are the
loader library's RandAugment suite (DALI's `get_rand_augment_suite`, torchvision's
`RandAugment`), the 14 ops of the RandAugment paper with Identity, where timm's PIL suite has
Invert and SolarizeAdd instead of Identity and other posterize bounds. `inc0` (posterize,
solarize and the enhance ops not growing with m) exists as DALI's non-monotonic suite; the
torchvision loader has no such suite and refuses it.

Torch-free, so the trainer checks a config's string before any worker starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_MAGNITUDE = 10          # timm's _LEVEL_DENOM: m10 is each op's full range
UNIFORM_ABOVE = 100         # timm: an mstd above this draws the magnitude uniformly in [0, m]
TRIVIAL_NAMES = ("ta_wide", "trivialaugment")
SECTIONS = ("m", "n", "p", "mstd", "inc")
# Both loaders draw a magnitude on a grid of MAGNITUDE_BINS levels, 1/BINS_PER_UNIT of timm's m
# apart (timm's noisy magnitude is continuous; m itself is always on the grid). Coarse because
# DALI computes every op's parameter for every bin while it defines the graph: a grid of tenths
# made a noisy RandAugment graph about three times slower to define than halves (DALI's CPU
# backend on a loaded 2-core host).
BINS_PER_UNIT = 2
MAGNITUDE_BINS = MAX_MAGNITUDE * BINS_PER_UNIT + 1


class PolicyError(ValueError):
    """A policy string that means nothing, or something no loader here can do."""


@dataclass(frozen=True)
class RandAugment:
    num_ops: int = 2
    magnitude: int = MAX_MAGNITUDE
    prob: float = 0.5               # each layer's op applies with this probability
    magnitude_std: float = 0.0      # inf: magnitude uniform in [0, magnitude]
    increasing: bool = False        # timm's inc1: every op grows stronger with the magnitude


@dataclass(frozen=True)
class TrivialAugmentWide:
    pass


Policy = RandAugment | TrivialAugmentWide


def parse_policy(text: str | None) -> Policy | None:
    """A policy string -> its parameters (None: no policy). PolicyError says what is wrong."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if text.lower() in TRIVIAL_NAMES:
        return TrivialAugmentWide()
    head, *sections = text.split("-")
    if head != "rand":
        raise PolicyError(f"{text!r} is not a policy this trainer knows: write RandAugment as "
                          f"timm does (e.g. rand-m9-mstd0.5-inc1) or one of {list(TRIVIAL_NAMES)}"
                          " (AutoAugment's v0/original and AugMix are not supported)")
    pairs = [_section(text, s) for s in sections]
    values = dict(pairs)
    if len(values) < len(pairs):     # timm would keep the last m but the first mstd
        raise PolicyError(f"{text!r}: a section is given twice")
    return RandAugment(
        num_ops=_whole(text, "n", values.get("n", "2"), low=1),
        magnitude=_whole(text, "m", values.get("m", str(MAX_MAGNITUDE)), low=0,
                         high=MAX_MAGNITUDE),
        prob=_number(text, "p", values.get("p", "0.5"), high=1.0),
        magnitude_std=_magnitude_std(text, values.get("mstd", "0")),
        increasing=bool(_whole(text, "inc", values.get("inc", "0"), low=0, high=1)))


def _section(text: str, section: str) -> tuple[str, str]:
    """'mstd0.5' -> ('mstd', '0.5'), split at the first digit as timm splits it."""
    if section.startswith("t"):
        raise PolicyError(f"{text!r}: {section!r} names an op set (timm's t<name>); only the "
                          "loader library's RandAugment suite is supported")
    match = re.fullmatch(r"([a-z]+)(\d.*)", section)
    if match is None or match.group(1) not in SECTIONS:
        why = " (magnitudes beyond 10 are not supported)" if section.startswith("mmax") else ""
        raise PolicyError(f"{text!r}: section {section!r} is not one of "
                          f"{', '.join(SECTIONS)}{why}")
    return match.group(1), match.group(2)


def _whole(text: str, key: str, value: str, low: int, high: int | None = None) -> int:
    if not value.isdigit() or int(value) < low or (high is not None and int(value) > high):
        bound = f"in {low}..{high}" if high is not None else f">= {low}"
        raise PolicyError(f"{text!r}: {key} must be a whole number {bound}, got {value!r}")
    return int(value)


def _number(text: str, key: str, value: str, high: float | None = None) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0 <= number <= (high if high is not None else math.inf):
        bound = f"in [0, {high}]" if high is not None else ">= 0"
        raise PolicyError(f"{text!r}: {key} must be a number {bound}, got {value!r}")
    return number


def _magnitude_std(text: str, value: str) -> float:
    std = _number(text, "mstd", value)
    return math.inf if std > UNIFORM_ABOVE else std
