"""Algorithm 1 of Shafahi et al. 2019 ("Adversarial Training for Free!"), restated as plainly as
it can be written: the oracle that FreeAdversarialTrainer is checked against, by the engine's tests
(tests/engine/test_free.py) and by the GPU check (`free_vs_algorithm1`) on the hardware itself.

Why here: the GPU check ships with the package and runs this on GPU hosts, so it cannot live in
tests/; and it stays out of dist_free/engine/ because an oracle must share nothing with the code it
checks: torch and autograd only, none of the engine's update, buffer or L-inf helpers. It sits
beside reference.py, which restates the authors' implementation (DataLoader, normalisation in the
loop, meters read every replay) to compare speeds; this one is compared number for number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def algorithm1(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, eps: float,
               replays: int) -> torch.Tensor:
    """Free training over `batches` of (images in [0, 1], labels). Each minibatch is replayed
    `replays` times: autograd gives the loss of clamp(x + delta, 0, 1) its weight and input
    gradients, the optimizer steps the weights, and delta += eps * sign(input gradient), clipped to
    [-eps, eps]. delta is one tensor of the first minibatch's shape, carried over from minibatch to
    minibatch (a smaller last one uses its first rows). Returns delta."""
    delta = None
    for x, y in batches:
        if delta is None:
            delta = torch.zeros_like(x)
        b = x.shape[0]
        for _ in range(replays):
            leaf = delta[:b].clone().requires_grad_(True)
            loss = F.cross_entropy(model(torch.clamp(x + leaf, 0, 1)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta[:b] = torch.clamp(delta[:b] + eps * leaf.grad.sign(), -eps, eps)
    return delta
