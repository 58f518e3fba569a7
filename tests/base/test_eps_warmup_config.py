"""method.eps_warmup_epochs and eps_warmup_start: bad values stop the run naming the key."""

import pytest

from dist_free.config import ConfigError, load_config


@pytest.mark.parametrize("override, match", [
    ("method.eps_warmup_epochs=-1", r"method\.eps_warmup_epochs must be >= 0, got -1"),
    ("method.eps_warmup_start=-0.5", r"method\.eps_warmup_start must be >= 0, got -0.5"),
    ("method.eps_warmup_start=1.5", r"method\.eps_warmup_start is a fraction of method\.eps "
                                    r"in \[0, 1\], got 1.5"),
    ("method.eps_warmup_epochs=91", r"method\.eps_warmup_epochs=91.0 is longer than the run "
                                    r"\(optim\.epochs=90"),
])
def test_impossible_warm_ups_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_natural_training_with_a_warm_up_is_an_error_saying_it_has_no_eps():
    with pytest.raises(ConfigError, match=r"method\.eps_warmup_epochs=5.0 with method\.name="
                                          r"natural: .*no eps to warm up"):
        load_config(None, ["method.name=natural", "method.eps_warmup_epochs=5"])


def test_a_warm_up_in_epochs_is_refused_under_a_step_budget():
    with pytest.raises(ConfigError, match=r"method\.eps_warmup_epochs is in epochs; with "
                                          r"optim\.steps set"):
        load_config(None, ["optim.steps=1000", "method.eps_warmup_epochs=5"])


@pytest.mark.parametrize("method", ["free", "pgd", "fast", "nfgsm"])
def test_every_attacking_method_takes_a_warm_up_up_to_the_whole_run(method):
    cfg = load_config(None, [f"method.name={method}", "optim.epochs=10",
                             "method.eps_warmup_epochs=10", "method.eps_warmup_start=1"])
    assert (cfg.method.eps_warmup_epochs, cfg.method.eps_warmup_start) == (10.0, 1.0)
