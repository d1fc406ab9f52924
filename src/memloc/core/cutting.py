"""Cutting a model in two at one of its modules, and folding its norms: shared by the probes that sweep.

`cut_model(model, module)` splits any fx-traceable model right before (or
after) one call of a submodule into a prefix, which returns every value the
rest still needs, and a suffix, with suffix(*prefix(x)) == model(x). Rewinding
and retraining cut before a layer (`split_at`): the activations entering it do
not depend on its state, so they are computed once for every state the layer is
given. Flipping cuts after a layer's unit activations (`split_after`), so that
every mask of a group shares the layer itself. `fold_norms` gives a frozen copy
with each BatchNorm folded into the layer before it (the same function in eval
mode, one elementwise pass fewer each way). Models fx cannot trace get None or
a plain copy: callers fall back to full forward passes, with the same numbers.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .layers import Layer

Split = tuple[Callable[..., tuple], Callable[..., torch.Tensor]]


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps memloc's dropout modules (index-dependent control flow) as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m).__module__.startswith("memloc.core.dropout"):
            return True
        return super().is_leaf_module(m, qualname)


def cut_model(model: nn.Module, module: str, *, after: bool = False):
    """(prefix, suffix, live) cutting `model` by torch.fx at the one call of submodule `module`.

    The cut is right before that call, or right after it with `after`. prefix(x)
    returns the tuple of every value computed before the cut that the rest
    still needs (e.g. a residual branch), in the order of `live` (the fx nodes);
    suffix(*those) == model(x). Both share the model's modules and tensors, so a
    state put into the model, or a hook on a later module, shows in both. None
    when the model cannot be traced or calls `module` at more than one place.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception:  # fx raises many types (TraceError, TypeError, ...) for untraceable code
        return None
    nodes = list(graph.nodes)
    heads = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == module]
    if len(heads) != 1:
        return None
    cut = heads[0] + int(after)
    before = set(nodes[:cut])
    live = [n for n in nodes[:cut] if any(u not in before for u in n.users)]  # graph order

    pre = torch.fx.Graph()
    env: dict = {}
    for n in nodes[:cut]:
        env[n] = pre.node_copy(n, lambda a: env[a])
    pre.output(tuple(env[n] for n in live))

    suf = torch.fx.Graph()
    env = {n: suf.placeholder(f"live_{i}") for i, n in enumerate(live)}
    for n in nodes[cut:]:
        env[n] = suf.node_copy(n, lambda a: env[a])
    try:
        return torch.fx.GraphModule(model, pre), torch.fx.GraphModule(model, suf), live
    except Exception:
        return None


def split_at(model: nn.Module, layer: Layer) -> Split | None:
    """(prefix, suffix) with suffix(*prefix(x)) == model(x), cut right before `layer`'s first module.

    prefix(x) returns the tuple of every value computed before the layer that
    the rest of the model still needs (the layer's input and, e.g., a residual
    branch); the suffix takes them in that order. None when the model cannot be
    traced or calls the layer at more than one place.
    """
    cut = cut_model(model, layer.modules[0])  # the layer's first module (its name, for a traced layer)
    return None if cut is None else (cut[0], cut[1])


def split_after(model: nn.Module, layer: Layer):
    """(prefix, suffix, k) cutting `model` right after `layer`'s output module (its units' activations), by fx.

    prefix(x) returns the tuple of every value computed up to the cut that the
    rest still needs; live[k] is the layer's unit activations (what the mask
    hooks multiply), so suffix(*live) == model(x) once live[k] is masked. Both
    share the model's modules (hooks on later layers fire in the suffix). None
    when fx cannot trace the model or the output module is called more than once.
    Cutting after the layer rather than before it (`sweep.split_at`) lets every
    mask of a group share the layer's own conv as well.
    """
    cut = cut_model(model, layer.output, after=True)
    if cut is None:
        return None
    prefix, suffix, live = cut
    head = [n for n in live if n.op == "call_module" and n.target == layer.output]
    if not head:
        return None
    return prefix, suffix, live.index(head[0])


def fold_norms(model: nn.Module, candidates: list[Layer]) -> nn.Module:
    """A frozen eval-mode copy of `model` for the batched search, with BatchNorm folded into the layer before it.

    In eval mode a BatchNorm that only reads a conv's (or linear's) output is an
    affine map per unit, so folding it into that layer's weights computes the
    same function with one elementwise pass fewer in each direction (torch.fx's
    `fuse`; it skips a norm whose input has other readers). Where fx cannot trace
    the model, or a candidate's unit output would disappear, a plain copy. No
    parameter needs a gradient: the search differentiates activations only.
    """
    from torch.fx.experimental.optimization import fuse
    was_training = model.training
    model.eval()
    try:
        try:
            out = fuse(model)
            names = dict(out.named_modules())
            if any(layer.output not in names for layer in candidates):
                out = copy.deepcopy(model)
        except Exception:  # noqa: BLE001 - fx cannot trace every model; folding is only a speed-up
            out = copy.deepcopy(model)
    finally:
        model.train(was_training)
    out = out.to(memory_format=torch.channels_last)  # 4-d weights only; the inputs follow (`_Flipper._input`)
    for q in out.parameters():
        q.requires_grad_(False)
    return out.eval()


