"""Gradient accounting: how much of each layer's update comes from the memorized examples, epoch by epoch.

For every step, the gradient of the memorized examples' share of the batch loss
(the task's memorized kind: noisy labels) and of the rest's share (clean) —
each example's loss weighted by 1/B, so the two add up to exactly the step's
gradient and BatchNorm sees the full batch — is summed over the epoch per
parameter on the device. Per layer (a conv or linear with its norm) and epoch
the result holds the norm of each sum divided by sqrt(number of parameters of
the layer), and the cosine similarity between the two sums.

It costs one extra backward pass per step that holds a memorized example: the
memorized share first (retaining the graph), then the whole loss as training
does anyway; rest = whole - memorized. The sums stay on the device and are read
once per epoch (the published code used three passes and copied every gradient
to the host each step). On disk (gradients.npz) the rest is `clean_norm`, the
memorized share `noisy_norm`, and `cosine`, each (layers, epochs).

Data-parallel (torchrun): each process adds the memorized share of its own part of the
batch (weighted by 1 / the whole batch's size) and the whole, already summed, gradient;
`close_epoch` sums the memorized shares over the processes (sums are linear: once an epoch).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import Layer
from .layers import layers as find_layers


class GradientAccounting:
    """The per-epoch sums of one training run; `active` is False when there is nothing to split."""

    def __init__(self, model: nn.Module, memorized: torch.Tensor | None, epochs: int, device: torch.device):
        self.memorized_cpu = memorized.cpu() if memorized is not None else None
        self.active = memorized is not None and bool(memorized.any()) and bool((~memorized).any())
        self.layers: list[Layer] = find_layers(model) if self.active else []
        if not self.active:
            return
        self.memorized = memorized.to(device)
        params = dict(model.named_parameters())
        self.names = [p for l in self.layers for p in l.params if params[p].requires_grad]
        self.params = [params[p] for p in self.names]
        self.rest_norm = torch.zeros(len(self.layers), epochs, device=device)  # (L, E)
        self.memorized_norm = torch.zeros(len(self.layers), epochs, device=device)  # (L, E)
        self.cosine = torch.zeros(len(self.layers), epochs, device=device)  # (L, E)

    def start_epoch(self, order: torch.Tensor, batch_size: int) -> list[bool]:
        """Zero the sums; per step of the epoch's `order`: does its batch hold a memorized example."""
        if not self.active:
            return []
        self._memorized_sum = [torch.zeros_like(p) for p in self.params]
        self._total_sum = [torch.zeros_like(p) for p in self.params]
        n = len(order)
        return [bool(self.memorized_cpu[order[s:s + batch_size]].any()) for s in range(0, n, batch_size)]

    def memorized_share(self, loss_vec: torch.Tensor, idx: torch.Tensor, batch_size: int | None = None) -> None:
        """Before the step's backward: add the gradient of the memorized examples' share of the batch loss.

        `batch_size`: the whole batch's, when `idx` is one process's part of it (data-parallel training).
        """
        w = self.memorized[idx].float() / (len(idx) if batch_size is None else batch_size)
        grads = torch.autograd.grad((loss_vec * w).sum(), self.params, retain_graph=True, allow_unused=True)
        torch._foreach_add_(self._memorized_sum, [g if g is not None else torch.zeros_like(p)
                                                  for g, p in zip(grads, self.params)])

    def whole_step(self) -> None:
        """After the step's backward: add the whole gradient (rest = whole - memorized at the end)."""
        torch._foreach_add_(self._total_sum, [p.grad if p.grad is not None else torch.zeros_like(p)
                                              for p in self.params])

    @torch.no_grad()
    def close_epoch(self, e: int, reduce: Callable[[list[torch.Tensor]], None] | None = None) -> None:
        """Column `e` (0-based epoch) of the norms and cosines from the epoch's sums.

        `reduce` sums tensors over processes in place (data-parallel training): each holds
        the memorized share of its own examples; the whole gradient is the reduced one already.
        """
        if reduce is not None:
            reduce(self._memorized_sum)
        pos = {name: i for i, name in enumerate(self.names)}
        for li, layer in enumerate(self.layers):
            ids = [pos[p] for p in layer.params if p in pos]
            memorized = torch.cat([self._memorized_sum[i].flatten() for i in ids])
            rest = torch.cat([self._total_sum[i].flatten() for i in ids]) - memorized
            scale = math.sqrt(layer.num_params)
            self.rest_norm[li, e] = rest.norm() / scale
            self.memorized_norm[li, e] = memorized.norm() / scale
            self.cosine[li, e] = F.cosine_similarity(rest, memorized, dim=0, eps=1e-30)

    def arrays(self, k: int | None = None) -> dict[str, np.ndarray]:
        """What gradients.npz holds after `k` epochs (all of them by default)."""
        k = self.cosine.shape[1] if k is None else k
        return {"clean_norm": self.rest_norm[:, :k].cpu().numpy(),
                "noisy_norm": self.memorized_norm[:, :k].cpu().numpy(),
                "cosine": self.cosine[:, :k].cpu().numpy(), "layer_names": np.array([l.name for l in self.layers]),
                "num_params": np.array([l.num_params for l in self.layers]), "epochs": np.arange(1, k + 1)}

    def restore(self, saved: dict[str, np.ndarray], k: int) -> None:
        """The first `k` epochs' columns from a saved gradients.npz (resume)."""
        device = self.cosine.device
        self.rest_norm[:, :k] = torch.from_numpy(saved["clean_norm"][:, :k]).to(device)
        self.memorized_norm[:, :k] = torch.from_numpy(saved["noisy_norm"][:, :k]).to(device)
        self.cosine[:, :k] = torch.from_numpy(saved["cosine"][:, :k]).to(device)
