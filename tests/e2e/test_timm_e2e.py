"""Done-when of the timm work: a timm ConvNeXt and a timm ViT free-train on the demo digits under
torchrun with 2 ranks (AdamW, warm-up + cosine, EMA), export, and load from the card's three
lines. Small sizes: the training set is cut to ~340 digits by a large holdout."""

import json
import re

import pytest
import torch
from helpers_launch import PROBE, assert_ok, demo_args, run_cmd, torchrun, two_rank_states

from dist_free import checkpoint
from dist_free.engine.models import build_model
from dist_free.publish.load import from_checkpoint

pytestmark = pytest.mark.slow

MODELS = {
    "convnext": ["model.name=timm/convnext_atto", "model.channels_last=true"],
    "vit": ["model.name=timm/vit_tiny_patch16_224",
            "model.kwargs={img_size: 32, patch_size: 4, depth: 2, embed_dim: 48, num_heads: 2}"],
}
RECIPE = ["optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05",
          "optim.schedule=warmup_cosine", "optim.warmup_epochs=1", "optim.warmup_start=0.1",
          "optim.lr_floor=0.05", "optim.ema=0.99",
          "optim.clip_grad_norm=5", "eval.holdout=1100", "eval.max_batches=1",
          "eval.probes_per_epoch=0", "run.amp=off"]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_timm_models_free_trained_under_torchrun_load_from_the_card(arch, demo_root,
                                                                          tmp_path, monkeypatch):
    proc = run_cmd(torchrun("--nproc_per_node=2", "--standalone", PROBE,
                            *demo_args(demo_root, tmp_path), *MODELS[arch], *RECIPE),
                   tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_ok(proc)
    r0, r1 = two_rank_states(tmp_path)
    state = checkpoint.load(tmp_path / "demo" / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["ema"]["updates"] == 4 * state["global_step"]
    cfg = state["config"]["model"]
    torch.manual_seed(0)          # rank 0 builds its weights after seeding run.seed + 0
    fresh = build_model(cfg["name"], 10, kwargs=cfg["kwargs"]).state_dict()
    assert any(not torch.equal(v, state["model"][k]) for k, v in fresh.items() if "net." in k)

    out = tmp_path / "demo" / "export"
    card = json.loads((out / "model_card.json").read_text())
    assert card["weights"]["source"] == "ema" and (out / "model_info.json").is_file()
    lines = re.search(r"```python\n(.*?)\n```", (out / "MODEL_CARD.md").read_text(), re.S
                      ).group(1).splitlines()
    assert len(lines) == 3 and "timm.create_model(" in lines[1]
    assert not any("dist_free" in line for line in lines)
    namespace = {}
    monkeypatch.chdir(out)      # the card's loader names files relative to the export folder
    exec("\n".join(lines), namespace)
    x = torch.rand(4, 3, 32, 32)
    best = checkpoint.load(tmp_path / "demo" / "checkpoints" / "best.pt")
    expected = from_checkpoint(tmp_path / "demo" / "checkpoints" / "best.pt")(x)
    torch.testing.assert_close(namespace["model"](x), expected, rtol=0, atol=1e-5)
    live = build_model(cfg["name"], 10, kwargs=cfg["kwargs"])
    live.load_state_dict(best["model"])
    assert not torch.allclose(live.eval()(x), expected, atol=1e-4)     # the EMA was exported
