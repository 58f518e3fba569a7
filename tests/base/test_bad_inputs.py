"""Every bad input, on every command: exit status 2, one message naming the culprit, no traceback.

Each case calls the command's `main` in this process (a subprocess per case would cost seconds of
imports each); one case per command also runs the real command line in a subprocess, as typed.
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch
from helpers_launch import ROOT, run_cmd
from PIL import Image

from dist_free import checkpoint

DEMO = str(ROOT / "configs" / "demo.yaml")


def make_inputs(tmp: Path) -> None:
    """The broken files the cases below point at, all inside `tmp`."""
    (tmp / "bad.yaml").write_text("model: {name: 3\n")
    (tmp / "binary.yaml").write_bytes(b"\xff\xfe\x00model")
    (tmp / "nested.yaml").write_text("data: [1, 2]\n")
    (tmp / "list.yaml").write_text("- model\n- data\n")
    torch.save({"model": {}, "epoch": 1}, tmp / "partial.pt")          # no config, no classes
    (tmp / "junk.pt").write_bytes(b"not a checkpoint at all")
    flat = tmp / "flat"
    (flat / "train" / "n01").mkdir(parents=True)
    (flat / "val").mkdir()
    for name in ("a.JPEG", "b.JPEG"):
        Image.new("RGB", (8, 8)).save(flat / "val" / name)
    (flat / "labels_bad.txt").write_text("n01\nnot-a-class\n")
    (tmp / "run").mkdir()


CASES = [
    # train: config files and overrides
    ("train", ["--config", "missing.yaml"], "config file not found: missing.yaml"),
    ("train", ["--config", "bad.yaml"], "bad.yaml: not valid YAML"),
    ("train", ["--config", "binary.yaml"], "binary.yaml: not UTF-8"),
    ("train", ["--config", "nested.yaml"], "data: expected a mapping"),
    ("train", ["--config", "list.yaml"], "expected a mapping of sections"),
    ("train", ["--config", DEMO, "optim.lr=1e999"], "optim.lr"),
    ("train", ["--config", DEMO, "optim.lr=nan"], "optim.lr: expected a number"),
    ("train", ["--config", DEMO, "data.batch_size=1e30"], "data.batch_size"),
    ("train", ["--config", DEMO, "optim.milestones=[1,2"], "optim.milestones: not valid YAML"),
    ("train", ["--config", DEMO, "data.image_size.x=3"], "'image_size' is not a section"),
    ("train", ["--config", DEMO, "run.name=../outside"], "run.name must be a plain folder name"),
    ("train", ["--config", DEMO, "method.fused=maybe"], "method.fused"),
    ("train", ["--config", DEMO, "tracking.uri=http://ann:pw@mlflow:5000"],
     "MLFLOW_TRACKING_USERNAME"),
    ("train", ["--config", DEMO, "data.root=nowhere"], "nowhere"),
    # evaluate: flags and checkpoints
    ("evaluate", ["--checkpoint", "missing.pt"], "missing.pt"),
    ("evaluate", ["--checkpoint", "junk.pt"], "junk.pt"),
    ("evaluate", ["--checkpoint", "partial.pt"], "partial.pt"),
    ("evaluate", ["--checkpoint", "partial.pt", "--steps", "0"], "--steps"),
    ("evaluate", ["--checkpoint", "partial.pt", "--steps", "ten"], "--steps"),
    ("evaluate", ["--checkpoint", "partial.pt", "--restarts", "-1"], "--restarts"),
    ("evaluate", ["--checkpoint", "partial.pt", "--step-size", "x/255"], "--step-size"),
    ("evaluate", ["--checkpoint", "partial.pt", "--attack", "cw"], "--attack"),
    ("evaluate", ["--checkpoint", "partial.pt", "--subset", "0"], "--subset"),
    # data: prepare, demo, verify
    ("data", ["prepare", "flat", "--val-labels", "no_labels.txt"], "no_labels.txt"),
    ("data", ["prepare", "flat", "--val-labels", "flat/labels_bad.txt"], "labels_bad.txt"),
    ("data", ["demo", "demo_out", "--size", "0"], "--size"),
    ("data", ["demo", "demo_out", "--val-fraction", "1.5"], "--val-fraction"),
    ("data", ["verify", "nowhere"], "nowhere"),
    # replay: what a run left unsent
    ("tracking", ["replay", "no_such_run"], "no_such_run"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    make_inputs(tmp)
    return tmp


def run_main(command: str, args: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of `python -m dist_free.<command> ARGS`, run in this process."""
    module = importlib.import_module(f"dist_free.{command}")
    main = module.main if hasattr(module, "main") else importlib.import_module(
        f"dist_free.{command}.__main__").main
    try:
        return main(args), ""
    except SystemExit as e:                      # argparse's own errors
        return e.code, ""


@pytest.mark.parametrize("command, args, culprit", CASES,
                         ids=[f"{c}-{' '.join(a)[-40:]}" for c, a, _ in CASES])
def test_bad_input_exits_2_naming_the_culprit_without_a_traceback(inputs, command, args, culprit,
                                                                  monkeypatch, capfd):
    monkeypatch.chdir(inputs)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status, _ = run_main(command, args)          # an uncaught exception fails the test here
    err = capfd.readouterr().err
    assert status == 2, err
    assert culprit in err, err
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) <= 3, err


@pytest.mark.parametrize("command, args, culprit", [
    case for case in CASES if case[1][:2] in (["--config", "binary.yaml"], ["--checkpoint", "junk.pt"],
                                              ["demo", "demo_out"], ["replay", "no_such_run"])])
def test_the_real_command_line_answers_the_same(inputs, command, args, culprit):
    proc = run_cmd([sys.executable, "-m", f"dist_free.{command}", *args], inputs, timeout=120,
                   cwd=inputs)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert culprit in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_partial_checkpoint_fixture_is_really_missing_parts(inputs):
    with pytest.raises(checkpoint.CheckpointError, match=r"missing \['config'\]"):
        checkpoint.load(inputs / "partial.pt")
