"""Weight masks: scale every entry of chosen weight matrices by a mask, one mask for the whole batch.

A weight unit is one entry of a chosen matrix (TinyMem's Subnet, BalancedSubnet and Durable prune these). The
chosen matrices of a set of layers (`models.layers`) are every parameter of two or more dimensions among the
layers' own parameters (`Layer.params`): for a transformer block's MLP its input and output projections — memloc's
GPT `fc` and `proj`; GPT-2 `c_fc` and `c_proj`; GPT-NeoX `dense_h_to_4h` and `dense_4h_to_h`; Llama's SwiGLU
`gate_proj`, `up_proj` and `down_proj` — never a norm's gain or a bias; with attention layers too, their query /
key / value and output matrices. Weights are numbered flat: the matrices in layer order, each row-major, P in all.

A mask enters through `torch.nn.utils.parametrize`: inside `WeightMasks.installed()` each chosen matrix W is read
as W * scale (+ shift) from the flat (P,) tensors of `set`, so the model is never copied and autograd reaches the
mask; the parametrizations are removed in `finally` (the parameter objects, their order and the modules' classes
as before). Memory: the mask tensors are (P,), whatever the number of sequences or rows of a batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError
from .layers import Layer
from .recompute import restoring


@dataclass(frozen=True)
class Matrix:
    """One chosen weight matrix: `name` its state-dict name, `layer` / `layer_name` the layer that owns it."""

    index: int
    name: str
    layer: int
    layer_name: str
    shape: tuple[int, ...]

    @property
    def units(self) -> int:
        """Its weights (what `top_units` and the edit's size count as units)."""
        return int(np.prod(self.shape))


def weight_matrices(model: nn.Module, layers: Sequence[Layer]) -> list[Matrix]:
    """The chosen matrices of `layers`: each layer's parameters of two or more dimensions, in layer order."""
    params = dict(model.named_parameters())
    out: list[Matrix] = []
    for layer in layers:
        for name in layer.params:
            p = params.get(name)
            if p is not None and p.dim() >= 2:
                out.append(Matrix(len(out), name, layer.index, layer.name, tuple(p.shape)))
    if not out:
        raise ConfigError(f"the layers {', '.join(l.name for l in layers)} have no weight matrix: --units weights "
                          "needs layers with linear or conv weights")
    return out


def matrices_named(model: nn.Module, names: Sequence[str], layer_of: Sequence[int], layer_names: Sequence[str],
                   numel: Sequence[int]) -> list[Matrix]:
    """The matrices a saved weight edit names, checked against `model` (a different model fails in one line)."""
    params = dict(model.named_parameters())
    out = []
    for i, (name, layer, layer_name, n) in enumerate(zip(names, layer_of, layer_names, numel)):
        p = params.get(str(name))
        if p is None or p.numel() != int(n):
            raise ConfigError(f"the model has no weight {name} of {int(n)} entries: the weight edit is for another "
                              "model")
        out.append(Matrix(i, str(name), int(layer), str(layer_name), tuple(p.shape)))
    return out


class _Masked(nn.Module):
    """The parametrization of matrix j: W * scale_j (+ shift_j), the views of its owner's flat tensors; W alone when
    neither is set. Holds no tensor of its own, so the module's state dict gains nothing but the renamed weight."""

    def __init__(self, owner: "WeightMasks", j: int):
        super().__init__()
        self.owner, self.j = owner, j

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, shift = self.owner.views(self.j)
        if scale is not None:
            w = w * scale.to(w.dtype)
        if shift is not None:
            w = w + shift.to(w.dtype)
        return w


class WeightMasks:
    """Parametrizations reading each chosen matrix as W * scale + shift, from flat (P,) tensors set with `set`."""

    def __init__(self, model: nn.Module, matrices: Sequence[Matrix]):
        self.model, self.matrices = model, list(matrices)
        self.sizes = [m.units for m in self.matrices]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.total = int(self.offsets[-1])
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None

    def set(self, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> None:
        """Use these (P,) tensors (either may require grad) for the next forward passes; None: the weight as is."""
        for t in (scale, shift):
            if t is not None and tuple(t.shape) != (self.total,):
                raise ConfigError(f"the weight mask has shape {tuple(t.shape)}, the chosen matrices {self.total} "
                                  "weights: it is for another model or other layers")
        self.scale, self.shift = scale, shift

    def freeze(self) -> Callable[[], ContextManager]:
        """A context that puts the scale and shift set now back while it lasts (see `UnitMasks.freeze`)."""
        return restoring(self, scale=self.scale, shift=self.shift)

    def views(self, j: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        lo, hi, shape = int(self.offsets[j]), int(self.offsets[j + 1]), self.matrices[j].shape
        return tuple(None if t is None else t[lo:hi].view(shape) for t in (self.scale, self.shift))

    @contextlib.contextmanager
    def installed(self) -> Iterator["WeightMasks"]:
        """The parametrizations exist only inside; the model is in eval mode inside and gets its mode, parameters
        (the same objects, in their order) and module classes back in `finally`, even when the body raises."""
        modules = dict(self.model.named_modules())
        done: list[tuple[nn.Module, str, list[str]]] = []
        was_training = self.model.training
        try:
            self.model.eval()
            for j, m in enumerate(self.matrices):
                owner, _, attr = m.name.rpartition(".")
                module = modules[owner]
                order = list(module._parameters)
                parametrize.register_parametrization(module, attr, _Masked(self, j), unsafe=True)
                done.append((module, attr, order))
            yield self
        finally:
            self.set(None)
            for module, attr, order in reversed(done):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
                for key in order:  # removal re-adds the weight last: the parameters' order as before
                    module._parameters[key] = module._parameters.pop(key)
            self.model.train(was_training)


@contextlib.contextmanager
def masked(model: nn.Module, matrices: Sequence[Matrix], mask) -> Iterator[nn.Module]:
    """Inside: every weight of `matrices` scaled by its entry of `mask` (P,) (0 zeroes it), for any batch; the model
    as before afterwards, even when the body raises (`WeightMasks.installed`)."""
    masks = WeightMasks(model, matrices)
    device = next(model.parameters()).device
    masks.set(torch.as_tensor(np.asarray(mask), dtype=torch.float32, device=device))  # checked before installing
    with masks.installed():
        yield model


@torch.no_grad()
def fold(model: nn.Module, matrices: Sequence[Matrix], mask) -> nn.Module:
    """The edit for good, in place: each chosen matrix multiplied by its part of `mask` (P,), so the model computes
    what `masked(model, matrices, mask)` computes, with its own architecture."""
    mask = np.asarray(mask, dtype=np.float32)
    total = sum(m.units for m in matrices)
    if len(mask) != total:
        raise ConfigError(f"the weight edit has {len(mask)} weights but the matrices {total}: it is for another model")
    params = dict(model.named_parameters())
    lo = 0
    for m in matrices:
        part = mask[lo:lo + m.units]
        lo += m.units
        if (part != 1).any():
            w = params[m.name]
            w.mul_(torch.as_tensor(part, device=w.device, dtype=w.dtype).view(w.shape))
    return model


__all__ = ["Matrix", "WeightMasks", "fold", "masked", "matrices_named", "weight_matrices"]
