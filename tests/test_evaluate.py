"""`python -m dist_free.evaluate`: exact counts on any number of ranks, the eps sweep's outputs."""

import json
import subprocess
import sys

import pytest
import torch

from dist_free import checkpoint
from dist_free.config import load_config
from dist_free.models import build_model
from test_train import ROOT, probe_env, torchrun

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ckpt(demo_root, tmp_path_factory):
    cfg = load_config(ROOT / "configs/demo.yaml", [f"data.root={demo_root}"])
    torch.manual_seed(0)
    model = build_model(cfg.model.name, cfg.model.num_classes)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    checkpoint.save_atomic({"model": model.state_dict(), "epoch": 1, "config": cfg.to_dict(),
                            "class_to_idx": {str(i): i for i in range(10)}}, path)
    return path


def evaluate(launcher, ckpt, out, *args):
    proc = subprocess.run([*launcher, "-m", "dist_free.evaluate", "--checkpoint", str(ckpt),
                           "--steps", "2", "--out", str(out), *args], cwd=ROOT,
                          env=probe_env(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "eval_eps_sweep.json").read_text())


def test_counts_are_exact_and_identical_on_one_and_two_ranks(ckpt, tmp_path):
    one = evaluate([sys.executable], ckpt, tmp_path / "one", "--eps", "0,2/255,8/255")
    two = evaluate(torchrun("--nproc_per_node=2", "--standalone"), ckpt, tmp_path / "two",
                   "--eps", "0,2/255,8/255")
    assert one["samples"] == two["samples"] == 359       # every val digit once, no padding
    assert one["top1"] == two["top1"] and one["top5"] == two["top5"]
    assert one["pgd"]["0.0"] == one["top1"]


def test_sweep_writes_a_table_and_a_plot(ckpt, tmp_path):
    result = evaluate([sys.executable], ckpt, tmp_path, "--eps", "0,4/255,16/255")
    assert set(result["pgd"]) == {"0.0", str(4 / 255), str(16 / 255)}
    assert all(0 <= v <= 1 for v in result["pgd"].values())
    table = (tmp_path / "eval_eps_sweep.md").read_text()
    assert "| 0.01569 | 4.00 |" in table and "| 0.06275 | 16.00 |" in table
    assert (tmp_path / "eval_eps_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_checkpoint_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = subprocess.run([sys.executable, "-m", "dist_free.evaluate", "--checkpoint", str(bad)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot read checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr



def _broadcast_worker(rank, port, out):
    import torch.distributed as dist
    from dist_free.distributed import broadcast_buffers
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    model = build_model("small_cnn", 10)
    for buffer in model.buffers():
        buffer.fill_(rank + 1)              # ranks' BatchNorm statistics drift apart in training
    broadcast_buffers(model)
    torch.save([b.clone() for b in model.buffers()], out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_evaluation_uses_rank_0s_batchnorm_statistics_on_every_rank(tmp_path):
    """So the all-reduced accuracy is that of the model the checkpoint holds (rank 0's)."""
    from test_train import free_port
    torch.multiprocessing.spawn(_broadcast_worker, args=(free_port(), tmp_path), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))
    assert all(bool((b == 1).all()) for b in r1)
