"""The authors' free-training loop, restated plainly, to compare speeds on the same work.

This is our own restatement of the training loop of the reference implementation that comes with
Shafahi et al. 2019 (their `main_free.py`), written from a description of its algorithm, not from
its code. What it keeps of theirs, because it decides the speed:

- input from a torchvision ImageFolder and a DataLoader (random-resized-crop, flip, ToTensor;
  shuffled; `workers` worker processes), fp32 throughout, the network without a normalisation
  layer: mean/std are applied in the loop;
- one global noise buffer of (batch, 3, H, W); for each of the m replays of a minibatch: a leaf over
  its first b rows, in1 = clamp(input + noise, 0, 1), normalise, forward, loss, zero_grad,
  backward, noise += fgsm_step * sign(grad), the buffer clamped to [-eps, eps], optimizer.step();
- the loss and top-1 accuracy read back every replay for the running meters, as a training loop
  that prints progress does.

It runs on the CPU here (their code targets CUDA; only the device changes).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from dist_free.engine.models import IMAGENET_MEAN, IMAGENET_STD


def imagefolder_loader(root: str | Path, batch: int, image_size: int, workers: int,
                       seed: int = 0) -> DataLoader:
    """ROOT/train as ImageFolder: RandomResizedCrop (scale 0.08-1), flip, ToTensor; shuffled."""
    transform = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    dataset = torchvision.datasets.ImageFolder(str(Path(root) / "train"), transform)
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


class ReferenceFree:
    """The loop's state: network (no normalisation inside), SGD, the global noise buffer."""

    def __init__(self, net: torch.nn.Module, *, batch: int, image_size: int, eps: float,
                 replays: int, fgsm_step: float | None = None, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-4):
        self.net = net
        self.optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        self.eps, self.replays = eps, replays
        self.fgsm_step = eps if fgsm_step is None else fgsm_step
        self.global_noise = torch.zeros(batch, 3, image_size, image_size)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.losses, self.top1 = [], []

    def train_batch(self, images: torch.Tensor, target: torch.Tensor) -> None:
        b = images.shape[0]
        self.net.train()
        for _ in range(self.replays):
            noise = self.global_noise[:b].detach().requires_grad_(True)
            in1 = (images + noise).clamp(0, 1)
            in1 = (in1 - self.mean) / self.std
            output = self.net(in1)
            loss = F.cross_entropy(output, target)
            self.losses.append(loss.item())
            self.top1.append((output.argmax(1) == target).float().mean().item())
            self.optimizer.zero_grad()
            loss.backward()
            with torch.no_grad():
                self.global_noise[:b] += self.fgsm_step * torch.sign(noise.grad)
                self.global_noise.clamp_(-self.eps, self.eps)
            self.optimizer.step()
