"""A RobustBench-style model-info record of an export (`model_info.json` beside the card).

RobustBench describes each leaderboard entry in a small JSON file (model_info/<dataset>/<threat
model>/<Name>.json: link, name, authors, additional_data, number_forward_passes, dataset, venue,
architecture, eps, clean_acc, reported, autoattack_acc, with accuracies as percent strings). This
writes the same fields from the model card, leaves null what only the authors can say (link,
name, authors, venue, dataset, whether the training data went beyond it), and adds what a reader
needs to trust the figures: how many images, which subset, the preprocessing, and where the
numbers came from. Accuracies come only from a standalone evaluation (`python -m
dist_free.evaluate`, exported with --report); an in-training PGD figure is never written as
clean_acc or autoattack_acc.
"""

from __future__ import annotations

from fractions import Fraction

from dist_free.evaluation.report import pct

FILE = "model_info.json"


def percent(x) -> str | None:
    """RobustBench's accuracy strings: percent without the sign ("72.34")."""
    return None if x is None else pct(x).removesuffix("%")


def eps_fraction(eps: float | None) -> str | None:
    """4/255 as RobustBench writes it ("4/255"), from the float the config holds."""
    if eps is None:
        return None
    f = Fraction(eps).limit_denominator(255 * 64)
    return f"{f.numerator}/{f.denominator}" if (f * 255).denominator != 1 else \
        f"{int(f * 255)}/255"


def autoattack_result(ev: dict) -> dict | None:
    rows = [r for r in ev.get("results") or [] if r.get("attack") == "autoattack"]
    return rows[0] if rows else None


def robustbench_info(card: dict) -> dict:
    ev, threat = card["evaluation"], card["threat_model"]
    final = ev.get("source") == "report"
    aa = autoattack_result(ev) if final else None
    clean = (ev.get("clean") or {}).get("top1") if final else None
    return {
        "link": None, "name": None, "authors": None, "venue": None, "dataset": None,
        "additional_data": None, "number_forward_passes": 1,
        "architecture": card["architecture"],
        "eps": eps_fraction(aa["eps"] if aa else threat["eval_eps"]),
        "clean_acc": percent(clean),
        "reported": percent(aa["robust_top1"]) if aa else None,
        "autoattack_acc": percent(aa["robust_top1"]) if aa else None,
        # Beyond RobustBench's fields: what the figures rest on.
        "threat_model": "Linf",
        "n_images": ev.get("images") if final else None,
        "subset": ev.get("subset") if final else None,
        "preprocessing": card["input"]["preprocessing"],
        "normalization": "inside the model (inputs are [0, 1] pixels)",
        "source": ("python -m dist_free.evaluate report" if final else
                   "none: no standalone evaluation was exported with this model; run python -m "
                   "dist_free.evaluate --attack autoattack and export with --report"),
        "autoattack_version": aa.get("version") if aa else None,
        "weights": card["weights"].get("source", "model"),
    }
