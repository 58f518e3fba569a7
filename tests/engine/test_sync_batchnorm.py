"""model.sync_bn's conversion, in one process (tests/e2e/test_sync_bn.py runs it on 2 ranks)."""

import pytest
import torch
import torch.nn as nn

from dist_free.engine.sync_batchnorm import GlobalBatchNorm, convert


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
                         nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4, momentum=None)),
                         nn.Flatten(), nn.BatchNorm1d(4 * 6 * 6))


def test_on_the_cpu_every_batchnorm_becomes_global_with_the_same_tensors():
    model = net()
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    converted = convert(model, "cpu")
    assert converted is model                       # in place, as torch's converter
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(type(m) is GlobalBatchNorm for m in bns)
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert (bns[0].eps, bns[0].momentum, bns[1].momentum) == (1e-3, 0.3, None)


def test_on_cuda_ranks_it_is_torchs_sync_batchnorm():
    model = convert(net(), "cuda")                  # converting needs no GPU
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 3


def test_without_a_process_group_it_is_torchs_batchnorm():
    plain, converted = net(), convert(net(), "cpu")
    x = torch.rand(5, 3, 8, 8)
    for training in (True, False, True):
        plain.train(training), converted.train(training)
        torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
    for (k, a), b in zip(plain.state_dict().items(), converted.state_dict().values()):
        assert torch.equal(a, b), k


def timm_net():
    """A timm architecture whose BatchNorms are timm's BatchNormAct2d (BatchNorm + activation in
    one module)."""
    import timm
    torch.manual_seed(0)
    return timm.create_model("efficientnet_b0", num_classes=10)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_timms_batchnorm_with_activation_keeps_its_activation(device_type):
    """torch's converter turns BatchNormAct2d into a plain SyncBatchNorm and drops the activation:
    the converted net must compute what it computed before (eval mode runs on the CPU for both)."""
    from timm.layers import BatchNormAct2d
    plain, converted = timm_net().eval(), convert(timm_net(), device_type).eval()
    assert any(isinstance(m, BatchNormAct2d) for m in plain.modules())
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm if device_type == "cuda" else
                                  GlobalBatchNorm) for m in bns)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
    if device_type == "cpu":                        # training mode without a process group too
        plain.train(), converted.train()
        torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
