"""The benchmark suite: its --quick form runs end to end, and the pieces it is built from measure
what they claim to (timing arithmetic, bytes moved, realistic JPEGs, DDP's all-reduced bytes)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_free.bench import pipeline as bench_data
from dist_free.bench import reference as bench_reference
from dist_free.bench import report as bench_report
from dist_free.bench import timing as bench_timing
from dist_free.bench import workers as bench_workers
from dist_free.engine import linf
from dist_free.engine.free import FreeAdversarialTrainer
from dist_free.engine.methods import build_method
from dist_free.engine.models import build_model

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("step", "floor", "update", "pipeline", "e2e", "reference", "memory", "scaling", "eval")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `python -m dist_free.bench --quick` run, shared by the tests that read its output."""
    tmp = tmp_path_factory.mktemp("bench")
    out, md = tmp / "quick.json", tmp / "RESULTS.md"
    md.write_text("# Benchmark results\n\nintro kept\n\n<!-- bench: Other GPU -->\nold\n"
                  "<!-- /bench: Other GPU -->\n")
    proc = subprocess.run([sys.executable, "-m", "dist_free.bench", "--quick", "--out", str(out),
                           "--results-md", str(md)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)  # a hang guard: a loaded 2-core host took >300 s
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


def test_quick_timings_with_rates_are_positive(quick_run):
    _, r, _ = quick_run
    step = r["step"]["fp32"]
    for name in ("natural_step", "free_replay", "pgd7_step", "fgsm_rs_step", "nfgsm_step", "fwd_bwd",
                 "fwd_bwd_input_grad", "perturbation_update"):
        assert step["seconds"][name]["median"] > 0, name
    for name in ("eager", "eager_alloc", "fused", "copy"):
        assert r["update"]["seconds"][name]["gb_per_s"] > 0, name
    floor = r["floor"]["fp32"]
    for name in ("natural_step", "floor", "free_replay"):
        assert floor["seconds"][name]["median"] > 0, name
    ratio = floor["ratios"]["free_replay/floor"]
    assert ratio["median_ci95"][0] <= ratio["median"] <= ratio["median_ci95"][1]
    assert floor["profile"]["totals"]["free_replay"]["self_ms"] > 0
    for name in ("reference", "ours_fp32", "ours_recommended"):
        assert r["reference"]["images_per_s"][name]["median"] > 0, name
    assert min(v["median"] for v in r["pipeline"]["images_per_s"].values()) > 0
    assert r["e2e"]["jpeg"]["images_per_s"] > 0 and r["e2e"]["synthetic"]["images_per_s"] > 0
    assert 0 <= r["e2e"]["jpeg"]["data_wait_frac"] <= 1
    assert min(v["median"] for v in r["resident"]["loader_images_per_s"].values()) > 0
    assert 0 <= r["resident"]["training"]["resident"]["data_wait_frac"] <= 1
    assert r["memory"]["free"]["peak_bytes"] > 0 and r["memory"]["natural"]["peak_bytes"] > 0
    for world, run in r["scaling"]["runs"].items():
        assert all(rank["free"]["images_per_s_per_rank"] > 0 for rank in run["ranks"]), world


def goal_met(goal: str, measured: float) -> bool:
    """Judge `measured` against a target as the report states it: "<= 1.05", ">= 5",
    "about 8 (7-9)", "IQR/median < 0.01"."""
    span = re.search(r"\(([\d.]+)-([\d.]+)\)", goal)
    if span:
        return float(span[1]) <= measured <= float(span[2])
    op, value = re.search(r"(<=|>=|<|>)\s*([\d.]+)$", goal).groups()
    return {"<=": measured <= float(value), ">=": measured >= float(value),
            "<": measured < float(value), ">": measured > float(value)}[op]


def all_targets(tree):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "targets":
                yield from v.items()
            else:
                yield from all_targets(v)


def test_quick_targets_are_judged_against_the_goal_they_state(quick_run):
    _, r, _ = quick_run
    targets = dict(all_targets(r))
    assert {"free_replay_vs_natural", "free_replay_vs_floor", "recommended_vs_reference",
            "fused_vs_eager"} <= set(targets)
    for name, t in targets.items():
        assert t["met"] == goal_met(t["target"], t["measured"]), (name, t)


def test_step_table_has_a_convnext_row_with_a_vit_row(quick_run):
    table, r, _ = quick_run
    archs = r["step"]["architectures"]
    assert archs["ConvNeXt"]["fp32"]["model"] == "timm/convnext_atto"
    assert archs["ViT"]["fp32"]["model"] == "timm/vit_tiny_patch16_224"
    for row in (archs["ConvNeXt"]["fp32"], archs["ViT"]["fp32"]):
        assert row["seconds"]["natural_step"]["median"] > 0 and row["params"] > 0
        t = row["targets"]["free_replay_vs_natural"]
        assert t["met"] == (t["measured"] <= 1.05)
    assert "| ConvNeXt: timm/convnext_atto (" in table and "| ViT: timm/vit_tiny_patch16_224 (" in table


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


def test_scaling_compares_world_sizes_at_the_same_threads_per_rank(quick_run):
    _, r, _ = quick_run
    runs = r["scaling"]["runs"]
    assert runs["1"]["threads_per_rank"] == runs["2"]["threads_per_rank"] == 1
    assert len(runs["2"]["ranks"]) == 2
    share = runs["2"]["ranks"][0]["free"]["allreduce_share"]
    assert share["n"] == 1 and share["min"] <= share["median"] <= share["max"] < 1
    assert "allreduce_share" not in runs["1"]["ranks"][0]["free"]      # nothing to take out


def test_eval_bench_measures_a_rate_on_each_rank(quick_run):
    _, r, _ = quick_run
    for world, run in r["eval"]["runs"].items():
        assert len(run["ranks"]) == int(world) and run["threads_per_rank"] == 1
        for rank in run["ranks"]:
            assert rank["pgd"]["images_per_s"] > 0


def test_autoattack_on_the_unbreakable_net_runs_its_whole_budget(quick_run):
    _, r, _ = quick_run
    s = r["eval"]["settings"]
    for run in r["eval"]["runs"].values():
        for rank in run["ranks"]:
            # The unbreakable network keeps every image, so AutoAttack ran its whole budget.
            aa = rank["autoattack_unbreakable"]
            assert aa["robust"] == aa["images"] == s["aa_batch_never"]
            assert list(aa["robust_after"].values()) == [s["aa_batch_never"]] * 4


def test_memory_reports_the_perturbation_buffers(quick_run):
    _, r, _ = quick_run
    free, natural = r["memory"]["free"], r["memory"]["natural"]
    # fp32 delta, the fp32 replay input and the CPU update's 3 scratch tensors, each (8, 3, 32, 32);
    # natural keeps none.
    assert free["buffer_bytes"] == 5 * 8 * 3 * 32 * 32 * 4 and natural["buffer_bytes"] == 0


def test_the_table_prints_every_section_for_this_device(quick_run):
    stdout, result, _ = quick_run
    for n in range(1, len(SECTIONS) + 1):
        assert f"### {n}." in stdout
    assert "{n}" not in stdout
    assert "free replay / natural" in stdout and result["environment"]["device"] in stdout


def test_results_md_keeps_other_devices_sections(quick_run):
    _, result, md = quick_run
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


def test_interleaved_keeps_every_round_in_turn():
    calls = []
    variants = {"a": bench_timing.Variant(lambda: calls.append("a"), units=4),
                "b": bench_timing.Variant(lambda: calls.append("b"))}
    samples = bench_timing.interleaved(variants, torch.device("cpu"), repeats=3, min_sample_s=0)
    assert [len(samples["a"]), len(samples["b"])] == [3, 3]
    assert calls == ["a", "b"] + ["a", "b"] * 3          # warm-up round, then interleaved rounds


def test_interleaved_reports_seconds_per_unit(monkeypatch):
    # Seconds per call (a clock that reads 10 ms per call) over 2 units of work per call.
    monkeypatch.setattr(bench_timing, "time_once", lambda fn, device, calls=1: (fn(), 0.010)[1])
    slow = bench_timing.Variant(lambda: None, units=2)
    s = bench_timing.interleaved({"s": slow}, torch.device("cpu"), repeats=2, min_sample_s=0)["s"]
    assert s == [0.005, 0.005]


def test_paired_ratio_is_per_round():
    samples = {"x": [2.0, 6.0, 3.0], "y": [1.0, 2.0, 3.0]}
    assert bench_timing.paired_ratio(samples, "x", "y") == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_essential_bytes_count_each_operand_once():
    x, delta, grad, x_adv = bench_timing.update_operands((2, 3, 4, 4), torch.device("cpu"), torch.float16)
    n = 2 * 3 * 4 * 4
    # read x (fp16), delta, grad, x_adv; write delta and x_adv (all fp32)
    assert bench_timing.essential_bytes(x, delta, grad, x_adv) == n * (2 + 2 * 4 + 4 + 2 * 4)
    assert torch.equal(x_adv, (x.float() + delta).clamp(0, 1))


def test_interleaved_rotates_the_order_when_asked():
    calls = []
    variants = {k: bench_timing.Variant(lambda k=k: calls.append(k)) for k in "abc"}
    bench_timing.interleaved(variants, torch.device("cpu"), repeats=3, warmup=0, min_sample_s=0,
                             rotate=True)
    assert "".join(calls) == "abc" + "bca" + "cab"


def test_median_ci_brackets_the_median():
    xs = [float(i) for i in range(100)]
    lo, hi = bench_timing.median_ci(xs)
    assert lo < 49.5 < hi and 38 <= lo and hi <= 61


def test_median_ci_narrows_with_more_rounds():
    def width(n):  # n evenly spread samples of the same distribution, on [0, 1)
        lo, hi = bench_timing.median_ci([i / n for i in range(n)])
        return hi - lo
    assert width(1000) < width(100) < width(20)


def test_median_ci_of_a_tiny_sample_is_its_full_range():
    assert bench_timing.median_ci([1.0, 2.0, 3.0]) == (1.0, 3.0)


def test_spread_summary_gives_the_iqr_over_the_median():
    s = bench_timing.spread_summary([1.0, 1.0, 2.0, 3.0, 3.0])
    assert s["median"] == 2.0 and s["iqr_over_median"] == pytest.approx((s["q3"] - s["q1"]) / 2)


def small_batch(b=8, size=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) ** 2, torch.randint(classes, (b,), generator=g)


def test_floor_pass_does_a_replays_work():
    """The floor is a lower bound only if it computes what a replay computes: same weights and
    perturbation after one pass from the same state."""
    x, y = small_batch()
    states = []
    for kind in ("floor", "replay"):
        torch.manual_seed(0)
        model = build_model("small_cnn", 5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        if kind == "floor":
            natural = build_method("natural", model, opt)
            delta = torch.zeros_like(x)
            bench_timing.floor_pass(natural, x, y, delta, linf.perturb(x, delta), 4 / 255)
        else:
            t = FreeAdversarialTrainer(model, opt, eps=4 / 255, replays=1)
            t.train_step(x, y)
            delta = t.perturbation
        states.append((delta.clone(), [p.detach().clone() for p in model.parameters()]))
    (d0, p0), (d1, p1) = states
    assert torch.equal(d0, d1) and d0.abs().max() == pytest.approx(4 / 255)
    for a, b in zip(p0, p1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_reference_loop_is_the_same_algorithm_as_the_trainer():
    """The restated authors' loop and our trainer, fed the same batches in fp32, end with the same
    perturbation and weights: the speed comparison compares the same work."""
    eps, m = 4 / 255, 3
    batches = [small_batch(seed=s) for s in (1, 2, 3)]
    torch.manual_seed(0)
    ours_model = build_model("small_cnn", 5)
    ref_net = __import__("copy").deepcopy(ours_model.net)
    ref = bench_reference.ReferenceFree(ref_net, batch=8, image_size=16, eps=eps, replays=m)
    opt = torch.optim.SGD(ours_model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    ours = FreeAdversarialTrainer(ours_model, opt, eps=eps, replays=m)
    for x, y in batches:
        ref.train_batch(x, y)
        ours.train_step(x, y)
    assert len(ref.losses) == len(ref.top1) == 3 * m
    torch.testing.assert_close(ours.perturbation, ref.global_noise, rtol=0, atol=1e-7)
    assert (ref.global_noise != 0).float().mean() > 0.5
    for a, b in zip(ours_model.net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unbreakable_network_keeps_its_prediction_under_any_eps_input():
    torch.manual_seed(0)
    model = bench_workers.unbreakable(build_model("small_cnn", 10).eval())
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        clean = model(x).argmax(1)
        moved = model((x + torch.sign(torch.randn_like(x)) * 8 / 255).clamp(0, 1)).argmax(1)
    assert torch.equal(clean, moved)
    # Not a constant function: gradients still flow, so the attacks do real work.
    x.requires_grad_(True)
    model(x)[:, 1].sum().backward()
    assert x.grad.abs().sum() > 0


def bench_imports(path: Path) -> set[str]:
    """The dist_free.bench modules a file imports, function-level imports included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("dist_free.bench.")}


def test_no_bench_module_imports_a_module_that_a_process_runs():
    """`python -m M` runs M as __main__: M imported as well would be a second copy of it, with its
    own globals. So the children's entry point is worker_main, and the workers are a library."""
    bench = REPO / "dist_free" / "bench"
    entry_points = {f"dist_free.bench.{p.stem}" for p in bench.glob("*.py")
                    if p.stem == "__main__" or 'if __name__ == "__main__"' in p.read_text()}
    assert entry_points == {"dist_free.bench.__main__", "dist_free.bench.worker_main",
                            "dist_free.bench.compare"}
    for path in bench.glob("*.py"):
        assert not bench_imports(path) & entry_points, path.name


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
    assert proc.returncode == 2 and "--parts ['gpu']" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dist_free.bench", "--quick", "--dtype", "fp8"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dtype ['fp8']" in proc.stderr
