"""The model registry: every name builds, takes [0, 1] images, and normalises inside."""

import pytest
import torch

from dist_free.engine.models import SMALL_MODELS, NormalizedModel, available_models, build_model


@pytest.mark.parametrize("name, size", [*[(n, 32) for n in sorted(SMALL_MODELS)],
                                        ("resnet18", 64), ("resnet50", 64)])
def test_every_registered_model_maps_pixels_to_logits(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, size, size))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


def test_normalisation_is_inside_the_model():
    model = build_model("small_cnn", 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3)).eval()
    x = torch.rand(3, 3, 16, 16)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - mean) / std))
    assert isinstance(model, NormalizedModel)


def test_paper_cifar_wide_resnet_has_the_published_size():
    # WRN-32-10 (Shafahi et al.'s CIFAR model): about 46 M parameters.
    params = sum(p.numel() for p in build_model("wrn32_10", 10).parameters())
    assert 45e6 < params < 48e6


def test_channels_last_models_hold_channels_last_weights():
    model = build_model("resnet18", 10, channels_last=True)
    assert model.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_unknown_model_names_are_refused():
    with pytest.raises(ValueError, match="unknown model 'resnet5'"):
        build_model("resnet5", 10)
    assert {"resnet50", "preact_resnet18", "wrn32_10"} <= set(available_models())


def test_standard_wide_resnet_sizes():
    params = {n: sum(p.numel() for p in build_model(n, 10).parameters()) for n in ("wrn28_10", "wrn16_4")}
    assert 36e6 < params["wrn28_10"] < 37e6 and 2.6e6 < params["wrn16_4"] < 2.8e6
