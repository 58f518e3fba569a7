"""Is a robustness figure an artefact of gradient masking? A verdict from attack results alone.

`assess(rows)` takes the evaluator's result rows (one per attack per eps: PGD rows with steps and
restarts, AutoAttack rows with the robust accuracy left after each of its attacks) and applies
the checks the literature gives for masking (Athalye et al. 2018; Carlini et al. 2019, "On
evaluating adversarial robustness"; Croce & Hein 2020):

  black_box_breaks_more  Square, a black-box attack that never sees a gradient, breaks images
                         that APGD-CE, APGD-T and FAB-T all failed on (more than square_gap).
  eps_not_falling        robust accuracy does not fall towards zero as eps grows: it rises
                         between two eps (beyond rise_tol), or at 4x the smallest eps or more it
                         is still above plateau x its value at the smallest eps.
  more_steps_help        a stronger run of the same attack (more steps x restarts) is lower by
                         more than `gap`: the weaker one had not converged.
  cross_entropy_not_converged
                         PGD (cross-entropy) is more than `gap` above APGD-CE, the same loss
                         optimised better: PGD's fixed steps did not converge.

What is NOT a sign of masking, and is reported as what it is: AutoAttack below PGD because its
APGD-T, with a targeted margin (DLR) loss, breaks images the cross-entropy attacks could not.
That gap ("ce_vs_margin") measures the weakness of the cross-entropy loss as an attack objective
on this model; when PGD and APGD-CE agree, the gradients were informative and the lower figure
is simply the stronger attack's, the one to report. Checks the rows cannot support are listed in
`not_checked`, so a clean verdict says what it rests on.
"""

from __future__ import annotations

GAP = 0.03          # accuracy points between two runs of the same loss
SQUARE_GAP = 0.01   # accuracy Square may take beyond the gradient attacks
RISE_TOL = 0.01     # noise allowed in an eps sweep
PLATEAU = 0.5       # at >= 4x the smallest eps, accuracy above this fraction is "not falling"


def check(name: str, flagged: bool, value: float, threshold: float, text: str) -> dict:
    return {"check": name, "flagged": bool(flagged), "value": value, "threshold": threshold,
            "text": text}


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def black_box(aa_rows: list[dict], square_gap: float) -> list[dict]:
    out = []
    for r in aa_rows:
        after = r.get("robust_after") or {}
        if r["eps"] and "square" in after and "fab-t" in after:
            broke = after["fab-t"] - after["square"]
            out.append(check("black_box_breaks_more", broke > square_gap, broke, square_gap,
                             f"eps {r['eps'] * 255:.4g}/255: Square (black-box) broke "
                             f"{pct(broke)} of the images the gradient attacks left standing"))
    return out


def ce_versus_pgd(pgd_rows: list[dict], aa_rows: list[dict], gap: float) -> list[dict]:
    out = []
    for aa in aa_rows:
        ce = (aa.get("robust_after") or {}).get("apgd-ce")
        for p in (p for p in pgd_rows if p["eps"] == aa["eps"] and aa["eps"]):
            if ce is not None:
                diff = p["robust_top1"] - ce
                out.append(check("cross_entropy_not_converged", diff > gap, diff, gap,
                                 f"eps {p['eps'] * 255:.4g}/255: PGD-{p['steps']}x{p['restarts']} "
                                 f"{pct(p['robust_top1'])} vs APGD-CE {pct(ce)} (same loss)"))
    return out


def more_steps(pgd_rows: list[dict], gap: float) -> list[dict]:
    out = []
    for eps in sorted({r["eps"] for r in pgd_rows if r["eps"]}):
        runs = sorted((r for r in pgd_rows if r["eps"] == eps),
                      key=lambda r: r["steps"] * r["restarts"])
        if len({(r["steps"], r["restarts"]) for r in runs}) < 2:
            continue
        weak, strong = runs[0], runs[-1]
        drop = weak["robust_top1"] - strong["robust_top1"]
        out.append(check("more_steps_help", drop > gap, drop, gap,
                         f"eps {eps * 255:.4g}/255: PGD-{weak['steps']}x{weak['restarts']} "
                         f"{pct(weak['robust_top1'])} -> PGD-{strong['steps']}x"
                         f"{strong['restarts']} {pct(strong['robust_top1'])}"))
    return out


def sweep(rows: list[dict], rise_tol: float, plateau: float) -> list[dict]:
    out = []
    for tag in dict.fromkeys(attack_tag(r) for r in rows):
        curve = sorted((r["eps"], r["robust_top1"]) for r in rows
                       if attack_tag(r) == tag and r["eps"] > 0)
        if len(curve) < 2:
            continue
        rise = max(b[1] - a[1] for a, b in zip(curve, curve[1:]))
        out.append(check("eps_not_falling", rise > rise_tol, rise, rise_tol,
                         f"{tag}: largest rise of robust accuracy as eps grows {pct(rise)}"))
        (e0, a0), (e1, a1) = curve[0], curve[-1]
        if e1 >= 4 * e0 and a0 > 0:
            ratio = a1 / a0
            out.append(check("eps_not_falling", ratio > plateau, ratio, plateau,
                             f"{tag}: at eps {e1 * 255:.4g}/255 robust accuracy is {pct(a1)}, "
                             f"{ratio:.2f}x its {pct(a0)} at {e0 * 255:.4g}/255"))
    return out


def attack_tag(r: dict) -> str:
    return f"pgd{r['steps']}x{r['restarts']}" if r["attack"] == "pgd" else r["attack"]


def ce_vs_margin(aa_rows: list[dict]) -> dict | None:
    """The largest gap over eps between APGD-CE and the margin-loss attacks after it."""
    gaps = [(after["apgd-ce"] - after.get("fab-t", r["robust_top1"]), r["eps"]) for r in aa_rows
            if r["eps"] and "apgd-ce" in (after := r.get("robust_after") or {})]
    if not gaps:
        return None
    value, eps = max(gaps)
    return {"apgd_ce_minus_margin": value, "eps": eps,
            "text": f"eps {eps * 255:.4g}/255: the targeted margin-loss attacks (APGD-T, FAB-T) "
                    f"break {pct(value)} more than APGD-CE: the cross-entropy loss's weakness "
                    "as an attack objective on this model, not a sign of gradient masking"}


def assess(rows: list[dict], *, gap: float = GAP, square_gap: float = SQUARE_GAP,
           rise_tol: float = RISE_TOL, plateau: float = PLATEAU) -> dict | None:
    """The verdict over the result rows (see the module docstring); None when the rows support
    no check at all (one attack at one eps)."""
    pgd_rows = [r for r in rows if r["attack"] == "pgd"]
    aa_rows = [r for r in rows if r["attack"] == "autoattack"]
    if not any(r["eps"] for r in rows):
        return None
    checks = (black_box(aa_rows, square_gap) + ce_versus_pgd(pgd_rows, aa_rows, gap)
              + more_steps(pgd_rows, gap) + sweep(rows, rise_tol, plateau))
    margin = ce_vs_margin(aa_rows)
    if not checks and margin is None:
        return None
    names = {c["check"] for c in checks}
    not_checked = [n for n in ("black_box_breaks_more", "cross_entropy_not_converged",
                               "more_steps_help", "eps_not_falling") if n not in names]
    pgd_aa = [p["robust_top1"] - a["robust_top1"] for p in pgd_rows for a in aa_rows
              if p["eps"] == a["eps"] and p["eps"]]
    return {"flagged": any(c["flagged"] for c in checks),
            "signs": [c["text"] for c in checks if c["flagged"]],
            "checks": checks, "not_checked": not_checked, "threshold": gap,
            "ce_vs_margin": margin,
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
        lines.append(f"not checked (needs more attacks or eps): {', '.join(verdict['not_checked'])}")
    if verdict["ce_vs_margin"]:
        lines.append(verdict["ce_vs_margin"]["text"])
    return lines
