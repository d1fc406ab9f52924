"""A model's outputs over stored examples, batch by batch, in eval mode: what evaluation and the probes read.

`predict` restores each module's own train/eval flag afterwards (a partly frozen
model stays so), runs the training arithmetic of the device (`precision.autocast`)
and, with `with_indices`, hands each batch's dataset positions to example-tied
dropout (its `tied` mode evaluates each training example through its own mask).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .dropout import example_indices, find_example_tied_dropout
from .examples import batches, model_input
from .precision import autocast


def indices_context(model: nn.Module, task=None, split: str = "train"):
    """The context `ctx(model, idx)` that hands a batch's dataset positions `idx` (B,) to example-tied dropout
    layers (a no-op without them), as the ids the task ties them to (`Task.example_ids`: a language model's
    tokens take their document's id)."""
    layers = find_example_tied_dropout(model)
    if not layers:
        return lambda m, i: contextlib.nullcontext()
    tie = layers[0].tie
    if task is None or tie is None:
        return example_indices
    return lambda m, idx: example_indices(m, task.example_ids(idx, tie, split))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 1024, with_indices: bool = False,
            device: torch.device | None = None,
            inputs: Callable[[torch.Tensor, torch.device], torch.Tensor] = model_input) -> torch.Tensor:
    """Outputs (N, ...) in float32 for stored examples x (N, ...), in eval mode (logits (N, K) for images).

    `inputs` turns a batch of stored examples into model input (default: images, normalized).
    """
    device = device or next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}  # restored one by one: a partly frozen model stays so
    model.eval()
    ctx = indices_context(model)
    outs = []
    try:
        for xb, _, idx in batches(x, torch.zeros(len(x), dtype=torch.long, device=x.device), batch_size=batch_size,
                                  device=device):
            with autocast(device), (ctx(model, idx) if with_indices else contextlib.nullcontext()):
                outs.append(model(inputs(xb, device)).float())
    finally:
        for m, training in modes.items():
            m.training = training
    return torch.cat(outs) if outs else torch.zeros(0)
