"""Is a robustness figure an artefact of gradient masking? A verdict from attack results alone.

`assess(rows, num_classes=...)` takes the evaluator's result rows (one per attack per eps: PGD
rows with steps, restarts and loss; AutoAttack rows with the robust accuracy left after each of
its attacks, cumulative) and applies the checks below. Each is a sanity check of Carlini et al.
2019, "On Evaluating Adversarial Robustness" (its checklist and section 5, "Perform basic sanity
tests"), or of Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (AutoAttack), as their authors' code applies it:

  black_box_breaks_more   Square, a black-box attack that never sees a gradient, breaks images
                          that APGD-CE, APGD-T and FAB-T all failed on. Carlini et al.: white-box
                          attacks are a superset of black-box ones, so "gradient-free attacks
                          doing better often indicates that the defense is somehow masking
                          gradient information"; AutoAttack warns on the same comparison.
  margin_far_below_cross_entropy
                          APGD-T and FAB-T (targeted, margin losses) break far more than APGD-CE:
                          the cross-entropy loss's gradients vanish or mislead on this model
                          (softmax saturation, the logit scale), the failure Croce & Hein's
                          scale-invariant DLR loss was made for. Every cross-entropy figure
                          (PGD, the in-training check) is overstated; AutoAttack's is the
                          tighter bound, and a model that masks one loss deserves an adaptive
                          attack. Below the threshold the gap is reported as what it is
                          ("ce_vs_margin"), the usual weakness of CE as an attack objective.
  cross_entropy_not_converged
                          PGD with the CE loss is above APGD-CE, the same loss optimised better:
                          PGD's fixed steps did not converge (Carlini et al.: "verify that
                          iterative attacks use sufficient iterations to converge").
  more_steps_help         a stronger run of the same attack (more steps x restarts) is lower:
                          Carlini et al. ask that doubling the iterations or the restarts does not
                          raise the success rate. A run that dominates another in both steps and
                          restarts but scores higher is flagged too: a stronger attack doing
                          worse means the attack is wrong ("iterative attacks are strictly more
                          powerful than single-step attacks").
  eps_not_falling         robust accuracy rises between two eps of one attack: "increasing the
                          perturbation budget strictly increases attack success rate".
  above_chance_at_large_eps
                          at eps >= 0.5 accuracy is above chance (1 / classes): "it is not
                          possible to do better than random guessing with an L-inf distortion of
                          0.5: any image can be converted into a solid gray picture".

What is NOT a sign of masking, and is not flagged: a curve that falls slowly at small eps (a
healthy PGD-trained CIFAR model reads about 78% / 68% / 47% at 2, 4, 8/255), or AutoAttack a few
points below PGD because APGD-T's margin loss breaks images CE could not. Carlini et al. give no
number for "falls fast enough"; the only level they state as impossible is above chance at 0.5,
so that is the one checked. Checks the rows cannot support are listed in `not_checked` (the
summary says what each needs), so a clean verdict says what it rests on.
"""

from __future__ import annotations

# Square may break this much more than the gradient attacks before it is flagged: 0.2 points,
# AutoAttack's own threshold (pyautoattack checks.check_square_sr, alpha=.002; the authors'
# flags_doc.md gives Carlini et al. 2019 as its reason). Carlini et al. themselves ask for "very
# few instances where gradient-based attacks fail but gradient-free attacks succeed".
SQUARE_GAP = 0.002

# APGD-CE minus what APGD-T and FAB-T leave, above which CE is judged masked rather than merely
# weaker. The authors tie vanishing gradients to "the cross-entropy loss and the scale of the
# logits", with margin losses as the remedy (auto-attack's flags_doc.md), but give no number;
# 10 points is ours, set from their table of re-evaluated defences (auto-attack's "defenses
# evaluation"): figures of sound adversarial training, mostly from CE attacks, stood at most
# about 5 points above AutoAttack (Madry et al. 47.0 vs 44.3, Shafahi et al. 46.2 vs 41.6), those
# of defences found overestimated 8 to 66 points above it. The README's demo reads 5.3.
CE_MARGIN_GAP = 0.10

# Two runs of the same loss (PGD vs APGD-CE; fewer vs more steps x restarts) may differ by this
# much: `--masking-gap`. Carlini et al. ask for "only marginal effect" and give no number; the
# 3 points are ours.
GAP = 0.03

# A rise of robust accuracy with eps is flagged beyond this much. Carlini et al.: any rise means
# the attack is flawed; one point is ours, room for random starts landing differently.
RISE_TOL = 0.01

# Carlini et al.'s "theoretically impossible" level: above chance at L-inf eps 0.5 (a solid gray
# image is within reach of every input). CHANCE_SLACK is ours: a val set's largest class may
# hold a little more than 1 / classes of the images.
CHANCE_EPS = 0.5
CHANCE_SLACK = 0.02

NEEDS = {   # what each check needs from the evaluation, for the summary's "not checked" line
    "black_box_breaks_more": "AutoAttack",
    "margin_far_below_cross_entropy": "AutoAttack",
    "cross_entropy_not_converged": "PGD and AutoAttack at one eps",
    "more_steps_help": "two PGD runs with different steps x restarts",
    "eps_not_falling": "two eps > 0",
    "above_chance_at_large_eps": f"an eps >= {CHANCE_EPS}, e.g. --eps 0,2/255,8/255,{CHANCE_EPS}, "
                                 "and the model's number of classes",
}


def check(name: str, flagged: bool, value: float, threshold: float, text: str,
          eps: float | None = None) -> dict:
    return {"check": name, "flagged": bool(flagged), "value": value, "threshold": threshold,
            "text": text, "eps": eps}


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def eps_255(eps: float) -> str:
    return f"eps {eps * 255:.4g}/255"


def is_ce(row: dict) -> bool:
    return row.get("loss", "ce") == "ce"


def black_box(aa_rows: list[dict], square_gap: float) -> list[dict]:
    out = []
    for r in aa_rows:
        after = r.get("robust_after") or {}
        if r["eps"] and "square" in after and "fab-t" in after:
            broke = after["fab-t"] - after["square"]
            out.append(check("black_box_breaks_more", broke > square_gap, broke, square_gap,
                             f"{eps_255(r['eps'])}: Square (black-box) broke "
                             f"{pct(broke)} of the images the gradient attacks left standing"))
    return out


def margin_gaps(aa_rows: list[dict], ce_margin_gap: float) -> list[dict]:
    """APGD-CE against what the margin-loss attacks after it (APGD-T, FAB-T) leave, per eps."""
    out = []
    for r in aa_rows:
        after = r.get("robust_after") or {}
        if not r["eps"] or "apgd-ce" not in after:
            continue
        ce, margin = after["apgd-ce"], after.get("fab-t", r["robust_top1"])
        gap = ce - margin
        if gap > ce_margin_gap:
            text = (f"{eps_255(r['eps'])}: APGD-T and FAB-T (margin losses) break {pct(gap)} "
                    f"more than APGD-CE ({pct(ce)} -> {pct(margin)}): the cross-entropy "
                    "gradients are uninformative on this model (softmax saturation or logit "
                    "scale, what the DLR loss was made for), so every cross-entropy figure "
                    "(PGD, the in-training check) overstates robustness")
        else:
            text = (f"{eps_255(r['eps'])}: the targeted margin-loss attacks (APGD-T, FAB-T) "
                    f"break {pct(gap)} more than APGD-CE: the cross-entropy loss's weakness as "
                    "an attack objective on this model, not a sign of gradient masking (flagged "
                    f"above {pct(ce_margin_gap)})")
        out.append(check("margin_far_below_cross_entropy", gap > ce_margin_gap, gap,
                         ce_margin_gap, text, r["eps"]))
    return out


def ce_versus_pgd(pgd_rows: list[dict], aa_rows: list[dict], gap: float) -> list[dict]:
    out = []
    for aa in aa_rows:
        ce = (aa.get("robust_after") or {}).get("apgd-ce")
        for p in (p for p in pgd_rows if p["eps"] == aa["eps"] and aa["eps"] and is_ce(p)):
            if ce is not None:
                diff = p["robust_top1"] - ce
                out.append(check("cross_entropy_not_converged", diff > gap, diff, gap,
                                 f"{eps_255(p['eps'])}: PGD-{p['steps']}x{p['restarts']} "
                                 f"{pct(p['robust_top1'])} vs APGD-CE {pct(ce)} (same loss)"))
    return out


def strength(r: dict) -> str:
    return f"PGD-{r['steps']}x{r['restarts']} {pct(r['robust_top1'])}"


def more_steps(pgd_rows: list[dict], gap: float, rise_tol: float) -> list[dict]:
    out = []
    for eps, loss in sorted({(r["eps"], r.get("loss", "ce")) for r in pgd_rows if r["eps"]}):
        runs = sorted((r for r in pgd_rows if r["eps"] == eps and r.get("loss", "ce") == loss),
                      key=lambda r: (r["steps"] * r["restarts"], r["steps"]))
        if len({(r["steps"], r["restarts"]) for r in runs}) < 2:
            continue
        weak, strong = runs[0], runs[-1]
        drop = weak["robust_top1"] - strong["robust_top1"]
        dominates = strong["steps"] >= weak["steps"] and strong["restarts"] >= weak["restarts"]
        if dominates and -drop > rise_tol:
            out.append(check("more_steps_help", True, drop, rise_tol,
                             f"{eps_255(eps)}: the stronger attack does worse, {strength(weak)} "
                             f"-> {strength(strong)}: the attack is not working as it should"))
            continue
        out.append(check("more_steps_help", drop > gap, drop, gap,
                         f"{eps_255(eps)}: {strength(weak)} -> {strength(strong)}"))
    return out


def attack_tag(r: dict) -> str:
    return f"pgd{r['steps']}x{r['restarts']}" if r["attack"] == "pgd" else r["attack"]


def sweep(rows: list[dict], rise_tol: float) -> list[dict]:
    out = []
    for tag in dict.fromkeys(attack_tag(r) for r in rows):
        curve = sorted((r["eps"], r["robust_top1"]) for r in rows
                       if attack_tag(r) == tag and r["eps"] > 0)
        if len(curve) < 2:
            continue
        rise, (e0, a0), (e1, a1) = max((b[1] - a[1], a, b) for a, b in zip(curve, curve[1:]))
        out.append(check("eps_not_falling", rise > rise_tol, rise, rise_tol,
                         f"{tag}: robust accuracy's largest step up as eps grows {pct(rise)} "
                         f"({pct(a0)} at {e0 * 255:.4g}/255 -> {pct(a1)} at {e1 * 255:.4g}/255)"))
    return out


def chance(rows: list[dict], num_classes: int | None, slack: float) -> list[dict]:
    if not num_classes:
        return []
    level = 1 / num_classes + slack
    return [check("above_chance_at_large_eps", r["robust_top1"] > level, r["robust_top1"], level,
                  f"{attack_tag(r)} at {eps_255(r['eps'])}: robust accuracy {pct(r['robust_top1'])}"
                  f", above chance ({num_classes} classes), which no model can beat at L-inf "
                  f"eps {CHANCE_EPS}")
            for r in rows if r["eps"] >= CHANCE_EPS]


def assess(rows: list[dict], *, num_classes: int | None = None, gap: float = GAP,
           square_gap: float = SQUARE_GAP, ce_margin_gap: float = CE_MARGIN_GAP,
           rise_tol: float = RISE_TOL, chance_slack: float = CHANCE_SLACK) -> dict | None:
    """The verdict over the result rows (see the module docstring); None when the rows support
    no check at all (one attack at one eps)."""
    pgd_rows = [r for r in rows if r["attack"] == "pgd"]
    aa_rows = [r for r in rows if r["attack"] == "autoattack"]
    if not any(r["eps"] for r in rows):
        return None
    margins = margin_gaps(aa_rows, ce_margin_gap)
    checks = (black_box(aa_rows, square_gap) + margins + ce_versus_pgd(pgd_rows, aa_rows, gap)
              + more_steps(pgd_rows, gap, rise_tol) + sweep(rows, rise_tol)
              + chance(rows, num_classes, chance_slack))
    if not checks:
        return None
    names = {c["check"] for c in checks}
    widest = max(margins, key=lambda c: c["value"], default=None)
    pgd_aa = [p["robust_top1"] - a["robust_top1"] for p in pgd_rows for a in aa_rows
              if p["eps"] == a["eps"] and p["eps"]]
    return {"flagged": any(c["flagged"] for c in checks),
            "signs": [c["text"] for c in checks if c["flagged"]],
            "checks": checks, "not_checked": [n for n in NEEDS if n not in names],
            "threshold": gap,
            "ce_vs_margin": widest and {"apgd_ce_minus_margin": widest["value"],
                                        "eps": widest["eps"], "flagged": widest["flagged"],
                                        "text": widest["text"]},
            "pgd_minus_autoattack": max(pgd_aa) if pgd_aa else None}


def summary(verdict: dict | None) -> list[str]:
    """Lines for a terminal or a model card; the first says whether anything was flagged."""
    if not verdict:
        return []
    if verdict["flagged"]:
        lines = ["POSSIBLE GRADIENT MASKING: " + "; ".join(verdict["signs"])]
    else:
        ran = sorted({c["check"] for c in verdict["checks"]})
        lines = [f"no sign of gradient masking (checked: {', '.join(ran) or 'nothing'})"]
    if verdict["not_checked"]:
        lines.append("not checked: " + "; ".join(
            f"{n} (needs {NEEDS[n]})" if n in NEEDS else n for n in verdict["not_checked"]))
    margin = verdict.get("ce_vs_margin")
    if margin and not margin.get("flagged"):     # a flagged gap is already among the signs
        lines.append(margin["text"])
    return lines
