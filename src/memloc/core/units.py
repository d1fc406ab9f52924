"""Unit masks: zero any set of units of a model, one set per row of the batch, by forward hooks.

A unit is an output channel of a conv layer or an output feature of a linear
layer (`models.layers`); zeroing it multiplies its activation (the output of the
layer's norm+activation chain, every position) by 0. `UnitMasks` holds one mask
per row of the next forward pass, so many edited models share one pass, and
reads each unit's first-order effect (dJ/dm) from the activations' gradients.
The hooks exist only inside `installed()`, which restores the model on exit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .errors import RunError
from .layers import Layer
from .recompute import restoring


class UnitMasks:
    """Forward hooks multiplying each layer's unit activations by a per-row mask.

    `rows` holds one (R, U_total) tensor for the next forward pass (R rows of
    the batch, U_total = units of all candidate layers, concatenated in layer
    order); None runs the model unedited. Hooks exist only inside `installed()`.
    """

    def __init__(self, model: nn.Module, candidates: list[Layer]):
        self.model, self.layers = model, candidates
        self.sizes = [l.units for l in candidates]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.total = int(self.offsets[-1])
        self.rows: torch.Tensor | None = None
        self.edited: list[bool] | None = None  # per layer: does any row remove one of its units
        self.captured: list[tuple[torch.Tensor, int] | None] | None = None  # per layer: its output and version
        self.copied: set[int] = set()  # layers whose output the model modifies in place: always a fresh tensor

    def set_rows(self, rows: torch.Tensor | None, *, capture: bool = False, edited: list[bool] | None = None) -> None:
        """Use `rows` (R, U) of 0/1 for the next forward passes (None: unedited); `capture` keeps each layer's output.

        Layers where no row removes a unit skip the multiply (it would be by one).
        `edited` gives those flags (`edited_of` of the masks the rows repeat, or
        of a superset of them); without it they are read from `rows` (one host sync).
        """
        self.rows = rows
        self.captured = [None] * len(self.layers) if capture else None
        self.edited = None if rows is None else (edited if edited is not None else self.edited_of(rows))

    def freeze(self) -> Callable[[], ContextManager]:
        """A context that puts the rows and flags set now back while it lasts, capturing nothing: a block computed
        again in the backward pass (`memloc.core.recompute`) sees the masks of its forward pass."""
        return restoring(self, rows=self.rows, edited=self.edited, captured=None)

    def edited_of(self, masks: torch.Tensor) -> list[bool]:
        """Per candidate layer: does some row of masks (Q, U) remove one of its units (one host sync)."""
        removed = (masks == 0).any(0).to(torch.int32).cumsum(0)  # (U,): removed columns up to each unit
        ends = removed[torch.as_tensor(self.offsets[1:] - 1, device=masks.device)]
        return torch.diff(ends, prepend=ends.new_zeros(1)).gt(0).tolist()

    def activations(self) -> list[torch.Tensor] | None:
        """The activations captured in the last forward pass (each requires grad), for `scores_from`.

        None when the model changed one of them in place later in the pass (an
        in-place ReLU on a norm's output): those layers get a fresh tensor from
        now on, and the caller runs the pass again.
        """
        if self.captured is None or any(a is None for a in self.captured):
            missing = [l.name for l, a in zip(self.layers, self.captured or []) if a is None]
            raise RunError(f"layers {missing} did not run in the forward pass: they cannot be scored")
        changed = {j for j, (a, v) in enumerate(self.captured) if a._version != v}
        if changed:
            self.copied |= changed
            return None
        return [a for a, _ in self.captured]

    def scores_from(self, acts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """(R, U) float32 sum over each unit's positions of a * dJ/da: dJ/dm for a unit still live (m = 1).

        Equal to the gradient with respect to a multiplicative mask on the unit,
        without multiplying by a mask of ones in the forward pass. Computed
        without autograd: a recorded product would keep the whole forward graph
        of the pass alive for as long as the scores live.
        """
        with torch.no_grad():
            return self._scores_from(acts, grads)

    def _scores_from(self, acts: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        out = []
        for layer, a, g in zip(self.layers, acts, grads):
            dim = layer.unit_dim % a.dim()
            if g is None:
                out.append(a.new_zeros(a.shape[0], a.shape[dim], dtype=torch.float32))
                continue
            red = [d for d in range(1, a.dim()) if d != dim]
            prod = a * g
            out.append(prod.sum(red, dtype=torch.float32) if red else prod.float())
        return torch.cat(out, 1)

    def unit_of(self, flat: int) -> tuple[int, int]:
        """Flat unit position -> (layer index in the model, unit index)."""
        j = int(np.searchsorted(self.offsets, flat, side="right") - 1)
        return self.layers[j].index, int(flat - self.offsets[j])

    def flat(self, layer_index: int, unit: int) -> int:
        j = [l.index for l in self.layers].index(layer_index)
        return int(self.offsets[j] + unit)

    def apply(self, j: int, output: torch.Tensor) -> torch.Tensor:
        """Layer j's activations times its columns of `rows` (R, U_j), broadcast over positions."""
        lo, hi, dim = int(self.offsets[j]), int(self.offsets[j + 1]), self.layers[j].unit_dim
        m = self.rows[:, lo:hi]  # (R, U_j)
        if m.shape[0] != output.shape[0]:
            raise RunError(f"unit mask has {m.shape[0]} rows for a batch of {output.shape[0]}")
        shape = [m.shape[0]] + [1] * (output.dim() - 1)
        shape[dim % output.dim()] = m.shape[1]
        return output * m.to(output.dtype).view(shape)  # (R, U_j, 1, 1) for conv, (R, [T,] U_j) for linear

    def _hook(self, j: int):
        def hook(module, inputs, output):
            if self.rows is None:
                return None
            if self.edited is None or self.edited[j]:
                output = self.apply(j, output)
            if self.captured is not None:
                leaf = not output.requires_grad  # nothing before it needs a gradient: start the graph here
                if leaf:
                    output = output.detach().requires_grad_(True)
                self.captured[j] = (output, output._version)
                if leaf or j in self.copied:  # the model may edit what it gets in place: hand it a copy
                    return output.clone()
            return output
        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator["UnitMasks"]:
        modules = dict(self.model.named_modules())
        handles = []
        was_training = self.model.training
        try:
            self.model.eval()
            for j, layer in enumerate(self.layers):
                handles.append(modules[layer.output].register_forward_hook(self._hook(j)))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.set_rows(None)
            self.model.train(was_training)
