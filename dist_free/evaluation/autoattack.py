"""AutoAttack (Croce & Hein, 2020), standard version, from the authors' own `pyautoattack` package.

The standard L-inf version runs APGD-CE, APGD-T (9 target classes), FAB-T (9 targets) and Square
(5000 queries) one after the other, each only on the images every earlier attack failed to break.
`run_standard` does exactly that on one batch, one attack at a time through pyautoattack's own
`run_standard_evaluation`, so it can also report how many images were still robust after each
attack (cumulative; the library only logs these).

Precision and mode: always fp32 (autocast is switched off) with the model in eval mode; an
evaluation in bf16 or fp16 can overstate robustness.

Randomness and sharding: every attack reseeds the global RNG with the same fixed seed for every
batch (as pyautoattack does for each of its own batches) and its random draws are made for the
whole batch at once, so an image's result depends on which other images share its batch; a seed
per batch cannot fix that when batches differ. The evaluator therefore shards the val set in whole
batches (pipelines build_loader(whole_batches=True)): batch b holds the same images on any number
of ranks, each rank attacks its own batches, and the summed counts equal one rank's exactly. The
caller's RNG state is restored afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dist_free.engine.attacks import eval_mode

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSION = "standard"
LOGGER = "auto-attack"   # the logger pyautoattack reports progress and warnings to


class AutoAttackUnavailable(RuntimeError):
    pass


def require():
    """pyautoattack's AutoAttack class, imported only when AutoAttack is asked for."""
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise AutoAttackUnavailable(f"AutoAttack needs the pyautoattack package ({e}); install "
                                    "it with: pip install 'dist-free[eval]'") from None
    return AutoAttack


@dataclass(frozen=True)
class Result:
    robust: torch.Tensor            # per image: correct after every attack (bool)
    robust_after: dict[str, int]    # images still robust after each attack, cumulative


def quiet(verbose: bool) -> None:
    """pyautoattack logs every batch and attack; show it only when asked."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    if verbose and not logger.handlers:
        logger.addHandler(logging.StreamHandler())


def run_standard(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 eps: float, seed: int = 0, verbose: bool = False) -> Result:
    """Standard L-inf AutoAttack on one batch (images in [0, 1]); see the module docstring."""
    AutoAttack = require()
    quiet(verbose)
    x, y = images.float().contiguous(), labels
    devices = [x.device] if x.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices), \
            torch.autocast(x.device.type, enabled=False):
        aa = AutoAttack(model, norm="Linf", eps=eps, version=VERSION, seed=seed, device=x.device)
        aa.verbose = verbose
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        after = {}
        for attack in STANDARD:
            robust = _attack_robust(aa, attack, x, y, robust)
            after[attack] = int(robust.sum())
    return Result(robust, after)


def _attack_robust(aa, attack: str, x, y, robust: torch.Tensor) -> torch.Tensor:
    """Run one attack on the still-robust images, in one batch, as the full run would."""
    idx = robust.nonzero().flatten()
    if idx.numel() == 0:
        return robust
    aa.attacks_to_run = [attack]
    _, y_adv = aa.run_standard_evaluation(x[idx], y[idx], batch_size=idx.numel())
    robust = robust.clone()
    robust[idx] = y_adv == y[idx]
    return robust
