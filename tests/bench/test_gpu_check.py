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


@pytest.mark.slow
def test_cpu_mode_passes_every_check_without_mlflow_or_dali(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    p = subprocess.run([sys.executable, "-m", "dist_free.bench", "--gpu-check", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=1500)
    result = json.loads(out.read_text())
    statuses = {name: c["status"] for name, c in result["checks"].items()}
    assert p.returncode == 0, (statuses, p.stdout[-3000:], p.stderr[-3000:])
    assert list(statuses) == list(gpu_check.CHECKS)
    # On a CPU only the in-process peak-memory comparison has nothing to measure.
    assert {n for n, s in statuses.items() if s != "PASS"} == {"memory_free_vs_natural"}
    checks = result["checks"]
    assert checks["free_vs_algorithm1"]["bit_identical"] is True
    assert checks["trainer_e2e"]["resume"]["epoch"] == 2
    assert checks["process_group"]["backend"] == "gloo"
    for name in gpu_check.CHECKS:           # one console line per check, named
        assert f"  {name}" in p.stdout


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
