"""AdamW and its weight-decay groups, warm-up + cosine, gradient clipping (AMP, free training),
and the model EMA: what the ConvNeXt/ViT recipes need."""

import pytest
import torch
from helpers_nets import minibatches, tiny_net

from dist_free.config import ConfigError, load_config
from dist_free.engine import optim
from dist_free.engine.ema import ModelEMA
from dist_free.engine.free import FreeAdversarialTrainer
from dist_free.engine.methods import NaturalTrainer
from dist_free.trainer import runtime, schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit():
    from dist_free.engine.models import build_model
    return build_model("timm/vit_tiny_patch16_224", 10,
                       kwargs=dict(img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2))


def group_of(opt, param) -> dict:
    (group,) = [g for g in opt.param_groups if any(p is param for p in g["params"])]
    return group


def test_adamw_decays_weights_but_not_norms_biases_or_tokens():
    model = tiny_vit()
    opt = runtime.build_optimizer(load_config(None, ["optim.name=adamw", "optim.weight_decay=0.05"]),
                                  model, world_size=1)
    assert isinstance(opt, torch.optim.AdamW)
    named = dict(model.named_parameters())
    for exempt in ("net.pos_embed", "net.cls_token", "net.norm.weight", "net.norm.bias",
                   "net.blocks.0.attn.qkv.bias", "net.patch_embed.proj.bias"):
        assert group_of(opt, named[exempt])["weight_decay"] == 0.0, exempt
    for decayed in ("net.blocks.0.attn.qkv.weight", "net.patch_embed.proj.weight", "net.head.weight"):
        assert group_of(opt, named[decayed])["weight_decay"] == 0.05, decayed
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_sgd_keeps_one_group_with_decay_on_every_parameter_as_before():
    """The ResNet presets' optimizer is unchanged: one SGD group, weight decay on everything."""
    model = tiny_net()
    opt = runtime.build_optimizer(load_config(None, ["optim.weight_decay=1e-4"]), model, 1)
    assert type(opt) is torch.optim.SGD and len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 1e-4 and opt.param_groups[0]["momentum"] == 0.9
    exempt = runtime.build_optimizer(load_config(None, ["optim.wd_exempt=true"]), model, 1)
    assert [g["weight_decay"] for g in exempt.param_groups] == [1e-4, 0.0]


def test_warmup_cosine_runs_from_start_to_peak_then_down_to_the_floor():
    f = schedule.warmup_cosine_factor
    kw = dict(epochs=100, warmup_epochs=10, start=0.01, floor=0.1)
    assert f(0, **kw) == pytest.approx(0.01)
    assert f(5, **kw) == pytest.approx(0.505)
    assert f(10, **kw) == pytest.approx(1.0)
    assert f(55, **kw) == pytest.approx(0.55)          # half way down the cosine
    assert f(100, **kw) == pytest.approx(0.1) and f(130, **kw) == pytest.approx(0.1)
    cfg = load_config(None, ["optim.schedule=warmup_cosine", "optim.epochs=100",
                             "optim.warmup_epochs=10", "optim.warmup_start=0.01",
                             "optim.lr_floor=0.1"])
    assert schedule.lr_factor(cfg, 55) == pytest.approx(0.55)


@pytest.mark.parametrize("override, key", [
    ("optim.name=lamb", "optim.name"), ("optim.ema=1", "optim.ema"), ("optim.ema=0", "optim.ema"),
    ("optim.betas=[0.9]", "optim.betas"), ("optim.lr_floor=2", "optim.lr_floor"),
    ("optim.clip_grad_norm=0", "optim.clip_grad_norm"), ("optim.warmup_start=-1", "optim.warmup_start"),
])
def test_bad_optimizer_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def weight_step(clip: float | None, scaler=None, amp=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One free replay on a fixed batch with plain SGD (lr 1, no momentum): (weight change,
    perturbation after the replay)."""
    torch.manual_seed(0)
    model = tiny_net()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    t = FreeAdversarialTrainer(model, opt, eps=8 / 255, replays=1, grad_clip=clip,
                               scaler=scaler, amp_dtype=amp)
    (x, y), = minibatches([16])
    t.train_step(x, y)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return after - before, t.perturbation.clone()


def test_clipping_bounds_the_weight_step_not_the_perturbation():
    free_step, free_delta = weight_step(None)
    assert free_step.norm() > 0.5                      # so a bound of 0.05 does bite
    clipped_step, clipped_delta = weight_step(0.05)
    assert clipped_step.norm() == pytest.approx(0.05, rel=1e-3)
    # Same direction, shorter: clipping scales the weight gradient, nothing else.
    assert torch.allclose(clipped_step, free_step * (0.05 / free_step.norm()), atol=1e-6)
    # The FGSM step on delta used the input gradient, untouched by clipping.
    assert clipped_delta.abs().sum() > 0 and torch.equal(clipped_delta, free_delta)


def test_clipping_under_a_grad_scaler_works_in_true_units():
    """Without unscaling first, fp16's loss scale (65536) would shrink the step 65536-fold."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    step, _ = weight_step(0.05, scaler=scaler, amp=torch.float16)
    assert scaler.get_scale() == 2.0 ** 16                # the step was taken, not skipped
    assert step.norm() == pytest.approx(0.05, rel=2e-2)


def test_every_other_method_clips_too():
    torch.manual_seed(0)
    model = tiny_net()
    before = [p.detach().clone() for p in model.parameters()]
    t = NaturalTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), grad_clip=0.01)
    (x, y), = minibatches([16])
    t.train_step(x, y)
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert change.norm() == pytest.approx(0.01, rel=1e-3)


def test_ema_warms_up_then_averages_with_its_decay_per_optimizer_step():
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.99)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)                  # first update: decay min(0.99, 1/10) = 0.1
    assert torch.allclose(ema.module.weight, start + 0.9)
    assert not ema.module.weight.requires_grad and ema.updates == 1
    # Past the warm-up, 4 steps at once (a free minibatch of m = 4) equal 4 single updates.
    ema.updates = 10 ** 6
    twin = ModelEMA(model, decay=0.99)
    twin.module.load_state_dict(ema.module.state_dict())
    twin.updates = ema.updates
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model, steps=4)
    for _ in range(4):
        twin.update(model)
    assert torch.allclose(ema.module.weight, twin.module.weight, atol=1e-6)
    assert ema.updates == twin.updates == 10 ** 6 + 4


def test_ema_state_dict_round_trips_with_its_buffers():
    model = tiny_net()
    ema = ModelEMA(model, decay=0.999)
    start = {k: v.clone() for k, v in ema.module.named_buffers()}
    (x, y), = minibatches([16])
    model.train()(x)                   # BatchNorm statistics move
    ema.update(model)                  # first update: decay min(0.999, 1/10) = 0.1
    live = dict(model.named_buffers())
    for name, buf in ema.module.named_buffers():
        expected = live[name] if not buf.is_floating_point() else 0.1 * start[name] + 0.9 * live[name]
        assert torch.allclose(buf, expected), name
    other = ModelEMA(tiny_net(), decay=0.999)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1
    for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    model.train()(x * 0.5)             # the resumed average goes on exactly as the first one
    ema.update(model)
    other.update(model)
    for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_keeps_its_own_batchnorm_statistics_the_ema_of_the_live_ones():
    """Evaluating the averaged weights with the live model's running statistics is wrong for a
    BatchNorm net: the EMA's running_mean/var are averaged as its weights are (timm's ModelEmaV3)."""
    model = tiny_net()
    ema = ModelEMA(model, decay=0.9)
    bn, ema_bn = model.net[1], ema.module.net[1]
    mean, var = ema_bn.running_mean.clone(), ema_bn.running_var.clone()
    for (x, _) in minibatches([16, 16, 16, 16]):
        model.train()(x * 3 + 1)       # statistics far from the initial 0 / 1
        d = ema.step_decay(1)
        ema.update(model)
        mean += (1 - d) * (bn.running_mean - mean)
        var += (1 - d) * (bn.running_var - var)
    assert torch.allclose(ema_bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(ema_bn.running_var, var, atol=1e-6)
    assert not torch.allclose(ema_bn.running_mean, bn.running_mean, atol=1e-3)
    assert ema_bn.num_batches_tracked == bn.num_batches_tracked == 4


def test_split_decay_matches_timm_token_names_as_suffixes():
    model = tiny_vit()
    decay, exempt = optim.split_decay(model, {"pos_embed", "cls_token"})
    ids = {id(p) for p in exempt}
    assert id(model.net.pos_embed) in ids and id(model.net.cls_token) in ids
    assert id(model.net.head.weight) in {id(p) for p in decay}
