"""The benchmark suite: its --quick form runs end to end, and the pieces it is built from measure
what they claim to (timing arithmetic, bytes moved, realistic JPEGs, DDP's all-reduced bytes)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_free.bench import pipeline as bench_data
from dist_free.bench import report as bench_report
from dist_free.bench import timing as bench_timing

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("step", "update", "pipeline", "e2e", "memory", "scaling")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `python -m dist_free.bench --quick` run, shared by the tests that read its output."""
    tmp = tmp_path_factory.mktemp("bench")
    out, md = tmp / "quick.json", tmp / "RESULTS.md"
    md.write_text("# Benchmark results\n\nintro kept\n\n<!-- bench: Other GPU -->\nold\n"
                  "<!-- /bench: Other GPU -->\n")
    proc = subprocess.run([sys.executable, "-m", "dist_free.bench", "--quick", "--out", str(out),
                           "--results-md", str(md)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text()), md.read_text()


def positive_numbers(tree, path=""):
    """Every number in a section, with its path; ratios and times must all be > 0 where timed."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from positive_numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from positive_numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_quick_json_has_every_section_with_its_device(quick_run):
    _, result, _ = quick_run
    env = result["environment"]
    assert env["device"] and env["torch"] == torch.__version__ and env["commit"]
    assert env["command"].startswith("python -m dist_free.bench --quick")
    for part in SECTIONS:
        assert result[part]["device"] == env["device"], part
        assert result[part]["wall_s"] > 0


def test_quick_timings_and_rates_are_positive(quick_run):
    _, r, _ = quick_run
    step = r["step"]["fp32"]
    for name in ("natural_step", "free_replay", "pgd7_step", "fgsm_rs_step", "fwd_bwd",
                 "fwd_bwd_input_grad", "perturbation_update"):
        assert step["seconds"][name]["median"] > 0, name
    for name in ("eager", "fused", "copy"):
        assert r["update"]["seconds"][name]["gb_per_s"] > 0, name
    assert min(v["median"] for v in r["pipeline"]["images_per_s"].values()) > 0
    assert r["e2e"]["jpeg"]["images_per_s"] > 0 and r["e2e"]["synthetic"]["images_per_s"] > 0
    assert 0 <= r["e2e"]["jpeg"]["data_wait_frac"] <= 1
    assert r["memory"]["free"]["peak_bytes"] > 0 and r["memory"]["natural"]["peak_bytes"] > 0
    for world, run in r["scaling"]["runs"].items():
        assert all(rank["free"]["images_per_s_per_rank"] > 0 for rank in run["ranks"]), world


def test_quick_targets_are_judged_not_assumed(quick_run):
    _, r, _ = quick_run
    t = r["step"]["fp32"]["targets"]["free_replay_vs_natural"]
    assert t["met"] == (t["measured"] <= 1.05)
    u = r["update"]["targets"]["fused_vs_eager"]
    assert u["met"] == (u["measured"] >= 5)


def test_free_buffer_adds_no_ddp_communication(quick_run):
    """At world size 2 DDP all-reduces the parameter gradients once per replay, nothing more:
    the per-rank perturbation never travels, so free and natural send the same bytes per pass."""
    _, r, _ = quick_run
    rank0 = r["scaling"]["runs"]["2"]["ranks"][0]
    free, natural = rank0["free"], rank0["natural"]
    assert free["allreduce_bytes_per_pass"] == natural["allreduce_bytes_per_pass"] == free["param_bytes"]
    assert free["allreduce_bytes_per_train_step"] == 4 * free["param_bytes"]    # m = 4 replays
    assert free["perturbation_bytes"] == 8 * 3 * 32 * 32 * 4                      # quick: batch 8, 32 px
    assert r["scaling"]["runs"]["1"]["ranks"][0]["free"]["allreduce_bytes_per_pass"] == 0


def test_memory_reports_the_perturbation_buffers(quick_run):
    _, r, _ = quick_run
    free, natural = r["memory"]["free"], r["memory"]["natural"]
    # fp32 delta plus the fp32 replay input, each (batch 8, 3, 32, 32); natural keeps none.
    assert free["buffer_bytes"] == 2 * 8 * 3 * 32 * 32 * 4 and natural["buffer_bytes"] == 0


def test_table_prints_and_results_md_keeps_other_devices(quick_run):
    stdout, result, md = quick_run
    for n in range(1, 7):
        assert f"### {n}." in stdout
    assert "free replay / natural" in stdout and result["environment"]["device"] in stdout
    assert md.startswith("# Benchmark results\n\nintro kept")
    assert "<!-- bench: Other GPU -->\nold\n<!-- /bench: Other GPU -->" in md
    assert md.count(f"<!-- bench: {result['environment']['device']} -->") == 1


def test_results_md_replaces_only_its_own_section(tmp_path):
    md = tmp_path / "R.md"
    env = {"environment": {"device": "CPU X"}}
    bench_report.update_results_md(md, env, "table one\n", Path("a.json"))
    bench_report.update_results_md(md, {"environment": {"device": "GPU Y"}}, "gpu\n", Path("b.json"))
    bench_report.update_results_md(md, env, "table two\n", Path("c.json"))
    text = md.read_text()
    assert "table one" not in text and "table two" in text and "gpu" in text
    assert text.count("<!-- bench: CPU X -->") == 1 and text.index("CPU X") < text.index("GPU Y")


def test_interleaved_divides_by_units_and_keeps_every_round():
    calls = []
    variants = {"a": bench_timing.Variant(lambda: calls.append("a"), units=4),
                "b": bench_timing.Variant(lambda: calls.append("b"))}
    samples = bench_timing.interleaved(variants, torch.device("cpu"), repeats=3, min_sample_s=0)
    assert [len(samples["a"]), len(samples["b"])] == [3, 3]
    assert calls == ["a", "b"] + ["a", "b"] * 3          # warm-up round, then interleaved rounds
    slow = bench_timing.Variant(lambda: __import__("time").sleep(0.01), units=2)
    s = bench_timing.interleaved({"s": slow}, torch.device("cpu"), repeats=1, min_sample_s=0)["s"]
    assert 0.004 < s[0] < 0.05                            # 10 ms per call over 2 units


def test_paired_ratio_is_per_round():
    samples = {"x": [2.0, 6.0, 3.0], "y": [1.0, 2.0, 3.0]}
    assert bench_timing.paired_ratio(samples, "x", "y") == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_essential_bytes_count_each_operand_once():
    x, delta, grad, out, _ = bench_timing.update_operands((2, 3, 4, 4), torch.device("cpu"), torch.bfloat16)
    n = 2 * 3 * 4 * 4
    assert bench_timing.essential_bytes(x, delta, grad, out) == n * (4 + 2 * 4 + 2 + 2)


def test_photo_jpegs_are_imagenet_sized_real_photos(tmp_path):
    root = bench_data.write_photo_jpegs(tmp_path / "j", 6, classes=2)
    files = sorted(root.glob("train/*/*.jpg"))
    assert len(files) == 6 and {f.parent.name for f in files} == {"class_0", "class_1"}
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG"
            assert 337 <= min(im.size) <= 412 and 450 <= max(im.size) <= 550   # ~375x500 +-10%
            pixels = np.asarray(im.convert("L"), dtype=np.float32)
        # A photo is smooth: neighbouring pixels differ far less than in noise (~85 grey levels).
        assert np.abs(np.diff(pixels, axis=1)).mean() < 20
    assert bench_data.write_photo_jpegs(root, 6) == root    # a complete set is reused
    with pytest.raises(ValueError, match="holds 6 JPEGs, not 7"):
        bench_data.write_photo_jpegs(root, 7)


def test_bad_options_name_the_option():
    proc = subprocess.run([sys.executable, "-m", "dist_free.bench", "--quick", "--parts", "step,gpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--parts ['gpu']" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dist_free.bench", "--quick", "--dtype", "fp8"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--dtype ['fp8']" in proc.stderr
