"""shafahi2019_wrn32_10 is the network of the authors' free_model.py (ashafahi/free_adv_train),
checked against a restatement of that graph written here in plain torch.nn.functional."""

import math

import pytest
import torch
import torch.nn as nn

from dist_free.engine import optim, shafahi2019
from dist_free.engine.models import INPUT_NORMALIZATION, NormalizedModel, build_model
from dist_free.engine.shafahi2019 import ShafahiWideResNet, per_image_standardization

NAME = "shafahi2019_wrn32_10"


def tf_trainable_variables(num_classes, units=5, widen=10):
    """free_model.py's trainable variables and their shapes, one by one as its code creates them
    (the perturbation aside): init_conv DW; per unit init_bn gamma/beta, conv1 DW, bn2
    gamma/beta, conv2 DW; final_bn gamma/beta; logit DW and biases."""
    filters = [16, 16 * widen, 32 * widen, 64 * widen]
    shapes = [("DW", (3, 3, 3, 16))]
    for stage in range(3):
        for i in range(units):
            cin = filters[stage] if i == 0 else filters[stage + 1]
            cout = filters[stage + 1]
            shapes += [("gamma", (cin,)), ("beta", (cin,)), ("DW", (3, 3, cin, cout)),
                       ("gamma", (cout,)), ("beta", (cout,)), ("DW", (3, 3, cout, cout))]
    shapes += [("gamma", (filters[3],)), ("beta", (filters[3],)),
               ("DW", (filters[3], num_classes)), ("biases", (num_classes,))]
    return shapes


@pytest.mark.parametrize("num_classes", [10, 100])
def test_it_has_exactly_the_authors_trainable_variables(num_classes):
    with torch.device("meta"):                       # the real size, no memory, no compute
        net = build_model(NAME, num_classes).net
    theirs = tf_trainable_variables(num_classes)
    ours = [p.shape for p in net.parameters()]
    assert sorted(math.prod(s) for _, s in theirs) == sorted(math.prod(s) for s in ours)
    total = sum(math.prod(s) for _, s in theirs)
    assert sum(p.numel() for p in net.parameters()) == total
    assert total == (45_901_914 if num_classes == 10 else 45_959_604)   # computed from theirs
    assert net(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, num_classes)


# ------------------------------------------------------------------ their graph, restated

def tf_same_pad(x, stride):
    """TF "SAME" for a 3x3 kernel: 1 pixel each side at stride 1; at stride 2 on an even size
    the total of 1 goes after (bottom/right)."""
    return nn.functional.pad(x, (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1))


def tf_batch_norm(x, params, name, training):
    """tf.contrib.layers.batch_norm(decay=.9, epsilon=0.001): batch moments in training."""
    gamma, beta = params[f"{name}.weight"], params[f"{name}.bias"]
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = params[f"{name}.running_mean"], params[f"{name}.running_var"]
    shape = (1, -1, 1, 1)
    return (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 0.001) * gamma.view(shape) + \
        beta.view(shape)


def tf_relu(x, leakiness=0.1):
    return torch.where(x < 0.0, leakiness * x, x)


def tf_per_image_standardization(image):
    """TF 1.x's formula, as written there: E[x^2] - E[x]^2, relu'd, floored at rsqrt(N)."""
    n = image[0].numel()
    mean = image.mean((1, 2, 3), keepdim=True)
    variance = torch.relu(image.square().mean((1, 2, 3), keepdim=True) - mean.square())
    return (image - mean) / torch.maximum(variance.sqrt(), torch.tensor(n ** -0.5))


def tf_residual(x, params, name, in_filter, out_filter, stride, activate_before_residual,
                training):
    if activate_before_residual:
        x = tf_relu(tf_batch_norm(x, params, f"{name}.init_bn", training))
        orig_x = x
    else:
        orig_x = x
        x = tf_relu(tf_batch_norm(x, params, f"{name}.init_bn", training))
    x = nn.functional.conv2d(tf_same_pad(x, stride), params[f"{name}.conv1.weight"], stride=stride)
    x = tf_relu(tf_batch_norm(x, params, f"{name}.bn2", training))
    x = nn.functional.conv2d(tf_same_pad(x, 1), params[f"{name}.conv2.weight"])
    if in_filter != out_filter:
        orig_x = nn.functional.avg_pool2d(orig_x, stride, stride)
        pad = torch.zeros_like(orig_x[:, :1]).expand(-1, (out_filter - in_filter) // 2, -1, -1)
        orig_x = torch.cat([pad, orig_x, pad], dim=1)
    return x + orig_x


def tf_graph(pixels, params, units, widen, training):
    """free_model.py's _build_model from its placeholder (0-255 pixels) to pre_softmax."""
    filters = [16, 16 * widen, 32 * widen, 64 * widen]
    x = tf_per_image_standardization(pixels)
    x = nn.functional.conv2d(tf_same_pad(x, 1), params["init_conv.weight"])
    k = 0
    for stage, stride in enumerate([1, 2, 2]):
        for i in range(units):
            cin = filters[stage] if i == 0 else filters[stage + 1]
            x = tf_residual(x, params, f"units.{k}", cin, filters[stage + 1],
                            stride if i == 0 else 1, stage == 0 and i == 0, training)
            k += 1
    x = tf_relu(tf_batch_norm(x, params, "final_bn", training)).mean((2, 3))
    return x @ params["fc.weight"].T + params["fc.bias"]


def small_net(units=2, widen=2, seed=0):
    """Their graph at a smaller depth and width (every kind of unit still present)."""
    torch.manual_seed(seed)
    net = ShafahiWideResNet(10, units_per_stage=units, widen=widen)
    for bn in net.modules():        # statistics and affine terms away from their initial 0/1
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.2, 0.2)
    return net


def small_model(**kw):
    """small_net behind the fixed Normalize the registry puts in front of NAME."""
    return NormalizedModel(small_net(**kw), *INPUT_NORMALIZATION[NAME])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_net_computes_their_graph(training):
    net = small_net().train(training)
    params = {k: v.clone() for k, v in net.state_dict().items()}
    pixels = (torch.rand(4, 3, 32, 32) * 255).requires_grad_(True)
    ours = net(pixels)
    theirs = tf_graph(pixels, params, units=2, widen=2, training=training)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # The input gradient (free training's perturbation step) goes through the same graph.
    g_ours, = torch.autograd.grad(ours.logsumexp(1).sum(), pixels)
    g_theirs, = torch.autograd.grad(theirs.logsumexp(1).sum(), pixels)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-3, atol=1e-6)


def test_training_forwards_move_running_statistics_as_tf_decay_0_9_does():
    net = small_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(4, 3, 32, 32) * 255
    stem = net.init_conv(net.standardize(x))             # what units.0.init_bn sees
    net(x)
    batch_mean, batch_var = stem.mean((0, 2, 3)), stem.var((0, 2, 3), unbiased=True)
    # TF's fused batch norm averages the Bessel-corrected batch variance, as torch does.
    torch.testing.assert_close(net.units[0].init_bn.running_mean,
                               0.9 * before["units.0.init_bn.running_mean"] + 0.1 * batch_mean)
    torch.testing.assert_close(net.units[0].init_bn.running_var,
                               0.9 * before["units.0.init_bn.running_var"] + 0.1 * batch_var)


def test_batchnorm_and_activation_are_theirs():
    net = small_net(units=1, widen=1)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 * 3 + 1 and all((b.eps, b.momentum) == (1e-3, 0.1) for b in bns)
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(shafahi2019.leaky_relu(x), torch.where(x < 0, 0.1 * x, x))


def test_stride_2_convolutions_pad_as_tf_same_does():
    """Stride 2 on 32x32: TF pads one row/column after only, so the first output pixel's window
    starts at input pixel 0 (torch's padding=1 would centre it on pixel 0)."""
    conv = shafahi2019.SameConv2d(1, 1, 3, 2)
    nn.init.zeros_(conv.weight)
    conv.weight.data[0, 0, 0, 0] = 1.0                   # picks the window's top-left pixel
    x = torch.arange(32.0 * 32).view(1, 1, 32, 32) + 1
    y = conv(x)
    assert y.shape == (1, 1, 16, 16)
    assert torch.equal(y[0, 0], x[0, 0, 0::2, 0::2])    # windows start at 0, 2, ..., 30
    assert shafahi2019.same_padding(32, 3, 2) == (0, 1) and shafahi2019.same_padding(32, 3, 1) == (1, 1)


# ------------------------------------------------------------------ initialisation

@pytest.fixture(scope="module")
def full_net():
    torch.manual_seed(0)
    return build_model(NAME, 10).net


def test_convolutions_start_as_their_conv_initialiser(full_net):
    """N(0, sqrt(2 / (3 * 3 * out_channels))), no bias."""
    convs = [m for m in full_net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 15 * 2 and all(c.bias is None for c in convs)
    for conv in convs:
        w, want = conv.weight.detach(), math.sqrt(2.0 / (9 * conv.out_channels))
        tolerance = 5 / math.sqrt(w.numel())              # 5 standard errors of the estimate
        assert abs(w.std().item() / want - 1) < tolerance + 1e-3, conv
        assert abs(w.mean().item()) < want * tolerance
    big = convs[-1].weight.detach().flatten()              # 640 x 640 x 3 x 3: a normal, not uniform
    inside = (big.abs() < big.std()).float().mean().item()
    assert abs(inside - 0.6827) < 0.002


def test_fc_starts_uniform_unit_scaling_and_batchnorm_at_identity(full_net):
    w, limit = full_net.fc.weight.detach(), math.sqrt(3 / 640)
    assert w.abs().max().item() <= limit and w.abs().max().item() > 0.99 * limit
    assert abs(w.std().item() * math.sqrt(640) - 1) < 0.05
    assert torch.equal(full_net.fc.bias, torch.zeros(10))
    for bn in (m for m in full_net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bool((bn.weight == 1).all() and (bn.bias == 0).all())


def test_weight_decay_exemption_leaves_exactly_their_dw_variables_decayed(full_net):
    """Their _decay sums the variables named DW (conv kernels, the FC weight); wd_exempt=true
    exempts all the rest: BatchNorm weights and biases and the FC bias."""
    sgd = optim.build_optimizer(full_net, name="sgd", lr=0.1, weight_decay=2e-4, wd_exempt=True)
    decayed, exempt = ({id(p) for p in g["params"]} for g in sgd.param_groups)
    assert [g["weight_decay"] for g in sgd.param_groups] == [2e-4, 0.0]
    dw = {id(m.weight) for m in full_net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    rest = {id(p) for m in full_net.modules() if isinstance(m, nn.BatchNorm2d)
            for p in (m.weight, m.bias)} | {id(full_net.fc.bias)}
    assert decayed == dw and exempt == rest
    assert len(dw) == sum(name == "DW" for name, _ in tf_trainable_variables(10))


# ------------------------------------------------------------------ per-image standardisation

def test_the_model_takes_0_1_images_and_its_net_sees_0_255_pixels():
    with torch.device("meta"):
        assert isinstance(build_model(NAME, 10).net, ShafahiWideResNet)
    model = small_model()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.normalize(x), x * 255, rtol=1e-6, atol=0)


def test_each_image_is_standardised_by_its_own_mean_and_std():
    pixels = torch.rand(3, 3, 32, 32) * 255
    pixels[1] = pixels[1] * 0.2 + 40
    out = per_image_standardization(pixels)
    torch.testing.assert_close(out, tf_per_image_standardization(pixels), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.mean((1, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.std((1, 2, 3), unbiased=False), torch.ones(3))


def test_logits_do_not_change_under_a_per_image_affine_map_of_the_pixels():
    """x -> a x + b per image (a > 0), every value staying in [0, 1]: the same logits."""
    model = small_model().eval()
    x = 0.3 + 0.3 * torch.rand(4, 3, 32, 32)
    a = torch.tensor([0.5, 1.0, 1.5, 0.8]).view(4, 1, 1, 1)
    b = torch.tensor([0.05, -0.1, -0.3, 0.1]).view(4, 1, 1, 1)
    moved = a * x + b
    assert moved.min() >= 0 and moved.max() <= 1
    with torch.no_grad():
        torch.testing.assert_close(model(moved), model(x), rtol=1e-4, atol=1e-4)


def test_a_constant_image_hits_the_floor_and_stays_finite():
    """std 0 is floored at 1 / sqrt(N), N = 32 x 32 x 3: a constant image maps to zeros."""
    flat = torch.full((1, 3, 32, 32), 117.0)
    assert torch.equal(per_image_standardization(flat), torch.zeros_like(flat))
    model = small_model().eval()
    with torch.no_grad():
        logits = model(torch.full((2, 3, 32, 32), 0.3))
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, model(torch.zeros(2, 3, 32, 32)))


def test_a_constant_images_input_gradient_is_finite_and_tfs():
    """A constant image (a black or white one, or one the [0, 1] clamp flattened) has std 0: its
    input gradient, free training's next perturbation step, is TF's (finite), not sqrt's 0 / 0."""
    pixels = torch.rand(3, 3, 32, 32) * 255
    pixels[0] = 117.0                                   # constant
    pixels[1] = 100.0
    pixels[1, 1, 5, 7] += 0.5                           # std below the floor, not zero
    pixels.requires_grad_(True)
    weights = torch.randn(3, 3, 32, 32)
    ours, = torch.autograd.grad((per_image_standardization(pixels) * weights).sum(), pixels)
    theirs, = torch.autograd.grad((tf_per_image_standardization(pixels) * weights).sum(), pixels)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    model = small_model().train()
    x = torch.zeros(2, 3, 32, 32)
    x[1] = torch.rand(3, 32, 32)
    x.requires_grad_(True)
    nn.functional.cross_entropy(model(x), torch.tensor([3, 4])).backward()
    assert torch.isfinite(x.grad).all()


def test_the_floor_is_in_0_255_pixel_units():
    """An image whose values differ by half a grey level (std < 1/sqrt(N) in 0-255 units) is
    divided by the floor, not by its std: its deviations come out x sqrt(N) in pixels."""
    model = small_model()
    x = torch.full((1, 3, 32, 32), 100 / 255)
    x[0, 1, 5, 7] += 0.5 / 255
    pixels = model.normalize(x)
    out = model.net.standardize(pixels)
    expected = (pixels - pixels.mean()) * math.sqrt(3 * 32 * 32)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
