"""The method comparison gives every method the same number of forward/backward passes, then
evaluates each run's best.pt by one command on the same images."""

import json
from pathlib import Path

import pytest

from dist_free.bench import compare
from dist_free.config import ConfigError, load_config
from dist_free.engine import method_registry
from pipelines.cifar_demo import write_cifar_demo

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "cifar_demo.yaml"


def test_passes_per_step_counts_an_attacks_own_passes():
    cfg = load_config(DEMO, ["method.steps=3"])
    cost = {name: method_registry.passes_per_step(
        type(cfg.method)(**{**vars(cfg.method), "name": name})) for name in ("natural", "free",
                                                                              "fast", "pgd")}
    assert cost == {"natural": 1, "free": 1, "fast": 2, "pgd": 4}


def test_every_method_gets_the_configs_pass_budget():
    cfg = load_config(DEMO)                       # free, m = 4, 1,080 SGD steps = 1,080 passes
    plans = compare.budgets(cfg, ["natural", "free", "fast", "pgd"])
    assert {n: p["steps"] for n, p in plans.items()} == {"natural": 1080, "free": 1080,
                                                          "fast": 540, "pgd": 135}
    assert {p["passes"] for p in plans.values()} == {1080}
    assert "optim.steps=135" in plans["pgd"]["overrides"]


def test_a_step_schedules_milestones_scale_with_the_budget():
    cfg = load_config(ROOT / "configs/cifar10/free_m8.yaml")   # milestones 40,000 and 60,000
    assert "optim.milestones=[5000,7500]" in compare.budgets(cfg, ["pgd"])["pgd"]["overrides"]


def test_a_config_without_a_step_budget_or_an_unknown_method_is_refused(capsys):
    assert compare.main(["--config", str(ROOT / "configs/demo.yaml")]) == 2
    assert "optim.steps" in capsys.readouterr().err
    assert compare.main(["--config", str(DEMO), "--methods", "free,madry"]) == 2
    assert "madry" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        compare.budgets(load_config(ROOT / "configs/demo.yaml"), ["free"])


@pytest.mark.slow
def test_two_methods_train_and_evaluate_on_the_same_images(tmp_path):
    root = tmp_path / "data" / "cifar-10-batches-py"
    write_cifar_demo(root)
    out = tmp_path / "compare"
    code = compare.main(["--config", str(DEMO), "--methods", "natural,fast", "--out", str(out),
                         "--attack", "pgd", "--subset", "32", f"data.root={root.parent}",
                         "optim.steps=16", "eval.every=1", "eval.max_batches=1",
                         "eval.probes_per_epoch=0", "eval.steps=2", "tracking.enabled=false"])
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["method"], r["sgd_steps"], r["passes"]) for r in rows] == [
        ("natural", 16, 16), ("fast", 8, 16)]
    assert all(r["images"] == 32 and 0 <= r["robust"]["pgd50x10"] <= r["clean"] <= 1
               for r in rows)
    reports = sorted(out.glob("*/eval/eval_*.json"))
    assert [json.loads(r.read_text())["checkpoint"]["path"].rsplit("/", 1)[1] for r in reports] \
        == ["last.pt", "last.pt"]
    table = (out / "compare.md").read_text()
    assert "| natural | 16 | 16 |" in table and "| fast | 8 | 16 |" in table


def test_a_step_size_the_config_sets_stays_with_its_own_method():
    """PGD-7's 2/255 is not N-FGSM's, FGSM-RS's or free training's step: they take their own."""
    cfg = load_config(ROOT / "configs/cifar10/pgd7.yaml")      # method.step_size: 2/255
    plans = compare.budgets(cfg, ["pgd", "nfgsm", "fast", "free"])
    assert "method.step_size=null" not in plans["pgd"]["overrides"]
    for name in ("nfgsm", "fast", "free"):
        run_cfg = load_config(ROOT / "configs/cifar10/pgd7.yaml", plans[name]["overrides"])
        assert run_cfg.method.name == name and run_cfg.method.step_size is None
