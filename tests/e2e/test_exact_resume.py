"""A run stopped mid-epoch (SIGTERM) and resumed ends as the same run left alone, bit for bit
(fp32, CPU): every parameter and buffer, the optimizer, the perturbation buffer and where each
rank's generators stand, for the resident loader (CIFAR), the torchvision loader (JPEG folders),
a timm ViT with drop-path trained with random starts on two ranks, and the collapse probes.

The single-process runs go through `dist_free.train.main` in this process (a session signals
itself after its k-th step, as tests/train_probe.py does), to save the start-up of a process.
"""

import os
import signal
from pathlib import Path

import pytest
import torch
from helpers_launch import PROBE, assert_ok, demo_args, run_cmd, torchrun

from dist_free import checkpoint, train
from dist_free.trainer import runtime, validation
from pipelines.cifar_demo import write_cifar_demo

ROOT = Path(__file__).resolve().parents[2]
# 12 minibatches of 16 in an epoch of 73, an evaluation at the end; stops fall between log points.
SHORT = ["tracking.enabled=false", "run.device=cpu", "run.amp=off", "data.batch_size=16",
         "optim.warmup_epochs=0", "eval.max_batches=1", "eval.steps=1", "run.log_every=5"]
FREE = ["optim.steps=48", "eval.probes_per_epoch=0"]       # 12 minibatches x 4 replays


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact_cifar") / "cifar-10-batches-py"
    write_cifar_demo(root)
    return root.parent


@pytest.fixture
def train_here(monkeypatch):
    """train(args, stop_after=k) runs the trainer here; it sends itself SIGTERM after its k-th
    step. The signal handlers the trainer installs are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    build = runtime.build_method
    session = {"stop_after": None, "steps": 0}

    def build_method(*args, **kwargs):
        method = build(*args, **kwargs)
        step = method.train_step

        def train_step(*a, **kw):
            stats = step(*a, **kw)
            session["steps"] += 1
            if session["steps"] == session["stop_after"]:
                os.kill(os.getpid(), signal.SIGTERM)
            return stats

        method.train_step = train_step
        return method

    monkeypatch.setattr(runtime, "build_method", build_method)

    def run(args, stop_after=None):
        session.update(stop_after=stop_after, steps=0)
        assert train.main(args) == 0
    yield run
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def last(run_dir: Path, name: str) -> dict:
    return checkpoint.load(run_dir / name / "checkpoints" / "last.pt")


def assert_identical(left: dict, right: dict) -> None:
    """Two checkpoints hold the same training state, bit for bit."""
    assert left["global_step"] == right["global_step"]
    for key in ("model", "optimizer", "rank_states", "ema", "rank_local"):
        assert_same(left[key], right[key], key)


def assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def stopped_then_resumed(train_here, args, run_dir: Path, stop_after: int) -> None:
    train_here([*args, f"run.dir={run_dir}"], stop_after=stop_after)
    train_here([*args, f"run.dir={run_dir}"])


@pytest.mark.usefixtures("one_thread")
def test_resident_loader_free_training_resumes_mid_epoch_bit_for_bit(cifar_root, tmp_path,
                                                                    train_here):
    args = ["--config", str(ROOT / "configs/cifar_demo.yaml"), f"data.root={cifar_root}",
            *SHORT, *FREE]
    train_here([*args, f"run.dir={tmp_path / 'alone'}"])
    stopped_then_resumed(train_here, args, tmp_path / "stopped", stop_after=7)
    alone, resumed = last(tmp_path / "alone", "cifar_demo"), last(tmp_path / "stopped", "cifar_demo")
    assert alone["config"]["data"]["loader"] == "auto" and resumed["global_step"] == 12
    assert resumed["rank_states"][0]["perturbation"].abs().sum() > 0
    assert_identical(alone, resumed)


@pytest.mark.usefixtures("one_thread")
def test_torchvision_loader_free_training_resumes_mid_epoch_bit_for_bit(demo_root, tmp_path,
                                                                       train_here):
    args = ["--config", str(ROOT / "configs/demo.yaml"), f"data.root={demo_root}",
            "data.loader=torchvision", "data.threads=1", "optim.lr_batch=16", *SHORT, *FREE]
    train_here([*args, f"run.dir={tmp_path / 'alone'}"])
    stopped_then_resumed(train_here, args, tmp_path / "stopped", stop_after=7)
    assert_identical(last(tmp_path / "alone", "demo"), last(tmp_path / "stopped", "demo"))


@pytest.mark.usefixtures("one_thread")
def test_a_stop_at_a_probe_point_probes_first_on_resume_and_later_probes_match(
        cifar_root, tmp_path, train_here, monkeypatch):
    """Fast-FGSM (a random start each step) with three probes in the epoch (after steps 4, 8
    and 12); the run stops at the first, before probing: the next start probes first."""
    probes = []
    real = validation.probe

    def recorded(run):
        result = real(run)
        probes.append((run.global_step, *result))
        return result

    monkeypatch.setattr(validation, "probe", recorded)
    args = ["--config", str(ROOT / "configs/cifar_demo.yaml"), f"data.root={cifar_root}",
            *SHORT, "method.name=fast", "optim.steps=12", "eval.probes_per_epoch=3",
            "eval.probe_steps=2", "eval.collapse_drop=1.0"]
    train_here([*args, f"run.dir={tmp_path / 'alone'}"])
    alone_probes, probes[:] = list(probes), []
    train_here([*args, f"run.dir={tmp_path / 'stopped'}"], stop_after=4)
    stopped = last(tmp_path / "stopped", "cifar_demo")
    assert (stopped["batch_in_epoch"], stopped["probe_pending"], probes) == (4, True, [])
    train_here([*args, f"run.dir={tmp_path / 'stopped'}"])
    assert [p[0] for p in alone_probes] == [4, 8, 12]
    assert probes == alone_probes
    alone, resumed = last(tmp_path / "alone", "cifar_demo"), last(tmp_path / "stopped", "cifar_demo")
    assert alone["probe_best"] == resumed["probe_best"]
    assert_identical(alone, resumed)


@pytest.mark.slow
def test_two_rank_vit_with_drop_path_and_random_starts_resumes_bit_for_bit(demo_root, tmp_path):
    """Each rank draws its own drop-path masks and random starts: each gets its own generator
    back. The torchvision loader, whose iterator is rebuilt at the resume; AdamW and an EMA."""
    vit = ["model.name=timm/vit_tiny_patch16_224", "model.kwargs={img_size: 32, patch_size: 4, "
           "depth: 2, embed_dim: 32, num_heads: 2, drop_path_rate: 0.5}",
           "optim.name=adamw", "optim.lr=1e-3", "method.name=fast", "optim.steps=8",
           "optim.warmup_epochs=0", "optim.ema=0.9",
           "data.loader=torchvision", "data.threads=1", "eval.probes_per_epoch=0",
           "eval.max_batches=1", "eval.steps=1", "data.batch_size=8", "run.amp=off",
           "run.log_every=5"]
    launch = torchrun("--standalone", "--nproc_per_node=2", PROBE)

    def run(name, **env):
        return run_cmd([*launch, *demo_args(demo_root, tmp_path / name, *vit)], tmp_path,
                       env={"HF_HUB_OFFLINE": "1", **env})
    assert_ok(run("alone"))
    assert_ok(run("stopped", PROBE_SIGTERM_AT_STEP="3"))
    assert last(tmp_path / "stopped", "demo")["batch_in_epoch"] == 4      # one step to agree
    assert_ok(run("stopped"))
    alone, resumed = last(tmp_path / "alone", "demo"), last(tmp_path / "stopped", "demo")
    rng = [s["rng"]["torch"] for s in resumed["rank_local"]]
    assert not torch.equal(*rng)                         # two ranks, two streams
    assert resumed["ema"]["updates"] == 8
    assert_identical(alone, resumed)
