"""The report records the EvalProtocol it is given (no command line involved), and
`python -m dist_free.evaluate` builds that protocol from its flags."""

import hashlib
from types import SimpleNamespace

import pytest

from dist_free.evaluate import eval_protocol, parse_args
from dist_free.evaluation.protocol import EvalProtocol
from dist_free.evaluation.report import build_report


def protocol(**changes) -> EvalProtocol:
    fields = dict(attacks=("pgd", "autoattack"), eps_values=(0.0, 4 / 255), steps=4, restarts=2,
                  step_size=None, amp="off", subset=None, masking_gap=0.03)
    return EvalProtocol(**{**fields, **changes})


def result(eps: float) -> dict:
    """What robust_eval.evaluate returns for 20 images attacked at `eps` only."""
    after = {"apgd-ce": 0.5, "apgd-t": 0.45, "fab-t": 0.45, "square": 0.45}
    return {"samples": 20, "top1": 0.8, "top5": 1.0, "pgd": {eps: 0.5},
            "autoattack": {eps: {"robust_top1": 0.45, "robust_after": after}}}


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "best.pt"
    path.write_bytes(b"weights")
    return path


def test_the_report_records_the_protocol_it_was_given(ckpt):
    loader = SimpleNamespace(batch_size=16)
    report = build_report(protocol(masking_gap=0.07), ckpt, {"epoch": 2, "global_step": 9},
                          result(4 / 255), loader, world_size=2, seconds=1.5)
    assert report["checkpoint"] == {"path": str(ckpt), "epoch": 2, "global_step": 9,
                                    "sha256": hashlib.sha256(b"weights").hexdigest()}
    assert (report["dtype"], report["subset"], report["batch_size"]) == ("fp32", None, 16)
    assert [(r["attack"], r["eps"], r["robust_top1"]) for r in report["results"]] == [
        ("pgd", 0.0, 0.8), ("autoattack", 0.0, 0.8),          # eps 0: the clean accuracy
        ("pgd", 4 / 255, 0.5), ("autoattack", 4 / 255, 0.45)]
    pgd = report["results"][2]
    assert (pgd["steps"], pgd["restarts"], pgd["step_size"]) == (4, 2, 2.5 * (4 / 255) / 4)
    assert report["gradient_masking"]["threshold"] == 0.07


def test_the_reports_step_size_dtype_subset_and_attacks_follow_the_protocol(ckpt):
    chosen = protocol(attacks=("pgd",), eps_values=(8 / 255,), step_size=1 / 255, amp="bf16",
                      subset=20, masking_gap=0.1)
    report = build_report(chosen, ckpt, {"epoch": 1}, result(8 / 255), SimpleNamespace(),
                          world_size=1, seconds=0.1)
    assert [r["attack"] for r in report["results"]] == ["pgd"]
    assert report["results"][0]["step_size"] == 1 / 255 and report["dtype"] == "bf16"
    assert report["subset"]["n"] == 20 and report["subset"]["files_sha256"] is None


def test_the_masking_verdict_knows_the_checkpoints_chance_level(ckpt):
    """At eps 0.5 no model beats chance; the report gives the verdict the checkpoint's classes."""
    sweep = protocol(attacks=("pgd",), eps_values=(0.0, 0.5))
    state = {"epoch": 1, "config": {"model": {"num_classes": 10}}}
    report = build_report(sweep, ckpt, state, result(0.5), SimpleNamespace(), world_size=1,
                          seconds=0.1)
    verdict = report["gradient_masking"]
    assert verdict["flagged"] and "above chance (10 classes)" in verdict["signs"][0]


def test_the_command_builds_the_protocol_its_flags_ask_for():
    run = SimpleNamespace(eval_eps=8 / 255)
    assert eval_protocol(parse_args(["--checkpoint", "best.pt"]), run) == protocol(
        attacks=("pgd",), eps_values=(8 / 255,), steps=50, restarts=10)
    flags = ["--checkpoint", "best.pt", "--attack", "autoattack,pgd", "--eps", "4/255,0",
             "--steps", "7", "--restarts", "3", "--step-size", "1/255", "--amp", "off",
             "--subset", "100", "--masking-gap", "0.05"]
    assert eval_protocol(parse_args(flags), run) == protocol(
        eps_values=(0.0, 4 / 255), steps=7, restarts=3, step_size=1 / 255, subset=100,
        masking_gap=0.05)
    assert protocol().attacked_eps == [4 / 255] and protocol(amp="fp16").amp_dtype is not None
