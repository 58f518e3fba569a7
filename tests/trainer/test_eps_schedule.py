"""The eps warm-up's schedule: linear in natural-training epochs from a fraction of eps to eps,
as the loop sets it at each step and logs it."""

import pytest

from dist_free.config import load_config
from dist_free.trainer import schedule

EPS = 8 / 255


def warm(method: str, *extra: str):
    return load_config(None, [f"method.name={method}", "method.eps=8/255", "optim.epochs=40",
                              "method.eps_warmup_epochs=8", *extra])


def test_eps_rises_linearly_from_zero_over_the_warm_up_then_holds():
    cfg = warm("pgd")                   # one pass per minibatch: natural epochs = real epochs
    assert schedule.eps_at(cfg, 0.0) == 0.0
    assert schedule.eps_at(cfg, 2.0) == pytest.approx(EPS / 4)
    assert schedule.eps_at(cfg, 4.0) == pytest.approx(EPS / 2)
    assert schedule.eps_at(cfg, 8.0) == EPS
    assert schedule.eps_at(cfg, 30.5) == EPS


def test_free_training_warms_up_over_the_natural_epochs_divided_by_replays():
    cfg = warm("free", "method.replays=4")      # 8 natural-training epochs = 2 real epochs
    assert schedule.eps_at(cfg, 0.0) == 0.0
    assert schedule.eps_at(cfg, 1.0) == pytest.approx(EPS / 2)
    assert schedule.eps_at(cfg, 1.5) == pytest.approx(3 * EPS / 4)
    assert schedule.eps_at(cfg, 2.0) == EPS and schedule.eps_at(cfg, 9.0) == EPS


@pytest.mark.parametrize("method", ["fast", "nfgsm"])
def test_a_warm_up_may_start_from_a_fraction_of_eps(method):
    cfg = warm(method, "method.eps_warmup_start=0.25")
    assert schedule.eps_at(cfg, 0.0) == pytest.approx(EPS / 4)
    assert schedule.eps_at(cfg, 4.0) == pytest.approx(EPS * (0.25 + 0.75 / 2))
    assert schedule.eps_at(cfg, 8.0) == EPS


def test_without_a_warm_up_eps_is_full_from_the_first_step_and_natural_has_none():
    cfg = load_config(None, ["method.name=pgd", "method.eps=8/255"])
    assert schedule.eps_at(cfg, 0.0) == EPS
    assert schedule.eps_at(load_config(None, ["method.name=natural"]), 0.0) is None

