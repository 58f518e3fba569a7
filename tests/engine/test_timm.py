"""timm architectures (model.name: timm/<name>): built offline with the normalisation inside,
trained by every method, started from a checked local safetensors file, exported with the EMA
weights and loaded back with timm alone; a run interrupted and resumed equals an uninterrupted
one (AdamW, warm-up + cosine, clipping, label smoothing and EMA all in the checkpoint)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dist_free import checkpoint, train
from dist_free.config import ConfigError, load_config
from dist_free.engine.methods import build_method
from dist_free.engine.models import NormalizedModel, build_model
from dist_free.publish.export import export_checkpoint
from dist_free.publish.load import from_checkpoint
from dist_free.trainer import runtime
from dist_free.trainer.run import Hooks

VIT = "timm/vit_tiny_patch16_224"
VIT_KW = dict(img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2)
CONVNEXT = "timm/convnext_atto"
DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing here may touch the network: the hub is offline and any socket connect fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def px(name) -> int:
    return 16 if name == VIT else 32      # ConvNeXt downsamples 32-fold


def tiny(name, classes=5):
    torch.manual_seed(0)
    return build_model(name, classes, kwargs=VIT_KW if name == VIT else None)


@pytest.mark.parametrize("name", [CONVNEXT, VIT])
def test_timm_models_take_pixels_with_the_normalisation_inside(name):
    model = tiny(name).eval()
    assert isinstance(model, NormalizedModel) and type(model.net).__module__.startswith("timm.")
    x = torch.rand(2, 3, px(name), px(name))
    by_hand = model.net((x - model.normalize.mean) / model.normalize.std)
    assert torch.equal(model(x), by_hand) and model(x).shape == (2, 5)


def test_a_vit_takes_channels_last_batches_as_the_loaders_may_hand_them():
    model = tiny(VIT).eval()
    x = torch.rand(2, 3, 16, 16)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(nhwc), model(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["free", "natural", "pgd", "fast", "nfgsm"])
@pytest.mark.parametrize("name", [CONVNEXT, VIT])
def test_every_method_trains_a_timm_model(name, method):
    model = tiny(name)
    before = [p.detach().clone() for p in model.parameters()]
    opt = runtime.build_optimizer(load_config(None, ["optim.name=adamw", "optim.lr=1e-3"]), model, 1)
    options = {"free": dict(eps=4 / 255, replays=2), "pgd": dict(eps=4 / 255, steps=2),
               "fast": dict(eps=4 / 255), "nfgsm": dict(eps=4 / 255)}.get(method, {})
    trainer = build_method(method, model, opt, grad_clip=1.0, **options)
    stats = trainer.train_step(torch.rand(4, 3, px(name), px(name)), torch.randint(0, 5, (4,)))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if method == "free":
        assert trainer.perturbation.abs().sum() > 0


def test_architecture_arguments_are_validated_data():
    cfg = load_config(None, [f"model.name={VIT}", "model.kwargs.img_size=32",
                             "model.kwargs.patch_size=4", "model.kwargs.drop_path_rate=0.1"])
    assert cfg.model.kwargs == {"img_size": 32, "patch_size": 4, "drop_path_rate": 0.1}
    runtime.check_model(cfg)
    with pytest.raises(ConfigError, match="model.kwargs: only timm architectures"):
        load_config(None, ["model.name=resnet18", "model.kwargs.img_size=32"])
    with pytest.raises(ConfigError, match=r"model.kwargs.img_size: expected a number"):
        load_config(None, [f"model.name={VIT}", "model.kwargs={img_size: {a: 1}}"])
    with pytest.raises(ConfigError, match="does not take these arguments.*bogus"):
        runtime.check_model(load_config(None, [f"model.name={VIT}", "model.kwargs.bogus=3"]))
    with pytest.raises(ConfigError, match="unknown timm architecture 'convnext_nano_typo'"):
        runtime.check_model(load_config(None, ["model.name=timm/convnext_nano_typo"]))


def test_a_bad_timm_config_exits_2_before_any_training(tmp_path, capfd):
    code = train.main([f"model.name={VIT}", "model.kwargs.bogus=3", f"run.dir={tmp_path}",
                       "tracking.enabled=false"])
    assert code == 2 and "bogus" in capfd.readouterr().err
    assert not any(tmp_path.iterdir())


# With these timm reads weights or a pretrained config from a file, its cache or the hub: the
# explicit list (timm.create_model's, build_model_with_cfg's), then names its rule catches.
WEIGHT_SOURCES = {"checkpoint_path": "/x/net.pth", "pretrained": True, "pretrained_cfg": "augreg",
                  "pretrained_cfg_overlay": "x", "pretrained_strict": False, "cache_dir": "/x",
                  "pruned": True, "pretrained_filter_fn": "x", "pretrained_model_args": "x",
                  "hf_hub_id": "timm/x", "weights_url": "http://x", "init_file": "/x"}


def forbid_reading_weights(monkeypatch):
    """From here on, timm.create_model or reading any weights file fails the test."""
    import safetensors.torch
    import timm

    def called(*args, **kwargs):
        raise AssertionError(f"called with {args} {kwargs}")
    for module, name in ((timm, "create_model"), (safetensors.torch, "load_file"), (torch, "load")):
        monkeypatch.setattr(module, name, called)


@pytest.mark.parametrize("key", WEIGHT_SOURCES)
def test_an_argument_that_reads_weights_is_a_config_error_naming_it(key, monkeypatch):
    forbid_reading_weights(monkeypatch)
    cfg = load_config(None, [f"model.name={VIT}", f"model.kwargs.{key}={WEIGHT_SOURCES[key]}"])
    with pytest.raises(ConfigError, match=f"model.kwargs: argument '{key}' would have timm read "
                                          "weights.*model.init"):
        runtime.check_model(cfg)


def test_architecture_arguments_the_rule_could_mistake_still_build():
    runtime.check_model(load_config(None, ["model.name=timm/swinv2_cr_tiny_ns_224",
                                           "model.kwargs.drop_path_rate=0.1"]))
    runtime.check_model(load_config(None, ["model.name=timm/swinv2_tiny_window8_256",
                                           "model.kwargs.pretrained_window_sizes=[8, 8, 8, 4]"]))


def test_checkpoint_path_in_kwargs_exits_2_before_any_process_group(tmp_path, capfd, monkeypatch):
    weights = tmp_path / "net.pth"
    torch.save(tiny(VIT).net.state_dict(), weights)
    forbid_reading_weights(monkeypatch)
    monkeypatch.setattr(train.distributed, "init", lambda *a: pytest.fail("a process group"))
    code = train.main(["--config", DEMO, f"model.name={VIT}",
                       f"model.kwargs.checkpoint_path={weights}", f"run.dir={tmp_path / 'runs'}",
                       "tracking.enabled=false"])
    err = capfd.readouterr().err
    assert code == 2 and "model.kwargs: argument 'checkpoint_path'" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_model_init_loads_a_local_safetensors_after_checking_every_shape(tmp_path):
    source = tiny(CONVNEXT)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    plain = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, plain)
    exported = tmp_path / "export.safetensors"      # a dist-free export's "1." keys
    save_file({f"1.{k}": v.contiguous() for k, v in source.net.state_dict().items()}, exported)
    for path in (plain, exported):
        model = tiny(CONVNEXT)
        runtime.apply_init(load_config(None, [f"model.name={CONVNEXT}", f"model.init={path}"]), model)
        for a, b in zip(model.net.state_dict().values(), source.net.state_dict().values()):
            assert torch.equal(a, b)
    other = build_model(CONVNEXT, 7)                   # a 7-class head does not fit 5 classes
    with pytest.raises(ConfigError, match=r"does not fit.*head.fc.weight: file \(5, 320\) vs "
                                          r"model \(7, 320\)"):
        runtime.apply_init(load_config(None, [f"model.name={CONVNEXT}", f"model.init={plain}"]),
                           other)
    with pytest.raises(ConfigError, match="does not exist"):
        runtime.apply_init(load_config(None, [f"model.init={tmp_path / 'no.safetensors'}"]), other)
    with pytest.raises(ConfigError, match="model.init must name a local .safetensors"):
        load_config(None, ["model.init=weights.pt"])


def ema_checkpoint(path):
    """A trainer-style checkpoint of a tiny ViT whose EMA differs from its live weights."""
    cfg = load_config(None, [f"model.name={VIT}", "model.num_classes=5", "data.image_size=16",
                             "data.val_resize=20", "optim.ema=0.999", "optim.name=adamw",
                             "optim.schedule=warmup_cosine", "optim.warmup_epochs=1",
                             "model.channels_last=false"] +
                      [f"model.kwargs.{k}={v}" for k, v in VIT_KW.items()])
    live, ema = tiny(VIT), tiny(VIT)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(0.5)
    state = {"model": live.state_dict(), "config": cfg.to_dict(), "epoch": 1, "global_step": 3,
             "world_size": 2, "ema": {"decay": 0.999, "updates": 12, "model": ema.state_dict()},
             "eval": {"epoch": 1, "samples": 64, "top1": 0.5, "top5": 0.9, "pgd": 0.2,
                      "eps": 4 / 255, "pgd_steps": 10, "pgd_restarts": 1,
                      "selected_on": "holdout", "holdout": {"samples": 256, "top1": 0.6, "pgd": 0.3},
                      "weights": "ema"}}
    return checkpoint.save_atomic(state, path), live, ema


BLOCK_DIST_FREE = "import sys; sys.modules['dist_free'] = None  # timm alone, no dist_free\n"


def test_the_export_holds_the_ema_loadable_with_timm_alone(tmp_path):
    ckpt, live, ema = ema_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    card = json.loads((out / "model_card.json").read_text())
    assert card["architecture_source"] == "timm" and card["weights"]["source"] == "ema"
    assert card["architecture_kwargs"] == VIT_KW
    x = torch.rand(3, 3, 16, 16)
    expected = ema.eval()(x)
    assert not torch.allclose(expected, live.eval()(x))
    assert torch.equal(from_checkpoint(out)(x), expected) and torch.equal(from_checkpoint(ckpt)(x), expected)
    md = (out / "MODEL_CARD.md").read_text()
    lines = md.split("```python\n")[1].split("\n```")[0].splitlines()
    assert len(lines) == 3 and "timm.create_model('vit_tiny_patch16_224', num_classes=5" in lines[1]
    torch.save(x, tmp_path / "x.pt")
    script = BLOCK_DIST_FREE + "\n".join(lines) + (
        f"\nimport torch; x = torch.load({str(tmp_path / 'x.pt')!r})"
        f"\ntorch.save(model(x).detach(), {str(tmp_path / 'y.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=out, capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=0, atol=1e-6)
    # The card is true about selection and schedule.
    assert "best PGD accuracy on 256 held-out training images" in md and "same val" not in md
    assert "milestones" not in md and "then cosine to 0 x peak" in md
    assert card["training"]["milestones_natural"] is None
    assert "the EMA of the weights (decay 0.999" in md
    info = json.loads((out / "model_info.json").read_text())
    assert info["architecture"] == VIT and info["eps"] == "4/255"
    assert info["clean_acc"] is None and info["autoattack_acc"] is None   # no final evaluation


@pytest.mark.parametrize("hostile", [{"checkpoint_path": "net.pth"}, {"pretrained": True},
                                     {"pretrained_cfg": {"file": "net.pth"}}])
def test_an_export_whose_card_asks_timm_to_read_weights_is_refused_unread(tmp_path, monkeypatch,
                                                                          hostile):
    ckpt, _, _ = ema_checkpoint(tmp_path / "best.pt")
    out = tmp_path / "export"
    export_checkpoint(ckpt, out)
    torch.save(tiny(VIT).net.state_dict(), out / "net.pth")
    card = json.loads((out / "model_card.json").read_text())
    card["architecture_kwargs"] = {**card["architecture_kwargs"], **hostile}
    (out / "model_card.json").write_text(json.dumps(card))
    forbid_reading_weights(monkeypatch)
    (key,) = hostile
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"model.safetensors: cannot build architecture '{VIT}': argument "
                             f"'{key}' would have timm read weights"):
        from_checkpoint(out)


def test_a_checkpoint_whose_config_asks_timm_to_read_weights_is_refused(tmp_path, monkeypatch):
    ckpt, live, _ = ema_checkpoint(tmp_path / "best.pt")
    state = checkpoint.load(ckpt)
    state["config"]["model"]["kwargs"]["checkpoint_path"] = str(tmp_path / "net.pth")
    torch.save(live.net.state_dict(), tmp_path / "net.pth")
    hostile = checkpoint.save_atomic(state, tmp_path / "hostile.pt")
    import timm
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("timm was called"))
    with pytest.raises(checkpoint.CheckpointError, match="argument 'checkpoint_path' would have"):
        from_checkpoint(hostile)


def test_model_info_carries_a_reports_autoattack_figures(tmp_path):
    ckpt, _, _ = ema_checkpoint(tmp_path / "best.pt")
    report = {"checkpoint": {"sha256": checkpoint.sha256(ckpt)}, "split": "val", "images": 500,
              "subset": {"n": 500, "selection": "sha1"}, "dtype": "fp32", "world_size": 1,
              "clean": {"top1": 0.7234, "top5": 0.9},
              "results": [{"attack": "autoattack", "eps": 4 / 255, "robust_top1": 0.4178,
                           "version": "standard", "attacks": ["apgd-ce"]}]}
    export_checkpoint(ckpt, tmp_path / "out", report=report)
    info = json.loads((tmp_path / "out" / "model_info.json").read_text())
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == ("72.34", "41.78", "41.78")
    assert info["eps"] == "4/255" and info["dataset"] is None and not info["unreliable"]
    assert "500 val images" in info["footnote"] and "ema weights" in info["footnote"]


class StopAtFirstWrite(Hooks):
    """As SIGTERM during the first checkpoint write does, without a signal in the test process."""

    def before_write(self, run):
        run.preemption.requested = True


def recipe_args(demo_root, run_dir):
    return ["--config", DEMO, f"data.root={demo_root}", f"run.dir={run_dir}",
            f"model.name={VIT}", "model.kwargs={img_size: 32, patch_size: 8, depth: 1, "
            "embed_dim: 32, num_heads: 2}", "optim.name=adamw", "optim.lr=2e-3",
            "optim.weight_decay=0.05", "optim.schedule=warmup_cosine", "optim.warmup_epochs=2",
            "optim.warmup_start=0.1", "optim.lr_floor=0.05",
            "optim.clip_grad_norm=1.0", "optim.ema=0.99", "optim.epochs=8", "data.batch_size=64",
            "eval.holdout=1100", "eval.max_batches=1", "eval.steps=2", "eval.every=1",
            "eval.probes_per_epoch=0", "run.amp=off", "run.log_every=5", "tracking.enabled=false"]


def test_a_run_interrupted_then_resumed_equals_an_uninterrupted_one(demo_root, tmp_path):
    assert train.main(recipe_args(demo_root, tmp_path / "a")) == 0
    assert train.main(recipe_args(demo_root, tmp_path / "b"), hooks=StopAtFirstWrite()) == 0
    stopped = checkpoint.load(tmp_path / "b" / "demo" / "checkpoints" / "last.pt")
    assert stopped["epoch"] == 1 and stopped["eval_pending"]
    assert train.main(recipe_args(demo_root, tmp_path / "b")) == 0
    a, b = (checkpoint.load(tmp_path / r / "demo" / "checkpoints" / "last.pt") for r in "ab")
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"]
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4 * a["global_step"]
    for key in ("model",):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), k
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), k
    assert not torch.equal(a["ema"]["model"]["net.head.weight"], a["model"]["net.head.weight"])
    for (ka, va), (kb, vb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert all(torch.equal(va[s], vb[s]) for s in va), ka
    assert [g["weight_decay"] for g in a["optimizer"]["param_groups"]] == [0.05, 0.0]
    assert torch.equal(a["rank_states"][0]["perturbation"], b["rank_states"][0]["perturbation"])
    assert a["eval"]["weights"] == "ema" and a["eval"]["selected_on"] == "holdout"
