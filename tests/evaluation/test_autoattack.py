"""AutoAttack (standard, via pyautoattack): fp32, stronger than PGD, exact across world sizes.

Measured on scikit-learn's digits (2 CPU cores, 64 held-out images, seed 0):
  natural small CNN, eps 0.1:   clean 58/64, PGD-50x10 5/64, AutoAttack 4/64 (APGD-CE leaves 5);
                   eps 8/255:   PGD 42/64 = AutoAttack 42/64 (digits' ink steps are 1/16 > 8/255,
                                so 8/255 is too small to break a natural model here; 0.1 does);
  free (m=4, 5 epochs, 8/255), eps 8/255: clean 64/64, PGD-50x10 62/64, AutoAttack 62/64.
The bounds below leave room for other seeds and BLAS builds.
"""

import json
import subprocess
import sys

import pytest
import torch
from helpers_launch import ROOT, probe_env, torchrun
from helpers_nets import digits_tensors
from PIL import Image

from dist_free import checkpoint
from dist_free.config import load_config
from dist_free.engine import attacks
from dist_free.engine.free import FreeAdversarialTrainer
from dist_free.engine.models import build_model
from dist_free.evaluation import autoattack

EPS = 8 / 255


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return digits_tensors()


@pytest.fixture(scope="module")
def free_model(digits):
    """The demo architecture (build_model's small_cnn), free-trained on 1,400 digits: m=4, 5
    epochs, eps 8/255. Its last 397 digits are never trained on."""
    x, y = digits
    torch.set_num_threads(1)      # module fixtures run before the per-test thread setting
    torch.manual_seed(0)
    model = build_model("small_cnn", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer = FreeAdversarialTrainer(model, opt, eps=EPS, replays=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        order = torch.randperm(1400, generator=g)
        for i in range(0, 1400, 50):
            trainer.train_step(x[order[i:i + 50]], y[order[i:i + 50]])
    return model.eval()


def dtype_probe(model):
    """Records the dtype of every logits tensor the model returns."""
    seen = set()
    handle = model.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    return seen, handle


def test_natural_training_is_not_robust_to_autoattack_which_beats_pgd(digits_model):
    model, x, y = digits_model
    x, y = x[:64], y[:64]
    seen, handle = dtype_probe(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # a caller's autocast is switched off
        aa = autoattack.run_standard(model, x, y, eps=0.1)
    handle.remove()
    pgd = attacks.robust_correct(model, x, y, eps=0.1, steps=50, restarts=10)
    assert seen == {torch.float32}
    assert aa.robust.sum() <= 0.15 * len(y)
    assert aa.robust.sum() <= pgd.sum()
    after = list(aa.robust_after.values())
    assert list(aa.robust_after) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert after == sorted(after, reverse=True) and after[-1] == int(aa.robust.sum())
    assert after[0] <= int(attacks.correct(model, x, y).sum())


def test_free_training_survives_autoattack_close_to_its_pgd_accuracy(free_model, digits):
    x, y = digits[0][1400:1464], digits[1][1400:1464]
    state = torch.get_rng_state()
    aa = autoattack.run_standard(free_model, x, y, eps=EPS)
    assert torch.equal(torch.get_rng_state(), state)      # the caller's RNG is left alone
    pgd = attacks.robust_correct(free_model, x, y, eps=EPS, steps=50, restarts=10)
    # Measured gap 0 (62/64 both). Free training has no gradient masking (it is PGD-like
    # training), so AutoAttack may only find a handful more: 10 points = 6 of 64 images.
    assert aa.robust.sum() <= pgd.sum() <= aa.robust.sum() + 6
    assert aa.robust.sum() >= 0.6 * len(y)               # and the model really is robust


def test_a_missing_package_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)     # import now fails
    with pytest.raises(autoattack.AutoAttackUnavailable, match=r"pip install 'dist-free\[eval\]'"):
        autoattack.require()


@pytest.fixture(scope="module")
def digits_checkpoint(free_model, digits, tmp_path_factory):
    """The free model's checkpoint and its 397 unseen digits as lossless 8x8 PNGs."""
    x, y = digits
    root = tmp_path_factory.mktemp("digits8")
    for i in range(1400, len(y)):
        folder = root / "val" / str(int(y[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (x[i].permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(pixels, "RGB").save(folder / f"{i:04d}.png")
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"data.root={root}", "data.loader=torchvision", "data.image_size=8",
        "data.val_resize=8", "data.val_batch_size=12", "data.threads=1",
        "tracking.enabled=false"])
    path = root / "free.pt"
    checkpoint.save_atomic({"model": free_model.state_dict(), "epoch": 5, "global_step": 140,
                            "config": cfg.to_dict(),
                            "class_to_idx": {str(i): i for i in range(10)}}, path)
    return path


def run_evaluate(launcher, ckpt, out, *args):
    proc = subprocess.run([*launcher, "-m", "dist_free.evaluate", "--checkpoint", str(ckpt),
                           "--out", str(out), *args], cwd=ROOT, env=probe_env(out),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (report,) = out.glob("eval_*.json")
    return json.loads(report.read_text()), proc


@pytest.mark.slow
def test_two_ranks_give_exactly_one_ranks_counts_for_every_attack(digits_checkpoint, tmp_path):
    """24 images in 2 batches of 12: one rank attacks both, two ranks one each; every batch has
    its own APGD, FAB and Square random draws, yet the counts must match one rank's exactly."""
    args = ["--attack", "pgd,autoattack", "--subset", "24", "--steps", "10", "--restarts", "2"]
    one, proc = run_evaluate([sys.executable], digits_checkpoint, tmp_path / "one", *args)
    two, _ = run_evaluate(torchrun("--nproc_per_node=2", "--standalone"), digits_checkpoint,
                          tmp_path / "two", *args)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["images"] == two["images"] == 24
    assert one["clean"] == two["clean"] and one["results"] == two["results"]
    pgd, aa = one["results"]
    assert aa["robust_after"]["fab-t"] > 0       # images reached Square: its draws were tested
    assert aa["robust_top1"] <= pgd["robust_top1"]
    assert one["gradient_masking"]["pgd_minus_autoattack"] == pgd["robust_top1"] - aa["robust_top1"]
    assert "AutoAttack standard (apgd-ce, apgd-t, fab-t, square), fp32" in proc.stdout


@pytest.mark.slow
def test_an_outside_autoattack_run_reproduces_the_exported_cards_number(digits_checkpoint,
                                                                        tmp_path):
    """Train -> evaluate --attack autoattack -> export with the report -> the authors' own
    AutoAttack, run directly on the exported model and the same images, gets the card's number."""
    from pyautoattack import AutoAttack

    from dist_free.distributed import DistInfo
    from dist_free.publish.export import export_checkpoint
    from dist_free.publish.load import from_checkpoint
    from dist_free.trainer.runtime import build_loader

    report, _ = run_evaluate([sys.executable], digits_checkpoint, tmp_path / "eval",
                             "--attack", "autoattack", "--subset", "24")
    export_checkpoint(digits_checkpoint, tmp_path / "export",
                      report=next((tmp_path / "eval").glob("eval_*.json")))
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    (stated,) = [r for r in card["evaluation"]["results"] if r["attack"] == "autoattack"]
    assert card["evaluation"]["images"] == 24 and card["evaluation"]["dtype"] == "fp32"

    model = from_checkpoint(tmp_path / "export")
    cfg = load_config(None, [f"{k}={v}" for k, v in
                             [("data.root", digits_checkpoint.parent), ("data.loader", "torchvision"),
                              ("data.image_size", 8), ("data.val_resize", 8),
                              ("data.val_batch_size", report["batch_size"]), ("data.threads", 1),
                              ("model.num_classes", 10)]])
    robust = images = 0
    # The report's images in its batches (whole batches: the same on any world size), seed 0.
    for x, y in build_loader(cfg, DistInfo(), "val", subset=24, whole_batches=True):
        outside = AutoAttack(model, norm="Linf", eps=stated["eps"], version="standard", seed=0)
        outside.verbose = False
        x = x.float().contiguous()      # as a user would hand it plain NCHW tensors
        x_adv, _ = outside.run_standard_evaluation(x, y, batch_size=len(x))
        with torch.no_grad():
            robust += int((model(x_adv).argmax(1) == y).sum())
        images += len(y)
    assert images == 24
    assert robust / images == pytest.approx(stated["robust_top1"], abs=1e-9)
