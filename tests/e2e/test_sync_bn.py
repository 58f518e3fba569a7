"""model.sync_bn on 2 CPU ranks (gloo), wired as the trainer wires it (runtime.wrap, DDP): one
training forward and backward over half a batch each equals one process over the whole batch."""

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers_launch import free_port

from dist_free.config import load_config
from dist_free.distributed import DistInfo
from dist_free.engine.models import INPUT_NORMALIZATION, NormalizedModel
from dist_free.engine.shafahi2019 import ShafahiWideResNet
from dist_free.trainer import runtime

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "cifar10" / "free_m8.yaml"
WORLD, PER_RANK = 2, 4


def model():
    """The preset's network at depth 1 per stage and width 1 (BatchNorm in every unit)."""
    torch.manual_seed(0)
    return NormalizedModel(ShafahiWideResNet(10, units_per_stage=1, widen=1),
                           *INPUT_NORMALIZATION["shafahi2019_wrn32_10"])


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(WORLD * PER_RANK, 3, 32, 32, generator=g),
            torch.randint(0, 10, (WORLD * PER_RANK,), generator=g))


def step(net, bare, x, y) -> dict:
    """One training forward/backward; what BatchNorm and the gradients came out as."""
    x = x.clone().requires_grad_(True)
    logits = net(x)
    F.cross_entropy(logits, y).backward()
    return {"logits": logits.detach(), "input_grad": x.grad,
            "stats": {k: v.clone() for k, v in bare.state_dict().items() if "running_" in k},
            "grads": {k: p.grad.clone() for k, p in bare.named_parameters()}}


def _worker(rank, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    x, y = batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for sync in (True, False):
        cfg = load_config(PRESET, [f"model.sync_bn={str(sync).lower()}"])
        bare = model().train()
        net = runtime.wrap(cfg, bare, DistInfo(rank=rank, world_size=WORLD))
        results[sync] = step(net, bare, x[mine], y[mine])
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_bn")
    assert load_config(PRESET).model.sync_bn         # the CIFAR presets turn it on
    torch.multiprocessing.spawn(_worker, args=(free_port(), out), nprocs=WORLD)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    bare = model().train()
    return ranks, step(bare, bare, *batch())


def test_every_rank_keeps_the_running_statistics_of_the_whole_batch(runs):
    ranks, whole = runs
    assert len(whole["stats"]) == 2 * 7
    for r in ranks:
        for k, v in whole["stats"].items():
            torch.testing.assert_close(r[True]["stats"][k], v, rtol=1e-5, atol=1e-6)


def test_the_ranks_outputs_are_the_whole_batchs(runs):
    ranks, whole = runs
    logits = torch.cat([r[True]["logits"] for r in ranks])
    torch.testing.assert_close(logits, whole["logits"], rtol=1e-5, atol=1e-5)


def test_gradients_are_the_whole_batchs(runs):
    """DDP's averaged weight gradients are the whole batch's; each rank's input gradient is that
    of the sum of both ranks' mean losses, so twice the whole batch's (the same sign: free
    training's step)."""
    ranks, whole = runs
    for r in ranks:
        for k, g in whole["grads"].items():
            torch.testing.assert_close(r[True]["grads"][k], g, rtol=1e-4, atol=1e-6)
    for rank, r in enumerate(ranks):
        mine = whole["input_grad"][rank * PER_RANK:(rank + 1) * PER_RANK]
        torch.testing.assert_close(r[True]["input_grad"], WORLD * mine, rtol=1e-4, atol=1e-8)


def test_without_sync_bn_each_rank_sees_only_its_own_images(runs):
    """The control: per-rank BatchNorm misses the tolerances above, so they can fail."""
    ranks, whole = runs
    for r in ranks:
        assert not all(torch.allclose(r[False]["stats"][k], v, rtol=1e-5, atol=1e-6)
                       for k, v in whole["stats"].items())
    logits = torch.cat([r[False]["logits"] for r in ranks])
    assert not torch.allclose(logits, whole["logits"], rtol=1e-5, atol=1e-5)
