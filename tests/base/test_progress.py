"""Rank 0's progress: a tqdm bar on a terminal, log lines with rate and time left elsewhere,
silence on other ranks; `python -m dist_free.evaluate` reports progress when not on a terminal."""

import logging
import subprocess
import sys

import torch
from helpers_launch import ROOT, probe_env

from dist_free import checkpoint
from dist_free.config import load_config
from dist_free.engine.models import build_model
from dist_free.progress import Progress

FIGURES = "loss 1.234 adv-acc 50.0%"


def test_bar_mode_draws_a_tqdm_bar_with_the_callers_figures(capsys):
    p = Progress("epoch 1/3", 10, mode="bar")
    p.update(5, FIGURES)
    p.close()
    err = capsys.readouterr().err
    assert "\r" in err and "epoch 1/3" in err and "5/10" in err and FIGURES in err


def test_a_log_line_gives_count_rate_time_left(caplog, capsys):
    caplog.set_level(logging.INFO, "dist_free.progress")
    p = Progress("epoch 2/3", 10, mode="log", log_every_s=0)
    p.describe("PGD eps 4/255")
    p.update(10, FIGURES)
    p.close()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("epoch 2/3: PGD eps 4/255: 10/10 batch (100%), ")
    assert "batch/s" in line and line.endswith(f"left; {FIGURES}")
    assert "\r" not in capsys.readouterr().err


def test_log_lines_come_once_per_log_every_s_plus_one_at_the_end(caplog):
    caplog.set_level(logging.INFO, "dist_free.progress")
    p = Progress("eval", 10, mode="log", log_every_s=3600)
    for _ in range(10):
        p.advance(1)
    assert [r.getMessage().split(": ")[1].split(" ")[0] for r in caplog.records] == ["1/10", "10/10"]


def test_auto_is_plain_when_not_on_a_terminal(caplog, capsys):
    caplog.set_level(logging.INFO, "dist_free.progress")
    Progress("e", 2, mode="auto").update(1)           # pytest's stderr is no terminal
    assert "e: 1/2" in caplog.text and "\r" not in capsys.readouterr().err


def test_other_ranks_stay_silent(caplog, capsys):
    caplog.set_level(logging.INFO, "dist_free.progress")
    p = Progress("e", 2, enabled=False, mode="bar")
    p.update(1, FIGURES)
    p.close()
    assert caplog.text == "" and capsys.readouterr().err == ""


def test_evaluate_logs_progress_lines_when_not_on_a_terminal(demo_root, tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={demo_root}"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.num_classes)
    path = checkpoint.save_atomic({"model": model.state_dict(), "epoch": 1, "global_step": 7,
                                   "config": cfg.to_dict(),
                                   "class_to_idx": {str(i): i for i in range(10)}},
                                  tmp_path / "best.pt")
    proc = subprocess.run([sys.executable, "-m", "dist_free.evaluate", "--checkpoint", str(path),
                           "--subset", "16", "--steps", "1", "--restarts", "1", "--eps", "8/255"],
                          cwd=ROOT, env=probe_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [l for l in proc.stderr.splitlines() if "evaluate: PGD-1 x 1 eps 8/255: " in l]
    assert lines and "16/16 img (100%)" in lines[-1] and "img/s" in lines[-1]
