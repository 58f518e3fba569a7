"""Export: weights without pickles plus a model card; the documented loaders give the same logits."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_free import atomic, checkpoint, export
from dist_free.config import config_from_dict
from dist_free.engine.models import build_model
from dist_free.publish.export import EXPORT_FILES, export_checkpoint
from dist_free.publish.load import from_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {"cat": 0, "dog": 1, "owl": 2}


def make_checkpoint(path: Path, name="small_cnn", size=16, mean=None, std=None) -> Path:
    """A few real SGD steps (BatchNorm statistics move too), saved as the trainer saves."""
    torch.manual_seed(0)
    cfg = config_from_dict({
        "model": {"name": name, "num_classes": 3, "channels_last": False},
        "data": {"image_size": size, "val_resize": size + 4, "batch_size": 8},
        "method": {"name": "free", "eps": "4/255", "replays": 4},
        "optim": {"epochs": 8, "lr": 0.05, "lr_batch": 16}})
    norm = {"mean": mean, "std": std} if mean else {}
    model = build_model(name, 3, **norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        x, y = torch.rand(8, 3, size, size), torch.randint(0, 3, (8,))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    evaluation = {"epoch": 1, "global_step": 2, "samples": 96, "top1": 0.5, "top5": 1.0,
                  "pgd": 0.25, "eps": 4 / 255, "pgd_steps": 10, "pgd_restarts": 1,
                  "selected_on": "val", "holdout": None}
    return checkpoint.save_atomic(
        {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1, "global_step": 2,
         "eval": evaluation, "class_to_idx": CLASSES, "world_size": 2, "best_pgd": 0.25}, path)


def reference_model(ckpt: Path) -> torch.nn.Module:
    """The checkpoint's model rebuilt by hand, independently of from_checkpoint."""
    state = torch.load(ckpt, weights_only=True)
    model = build_model(state["config"]["model"]["name"], 3)
    model.load_state_dict(state["model"])
    return model.eval()


def loader_block(out: Path) -> list[str]:
    md = (out / "MODEL_CARD.md").read_text()
    return re.search(r"```python\n(.*?)\n```", md, re.S).group(1).splitlines()


def run_snippet(lines: list[str], folder: Path, monkeypatch) -> torch.nn.Module:
    monkeypatch.chdir(folder)    # the card's loader names files relative to the export folder
    namespace = {}
    exec("\n".join(lines), namespace)
    return namespace["model"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def resnet_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resnet")
    ckpt = make_checkpoint(tmp / "best.pt", "resnet18", size=32)
    assert export.main([str(ckpt), str(tmp / "out")]) == 0
    return ckpt, tmp / "out"


def test_torchvision_export_loads_with_the_cards_three_lines(resnet_export, monkeypatch):
    ckpt, out = resnet_export
    lines = loader_block(out)
    assert len(lines) == 3 and not any("dist_free" in line for line in lines)
    assert "torchvision.models.resnet18(num_classes=3)" in lines[1]
    assert "Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))" in lines[1]
    model = run_snippet(lines, out, monkeypatch)
    assert not model.training
    reference = reference_model(ckpt)
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert torch.equal(logits, reference(x))
    # Attacks differentiate through torchvision's Normalize: the input gradient is the same.
    grad = torch.autograd.grad(logits.logsumexp(1).sum(), x)[0]
    ref_grad = torch.autograd.grad(reference(x).logsumexp(1).sum(), x)[0]
    assert grad.abs().sum() > 0 and torch.equal(grad, ref_grad)


def test_each_weights_file_holds_the_nets_weights(resnet_export):
    ckpt, out = resnet_export
    net = {k[len("net."):]: v for k, v in torch.load(ckpt, weights_only=True)["model"].items()
           if k.startswith("net.")}
    for tensors in (load_file(out / "model.safetensors"),
                    torch.load(out / "model.pt", weights_only=True)):
        assert set(tensors) == {f"1.{k}" for k in net}        # no normalize.* buffers
        assert all(torch.equal(tensors[f"1.{k}"], v) for k, v in net.items())


def test_card_records_the_sha256_of_every_file_it_describes(resnet_export):
    ckpt, out = resnet_export
    card = json.loads((out / "model_card.json").read_text())
    assert card["weights"]["model.safetensors"]["sha256"] == sha256(out / "model.safetensors")
    assert card["weights"]["model.pt"]["sha256"] == sha256(out / "model.pt")
    assert card["provenance"]["checkpoint"]["sha256"] == sha256(ckpt)


def test_card_records_the_normalization_inside_the_model(resnet_export):
    _, out = resnet_export
    card = json.loads((out / "model_card.json").read_text())
    assert card["normalization"] == {"mean": [0.485, 0.456, 0.406],
                                     "std": [0.229, 0.224, 0.225], "inside_model": True}


def test_card_describes_the_training_recipe(resnet_export):
    _, out = resnet_export
    card = json.loads((out / "model_card.json").read_text())
    t = card["training"]
    assert (t["method"], t["replays"], t["epochs_natural"], t["epochs_real"]) == ("free", 4, 8, 2)
    assert t["global_batch"] == 16 and t["peak_lr"] == pytest.approx(0.05)
    assert card["threat_model"]["eps_x255"] == pytest.approx(4)
    assert card["class_to_idx"] == CLASSES and card["input"]["val_resize"] == 36
    md = (out / "MODEL_CARD.md").read_text()
    assert "resize the shorter side to 36" in md and "0: cat, 1: dog, 2: owl" in md
    assert t["eps_warmup_epochs_natural"] == 0 and "warmed up" not in md


def test_card_states_the_eps_warm_up(tmp_path):
    state = checkpoint.load(make_checkpoint(tmp_path / "epochs.pt"))
    state["config"]["method"].update(eps_warmup_epochs=4, eps_warmup_start=0.25)
    ckpt = checkpoint.save_atomic(state, tmp_path / "best.pt")
    export_checkpoint(ckpt, tmp_path / "out")
    t = json.loads((tmp_path / "out" / "model_card.json").read_text())["training"]
    assert (t["eps_warmup_epochs_natural"], t["eps_warmup_start"]) == (4, 0.25)
    md = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "training eps 0.0156863 (4/255), warmed up linearly from 0.25 x eps over 4 " \
           "natural-training epochs (L-inf)" in md


def step_budget_checkpoint(tmp_path: Path, **recorded) -> Path:
    """make_checkpoint's run on the CIFAR demo's budget, trained to its end: 1,080 SGD steps at
    m=4 are 270 minibatches, 15 epochs of 19 (the last cut short); optim.epochs (8) is unused."""
    state = checkpoint.load(make_checkpoint(tmp_path / "epochs.pt"))
    state["config"]["optim"].update(steps=1080, schedule="cosine")
    state.update(epoch=15, global_step=270, **recorded)
    return checkpoint.save_atomic(state, tmp_path / "best.pt")


def test_a_step_budget_card_states_the_steps_and_epochs_the_run_trained(tmp_path):
    ckpt = step_budget_checkpoint(tmp_path, batches_per_epoch=19)
    export_checkpoint(ckpt, tmp_path / "out")
    t = json.loads((tmp_path / "out" / "model_card.json").read_text())["training"]
    assert (t["sgd_steps_budget"], t["minibatches_budget"], t["replays"]) == (1080, 270, 4)
    assert (t["epochs_real"], t["batches_per_epoch"], t["epochs_completed_real"]) == (15, 19, 15)
    assert t["epochs_natural"] is None                 # the budget is in steps, not epochs
    md = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert ("1080 SGD steps counting every replay = 270 minibatches x 4, 15 real epochs of up "
            "to 19 minibatches; this checkpoint: 270 minibatches x 4 = 1080 SGD steps") in md


@pytest.mark.parametrize("epoch, global_step", [(23, 270), (12, 165)])    # the end; best.pt
def test_a_step_budget_card_counts_the_epochs_before_a_resume_on_another_global_batch(
        tmp_path, epoch, global_step):
    """5 epochs of 19 minibatches (95), then resumed at twice the global batch: the other 175 in
    epochs of 10, the last cut short, 23 real epochs in all (a fresh run of 10 would make 27)."""
    ckpt = step_budget_checkpoint(tmp_path, batches_per_epoch=10, length_since=5)
    state = checkpoint.load(ckpt)
    state.update(epoch=epoch, global_step=global_step)
    export_checkpoint(checkpoint.save_atomic(state, ckpt), tmp_path / "out")
    t = json.loads((tmp_path / "out" / "model_card.json").read_text())["training"]
    assert (t["epochs_real"], t["batches_per_epoch"], t["batches_per_epoch_since"]) == (23, 10, 5)
    md = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert ("270 minibatches x 4, 23 real epochs: 5 of another length (a resume changed the "
            "global batch), then up to 10 minibatches each") in md


def test_a_step_budget_checkpoint_without_its_epoch_length_still_exports(tmp_path):
    """Checkpoints saved before the trainer recorded batches_per_epoch: the steps are known, the
    epochs the budget made are not, and the card says so."""
    export_checkpoint(step_budget_checkpoint(tmp_path), tmp_path / "out")
    t = json.loads((tmp_path / "out" / "model_card.json").read_text())["training"]
    assert (t["sgd_steps_budget"], t["minibatches_budget"]) == (1080, 270)
    assert t["epochs_real"] is None and t["batches_per_epoch"] is None
    md = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "270 minibatches x 4, real epochs not recorded in the checkpoint" in md


def test_card_labels_in_training_numbers_as_not_final(resnet_export):
    _, out = resnet_export
    card = json.loads((out / "model_card.json").read_text())
    assert card["evaluation"]["source"] == "in_training" and card["evaluation"]["final"] is False
    md = (out / "MODEL_CARD.md").read_text()
    assert "not a final number: PGD-10 in training, not AutoAttack; selected on" in md
    assert "| pgd | PGD-10 x 1 restarts" in md and "25.00%" in md


def test_from_checkpoint_gives_the_same_model_from_every_source(tmp_path, monkeypatch):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ckpt = make_checkpoint(tmp_path / "last.pt", mean=mean, std=std)
    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    x = torch.rand(5, 3, 16, 16)
    trained = from_checkpoint(ckpt)
    assert not trained.training
    assert torch.equal(trained.normalize.mean.flatten(), torch.tensor(mean))
    expected = trained(x)
    for source in (out, out / "model.safetensors", out / "model.pt", out / "model_card.json"):
        assert torch.equal(from_checkpoint(source)(x), expected), source
    lines = loader_block(out)
    assert "from_checkpoint" in lines[1]
    assert torch.equal(run_snippet(lines, out, monkeypatch)(x), expected)


def test_the_authors_cifar_net_exports_and_loads_with_from_checkpoint(tmp_path, monkeypatch):
    """shafahi2019_wrn32_10 (here at depth 1, width 1 per stage): its card records the x 255 in
    front and the per-image standardisation after it, offers no torchvision line (torchvision
    cannot build it), and every source gives back the trained model."""
    from dist_free.engine import models
    from dist_free.engine.shafahi2019 import ShafahiWideResNet
    name = "shafahi2019_wrn32_10"
    monkeypatch.setitem(models.SMALL_MODELS, name, lambda n: ShafahiWideResNet(n, 1, 1))
    ckpt = make_checkpoint(tmp_path / "last.pt", name, size=32)
    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    card = json.loads((out / "model_card.json").read_text())
    assert card["architecture_source"] == "dist_free"
    assert card["normalization"]["mean"] == [0.0] * 3
    assert torch.equal(torch.tensor(card["normalization"]["std"]), torch.full((3,), 1 / 255))
    assert "tf.image.per_image_standardization" in card["normalization"]["then"]
    md = (out / "MODEL_CARD.md").read_text()
    assert "per-image standardisation" in md and "torchvision.models" not in md
    lines = loader_block(out)
    assert lines[0] == "from dist_free.models import from_checkpoint"
    x = torch.rand(3, 3, 32, 32)
    expected = reference_model(ckpt)(x)
    for source in (ckpt, out, out / "model.safetensors", out / "model.pt"):
        assert torch.equal(from_checkpoint(source)(x), expected), source
    assert torch.equal(run_snippet(lines, out, monkeypatch)(x), expected)


def write_report(path: Path, sha: str, flagged=False) -> Path:
    report = {
        "checkpoint": {"path": "best.pt", "sha256": sha, "epoch": 1, "global_step": 2},
        "split": "val", "images": 1000, "dtype": "bf16", "world_size": 4, "seconds": 12.5,
        "subset": {"n": 1000, "selection": "first 1000 of the sorted listing",
                   "files_sha256": "ab" * 32},
        "clean": {"top1": 0.61, "top5": 0.83},
        "results": [{"attack": "pgd", "eps": 4 / 255, "steps": 50, "restarts": 2,
                     "step_size": 1 / 255, "loss": "ce", "robust_top1": 0.34},
                    {"attack": "autoattack", "version": "standard", "eps": 4 / 255,
                     "attacks": ["apgd-ce", "apgd-t"], "robust_after": {}, "robust_top1": 0.30}],
        "gradient_masking": {"pgd_minus_autoattack": 0.04, "threshold": 0.02, "flagged": flagged}}
    path.write_text(json.dumps(report))
    return path


def test_card_carries_the_reports_protocol(resnet_export, tmp_path):
    ckpt, _ = resnet_export
    report = write_report(tmp_path / "eval.json", sha256(ckpt), flagged=True)
    assert export.main([str(ckpt), str(tmp_path / "out"), "--report", str(report)]) == 0
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    ev = card["evaluation"]
    assert ev["source"] == "report" and ev["final"] is True and ev["dtype"] == "bf16"
    assert [r["robust_top1"] for r in ev["results"]] == [0.34, 0.30]
    md = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "in training" not in md
    assert ("1000 val images (subset of 1000: first 1000 of the sorted listing, file list sha256 "
            f"`{'ab' * 32}`), bf16, 4 rank(s)") in md
    assert f"checkpoint sha256 `{sha256(ckpt)}`" in md
    assert ("| pgd | PGD-50 x 2 restarts, step 0.00392157 (1/255), CE loss "
            "| 0.0156863 (4/255) | 34.00% |") in md
    assert "| autoattack | AutoAttack standard (apgd-ce, apgd-t) |" in md and "30.00%" in md
    assert "**Warning: PGD minus AutoAttack = 4.00% (threshold 2.00%): possible gradient masking.**" in md


def test_a_report_for_another_checkpoint_is_refused(resnet_export, tmp_path, capsys):
    ckpt, _ = resnet_export
    report = write_report(tmp_path / "eval.json", "0" * 64)
    assert export.main([str(ckpt), str(tmp_path / "out"), "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: report") and str(report) in err and "not this one" in err
    assert not (tmp_path / "out").exists()
    assert export.main([str(ckpt), str(tmp_path / "out"), "--report", str(tmp_path / "no.json")]) == 2
    assert "cannot read report" in capsys.readouterr().err


def test_bad_inputs_exit_2_naming_the_cause(resnet_export, tmp_path, capsys):
    ckpt, earlier = resnet_export

    def fails(args, *needles):
        assert export.main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and all(n in err for n in needles), err

    fails([tmp_path / "missing.pt", tmp_path / "a"], "checkpoint not found", "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    fails([tmp_path / "junk.pt", tmp_path / "a"], "cannot read checkpoint", "junk.pt")
    state = torch.load(ckpt, weights_only=True)
    checkpoint.save_atomic({k: v for k, v in state.items() if k != "config"}, tmp_path / "nc.pt")
    fails([tmp_path / "nc.pt", tmp_path / "a"], "nc.pt is not a dist-free checkpoint", "'config'")
    state["config"]["model"]["name"] = "resnet5"
    checkpoint.save_atomic(state, tmp_path / "arch.pt")
    fails([tmp_path / "arch.pt", tmp_path / "a"], "arch.pt", "unknown architecture 'resnet5'")
    fails([ckpt, earlier], str(earlier), "not empty", "--force")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    fails([ckpt, tmp_path / "mine", "--force"], "notes.txt", "replaces only an earlier export")
    assert not (tmp_path / "a").exists()


def test_cli_errors_carry_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dist_free.export", str(tmp_path / "nope.pt"),
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: checkpoint not found: {tmp_path / 'nope.pt'}\n"


def test_a_failed_forced_export_leaves_the_old_one(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "last.pt")
    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(path):
        raise OSError("disk full")
    monkeypatch.setattr(atomic, "fsync_path", disk_full)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "last.pt"]  # no temp folders


def test_force_replaces_an_export_with_an_ordinary_folder(tmp_path):
    ckpt = make_checkpoint(tmp_path / "last.pt")
    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    written = export_checkpoint(ckpt, out, force=True)
    assert sorted(p.name for p in written) == sorted(EXPORT_FILES)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask    # an ordinary folder, not a 0700 temp


def test_from_checkpoint_names_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="empty.*not a dist-free export"):
        from_checkpoint(tmp_path / "empty")
    torch.save({"model": {}, "epoch": 0}, tmp_path / "bare.pt")
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"bare.pt is not a dist-free checkpoint \(missing \['config'\]\)"):
        from_checkpoint(tmp_path / "bare.pt")
    ckpt = make_checkpoint(tmp_path / "last.pt")
    state = torch.load(ckpt, weights_only=True)
    state["config"]["model"]["num_classes"] = 5
    checkpoint.save_atomic(state, tmp_path / "other.pt")
    with pytest.raises(checkpoint.CheckpointError, match="weights do not fit small_cnn with 5"):
        from_checkpoint(tmp_path / "other.pt")


def test_the_card_names_the_figure_best_pt_was_selected_by():
    from dist_free.publish.card import selection_text
    held = {"samples": 1000, "top1": 0.6, "pgd": 0.3}
    on_holdout = {"selected_on": "holdout", "holdout": held}
    assert "the best clean top-1 on 1000 held-out" in selection_text(
        {**on_holdout, "selected_by": "clean"})
    assert "the best PGD accuracy on 1000 held-out" in selection_text(
        {**on_holdout, "selected_by": "robust"})
    assert "the best PGD accuracy on 1000" in selection_text(on_holdout)   # before select_on
    assert "the best val clean top-1), so optimistic" in selection_text(
        {"selected_on": "val", "selected_by": "clean", "holdout": None})
