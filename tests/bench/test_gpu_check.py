"""The GPU check's CPU mode: the same command a lent GPU runs, at tiny sizes, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_free.bench import gpu_check

REPO = Path(__file__).resolve().parents[2]

# Every Python process of the check (the trainer and evaluator subprocesses too) loads this and
# fails on any import of MLflow or DALI: the lent GPU host has neither.
BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mlflow" or name.startswith("mlflow.") or name.startswith("nvidia.dali"):
            raise ImportError(f"{name} imported by the GPU check (the GPU host has none)")
sys.meta_path.insert(0, _Block())
"""


# What a CPU cannot check: the speed and memory floors are judged on CUDA only, NCCL and DALI's
# GPU decoder need CUDA. Each says SKIP there, never PASS.
CUDA_ONLY = {"stop_vote_groups", "step_speed", "update_bandwidth", "memory_free_vs_natural",
             "resident_cifar", "trainer_dali", "compiled_model"}


@pytest.mark.slow
def test_cpu_mode_passes_every_check_it_can_and_skips_the_rest_without_mlflow_or_dali(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    p = subprocess.run([sys.executable, "-m", "dist_free.bench", "--gpu-check", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=2400)
    result = json.loads(out.read_text())
    statuses = {name: c["status"] for name, c in result["checks"].items()}
    assert p.returncode == 0, (statuses, p.stdout[-3000:], p.stderr[-3000:])
    assert list(statuses) == list(gpu_check.CHECKS)
    assert {n for n, s in statuses.items() if s == "SKIP"} == CUDA_ONLY
    assert {n for n, s in statuses.items() if s == "PASS"} == set(gpu_check.CHECKS) - CUDA_ONLY
    checks = result["checks"]
    assert checks["free_vs_algorithm1"]["bit_identical"] is True
    assert checks["trainer_e2e"]["resume"]["epoch"] == 2
    assert checks["trainer_e2e"]["train"]["compiled"] is False          # auto: off on a CPU
    assert checks["process_group"]["backend"] == "gloo"
    assert checks["compile_auto"]["resolved"] is False
    assert checks["compile_auto"]["graphs"]["after_evaluation"] == 1
    # The speed figures were measured, each beside its floor, though not judged here.
    for name in ("step_speed", "update_bandwidth", "resident_cifar", "compiled_model"):
        assert checks[name]["floors"] and "(floor " in checks[name]["figure"], name
    assert "DALI is not importable" not in checks["trainer_dali"]["figure"]   # CUDA is asked first
    env_record = result["environment"]
    for key in ("gpu", "driver", "torch", "cuda", "dali", "batch", "dtype", "commit"):
        assert key in env_record, key
    assert (env_record["batch"], env_record["dtype"]) == (gpu_check.CPU_SIZES.batch, "fp32")
    table = out.with_suffix(".md").read_text()
    for name in gpu_check.CHECKS:           # one console line and one table row per check, named
        assert f"  {name}" in p.stdout
        assert f"| `{name}` | {statuses[name]} |" in table


def test_a_raising_check_is_a_fail_line_that_does_not_stop_the_run(tmp_path):
    def boom(s, device):
        raise RuntimeError("kernel launch failed")

    def fine(s, device):
        return gpu_check.Result("PASS", "1.0", {"value": 1.0})
    lines = []
    out = tmp_path / "r.json"
    r = gpu_check.run_checks(torch.device("cpu"), out, checks={"boom": boom, "fine": fine},
                             log=lambda *a, **k: lines.append(a[0]))
    saved = json.loads(out.read_text())
    assert saved["checks"]["boom"]["status"] == "FAIL"
    assert "RuntimeError: kernel launch failed" in saved["checks"]["boom"]["figure"]
    assert "traceback" in saved["checks"]["boom"]
    assert saved["checks"]["fine"] == {**saved["checks"]["fine"], "status": "PASS", "value": 1.0}
    assert r["summary"] == {"PASS": 1, "FAIL": 1, "SKIP": 0}


def test_checks_past_the_time_budget_are_skipped_not_started(tmp_path):
    started = []

    def slow(s, device):
        started.append(1)
        return gpu_check.Result("PASS", "")
    sizes = gpu_check.CPU_SIZES.__class__(**{**gpu_check.CPU_SIZES.__dict__, "budget_s": -1.0})
    r = gpu_check.run_checks(torch.device("cpu"), tmp_path / "r.json", sizes=sizes,
                             checks={"a": slow, "b": slow}, log=lambda *a, **k: None)
    assert started == []
    assert [c["status"] for c in r["checks"].values()] == ["SKIP", "SKIP"]


def test_an_unknown_check_name_exits_2(capsys):
    from dist_free.bench.suite import main
    assert main(["--gpu-check", "--device", "cpu", "--only", "no_such_check"]) == 2
    assert "no_such_check" in capsys.readouterr().err


def test_the_batched_crop_gives_unit_range_images_of_the_crop_size():
    images = torch.randint(0, 256, (6, 3, 40, 50), dtype=torch.uint8)
    out = gpu_check.random_resized_crop(images, 16)
    assert out.shape == (6, 3, 16, 16) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    # A constant image stays that constant whatever the crop and flip.
    flat = torch.full((2, 3, 40, 50), 128, dtype=torch.uint8)
    assert torch.allclose(gpu_check.random_resized_crop(flat, 8), torch.full((2, 3, 8, 8), 128 / 255))


CUDA = torch.device("cuda", 0)   # named only: the fed checks below never touch a GPU


def measured_step(free_replay: float) -> dict:
    ratio = {"median": free_replay}
    # timing.step_cost's shape, its "seconds" included (the run's table must not confuse it with
    # the check's own duration)
    return {"images_per_s_natural": 4585.0, "seconds": {"natural_step": {"median": 0.0558}},
            "ratios": {"free_replay/natural_step": ratio,
            "pgd7_step/natural_step": {"median": 7.7}, "fgsm_rs_step/natural_step": {"median": 1.9},
            "nfgsm_step/natural_step": {"median": 1.9}}}


def measured_update(fraction_of_copy: float) -> dict:
    return {"seconds": {"fused": {"gb_per_s": 4000 * fraction_of_copy}, "copy": {"gb_per_s": 4000.0}},
            "fused_speedup": {"median": 3.9}, "fused_fraction_of_copy": fraction_of_copy}


def measured_memory(ratio: float) -> dict:
    return {"natural": {"peak_bytes": 10 * 2**30}, "free": {"peak_bytes": int(ratio * 10 * 2**30)}}


def measured_compiled(speedup: float) -> dict:
    return {"compile_s": 70.0, "first_step_s": 40.0, "stage": "compiled",
            "speedup_vs_eager": {"natural": speedup, "free": 1.3}, "free_replay_vs_natural": 1.08,
            "images_per_s_compiled": 6490.0}


def measured_resident(free_replay: float) -> dict:
    return {"kind": "resident", "model": "shafahi2019_wrn32_10", "batch": 128, "dtype": "fp32",
            "replays": 8, "images_per_s": {"natural": {"median": 9000.0}, "free": {"median": 1100.0}},
            "data_wait_frac": {"natural": {"median": 0.01}},
            "free_replay_vs_natural": {"median": free_replay}}


# (check, its measurement as a function of the judged figure, a figure that meets the floor,
# one that misses it)
FED = {
    "step_speed": (measured_step, 1.059, 1.2),
    "update_bandwidth": (measured_update, 1.04, 0.5),
    "memory_free_vs_natural": (measured_memory, 1.039, 1.25),
    "compiled_model": (measured_compiled, 1.43, 0.9),
    "resident_cifar": (measured_resident, 1.03, 1.3),
}


def fed(name: str, device, measurement: dict) -> gpu_check.Result:
    fn = gpu_check.CHECKS[name]
    measure = (lambda s, d, w: measurement) if name in gpu_check.NEEDS_WORKDIR else \
        (lambda s, d: measurement)
    args = (gpu_check.GPU_SIZES, device) + ((Path("unused"),) if name in gpu_check.NEEDS_WORKDIR else ())
    return fn(*args, measure=measure)


@pytest.mark.parametrize("name", list(FED))
def test_a_speed_or_memory_figure_that_misses_its_floor_fails_on_cuda(name):
    make, good, bad = FED[name]
    passed, failed = fed(name, CUDA, make(good)), fed(name, CUDA, make(bad))
    assert passed.status == "PASS", passed.figure
    assert failed.status == "FAIL", failed.figure
    (floor_name, floor), = [(k, v) for k, v in failed.data["floors"].items() if not v["met"]]
    assert floor["measured"] == pytest.approx(bad)
    # The floor is printed beside the figure, as the table states it.
    assert f"{floor_name} {bad:.3f} (floor {gpu_check.FLOORS[floor_name].text}: MISSED)" in failed.figure


@pytest.mark.parametrize("name", list(FED))
def test_off_cuda_a_speed_figure_is_shown_with_its_floor_and_skipped_not_passed(name):
    make, good, _ = FED[name]
    r = fed(name, torch.device("cpu"), make(good))
    if name == "memory_free_vs_natural":
        assert r.status == "SKIP"
        return
    assert r.status == "SKIP" and "[floors judged on CUDA only]" in r.figure


def test_a_compile_that_fell_back_to_eager_fails_the_compiled_check():
    r = fed("compiled_model", CUDA, {**measured_compiled(1.4), "stage": "eager"})
    assert r.status == "FAIL" and "eagerly" in r.figure


def test_the_exit_status_is_1_when_any_check_fails(tmp_path, monkeypatch):
    slow = fed("step_speed", CUDA, measured_step(1.3))      # before CHECKS is replaced
    passing = {"fine": lambda s, d: gpu_check.Result("PASS", "ok")}
    monkeypatch.setattr(gpu_check, "CHECKS", passing)
    assert gpu_check.main("cpu", tmp_path / "a.json", None) == 0
    monkeypatch.setattr(gpu_check, "CHECKS", {**passing, "slow_replay": lambda s, d: slow})
    assert gpu_check.main("cpu", tmp_path / "b.json", None) == 1
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["checks"]["slow_replay"]["status"] == "FAIL"
    assert "traceback" not in saved["checks"]["slow_replay"]      # failed on its floor, not raised
    assert "| `slow_replay` | FAIL |" in (tmp_path / "b.md").read_text()


def test_the_stop_vote_agrees_one_step_later_beside_the_default_group():
    r = gpu_check.stop_vote_beside(torch.device("cpu"), "gloo")
    assert r.status == "PASS", r.figure
    assert r.data["polls"] == [False, False, True] and r.data["vote_backend"] == "gloo"
    assert r.data["own_group"] is False      # a gloo default group serves the vote itself
