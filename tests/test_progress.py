"""Rank 0's progress: a redrawn bar on a terminal, log lines elsewhere, silence on other ranks."""

import logging

from dist_free.progress import Progress

METRICS = {"train/loss": 1.234, "train/adv_acc": 0.5, "perf/images_per_s": 321.0,
           "perf/data_wait_frac": 0.07}


def test_bar_redraws_one_line(capsys):
    p = Progress(True, "bar", "epoch 1/3", total=10)
    p.update(5, METRICS)
    p.close()
    err = capsys.readouterr().err
    assert err.startswith("\r[############............] epoch 1/3 5/10 loss 1.234")
    assert "321 img/s" in err and "data-wait 7%" in err and err.endswith("\n")


def test_log_mode_writes_plain_lines(caplog, capsys):
    caplog.set_level(logging.INFO, "dist_free.train")
    p = Progress(True, "log", "epoch 2/3", total=10)
    p.update(10, METRICS)
    p.close()
    assert "epoch 2/3 10/10 loss 1.234 adv-acc 50.0%" in caplog.text
    assert "\r" not in capsys.readouterr().err


def test_auto_is_plain_when_not_on_a_terminal(caplog, capsys):
    caplog.set_level(logging.INFO, "dist_free.train")
    Progress(True, "auto", "e", total=2).update(1, METRICS)   # pytest's stderr is no terminal
    assert "e 1/2" in caplog.text and "\r" not in capsys.readouterr().err


def test_other_ranks_stay_silent(caplog, capsys):
    caplog.set_level(logging.INFO, "dist_free.train")
    p = Progress(False, "bar", "e", total=2)
    p.update(1, METRICS)
    p.close()
    assert caplog.text == "" and capsys.readouterr().err == ""
