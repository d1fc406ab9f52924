"""The edit a localization proposes, scoped and for good, and what is measured with it.

The top-k units by score (`top_units`) zeroed inside a `with` block (`zeroed` for layers' units,
`memloc.core.weights.masked` for matrices' weights: `scoped_edit`; a saved result's edit: `edited`) or folded into
the weights in place (`fold_units`, `fold_edit`); the output projection a unit writes through (`output_projection`,
read by `methods`' activations too); extraction of every example (`_hits`) and the edit's cost on held-out data.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ...core.batching import in_batches, rows_that_fit
from ...core.errors import ConfigError
from ...core.layers import Layer
from ...core.layers import layers as find_layers
from ...core.tasks import Task
from ...core.units import UnitMasks
from ...core.weights import Matrix, fold, masked, matrices_named
from ..base import ProbeResult

# ----------------------------------------------------------------------------- rows per pass, extraction

def _rows(cfg, model: nn.Module, x: torch.Tensor, *, backward: bool = True) -> int:
    """Rows per pass: --batch-size, else what fits (`memloc.core.batching`: a language model's rows of x's length, a
    pass that backpropagates to the masks unless `backward` is False; at most 256 on a CPU, 2048 on a GPU)."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    return rows_that_fit(model, length=x.shape[1] if x.dim() == 2 else 1, backward=backward)


@torch.no_grad()
def _hits(model: nn.Module, task: Task, split: str, *, batch_size: int) -> torch.Tensor:
    """(N,) bool `task.match` of every training ("train") or held-out ("test") example, eval mode, float32; the
    batch halved on an out-of-memory error (`memloc.core.batching.in_batches`)."""
    return _pass(model, task, split, batch_size=batch_size)[0]


@torch.no_grad()
def _heldout(model: nn.Module, task: Task, *, batch_size: int, quality: bool) -> tuple[torch.Tensor, float | None]:
    """The held-out examples' `_hits` and, with `quality`, what an edit must keep, from the same pass: a
    language model's held-out perplexity (the same batches, so the same value as `heldout_perplexity`'s own pass),
    else the test accuracy of those hits."""
    hits, terms = _pass(model, task, "test", batch_size=batch_size, perplexity=quality and _is_text(task))
    if not quality:
        return hits, None
    if _is_text(task):
        return hits, math.exp(terms[0] / terms[1]) if terms[1] else None
    return hits, float(hits.float().mean()) if len(hits) else None


def _pass(model: nn.Module, task: Task, split: str, *, batch_size: int,
          perplexity: bool = False) -> tuple[torch.Tensor, list]:
    data = task.data
    x, y = (data.x_train, task.targets("given")) if split == "train" else (data.x_test, task.targets("test"))
    device = next(model.parameters()).device
    out = torch.zeros(len(x), dtype=torch.bool)
    terms = [0.0, 0]  # the perplexity's sum of cross-entropies and its count of tokens
    was_training = model.training
    model.eval()
    if perplexity:
        from ..memorization import perplexity_terms

    def part(lo: int, hi: int) -> None:
        xb, yb = x[lo:hi].to(device, non_blocking=True), y[lo:hi].to(device, non_blocking=True)
        logits = model(task.inputs(xb, device)).float()
        out[lo:hi] = task.match(task.predict(logits), yb).cpu()
        if perplexity:
            t, c = perplexity_terms(logits, yb)
            terms[0], terms[1] = terms[0] + t, terms[1] + c
    try:
        in_batches(len(x), batch_size, part, what="localization's extraction pass")
    finally:
        model.train(was_training)
    return out, terms


# ----------------------------------------------------------------------------- the edit, scoped

def top_units(scores: np.ndarray, candidates: Sequence[Layer | Matrix], k: int | Sequence[int]) -> np.ndarray:
    """Flat positions of the top-k units by score (ties: the earlier unit), over all units or k per layer (matrix)."""
    scores = np.asarray(scores, dtype=np.float64)
    if isinstance(k, (int, np.integer)):
        return _top(scores, int(k))
    out, lo = [], 0
    for layer, kj in zip(candidates, k):
        out.append(lo + _top(scores[lo:lo + layer.units], int(kj)))
        lo += layer.units
    return np.concatenate(out)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """The k largest, best first, ties by position: sorted among those at least the k-th largest value only (a
    weight edit's millions of scores are never sorted whole)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < len(scores):
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        pool = np.flatnonzero(scores >= kth)
    else:
        pool = np.arange(len(scores))
    return pool[np.lexsort((pool, -scores[pool]))][:k]


@contextlib.contextmanager
def zeroed(model: nn.Module, candidates: Sequence[Layer], mask) -> Iterator[nn.Module]:
    """Inside: every unit of `candidates` scaled by its entry of `mask` (U,) (0 zeroes it, 1 keeps it), for any batch.

    Forward hooks (`UnitMasks`) that exist only inside; the model is in eval mode inside and
    gets its mode, and nothing else changed, back in `finally`, even when the body raises.
    """
    masks = UnitMasks(model, list(candidates))
    device = next(model.parameters()).device
    row = torch.as_tensor(np.asarray(mask), dtype=torch.float32, device=device)[None]  # (1, U)
    if row.shape[1] != masks.total:
        raise ConfigError(f"the edit has {row.shape[1]} units but the layers have {masks.total}: it is for another "
                          "model or other layers")
    edited = [bool((row[0, masks.offsets[j]:masks.offsets[j + 1]] != 1).any()) for j in range(len(candidates))]

    def set_rows(module, args, kwargs):  # one mask for every row of whatever batch comes
        first = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))
        masks.set_rows(row.expand(first.shape[0], -1), edited=edited)

    handle = model.register_forward_pre_hook(set_rows, with_kwargs=True)
    try:
        with masks.installed():
            yield model
    finally:
        handle.remove()


def scoped_edit(model: nn.Module, units: Sequence[Layer] | Sequence[Matrix], mask) -> contextlib.AbstractContextManager:
    """`zeroed` for layers' units, `memloc.core.weights.masked` for matrices' weights: `mask` (U,) applied inside."""
    if units and isinstance(units[0], Matrix):
        return masked(model, units, mask)
    return zeroed(model, units, mask)


def edit_of(model: nn.Module, result: ProbeResult) -> tuple[list[Layer] | list[Matrix], np.ndarray]:
    """The units a localize result's edit is over, found in `model` (its layers; a weight edit's matrices), and the
    edit as a mask over them (U,) (0 = zeroed). A result for another model fails in one line (ConfigError)."""
    a = result.arrays
    if (result.summary.get("settings") or {}).get("units") == "weights":
        names = {int(i): str(n) for i, n in zip(a["layer_index"], a["layer_names"])}
        layer_of = [int(i) for i in a["weight_layer"]]
        matrices = matrices_named(model, a["weight_names"], layer_of, [names.get(i, "") for i in layer_of],
                                  a["weight_numel"])
        mask = np.ones(sum(m.units for m in matrices), dtype=np.float32)
        mask[np.asarray(a["edit_weight"], dtype=np.int64)] = 0.0
        return matrices, mask
    by_index = {l.index: l for l in find_layers(model)}
    wanted = [int(i) for i in a["layer_index"]]
    missing = [i for i in wanted if i not in by_index]
    if missing:
        raise ConfigError(f"the model has no layer {missing[0]}: the localize result is for another model")
    return [by_index[i] for i in wanted], np.asarray(a["edit_mask"])


def edited(model: nn.Module, result: ProbeResult) -> contextlib.AbstractContextManager:
    """The edit a localize result proposes (its units or weights zeroed), applied to `model` inside a `with`
    block."""
    return scoped_edit(model, *edit_of(model, result))


def fold_units(model: nn.Module, units: Sequence[Layer] | Sequence[Matrix], mask) -> nn.Module:
    """An edit made for good, in place: `fold_edit` for layers' units, `memloc.core.weights.fold` for matrices' weights;
    the model then computes what `scoped_edit(model, units, mask)` computes."""
    if units and isinstance(units[0], Matrix):
        return fold(model, units, mask)
    return fold_edit(model, units, mask)


# ----------------------------------------------------------------------------- the output projection, folded

def output_projection(model: nn.Module, layer: Layer) -> nn.Module | None:
    """The output projection of a transformer block's MLP or attention layer, None elsewhere (or when its input
    features do not split evenly into the layer's units).

    The projection is the last module with a 2-D weight among the layer's modules (memloc's GPT and the wrapped
    Hugging Face families: `proj`, `c_proj`, `dense_4h_to_h`, `down_proj`, `o_proj`); a unit owns its input
    features (one for a neuron, a head's block for a head): a Linear reads weight[:, f], GPT-2's Conv1D weight[f, :].
    """
    if layer.kind not in ("mlp", "attention"):
        return None
    modules = dict(model.named_modules())
    proj = None
    for name in layer.modules:
        for sub in modules[name].modules():
            w = getattr(sub, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                proj = sub
    if proj is None or _in_out(proj).shape[1] % layer.units:
        return None
    return proj


def _in_out(proj: nn.Module) -> torch.Tensor:
    """The projection's weight as (out, in), a view (GPT-2's Conv1D stores (in, out))."""
    w = proj.weight
    return w if isinstance(proj, nn.Linear) or not hasattr(proj, "nf") else w.t()


def _outgoing_norms(model: nn.Module, layer: Layer) -> torch.Tensor | None:
    """(U_j,) norm of each unit's outgoing weights in its block's output projection (`output_projection`), None
    where there is none."""
    proj = output_projection(model, layer)
    if proj is None:
        return None
    w = _in_out(proj).detach().float()
    return w.reshape(w.shape[0], layer.units, -1).pow(2).sum((0, 2)).sqrt()  # (U_j,)


@torch.no_grad()
def fold_edit(model: nn.Module, layers: Sequence[Layer], mask) -> nn.Module:
    """Remove the units an edit zeroes for good, in place: each zeroed unit's input columns of its block's output
    projection set to 0. `proj(x * m) == proj'(x)` exactly, so the model keeps its architecture and computes what
    `zeroed(model, layers, mask)` computes. Transformer MLP neurons and attention heads only (a layer without an
    output projection raises a one-line ConfigError)."""
    mask = np.asarray(mask, dtype=np.float32)
    sizes = [l.units for l in layers]
    if len(mask) != sum(sizes):
        raise ConfigError(f"the edit has {len(mask)} units but the layers have {sum(sizes)}: it is for another model")
    lo = 0
    for layer, size in zip(layers, sizes):
        part = mask[lo:lo + size]
        lo += size
        if (part == 1).all():
            continue
        proj = output_projection(model, layer)
        if proj is None:
            raise ConfigError(f"layer {layer.name} ({layer.kind}) has no output projection to fold the edit into: "
                              "only transformer MLP neurons and attention heads can be removed from the weights")
        w = _in_out(proj)  # (out, in): a view, written in place
        factor = torch.as_tensor(part, device=w.device, dtype=w.dtype).repeat_interleave(w.shape[1] // size)
        w.mul_(factor[None, :])
    return model


# ----------------------------------------------------------------------------- the edit's cost

def _share(hits: torch.Tensor, seqs: np.ndarray) -> float:
    return float(hits.numpy()[seqs].mean()) if len(seqs) else 0.0


def _is_text(task: Task) -> bool:
    return getattr(task.data, "canaries", None) is not None


def _cost(task: Task, base: float | None, now: float | None) -> float | None:
    """The edit's cost: relative perplexity increase (text), accuracy points lost (classification)."""
    if base is None or now is None:
        return None
    return now / base - 1.0 if _is_text(task) else base - now


def _cost_text(task: Task, cost: float | None) -> str:
    if cost is None:
        return "cost not measured (no held-out data)"
    return f"held-out perplexity {100 * cost:+.2f}%" if _is_text(task) else f"test accuracy {-100 * cost:+.2f} points"
