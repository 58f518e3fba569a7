"""Clean and robust accuracy with exact sharded counts: the evaluation library.

The trainer's in-training evaluation (dist_free.trainer.validation) and the standalone CLI
(`python -m dist_free.evaluate`) both call `evaluate`.

Counts are exact: each rank counts its own images (clean top-1/top-5, PGD and AutoAttack
survivors) and the counts are summed with one all-reduce at the end, so every image is counted
once. Random draws are keyed to the batch, not to the rank: every batch's PGD random starts come
from a generator seeded with the same seed, and AutoAttack reseeds per batch as pyautoattack
itself does. Given a loader cut in whole batches (the same images per batch on any world size),
1 and N ranks give identical counts (see dist_free.evaluation.autoattack).
"""

from __future__ import annotations

import torch

from dist_free import distributed
from dist_free.engine import attacks
from dist_free.evaluation import autoattack

ATTACKS = ("pgd", "autoattack")


def evaluate(model: torch.nn.Module, loader, *, eps_values: list[float], steps: int,
             step_size: float | None = None, restarts: int = 1,
             amp_dtype: torch.dtype | None = None, max_batches: int | None = None,
             attack_names: tuple[str, ...] = ("pgd",), seed: int = 0,
             verbose: bool = False, progress=None, more_pgd: tuple = ()) -> dict:
    """Clean top-1/top-5 and robust accuracy at each eps, all-reduced over ranks.

    `model` must be the bare module (not DDP): attacks take input gradients only. Returns
    {"samples": n, "top1", "top5", "pgd": {eps: acc}, "autoattack": {eps: {"robust_top1": acc,
    "robust_after": {attack: acc}}}}; "autoattack" only when it is among `attack_names`.
    `progress` (a dist_free.progress.Progress, or None) is told which attack and eps run and how
    many images each finished batch held; it is fed host-side counts only.
    `more_pgd`: further PGD runs, (steps, restarts, step_size) each, at the same eps values (a
    named protocol's); their accuracies come back as "pgd_more": [{eps: acc}], one per run.
    """
    plan = {"pgd": eps_values if "pgd" in attack_names else [],
            "autoattack": eps_values if "autoattack" in attack_names else [],
            "pgd_settings": [(steps, restarts, step_size), *more_pgd]}
    width = (3 + len(plan["pgd"]) * len(plan["pgd_settings"])
             + len(autoattack.STANDARD) * len(plan["autoattack"]))
    device = next(model.parameters()).device
    counts = torch.zeros(width, dtype=torch.float64, device=device)
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        counts += batch_counts(model, images, labels, plan, amp_dtype=amp_dtype, seed=seed,
                               verbose=verbose, progress=progress).to(device)
        if progress is not None:
            progress.advance(labels.shape[0])
    return accuracies(distributed.all_reduce_sum(counts).tolist(), plan)


def batch_counts(model, images, labels, plan: dict, *, amp_dtype, seed, verbose,
                 progress=None) -> torch.Tensor:
    """[images, top-1, top-5, PGD robust per PGD setting per eps, AutoAttack robust-after per eps
    and attack]."""
    row = [labels.numel(), attacks.correct(model, images, labels, amp_dtype).sum(),
           attacks.correct(model, images, labels, amp_dtype, topk=5).sum()]
    for steps, restarts, step_size in plan["pgd_settings"]:
        for eps in plan["pgd"]:
            if progress is not None:
                progress.describe(f"PGD-{steps} x {restarts} eps {eps * 255:.4g}/255")
            # A fresh generator per batch and eps: a batch's random starts do not depend on how
            # many batches this rank attacked before it, nor on which other eps were asked for.
            generator = torch.Generator(device=images.device).manual_seed(seed)
            row.append(attacks.robust_correct(model, images, labels, eps=eps, steps=steps,
                                              step_size=step_size, restarts=restarts,
                                              amp_dtype=amp_dtype, generator=generator).sum())
    for eps in plan["autoattack"]:
        if progress is not None:
            progress.describe(f"AutoAttack eps {eps * 255:.4g}/255")
        result = autoattack.run_standard(model, images, labels, eps=eps, seed=seed,
                                         verbose=verbose)
        row += list(result.robust_after.values())
    return torch.tensor([float(v) for v in row], dtype=torch.float64)


def accuracies(counts: list[float], plan: dict) -> dict:
    n = counts[0]
    if n == 0:
        raise RuntimeError("the validation loader yielded no images")
    k_pgd = len(plan["pgd"])
    runs = [{eps: c / n for eps, c in zip(plan["pgd"], counts[3 + j * k_pgd:3 + (j + 1) * k_pgd])}
            for j in range(len(plan.get("pgd_settings") or [None]))]
    result = {"samples": int(n), "top1": counts[1] / n, "top5": counts[2] / n, "pgd": runs[0]}
    if len(runs) > 1:
        result["pgd_more"] = runs[1:]
    if plan["autoattack"]:
        k = len(autoattack.STANDARD)
        rest = counts[3 + k_pgd * len(runs):]
        result["autoattack"] = {}
        for j, eps in enumerate(plan["autoattack"]):
            after = dict(zip(autoattack.STANDARD, (c / n for c in rest[j * k:(j + 1) * k])))
            result["autoattack"][eps] = {"robust_top1": after[autoattack.STANDARD[-1]],
                                         "robust_after": after}
    return result
