"""The gradient-masking verdict flags what does indicate masking and nothing else."""

import re
from pathlib import Path

import pytest

from dist_free.evaluation.masking import assess, summary

README = Path(__file__).resolve().parents[2] / "README.md"


def pgd(eps, acc, steps=50, restarts=10, loss="ce"):
    return {"attack": "pgd", "eps": eps, "steps": steps, "restarts": restarts,
            "step_size": 2.5 * eps / steps, "loss": loss, "robust_top1": acc}


def aa(eps, ce, t, fab, square):
    return {"attack": "autoattack", "version": "standard", "eps": eps,
            "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "robust_top1": square,
            "robust_after": {"apgd-ce": ce, "apgd-t": t, "fab-t": fab, "square": square}}


def flagged_checks(verdict):
    return [c["check"] for c in verdict["checks"] if c["flagged"]]


def readme_demo_figures() -> dict:
    """The demo's measured figures as the README states them (its first section)."""
    text = " ".join(README.read_text().split())
    found = {
        "autoattack": re.search(r"([\d.]+)% robust and [\d.]+% clean at eps 8/255", text),
        "apgd_ce": re.search(r"after APGD-CE alone ([\d.]+)%", text),
        "pgd10": re.search(r"read [\d.]+% clean and ([\d.]+)% PGD-10", text),
    }
    assert all(found.values()), f"the README's demo figures moved: {found}"
    return {k: float(m.group(1)) / 100 for k, m in found.items()}


def assert_a_margin_gap_not_masking(verdict, pgd_minus_aa, margin_gap):
    assert not verdict["flagged"] and verdict["signs"] == []
    assert verdict["pgd_minus_autoattack"] == pytest.approx(pgd_minus_aa)
    assert verdict["ce_vs_margin"]["apgd_ce_minus_margin"] == pytest.approx(margin_gap)
    lines = summary(verdict)
    assert lines[0].startswith("no sign of gradient masking")
    assert any("not a sign of gradient masking" in line and f"{100 * margin_gap:.2f}%" in line
               for line in lines)


def test_the_readme_demo_figures_are_a_margin_gap_not_masking():
    """The demo as the README reports it: AutoAttack 24.8%, 30.1% after APGD-CE, its
    in-training PGD-10 30.6%. The CE attacks agree; the 5.3 points are APGD-T's margin loss."""
    demo = readme_demo_figures()
    assert demo == pytest.approx({"autoattack": 0.248, "apgd_ce": 0.301, "pgd10": 0.306})
    a = demo["autoattack"]
    verdict = assess([pgd(8 / 255, demo["pgd10"], steps=10, restarts=1),
                      aa(8 / 255, demo["apgd_ce"], a, a, a)], num_classes=10)
    assert_a_margin_gap_not_masking(verdict, pgd_minus_aa=0.058, margin_gap=0.053)


def test_an_earlier_demo_case_is_a_margin_gap_not_masking():
    """PGD-50x10 31.5% vs AutoAttack 25.6% with APGD-CE at 31.2%. The old rule (PGD - AA > 3
    points) cried wolf here."""
    verdict = assess([pgd(8 / 255, 0.315), aa(8 / 255, 0.312, 0.258, 0.257, 0.256)])
    assert_a_margin_gap_not_masking(verdict, pgd_minus_aa=0.059, margin_gap=0.055)


def test_a_healthy_pgd_trained_sweep_is_not_flagged():
    """A typical PGD-7 CIFAR WRN under PGD-50x10: 78% / 68% / 47% at 2, 4, 8/255. It falls
    with eps as it should; nothing in the literature asks it to fall faster."""
    verdict = assess([pgd(e / 255, a) for e, a in ((2, 0.78), (4, 0.68), (8, 0.47))],
                     num_classes=10)
    assert not verdict["flagged"], verdict["signs"]
    assert "eps_not_falling" in {c["check"] for c in verdict["checks"]}
    assert summary(verdict)[0].startswith("no sign of gradient masking")


def test_cross_entropy_far_above_the_margin_attacks_is_flagged():
    """APGD-CE 60% against 5% after APGD-T and FAB-T: CE's gradients are useless on this model
    (the logit-scaling / saturation failure DLR was made for); PGD agreeing with APGD-CE only
    confirms that every CE attack is fooled."""
    verdict = assess([pgd(8 / 255, 0.61), aa(8 / 255, 0.60, 0.07, 0.05, 0.05)], num_classes=10)
    assert verdict["flagged"]
    assert flagged_checks(verdict) == ["margin_far_below_cross_entropy"]
    lines = summary(verdict)
    assert lines[0].startswith("POSSIBLE GRADIENT MASKING") and "break 55.00% more" in lines[0]
    assert not any("not a sign of gradient masking" in line for line in lines)
    assert verdict["ce_vs_margin"]["flagged"] and verdict["ce_vs_margin"]["eps"] == 8 / 255


def test_square_breaking_what_gradients_could_not_is_flagged():
    verdict = assess([aa(8 / 255, 0.40, 0.38, 0.38, 0.30)])
    assert verdict["flagged"]
    assert "Square (black-box) broke 8.00%" in summary(verdict)[0]


def test_square_is_held_to_autoattacks_own_threshold_of_a_fifth_of_a_point():
    assert flagged_checks(assess([aa(8 / 255, 0.40, 0.38, 0.38, 0.375)])) == \
        ["black_box_breaks_more"]
    assert not assess([aa(8 / 255, 0.40, 0.38, 0.38, 0.379)])["flagged"]


def test_pgd_far_above_apgd_ce_means_pgd_did_not_converge():
    verdict = assess([pgd(8 / 255, 0.45), aa(8 / 255, 0.38, 0.37, 0.37, 0.37)])
    assert flagged_checks(verdict) == ["cross_entropy_not_converged"]


def test_a_pgd_run_of_another_loss_is_not_held_to_apgd_ce():
    verdict = assess([pgd(8 / 255, 0.45, loss="dlr"), aa(8 / 255, 0.38, 0.37, 0.37, 0.37)])
    assert not verdict["flagged"] and "cross_entropy_not_converged" in verdict["not_checked"]


def test_more_steps_or_restarts_still_helping_is_flagged():
    rows = [pgd(8 / 255, 0.50, steps=20, restarts=1), pgd(8 / 255, 0.42, steps=100, restarts=10)]
    verdict = assess(rows)
    assert verdict["flagged"] and "PGD-20x1 50.00% -> PGD-100x10 42.00%" in verdict["signs"][0]
    converged = assess([pgd(8 / 255, 0.43, steps=20, restarts=1),
                        pgd(8 / 255, 0.42, steps=100, restarts=10)])
    assert not converged["flagged"]


def test_a_stronger_attack_doing_worse_is_flagged():
    """Carlini et al.: iterative attacks are strictly stronger than single-step ones."""
    verdict = assess([pgd(8 / 255, 0.40, steps=1, restarts=1),
                      pgd(8 / 255, 0.45, steps=50, restarts=10)])
    assert flagged_checks(verdict) == ["more_steps_help"]
    assert "the stronger attack does worse" in verdict["signs"][0]


@pytest.mark.parametrize("curve, flagged", [
    ([0.60, 0.45, 0.20, 0.02], False),     # falls towards zero: healthy
    ([0.60, 0.40, 0.50, 0.05], True),      # rises with eps: masking
])
def test_robust_accuracy_must_not_rise_as_eps_grows(curve, flagged):
    eps = [2 / 255, 4 / 255, 8 / 255, 16 / 255]
    verdict = assess([pgd(e, a, steps=10, restarts=1) for e, a in zip(eps, curve)])
    assert verdict["flagged"] is flagged
    assert "more_steps_help" in verdict["not_checked"]


@pytest.mark.parametrize("at_half, flagged", [(0.50, True), (0.11, False), (0.0, False)])
def test_a_plateau_is_flagged_where_accuracy_must_be_chance(at_half, flagged):
    """A plateau (60% -> 55% over 2..16/255) carried to eps 0.5, where no 10-class model can
    beat chance (a solid gray image is within reach of every input)."""
    eps = [2 / 255, 4 / 255, 8 / 255, 16 / 255, 0.5]
    curve = [0.60, 0.58, 0.57, 0.55, at_half]
    verdict = assess([pgd(e, a, steps=10, restarts=1) for e, a in zip(eps, curve)],
                     num_classes=10)
    assert verdict["flagged"] is flagged
    assert flagged_checks(verdict) == (["above_chance_at_large_eps"] if flagged else [])


def test_a_sweep_short_of_eps_half_says_the_chance_check_was_not_made():
    eps = [2 / 255, 4 / 255, 8 / 255, 16 / 255]
    verdict = assess([pgd(e, a, steps=10, restarts=1)
                      for e, a in zip(eps, [0.60, 0.58, 0.57, 0.55])], num_classes=10)
    assert not verdict["flagged"] and "above_chance_at_large_eps" in verdict["not_checked"]
    assert any(line.startswith("not checked:") and "an eps >= 0.5" in line
               for line in summary(verdict))


def test_one_attack_at_one_eps_supports_no_verdict():
    assert assess([pgd(8 / 255, 0.4)]) is None
    assert summary(None) == []
