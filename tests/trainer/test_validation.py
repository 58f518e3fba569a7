"""Evaluation during training reads of a run exactly what `validation.Evaluated` names: a stand-in
with those fields and no others is evaluated like a run (one process, no process group)."""

from dataclasses import make_dataclass
from types import SimpleNamespace

import pytest
import torch
from helpers_nets import minibatches, tiny_net

from dist_free.config import load_config
from dist_free.distributed import DistInfo
from dist_free.engine.ema import ModelEMA
from dist_free.trainer import validation

# A run cut down to the interface: reading any other attribute raises AttributeError.
StandIn = make_dataclass("StandIn", list(validation.Evaluated.__annotations__))


def stand_in(*, holdout: bool, ema: bool = False, stop: bool = False):
    cfg = load_config(None, ["eval.steps=2", "eval.probe_steps=1", "eval.probe_batches=1"])
    model = tiny_net().eval()
    # The model is right on every holdout image and wrong on every val image, so the two
    # splits' accuracies tell which one a figure came from.
    return StandIn(cfg=cfg, d=DistInfo(), model=model,
                    ema=ModelEMA(model, 0.5) if ema else None,
                    val_loader=labelled(model, minibatches([8, 8], seed=1), right=False),
                    holdout_loader=labelled(model, minibatches([4, 4], seed=2), right=True)
                    if holdout else None,
                    preemption=SimpleNamespace(requested=stop), epoch=3, global_step=30)


@torch.no_grad()
def labelled(model, batches, *, right: bool) -> list:
    """The batches' images labelled with the model's prediction, or with another class."""
    out = []
    for images, _ in batches:
        predicted = model(images).argmax(1)
        out.append((images, predicted if right else (predicted + 1) % 5))
    return out


def forwards(module) -> list:
    """A list that grows by one at each forward of `module`."""
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


def test_the_epoch_report_selects_on_the_holdout_and_reports_val():
    run = stand_in(holdout=True)
    report = validation.epoch_report(run)
    assert (report["epoch"], report["global_step"], report["samples"]) == (3, 30, 16)
    assert report["holdout"]["samples"] == 8 and report["selected_on"] == "holdout"
    assert (report["top1"], report["holdout"]["top1"]) == (0.0, 1.0)
    assert report["selection_metric"] == report["holdout"]["pgd"] > report["pgd"]
    assert (report["pgd_steps"], report["dtype"], report["weights"]) == (2, "fp32", "model")


def test_without_a_holdout_the_report_selects_on_val():
    report = validation.epoch_report(stand_in(holdout=False))
    assert report["holdout"] is None and report["selected_on"] == "val"
    assert report["selection_metric"] == report["pgd"]


def test_the_epoch_report_evaluates_the_ema_when_the_run_keeps_one():
    run = stand_in(holdout=False, ema=True)
    live, averaged = forwards(run.model), forwards(run.ema.module)
    assert validation.epoch_report(run)["weights"] == "ema"
    assert averaged and not live


def test_the_probe_attacks_the_live_model_on_its_first_holdout_batches():
    run = stand_in(holdout=True, ema=True)
    live, averaged = forwards(run.model), forwards(run.ema.module)
    robust, clean = validation.probe(run)
    assert clean == 1.0 and live and not averaged     # the holdout's, not val's
    # eval.probe_batches=1: the first holdout batch (4 images) only, as pgd_accuracy counts it.
    first = validation.pgd_accuracy(run, run.holdout_loader, steps=1, restarts=1, max_batches=1)
    assert first["samples"] == 4 and (first["pgd"][run.cfg.eval_eps], first["top1"]) == (robust, clean)


def test_a_requested_stop_ends_the_evaluation():
    with pytest.raises(validation.Stopped):
        validation.epoch_report(stand_in(holdout=True, stop=True))
