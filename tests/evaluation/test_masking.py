"""The gradient-masking verdict flags what does indicate masking and nothing else."""

import pytest

from dist_free.evaluation.masking import assess, summary


def pgd(eps, acc, steps=50, restarts=10):
    return {"attack": "pgd", "eps": eps, "steps": steps, "restarts": restarts,
            "step_size": 2.5 * eps / steps, "loss": "ce", "robust_top1": acc}


def aa(eps, ce, t, fab, square):
    return {"attack": "autoattack", "version": "standard", "eps": eps,
            "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "robust_top1": square,
            "robust_after": {"apgd-ce": ce, "apgd-t": t, "fab-t": fab, "square": square}}


def test_the_readme_demo_case_is_a_margin_gap_not_masking():
    """PGD-50x10 31.5% vs AutoAttack 25.6% with APGD-CE at 31.2%: the CE attacks agree; the gap
    is APGD-T's margin loss. The old rule (PGD - AA > 3 points) cried wolf here."""
    verdict = assess([pgd(8 / 255, 0.315), aa(8 / 255, 0.312, 0.258, 0.257, 0.256)])
    assert not verdict["flagged"] and verdict["signs"] == []
    assert verdict["pgd_minus_autoattack"] == pytest.approx(0.059)
    assert verdict["ce_vs_margin"]["apgd_ce_minus_margin"] == pytest.approx(0.055)
    lines = summary(verdict)
    assert lines[0].startswith("no sign of gradient masking")
    assert any("not a sign of gradient masking" in line and "5.50%" in line for line in lines)


def test_square_breaking_what_gradients_could_not_is_flagged():
    verdict = assess([aa(8 / 255, 0.40, 0.38, 0.38, 0.30)])
    assert verdict["flagged"]
    assert "Square (black-box) broke 8.00%" in summary(verdict)[0]


def test_pgd_far_above_apgd_ce_means_pgd_did_not_converge():
    verdict = assess([pgd(8 / 255, 0.45), aa(8 / 255, 0.38, 0.37, 0.37, 0.37)])
    assert [c["check"] for c in verdict["checks"] if c["flagged"]] == \
        ["cross_entropy_not_converged"]


def test_more_steps_or_restarts_still_helping_is_flagged():
    rows = [pgd(8 / 255, 0.50, steps=20, restarts=1), pgd(8 / 255, 0.42, steps=100, restarts=10)]
    verdict = assess(rows)
    assert verdict["flagged"] and "PGD-20x1 50.00% -> PGD-100x10 42.00%" in verdict["signs"][0]
    converged = assess([pgd(8 / 255, 0.43, steps=20, restarts=1),
                        pgd(8 / 255, 0.42, steps=100, restarts=10)])
    assert not converged["flagged"]


@pytest.mark.parametrize("curve, flagged", [
    ([0.60, 0.45, 0.20, 0.02], False),     # falls towards zero: healthy
    ([0.60, 0.58, 0.57, 0.55], True),      # a plateau at 8x the eps: masking
    ([0.60, 0.40, 0.50, 0.05], True),      # rises with eps: masking
])
def test_robust_accuracy_must_fall_towards_zero_as_eps_grows(curve, flagged):
    eps = [2 / 255, 4 / 255, 8 / 255, 16 / 255]
    verdict = assess([pgd(e, a, steps=10, restarts=1) for e, a in zip(eps, curve)])
    assert verdict["flagged"] is flagged
    assert "more_steps_help" in verdict["not_checked"]


def test_one_attack_at_one_eps_supports_no_verdict():
    assert assess([pgd(8 / 255, 0.4)]) is None
    assert summary(None) == []
