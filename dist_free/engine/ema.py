"""A model's exponential moving average (`optim.ema`): the weights the recipes evaluate and ship.

`ModelEMA(model, decay)` keeps a copy of the bare model. `update(model, steps)` moves every
floating-point parameter towards the live one by one step of `decay` per optimizer step:
    ema = ema + (1 - d) * (live - ema),  d = min(decay, (1 + n) / (10 + n)) ** steps
where n counts optimizer steps so far; the (1 + n) / (10 + n) warm-up (timm's and TF's) keeps
the first weights, still random, from dominating a short run. Free training makes `replays`
optimizer steps per minibatch, so the trainer passes steps=replays: `decay` means the same per
optimizer step for every method.

Floating-point buffers (BatchNorm's running mean and variance) are averaged with the
parameters, by the same d; integer ones (num_batches_tracked) are copied: timm's ModelEmaV3
default (ModelEmaV2 averages the whole state_dict alike). The live buffers are statistics of the
live weights' activations; copying them, as this class once did, evaluated the averaged weights
with another model's normalisation, wrong for every BatchNorm net (LayerNorm nets have no buffers
to get wrong). Recomputing them with the EMA weights on training batches before each evaluation
would be exact for those weights, but costs passes over the data at every evaluation and
checkpoint, and must choose clean or perturbed inputs, where the live statistics came from the
inputs training saw (free training's perturbed ones). Averaging needs no data, rides in the
same foreach update, and takes the statistics over the same window and inputs as the weights.

The update is two foreach kernels over preallocated tensors: nothing is allocated or read back
per step. `state_dict()` (decay, updates, the averaged model's state_dict) goes into checkpoints,
so a resumed run continues the same average.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0                     # optimizer steps averaged so far
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs(model)                   # fail now, not mid-run, if the models differ

    def _pairs(self, model: nn.Module):
        ours, theirs = dict(self.module.named_parameters()), dict(model.named_parameters())
        if ours.keys() != theirs.keys():
            raise ValueError("the EMA and the model have different parameters")
        bufs, live_bufs = dict(self.module.named_buffers()), dict(model.named_buffers())
        if bufs.keys() != live_bufs.keys():
            raise ValueError("the EMA and the model have different buffers")
        ours, theirs = {**ours, **bufs}, {**theirs, **live_bufs}
        averaged = [k for k, v in ours.items() if v.is_floating_point()]
        copied = [k for k, v in ours.items() if not v.is_floating_point()]
        return ([ours[k] for k in averaged], [theirs[k] for k in averaged],
                [ours[k] for k in copied], [theirs[k] for k in copied])

    def step_decay(self, steps: int) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) ** steps

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int = 1) -> None:
        """Average in `steps` optimizer steps' worth of `model` (the bare, unwrapped model)."""
        d = self.step_decay(steps)
        if not hasattr(self, "_cached") or self._cached[0] is not model:
            self._cached = (model, self._pairs(model))
        ema_avg, live_avg, ema_copy, live_copy = self._cached[1]
        torch._foreach_lerp_(ema_avg, live_avg, 1.0 - d)
        if ema_copy:
            torch._foreach_copy_(ema_copy, live_copy)
        self.updates += steps

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
