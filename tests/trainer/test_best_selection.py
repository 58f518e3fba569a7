"""best.pt keeps the epoch with the best `eval.select_on` figure: holdout PGD accuracy (robust, the
default) or clean top-1 (clean, the authors' ImageNet model_best)."""

import logging
from types import SimpleNamespace

import pytest
import torch
from helpers_nets import sgd, tiny_net

from dist_free import checkpoint
from dist_free.config import load_config
from dist_free.distributed import DistInfo
from dist_free.trainer import loop, validation
from dist_free.trainer.run import Hooks, resumed_best_metric
from dist_free.trainer.window import Window

# Two evaluations that disagree: epoch 1 is the cleaner, epoch 2 the more robust.
EVALUATIONS = {1: {"clean": 0.70, "pgd": 0.20}, 2: {"clean": 0.60, "pgd": 0.30}}


class Loader(list):
    class_to_idx = {"a": 0}


def scripted_pgd_accuracy(run, loader, **kw):
    """The epoch's scripted figures, on whichever split is asked for."""
    figures = EVALUATIONS[run.epoch]
    return {"samples": 8, "top1": figures["clean"], "top5": 1.0,
            "pgd": {run.cfg.eval_eps: figures["pgd"]}}


def fake_run(tmp_path, select_on: str):
    """What evaluate_epoch and save read of a run, and nothing they do not (one process)."""
    cfg = load_config(None, [f"eval.select_on={select_on}", "eval.holdout=8",
                             "tracking.enabled=false"])
    model = tiny_net()
    return SimpleNamespace(
        cfg=cfg, d=DistInfo(), model=model, ema=None, optimizer=sgd(model),
        method=SimpleNamespace(state_dict=dict, rank_state=dict), train_loader=Loader([0]),
        val_loader=[], holdout_loader=[0], preemption=SimpleNamespace(requested=False),
        epoch=0, global_step=0, length_since=0, best_metric=-1.0,
        guard=validation.CollapseGuard(drop=0.5), run_dir=tmp_path, data={}, commit="test",
        tracker=SimpleNamespace(run_id=None, log_artifact=lambda *a: None),
        log_metrics=lambda *a: None, hooks=Hooks(), window=Window(torch.device("cpu")),
        probe_pending=False)


def train_two_epochs(tmp_path, monkeypatch, select_on: str) -> dict:
    monkeypatch.setattr(validation, "pgd_accuracy", scripted_pgd_accuracy)
    run = fake_run(tmp_path, select_on)
    for epoch in (1, 2):
        run.epoch, run.global_step = epoch, 10 * epoch
        assert loop.evaluate_epoch(run)
    best = checkpoint.checkpoint_dir(tmp_path) / "best.pt"
    return torch.load(best, weights_only=True)


@pytest.mark.parametrize("select_on, kept_epoch, figure", [("robust", 2, 0.30),
                                                           ("clean", 1, 0.70)])
def test_best_pt_follows_the_configured_figure_when_clean_and_robust_disagree(
        tmp_path, monkeypatch, select_on, kept_epoch, figure):
    best = train_two_epochs(tmp_path, monkeypatch, select_on)
    assert best["epoch"] == kept_epoch and best["best_metric"] == figure
    assert best["eval"]["selected_by"] == select_on
    assert best["eval"]["selection_metric"] == figure


def test_the_log_names_the_figure_best_pt_was_selected_by(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="dist_free.train"):
        train_two_epochs(tmp_path, monkeypatch, "clean")
    assert "best.pt selected on holdout by clean top-1: 60.00%" in caplog.text


def test_a_resume_with_another_figure_starts_the_comparison_afresh():
    saved = {"best_metric": 0.3, "config": load_config(None, []).to_dict()}   # robust
    assert resumed_best_metric(saved, load_config(None, [])) == 0.3
    assert resumed_best_metric(saved, load_config(None, ["eval.select_on=clean"])) == -1.0
    before_the_option = {"best_metric": 0.3, "config": {"eval": {}}}    # compared PGD accuracy
    assert resumed_best_metric(before_the_option, load_config(None, [])) == 0.3
