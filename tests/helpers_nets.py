"""A tiny normalised network and data for the engine's tests: fast, deterministic, BatchNorm inside."""

import torch
import torch.nn as nn

from dist_free.engine.models import NormalizedModel


def tiny_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))
    return NormalizedModel(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def minibatches(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    # Values near 0 and 1 make the [0, 1] clamp active, so its gradient mask matters.
    return [(torch.rand(b, 3, 6, 6, generator=g) ** 3, torch.randint(0, 5, (b,), generator=g))
            for b in sizes]


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits as (N, 3, 8, 8) pixels in [0, 1], and labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target)
