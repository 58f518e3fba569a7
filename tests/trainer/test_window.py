"""The log window (trainer/window.py): a stop between log points keeps its sums for the
checkpoint, and a window resumed from them logs at the next log point what the window left alone
would have, bit for bit, while its throughput counts only this session's images."""

import torch

from dist_free.engine.step_base import StepStats
from dist_free.trainer import window as window_module
from dist_free.trainer.window import Window

CPU = torch.device("cpu")


def steps(window: Window, losses) -> None:
    for loss in losses:
        window.add(StepStats(loss=torch.tensor(loss), acc=torch.tensor(loss / 7)), 16)


def test_a_window_carried_across_a_restart_logs_what_the_window_left_alone_would():
    losses = [0.1, 2.3, 0.7, 1.9, 0.3, 1.1]    # sums whose rounding depends on their order
    alone = Window(CPU)
    steps(alone, losses)
    expected, _ = alone.close(False, passes=4)

    stopped = Window(CPU)
    steps(stopped, losses[:4])
    stopped.close(True, passes=4, keep=True)           # the stop's own log line
    saved = stopped.state_dict()
    resumed = Window(CPU)
    resumed.load_state_dict(saved)
    steps(resumed, losses[4:])
    metrics, stop = resumed.close(False, passes=4)
    assert not stop
    assert (metrics["train/loss"], metrics["train/adv_acc"]) == \
        (expected["train/loss"], expected["train/adv_acc"])
    assert saved["images"] == 64


def test_the_throughput_after_a_restart_counts_this_sessions_images(monkeypatch):
    monkeypatch.setattr(window_module.time, "perf_counter", lambda: 100.0)
    resumed = Window(CPU)                          # opens at 100 s and closes at 102 s
    monkeypatch.setattr(window_module.time, "perf_counter", lambda: 102.0)
    resumed.load_state_dict({"sums": torch.tensor([50.0, 30.0]), "images": 1_000})
    steps(resumed, [1.0])
    metrics, _ = resumed.close(False, passes=4)
    assert (metrics["perf/images_per_s"], metrics["perf/passes_per_s"]) == (8.0, 32.0)
    assert metrics["train/loss"] == (50.0 + 16.0) / (1_000 + 16)


def test_a_log_point_empties_the_window():
    window = Window(CPU)
    steps(window, [1.0, 2.0])
    window.close(False, passes=1)
    assert window.state_dict()["images"] == 0 and window.sums.abs().sum() == 0
