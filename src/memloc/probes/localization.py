"""Localize memorized sequences and remove them: the field's methods on one interface (`memloc localize RUN`).

Every method scores every candidate unit for one set of memorized training sequences and
proposes the same kind of edit: the top-k units by score, zeroed. What this module computes:

* **Units** are the units of `memloc.layers(model)`: by default every MLP hidden neuron
  (MemPi's units), with `heads` also every attention head, or the layers named in `layers`;
  a model without transformer blocks offers every layer but its classifier (as flipping).
  Scores are kept per (layer, unit), the units of all candidate layers concatenated in layer
  order (U in all); a higher score means "more responsible for the memorized sequences".
  With `units="weights"` (TinyMem's weight-level localization) a unit is one weight of the
  candidate layers' matrices (`memloc.core.weights`: every parameter of two or more dimensions of the
  layers: an MLP's input and output projections — GPT `fc` / `proj`, GPT-2 `c_fc` / `c_proj`,
  NeoX `dense_h_to_4h` / `dense_4h_to_h`, Llama `gate_proj` / `up_proj` / `down_proj` — never
  a norm or a bias; with `heads`, the attention layers' matrices too); U = P, the matrices'
  weights, numbered flat in layer order. One mask (P,) serves every row of a batch (a
  parametrization W -> W * m, removed in `finally`): the memory is the mask's, nothing per
  sequence. `k` counts weights, `fraction` is a share of the P weights, `per_layer` takes the
  top of each matrix (TinyMem's per-matrix ratio), `until` doubles the number of weights.
  Weight methods: ``balanced-subnet``, ``subnet``, ``durable``, ``random``; the others score
  neurons only (a one-line ConfigError).
* **Memorized sequences** M: the training sequences of the task's memorized kind (canaries)
  that the model extracts (`task.match`: every scored token the greedy one, in context), all of
  them or a seeded choice of `examples`; or the given `indices`. The **others** O (what must be
  kept): `others` training sequences of the reference kind (corpus text), a seeded choice.
* **Losses**: L_M = mean over M of the cross-entropy of the tokens `match` checks (a target
  entry >= 0: a canary's secret; the whole label for classification), L_O = mean over O of the
  task's loss (every trained token). A unit's multiplicative mask m (1 = live) enters through
  `memloc.core.units.UnitMasks` forward hooks, one mask per row of the batch, so many masked models
  share one pass and d(objective)/dm comes from autograd on the mask rows.
* **Methods** (defaults in brackets):

  - ``greedy``: the paper's removal, `flipping.flip_units` on M (batched; J = mean loss of
    the others - loss of the sequence, one copy, no input noise, at most k units each).
    score(u) = sum over sequences of 1 / (1 + the step at which u was removed), 0 if never.
  - ``zero-out`` (MemPi): score(u) = L_M(m = 1 - e_u) - L_M(1), every unit ablated alone, as
    batched one-hot masks (rows = (unit, sequence)).
  - ``attribution`` (attribution patching: Nanda 2023; Syed et al. 2023): zero-out's score to
    first order, score(u) = -dL_M/dm_u at m = 1 (L_M(1 - e_u) - L_M(1) ~ -dL_M/dm_u: the same loss,
    positions and sign as zero-out). One forward and one backward pass per batch of M (rows =
    sequences, every mask 1; d/dm of the mean over M accumulated, no per-sequence gradient) against
    zero-out's U x |M| rows; no settings. Exact where L_M is linear in m_u; it misjudges a unit
    whose removal moves the loss far (a saturated softmax, a unit backed up by another).
  - ``activations`` (MemPi): score(u) = ||mean activation of u over the scored positions of M||
    (|.| for a neuron, the norm of the head's output vector for a head) x the norm of u's
    outgoing weights (its column, or a head's block, of the layer's output projection: the
    last 2-D weight of the layer's modules). Layers without a block's projection (conv or
    linear layers of other models): the magnitude alone.
  - ``ig`` (knowledge neurons, MemPi): integrated gradients of F = mean over M and scored
    positions of p(target token) along the path m: 0 -> 1 of one layer's units at a time (the
    rest live), midpoint Riemann sum of `ig_steps` [20] points: score(u) = mean_k dF/dm_u(a_k),
    a_k = (k + 1/2) / steps. (MemPi scales one position at a time; here a layer's activations at
    every position together.)
  - ``slimming`` (MemPi): a coefficient c_u in [0, 1] per unit (start 1) minimizing
    L_M(c) + penalty * mean|c|, Adam [lr 0.01, penalty 1000, up to 1000 steps, stopping once
    mean|c| < `stop` 0.1, checked every 10 steps]; c is clamped to [0, 1] after every step.
    score(u) = c_u: the units the memorized sequences still need once most are switched off.
  - ``hard-concrete`` (MemPi, Louizos et al.): an L0 mask per unit, z = clamp(sigmoid((log u -
    log(1 - u) + s) / temperature) * 1.2 - 0.1, 0, 1) (stretch -0.1..1.1, u ~ U(0, 1) per
    sequence and step from a seeded generator, s starting at 0: E z = 0.5), minimizing
    L_M(z) + penalty * mean sigmoid(s - temperature * log(0.1 / 1.1)), Adam [lr 0.01, penalty
    1000, temperature 2/3, up to 1000 steps, stopping once the penalty's mean < `stop`].
    score(u) = sigmoid(s_u).
  - ``balanced-subnet`` (TinyMem's best): a learned score s_u per unit; the mask zeroes the k
    units of smallest s (pooled, or per layer with `per_layer`) and passes its gradient
    straight through to s (edge-popup). Minimizes the balanced objective L_O - L_M (keep the
    others' loss, raise the memorized sequences'), SGD [lr 0.1, momentum 0.9, weight decay
    5e-4 as TinyMem; 200 steps, all of M and O each step]. Unlike TinyMem's weight masks, s is
    signed and starts at 1 plus a seeded 1e-3 jitter: with |s| (theirs), a unit pushed out
    overshoots zero under momentum and comes back; from a random start, k arbitrary units
    would begin removed. score(u) = -s_u: the top k are exactly the learned mask's removed units.
  - ``subnet`` (TinyMem's Subnet; weights only): balanced-subnet's mask, score and schedule with the
    memorized term alone, minimizing -L_M (TinyMem minimizes the negated loss of the sequences to
    forget, keeping nothing else).
  - ``durable`` (TinyMem's Durable, after the durable-backdoor masks; weights only): score(w) =
    |dL_M/dw|, the gradient magnitude of the memorized sequences' loss at each weight, one backward
    pass per batch of M; pooled it is TinyMem's "durable aggregate", with `per_layer` (the top of each
    matrix) their layer-wise "durable". It ignores w itself (zeroing w changes L_M by about -w dL/dw).
  - ``random``: uniform scores from a generator seeded with `seed`: the baseline.

  With weights, balanced-subnet and subnet learn a score s_w per weight exactly as above for units
  (signed, starting at 1 plus a seeded 1e-3 jitter, the k smallest removed each step, straight-through;
  TinyMem's SGD, lr 0.1). The k smallest are taken with `torch.topk` on the device each step (ties, which
  the jitter makes unlikely, in its order); the edit kept is the top k of -s by `top_units`.

* **The edit**: the top k units by score (ties: the earlier unit), over all candidate units or
  per layer (`per_layer`, MemPi), zeroed; k = `k`, else ceil(`fraction` x units) (at least 1).
  `zeroed(model, layers, mask)` and `edited(model, result)` apply an edit inside a `with`
  block and remove it in `finally`; no method writes a model tensor, and every forward hook,
  mask and learned coefficient is gone after each call, even when it raises (tested).
* **Measured**: extraction of every subset (`task.accuracy`) and of M itself, before and with
  the edit.
* **The edit's size, searched** (`until`): k doubled (from `k` or `fraction`; per layer with
  `per_layer`) until at most `until` of M is extracted with the edit, or every unit is zeroed,
  or the edit's cost passes `max_cost`: a language model's held-out perplexity relative to the
  model's (no held-out text: not measured, never a bound), a classifier's test accuracy points.
  The scores are computed once (balanced-subnet's mask, which depends on k, is learned again at
  each size). The edit kept is the smallest that reaches `until` within the cost, else the
  largest within the cost; ``details.sweep`` records (k, extraction, quality, cost) per size.

Weight results keep no per-weight index arrays: ``scores`` (P,), ``edit_weight`` (k,) (flat positions zeroed, best
first), ``edit_matrix`` / ``edit_index`` (k,) (the matrix and the position in it, row-major), ``weight_names`` /
``weight_layer`` / ``weight_numel`` (matrices,), the layer and sequence arrays below (``layer_units``: weights per
layer); rows: one per zeroed weight, best first.

Result arrays (U candidate units, L layers, k zeroed, S localized sequences): ``scores`` (U,),
``unit_layer`` (U,) (layer index), ``unit_index`` (U,), ``rank`` (U,) (0 = top), ``edit_mask``
(U,) (1 live, 0 zeroed), ``edit_layer`` / ``edit_unit`` (k,), ``layer_names`` / ``layer_index``
/ ``layer_units`` (L,), ``sequences`` (S,), ``extracted_before`` / ``extracted_after`` (S,),
``trace`` (steps,) (the learned methods' objective per step); rows: one per unit, best first.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.batching import rows_that_fit
from ..core.errors import ConfigError, DataError, RunError
from ..core.examples import batches
from ..core.layers import Layer, select_layers
from ..core.layers import layers as find_layers
from ..core.options import INT64_MAX, check_ranges, fitted, given_option, names, option
from ..core.options import settings as option_settings
from ..core.tasks import Task, task_of
from ..core.units import UnitMasks
from ..core.weights import Matrix, WeightMasks, fold, masked, matrices_named, weight_matrices
from ..tasks.classification.readers import check_indices, indices_of, read_indices
from .base import ProbeResult
from .engine import Context, Probe, run_probe
from .flipping import FlipConfig, _from_json, _merge_states, _to_json, flip_units
from .flipping import candidate_layers as flip_candidates

PROBE_NAME = "localize"
METHODS = ("greedy", "zero-out", "attribution", "activations", "ig", "slimming", "hard-concrete", "balanced-subnet",
           "random")  # the methods of neurons and heads
WEIGHT_METHODS = ("balanced-subnet", "subnet", "durable", "random")  # the methods of weights: TinyMem's, the baseline
ALL_METHODS = METHODS[:-1] + ("subnet", "durable", "random")
UNIT_KINDS = ("neurons", "weights")
DEFAULT_STEPS = {"slimming": 1000, "hard-concrete": 1000, "balanced-subnet": 200, "subnet": 200}
DEFAULT_LR = {"slimming": 0.01, "hard-concrete": 0.01, "balanced-subnet": 0.1, "subnet": 0.1}  # MemPi; TinyMem
SUBNET_JITTER = 1e-3  # the learned scores' seeded start: 1 + U(0, 1) x this
STRETCH = (-0.1, 1.1)  # hard-concrete's stretched interval (Louizos et al.; MemPi)
SUBNET_MOMENTUM, SUBNET_WEIGHT_DECAY = 0.9, 5e-4  # TinyMem's SGD for BalancedSubnet


@dataclass
class LocalizeConfig:
    """Settings of `memloc localize`. Defaults: MemPi's (slimming, hard-concrete, IG), TinyMem's (balanced-subnet)."""

    method: str = option("balanced-subnet", "how units are scored: " + ", ".join(ALL_METHODS) + " (weights: "
                         + ", ".join(WEIGHT_METHODS) + ")", choices=ALL_METHODS)
    units: str = option("neurons", "what is scored and zeroed: neurons (MLP neurons; heads too with --heads) or "
                        "weights (every weight of the layers' matrices: the MLP's in and out projections, with "
                        "--heads attention's too; TinyMem)", choices=UNIT_KINDS)
    k: int | None = option(None, "units to zero: the top K by score (wins over --fraction; per layer with "
                           "--per-layer; weights: K weights)", at_least=1)
    fraction: float = option(0.01, "units to zero as a fraction of the candidate units (at least 1; weights: of the "
                             "chosen weights)", above=0, at_most=1)
    per_layer: bool = option(False, "take the top units of every layer (MemPi; weights: of every matrix, TinyMem) "
                             "instead of over all layers")
    until: float | None = option(None, "grow the edit (k doubled, from --k or --fraction) until the localized "
                                 "sequences' extraction is at most this share (e.g. 0.1)", metavar="SHARE", at_least=0,
                                 at_most=1)
    max_cost: float | None = option(None, "with --until: never grow the edit past a held-out perplexity this much "
                                    "above the model's (relative, e.g. 0.05; classification: test accuracy points)",
                                    metavar="SHARE", above=0)
    heads: bool = option(False, "attention heads are units too (default: MLP neurons only)")
    layers: tuple[str, ...] | None = option(None, "comma-separated layer names or indices (default: every MLP)",
                                            parse=names)
    examples: int | None = option(None, "localize at most N of the memorized sequences, a seeded choice "
                                  "(default: all)", metavar="N", at_least=1)
    indices: tuple[int, ...] | None = option(None, "localize these training sequences instead (.npy or text, one "
                                             "index a line)", parse=read_indices, metavar="FILE", at_least=0,
                                             at_most=INT64_MAX)
    others: int = option(64, "other (reference-kind) training sequences whose loss is kept (the default: all where "
                         "there are fewer)", at_least=1)
    steps: int | None = option(None, "optimization steps of the learned methods (default: slimming and "
                               "hard-concrete 1000, balanced-subnet and subnet 200)", at_least=1)
    lr: float | None = option(None, "learning rate of the learned methods (default: slimming and hard-concrete "
                              "0.01, balanced-subnet and subnet 0.1)", above=0)
    penalty: float = option(1000.0, "weight of the mean L1 (slimming) or L0 (hard-concrete) penalty", at_least=0)
    stop: float = option(0.1, "slimming and hard-concrete stop once the penalty's mean is below this", at_least=0)
    temperature: float = option(2 / 3, "hard-concrete temperature", above=0)
    ig_steps: int = option(20, "integrated-gradients steps", at_least=1)
    seed: int = option(0, "seed of the sequences, the others, the random scores and the hard-concrete noise",
                       at_least=0, at_most=INT64_MAX)
    batch_size: int | None = option(None, "rows per forward pass (default: what fits the free memory, at most 256 "
                                    "on a CPU, 2048 on a GPU)",
                                    result=False, at_least=1)
    epoch: int | None = option(None, "probe this saved epoch (default: the final one)", at_least=0)
    device: str = option("auto", "auto, cpu or cuda", result=False)
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.method not in ALL_METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose from {', '.join(ALL_METHODS)}")
        if self.units not in UNIT_KINDS:
            raise ConfigError(f"unknown --units {self.units!r}: choose from {', '.join(UNIT_KINDS)}")
        if self.units == "weights" and self.method not in WEIGHT_METHODS:
            raise ConfigError(f"--method {self.method} scores neurons, not weights: with --units weights choose from "
                              f"{', '.join(WEIGHT_METHODS)}")
        if self.units == "neurons" and self.method not in METHODS:
            raise ConfigError(f"--method {self.method} scores weights (TinyMem's): pass --units weights")
        if self.indices is not None:
            self.indices = indices_of(self.indices)
            if not self.indices or len(set(self.indices)) != len(self.indices):
                raise ConfigError("the --indices file must list distinct training sequences, at least one")
        if self.layers is not None:
            self.layers = tuple(str(n) for n in self.layers)
        if self.max_cost is not None and self.until is None:
            raise ConfigError("--max-cost bounds how far --until grows the edit: pass --until SHARE too")

    def settings(self) -> dict:
        return option_settings(self)


# ----------------------------------------------------------------------------- what is localized

def candidate_layers(model: nn.Module, cfg: LocalizeConfig) -> list[Layer]:
    """The layers whose units are scored: `cfg.layers`, else every MLP (and attention with `heads`) of a transformer,
    else every layer but the classifier."""
    all_layers = find_layers(model)
    if cfg.layers:
        return select_layers(all_layers, list(cfg.layers))
    kinds = ("attention", "mlp") if cfg.heads else ("mlp",)
    picked = [l for l in all_layers if l.kind in kinds]
    return picked or flip_candidates(model, FlipConfig())


def units_to_zero(candidates: Sequence[Layer | Matrix], cfg: LocalizeConfig) -> int | list[int]:
    """k over all candidate units, or one k per layer (`per_layer`; weights: per matrix); more than there are fails
    in one line."""
    sizes = [l.units for l in candidates]
    weights = bool(candidates) and isinstance(candidates[0], Matrix)
    what, part = ("weights", "matrix") if weights else ("units", "layer")
    if cfg.per_layer:
        ks = [cfg.k if cfg.k is not None else max(1, math.ceil(cfg.fraction * s)) for s in sizes]
        small = [(l, k) for l, k in zip(candidates, ks) if k > l.units]
        if small:
            l, k = small[0]
            raise ConfigError(f"--k {k} is more than the {l.units} {what} of {part} {l.name}: pass --k {l.units} or "
                              "fewer")
        return ks
    total = sum(sizes)
    k = cfg.k if cfg.k is not None else max(1, math.ceil(cfg.fraction * total))
    if k > total:
        raise ConfigError(f"--k {k} is more than the {total} {what} of the candidate layers: pass --k {total} or "
                          "fewer")
    return k


@torch.no_grad()
def _hits(model: nn.Module, task: Task, split: str, *, batch_size: int) -> torch.Tensor:
    """(N,) bool `task.match` of every training ("train") or held-out ("test") example, eval mode, float32."""
    data = task.data
    x, y = (data.x_train, task.targets("given")) if split == "train" else (data.x_test, task.targets("test"))
    device = next(model.parameters()).device
    out = torch.zeros(len(x), dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        for xb, yb, idx in batches(x, y, batch_size=batch_size, device=device):
            logits = model(task.inputs(xb, device)).float()
            out[idx.cpu()] = task.match(task.predict(logits), yb).cpu()
    finally:
        model.train(was_training)
    return out


def memorized_sequences(model: nn.Module, data, *, batch_size: int = 256) -> np.ndarray:
    """Indices (S,) of the training sequences of the memorized kind (canaries) that the model extracts in context."""
    task = task_of(data)
    kind = task.kind_mask(task.memorized_kind)
    if kind is None:
        raise DataError(f"this run's data does not say which examples are {task.memorized_kind}: pass --indices FILE")
    kind = kind.cpu().numpy()
    if not kind.any():
        raise DataError(f"this run has no {task.memorized_kind} training sequences, so nothing memorized to localize: "
                        f"train with {task.memorized_kind}s, or pass --indices FILE")
    hits = _hits(model, task, "train", batch_size=batch_size).numpy()
    idx = np.flatnonzero(hits & kind)
    if not len(idx):
        raise DataError(f"the model extracts none of its {int(kind.sum())} {task.memorized_kind} training sequences: "
                        "nothing memorized to localize (train longer or with more repeats, or pass --indices FILE)")
    return idx


def _plan(model: nn.Module, data, cfg: LocalizeConfig, note: Callable[[str], None] | None = None
          ) -> tuple[list[Layer], list[Layer] | list[Matrix], int | list[int], np.ndarray, np.ndarray]:
    """Everything decided before any compute: candidate layers, their units (the layers themselves; with weights
    their matrices), k, the localized sequences and the others (a default count of them larger than the data shrinks
    with one line to `note`, `options.fitted`)."""
    task = task_of(data)
    candidates = candidate_layers(model, cfg)
    units = weight_matrices(model, candidates) if cfg.units == "weights" else candidates
    k = units_to_zero(units, cfg)
    n = task.num_train
    if cfg.indices is not None:
        check_indices(cfg.indices, n, "sequence")  # its file and line named, before the int64 array
        seqs = np.asarray(cfg.indices, dtype=np.int64)
    else:
        seqs = memorized_sequences(model, task, batch_size=_rows(cfg, model, task.data.x_train, backward=False))
        if cfg.examples is not None and cfg.examples < len(seqs):
            seqs = np.sort(np.random.default_rng([cfg.seed, 0]).choice(seqs, size=cfg.examples, replace=False))
    ref = task.kind_mask(task.reference_kind)
    pool = np.flatnonzero(ref.cpu().numpy()) if ref is not None else np.arange(n)
    pool = np.setdiff1d(pool, seqs)
    if not len(pool) and cfg.method == "balanced-subnet":
        raise DataError(f"balanced-subnet keeps the loss of other training sequences, and the run has no "
                        f"{task.reference_kind} sequences besides the localized ones: choose another --method")
    others = np.sort(np.random.default_rng([cfg.seed, 1]).choice(pool, size=fitted(
        cfg, "others", len(pool), f"{task.reference_kind} training sequences", note), replace=False)) if len(pool) \
        else pool
    return candidates, units, k, seqs.astype(np.int64), others.astype(np.int64)


def _rows(cfg: LocalizeConfig, model: nn.Module, x: torch.Tensor, *, backward: bool = True) -> int:
    """Rows per pass: --batch-size, else what fits (`memloc.core.batching`: a language model's rows of x's length, a
    pass that backpropagates to the masks unless `backward` is False; at most 256 on a CPU, 2048 on a GPU)."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    return rows_that_fit(model, length=x.shape[1] if x.dim() == 2 else 1, backward=backward)


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


# ----------------------------------------------------------------------------- scoring

def _per_row(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, p(target)) (B,), each the mean over what `match` checks: the target entries >= 0 (a label; a
    sequence's scored tokens)."""
    b = outputs.shape[0]
    scored = targets >= 0
    ce = F.cross_entropy(outputs.float().flatten(0, -2), targets.clamp_min(0).flatten(), reduction="none")
    ce, scored = ce.reshape(b, -1), scored.reshape(b, -1).float()
    count = scored.sum(1).clamp_min(1)
    return (ce * scored).sum(1) / count, (torch.exp(-ce) * scored).sum(1) / count


class _Localizer:
    """The memorized sequences, the others and the unit (or weight) masks of one model: what every method needs."""

    def __init__(self, model: nn.Module, task: Task, cfg: LocalizeConfig, candidates: list[Layer] | list[Matrix],
                 seqs: np.ndarray, others: np.ndarray, k: int | list[int], log: Callable[[str], None]):
        self.model, self.task, self.cfg, self.candidates, self.k, self.log = model, task, cfg, candidates, k, log
        self.device = next(model.parameters()).device
        self.weights = cfg.units == "weights"
        self.masks = WeightMasks(model, candidates) if self.weights else UnitMasks(model, candidates)
        self.U = self.masks.total
        data, y = task.data, task.targets("given")
        self.rows = _rows(cfg, model, data.x_train)
        self.seqs, self.others = seqs, others
        self.x_mem = self._input(data.x_train, seqs)
        self.y_mem = y[torch.as_tensor(seqs, device=y.device)].to(self.device)
        self.x_oth = self._input(data.x_train, others)
        self.y_oth = y[torch.as_tensor(others, device=y.device)].to(self.device)
        self.all_edited = [True] * len(candidates)
        self.trace: list[float] = []
        self.details: dict = {}

    def _input(self, x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
        return self.task.inputs(x[torch.as_tensor(idx, device=x.device)].to(self.device), self.device)

    def _layer_of_units(self, flat: torch.Tensor) -> list[bool]:
        pos = np.searchsorted(self.masks.offsets, flat.cpu().numpy(), side="right") - 1
        return [bool((pos == j).any()) for j in range(len(self.candidates))]

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None, edited: list[bool] | None = None) -> torch.Tensor:
        """Float logits of inputs x (R, ...) under mask rows (R, U) (None: unedited); rows may require grad."""
        self.masks.set_rows(rows, edited=edited if rows is not None else None)
        try:
            return self.model(x).float()
        finally:
            self.masks.set_rows(None)

    def _chunks(self, n: int) -> Iterator[slice]:
        for lo in range(0, n, self.rows):
            yield slice(lo, lo + self.rows)

    # -- one method each
    def random(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed)
        return torch.rand(self.U, generator=g, dtype=torch.float64).float()

    @torch.no_grad()
    def zero_out(self) -> torch.Tensor:
        m = len(self.seqs)
        base = torch.cat([_per_row(self.forward(self.x_mem[s], None), self.y_mem[s])[0] for s in self._chunks(m)])
        per = max(1, self.rows // m)  # units per pass: rows (unit, sequence), unit-major
        scores = torch.zeros(self.U, device=self.device)
        for lo in range(0, self.U, per):
            units = torch.arange(lo, min(lo + per, self.U), device=self.device)  # (C,)
            c = len(units)
            rows = torch.ones(c * m, self.U, device=self.device)
            rows[torch.arange(c * m, device=self.device), units.repeat_interleave(m)] = 0.0  # (C * M, U) one-hot zeros
            x = torch.cat([self.x_mem] * c)
            y = torch.cat([self.y_mem] * c)
            loss = _per_row(self.forward(x, rows, self._layer_of_units(units)), y)[0].view(c, m)  # (C, M)
            scores[lo:lo + c] = (loss - base).mean(1)
        return scores.cpu()

    def attribution(self) -> torch.Tensor:
        mask = torch.ones(self.U, device=self.device, requires_grad=True)  # one mask shared by every row: its
        # gradient is the sum over the rows, and each term is already divided by |M|: d(mean over M)/dm
        for term in self._memorized_terms(lambda n, s: mask.expand(n, -1)):
            torch.autograd.backward(term, inputs=[mask])
        grad = mask.grad if mask.grad is not None else torch.zeros_like(mask)
        return -grad.detach().cpu()  # L(1 - e_u) - L(1) ~ -dL/dm_u: higher = removing u raises the loss more

    @torch.no_grad()
    def activations(self) -> torch.Tensor:
        out = []
        for s in self._chunks(len(self.seqs)):
            acts = self._capture(self.x_mem[s])
            out.append([self._magnitude(j, a, self.y_mem[s]) for j, a in enumerate(acts)])  # per layer: (U_j,) sums
        count = (self.y_mem >= 0).sum().clamp_min(1).float() if self._aligned(self.y_mem) else None
        scores = []
        for j, layer in enumerate(self.candidates):
            total = sum(part[j] for part in out)
            if count is not None and total.dim() > 1:  # a per-position vector (a head's output): mean, then its norm
                mag = (total / count).flatten(1).norm(dim=1)
            elif count is not None:
                mag = (total / count).abs()
            else:
                mag = (total / len(self.seqs)).abs()
            norm = _outgoing_norms(self.model, layer)
            scores.append(mag * (norm.to(mag.device) if norm is not None else 1.0))
        return torch.cat(scores).cpu()

    def _aligned(self, y: torch.Tensor) -> bool:
        return y.dim() == 2  # (B, T) targets: one per position of the activations (B, T, ...)

    def _capture(self, x: torch.Tensor) -> list[torch.Tensor]:
        for _ in range(2):  # a second pass only when a layer's output is changed in place later (see UnitMasks)
            self.masks.set_rows(torch.ones(len(x), self.U, device=self.device), capture=True,
                                edited=[False] * len(self.candidates))
            try:
                self.model(x)
                acts = self.masks.activations()
            finally:
                self.masks.set_rows(None)
            if acts is not None:
                return [a.detach() for a in acts]
        raise RunError("a layer's activations keep changing in place during the forward pass: they cannot be read")

    def _magnitude(self, j: int, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum of layer j's activation over the scored positions of a chunk, per unit ((U_j,) or (U_j, width))."""
        layer = self.candidates[j]
        dim = layer.unit_dim % a.dim()
        if self._aligned(y) and a.dim() >= 3 and tuple(a.shape[:2]) == tuple(y.shape):
            w = (y >= 0).to(a.dtype)  # (B, T): the positions whose next token is scored
            s = torch.einsum("bt,bt...->...", w, a)  # a.shape[2:]
            return s.movedim(dim - 2, 0)  # (U_j,) or (U_j, hs)
        return a.movedim(dim, 0).flatten(1).mean(1) * len(a)  # other layers: the mean over every position

    def ig(self) -> torch.Tensor:
        steps, m = self.cfg.ig_steps, len(self.seqs)
        alphas = (torch.arange(steps, device=self.device, dtype=torch.float32) + 0.5) / steps  # midpoints
        scores = torch.zeros(self.U, device=self.device)
        pairs = [(a, s) for a in range(steps) for s in range(m)]  # rows: (step, sequence)
        for j in range(len(self.candidates)):
            lo, hi = int(self.masks.offsets[j]), int(self.masks.offsets[j + 1])
            only = [i == j for i in range(len(self.candidates))]
            for part in self._chunks(len(pairs)):
                chunk = pairs[part]
                a_idx = torch.as_tensor([p[0] for p in chunk], device=self.device)
                s_idx = torch.as_tensor([p[1] for p in chunk], device=self.device)
                rows = torch.ones(len(chunk), self.U, device=self.device)
                rows[:, lo:hi] = alphas[a_idx, None]
                rows.requires_grad_(True)
                with torch.enable_grad():
                    prob = _per_row(self.forward(self.x_mem[s_idx], rows, only), self.y_mem[s_idx])[1]
                    (grad,) = torch.autograd.grad(prob.sum(), rows)
                scores[lo:hi] += grad[:, lo:hi].sum(0) / (steps * m)  # mean over sequences of the Riemann sum
        return scores.detach().cpu()

    def _learn(self, param: torch.Tensor, opt: torch.optim.Optimizer, steps: int,
               loss_terms: Callable[[], Iterator[torch.Tensor]], penalty: Callable[[], torch.Tensor] | None,
               after_step: Callable[[], None] = lambda: None) -> int:
        """Minimize sum(loss_terms) (+ penalty) over `param` alone: chunk by chunk backward into param.grad only."""
        done = 0
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for term in loss_terms():
                torch.autograd.backward(term, inputs=[param])
                total += float(term.detach())
            reg = None
            if penalty is not None:
                with torch.enable_grad():
                    reg = penalty()
                torch.autograd.backward(self.cfg.penalty * reg, inputs=[param])
                total += self.cfg.penalty * float(reg.detach())
            opt.step()
            after_step()
            self.trace.append(total)
            done = step + 1
            # MemPi's rule: every 10 steps, stop once the penalty's mean is small enough
            if reg is not None and done % 10 == 0 and float(reg.detach()) < self.cfg.stop:
                break
        return done

    def _memorized_terms(self, rows_of: Callable[[int, slice], torch.Tensor]) -> Iterator[torch.Tensor]:
        m = len(self.seqs)
        for s in self._chunks(m):
            with torch.enable_grad():
                rows = rows_of(len(self.x_mem[s]), s)
                yield _per_row(self.forward(self.x_mem[s], rows, self.all_edited), self.y_mem[s])[0].sum() / m

    def slimming(self) -> torch.Tensor:
        c = torch.ones(self.U, device=self.device, requires_grad=True)
        steps = self.cfg.steps or DEFAULT_STEPS["slimming"]
        lr = self.cfg.lr or DEFAULT_LR["slimming"]
        opt = torch.optim.Adam([c], lr=lr)

        def clamp():
            with torch.no_grad():
                c.clamp_(0.0, 1.0)

        done = self._learn(c, opt, steps, lambda: self._memorized_terms(lambda n, s: c.expand(n, -1)),
                           lambda: c.abs().mean(), clamp)
        self.details = {"steps": steps, "steps_run": done, "lr": lr, "penalty": self.cfg.penalty,
                        "stop": self.cfg.stop}
        return c.detach().clamp(0.0, 1.0).cpu()

    def hard_concrete(self) -> torch.Tensor:
        lo_, hi_ = STRETCH
        beta = self.cfg.temperature
        s = torch.zeros(self.U, device=self.device, requires_grad=True)  # E z = 0.5 at the start (MemPi's mask_p)
        steps = self.cfg.steps or DEFAULT_STEPS["hard-concrete"]
        lr = self.cfg.lr or DEFAULT_LR["hard-concrete"]
        opt = torch.optim.Adam([s], lr=lr)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        state = {"u": None}

        def draw() -> None:  # one uniform per (sequence, unit) per step, on the CPU: the same on every device
            state["u"] = torch.rand(len(self.seqs), self.U, generator=gen).clamp(1e-4, 1 - 1e-4).to(self.device)

        def rows_of(n: int, part: slice) -> torch.Tensor:
            u = state["u"][part]
            z = torch.sigmoid((u.log() - (1 - u).log() + s) / beta) * (hi_ - lo_) + lo_
            return z.clamp(0.0, 1.0)

        def terms():
            draw()
            return self._memorized_terms(rows_of)

        done = self._learn(s, opt, steps, terms, lambda: torch.sigmoid(s - beta * math.log(-lo_ / hi_)).mean())
        self.details = {"steps": steps, "steps_run": done, "lr": lr, "penalty": self.cfg.penalty,
                        "stop": self.cfg.stop, "temperature": beta, "stretch": list(STRETCH)}
        return torch.sigmoid(s.detach()).cpu()

    def balanced_subnet(self) -> torch.Tensor:
        if self.weights:
            return self._weight_subnet(balanced=True)
        gen = torch.Generator().manual_seed(self.cfg.seed)
        s = (1.0 + SUBNET_JITTER * torch.rand(self.U, generator=gen)).to(self.device).requires_grad_(True)
        steps = self.cfg.steps or DEFAULT_STEPS["balanced-subnet"]
        lr = self.cfg.lr or DEFAULT_LR["balanced-subnet"]
        opt = torch.optim.SGD([s], lr=lr, momentum=SUBNET_MOMENTUM, weight_decay=SUBNET_WEIGHT_DECAY)
        sizes = [l.units for l in self.candidates]

        def terms():
            hard = torch.ones(self.U, device=self.device)
            removed = top_units(-s.detach().cpu().numpy(), self.candidates, self.k)  # the k smallest s
            hard[torch.as_tensor(removed, device=self.device)] = 0.0

            def rows(n: int) -> torch.Tensor:  # straight-through: the forward sees `hard`, d mask / d s = 1
                return (hard + s - s.detach()).expand(n, -1)

            n_m, n_o = len(self.seqs), len(self.others)
            for part in self._chunks(n_o):
                x, y = self.x_oth[part], self.y_oth[part]
                with torch.enable_grad():
                    yield self.task.loss(self.forward(x, rows(len(x)), self.all_edited), y).sum() / n_o
            for part in self._chunks(n_m):
                x, y = self.x_mem[part], self.y_mem[part]
                with torch.enable_grad():
                    yield -_per_row(self.forward(x, rows(len(x)), self.all_edited), y)[0].sum() / n_m

        done = self._learn(s, opt, steps, terms, None)
        self.details = {"steps": steps, "steps_run": done, "lr": lr, "momentum": SUBNET_MOMENTUM,
                        "weight_decay": SUBNET_WEIGHT_DECAY, "sizes": sizes}
        return -s.detach().cpu()

    # -- weights: one (P,) mask for every row (`memloc.core.weights`)
    def _weight_forward(self, x: torch.Tensor, *, scale: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None) -> torch.Tensor:
        """Float logits of x with every chosen weight read as w * scale + shift ((P,) each; None: as is)."""
        self.masks.set(scale, shift)
        try:
            return self.model(x).float()
        finally:
            self.masks.set(None)

    def _smallest(self, s: torch.Tensor) -> torch.Tensor:
        """Positions of the k smallest entries of s (P,), pooled or k per matrix (`per_layer`)."""
        if isinstance(self.k, (int, np.integer)):
            return torch.topk(s, int(self.k), largest=False, sorted=False).indices
        out = []
        for j, kj in enumerate(self.k):
            lo, hi = int(self.masks.offsets[j]), int(self.masks.offsets[j + 1])
            out.append(lo + torch.topk(s[lo:hi], int(kj), largest=False, sorted=False).indices)
        return torch.cat(out)

    def _weight_subnet(self, *, balanced: bool) -> torch.Tensor:
        """(Balanced)Subnet on weights: balanced_subnet's learned scores, one per weight; `balanced` keeps L_O."""
        name = "balanced-subnet" if balanced else "subnet"
        gen = torch.Generator().manual_seed(self.cfg.seed)
        s = (1.0 + SUBNET_JITTER * torch.rand(self.U, generator=gen)).to(self.device).requires_grad_(True)  # (P,)
        steps = self.cfg.steps or DEFAULT_STEPS[name]
        lr = self.cfg.lr or DEFAULT_LR[name]
        opt = torch.optim.SGD([s], lr=lr, momentum=SUBNET_MOMENTUM, weight_decay=SUBNET_WEIGHT_DECAY)

        def terms():
            hard = torch.ones(self.U, device=self.device)
            hard[self._smallest(s.detach())] = 0.0
            n_m, n_o = len(self.seqs), len(self.others)
            for part in self._chunks(n_o) if balanced else ():
                x, y = self.x_oth[part], self.y_oth[part]
                with torch.enable_grad():  # straight-through: the forward sees `hard`, d mask / d s = 1
                    yield self.task.loss(self._weight_forward(x, scale=hard + s - s.detach()), y).sum() / n_o
            for part in self._chunks(n_m):
                x, y = self.x_mem[part], self.y_mem[part]
                with torch.enable_grad():
                    yield -_per_row(self._weight_forward(x, scale=hard + s - s.detach()), y)[0].sum() / n_m

        done = self._learn(s, opt, steps, terms, None)
        self.details = {"steps": steps, "steps_run": done, "lr": lr, "momentum": SUBNET_MOMENTUM,
                        "weight_decay": SUBNET_WEIGHT_DECAY, "mask_numel": int(s.numel())}
        return -s.detach().cpu()

    def subnet(self) -> torch.Tensor:
        return self._weight_subnet(balanced=False)

    def durable(self) -> torch.Tensor:
        shift = torch.zeros(self.U, device=self.device, requires_grad=True)  # (P,): d L / d shift = d L / d w
        m = len(self.seqs)
        for part in self._chunks(m):
            with torch.enable_grad():
                term = _per_row(self._weight_forward(self.x_mem[part], shift=shift), self.y_mem[part])[0].sum() / m
            torch.autograd.backward(term, inputs=[shift])
        grad = shift.grad if shift.grad is not None else torch.zeros_like(shift)
        self.details = {"mask_numel": int(shift.numel())}
        return grad.detach().abs().cpu()

    def greedy(self, *, progress: bool = False, **resume) -> torch.Tensor | None:
        cap = self.k if isinstance(self.k, int) else int(sum(self.k))
        flip_cfg = FlipConfig(indices=tuple(int(i) for i in self.seqs), others=min(self.cfg.others,
                              self.task.num_train), copies=1, input_noise=0.0, max_units=cap,
                              layers=tuple(l.name for l in self.candidates), eval_subsample=1, eval_test=False,
                              seed=self.cfg.seed)
        res = flip_units(self.model, self.task, flip_cfg, progress=progress, log=self.log, **resume)
        if res is None:  # a shard: its part of the search is kept
            return None
        pos = {l.index: j for j, l in enumerate(self.candidates)}
        scores = torch.zeros(self.U)
        ul, ui, n = res.arrays["unit_layer"], res.arrays["unit_index"], res.arrays["num_units"]
        for e in range(len(n)):
            for step in range(int(n[e])):
                flat = int(self.masks.offsets[pos[int(ul[e, step])]]) + int(ui[e, step])
                scores[flat] += 1.0 / (1 + step)
        self.details = {"flipped": int(res.arrays["flipped"].sum()), "mean_units": float(np.mean(n)),
                        "cap": cap}
        return scores


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


# ----------------------------------------------------------------------------- the probe

def localize_units(model: nn.Module, data, cfg: LocalizeConfig | None = None, *, progress: bool = False,
                   log: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None,
                   resume: dict | None = None) -> ProbeResult | None:
    """Score every candidate unit of `model` for its memorized sequences with `cfg.method`, propose the top-k edit
    and measure extraction before and with it. The model is unchanged afterwards, even when this raises.

    `resume` (greedy only): `flip_units`'s done / done_seconds / on_chunk / mine, to continue an interrupted search
    or do one shard of it (then None is returned: the shard's records are kept by `on_chunk`). A default count
    larger than the data shrinks with one line to `note` (else `log`; a Python warning without either)."""
    cfg = cfg or LocalizeConfig()
    note = note or log
    log = log or (lambda s: None)
    task = task_of(data)
    candidates, units, k, seqs, others = _plan(model, task, cfg, note)
    loc = _Localizer(model, task, cfg, units, seqs, others, k, log)
    what = f"weights in {len(units)} matrices of" if cfg.units == "weights" else "units in"
    log(f"localize: {cfg.method} on {len(seqs)} sequences, {loc.U} {what} {len(candidates)} layers, "
        f"{len(others)} others")
    t0 = time.perf_counter()
    if cfg.method == "greedy":  # flipping searches on its own frozen copy
        scores = loc.greedy(progress=progress, **(resume or {}))
        if scores is None:
            return None
    else:
        with loc.masks.installed():
            scores = getattr(loc, cfg.method.replace("-", "_"))()
    elapsed = time.perf_counter() - t0
    scores = scores.double().numpy()
    rows = _rows(cfg, model, task.data.x_train, backward=False)
    before = (_hits(model, task, "train", batch_size=rows), _hits(model, task, "test", batch_size=rows))
    sweep: list[dict] = []
    while True:
        top = top_units(scores, units, k)
        mask = np.ones(loc.U, dtype=np.float32)
        mask[top] = 0.0
        with scoped_edit(model, units, mask):
            after = (_hits(model, task, "train", batch_size=rows), _hits(model, task, "test", batch_size=rows))
            quality = _quality(model, task, after, rows) if cfg.until is not None else None
        if cfg.until is None:
            break
        if not sweep:
            sweep.append({"k": 0, "extracted": _share(before[0], loc.seqs), "quality": _quality(model, task, before,
                                                                                                  rows)})
        step = {"k": int(len(top)), "extracted": _share(after[0], loc.seqs), "quality": quality,
                "scores": scores, "k_arg": k, "top": top, "mask": mask, "after": after,
                "elapsed": time.perf_counter() - t0}
        step["cost"] = _cost(task, sweep[0]["quality"], quality)
        sweep.append(step)
        log(f"localize: {step['k']} {cfg.units if cfg.units == 'weights' else 'units'} zeroed: extraction "
            f"{100 * step['extracted']:.1f}%, {_cost_text(task, step['cost'])}")
        over = cfg.max_cost is not None and step["cost"] is not None and step["cost"] > cfg.max_cost
        bigger = _grown(k, units)
        if step["extracted"] <= cfg.until or over or bigger is None:
            break
        k = bigger
        if cfg.method in ("balanced-subnet", "subnet"):  # the learned mask depends on k: learn it again at the new size
            loc.k, loc.trace = k, []
            with loc.masks.installed():
                scores = getattr(loc, cfg.method.replace("-", "_"))().double().numpy()
    if sweep:
        chosen = _chosen(sweep[1:], cfg)
        scores, k, top, mask, after = (chosen[f] for f in ("scores", "k_arg", "top", "mask", "after"))
        loc.details = {**loc.details, "until": cfg.until, "max_cost": cfg.max_cost,
                       "reached": chosen["extracted"] <= cfg.until and _within(chosen, cfg),
                       "cost": "perplexity" if _is_text(task) else "test accuracy",
                       "sweep": [{"k": r["k"], "extracted": r["extracted"],
                                  "quality": None if r["quality"] is None else round(r["quality"], 6),
                                  "cost": None if r.get("cost") is None else round(r["cost"], 6)} for r in sweep]}
    elapsed = time.perf_counter() - t0
    if cfg.units == "weights":
        return _weight_result(cfg, task, loc, candidates, units, k, scores, top, before, after, elapsed)
    return _result(cfg, task, loc, candidates, k, scores, top, mask, before, after, elapsed)


def _share(hits: torch.Tensor, seqs: np.ndarray) -> float:
    return float(hits.numpy()[seqs].mean()) if len(seqs) else 0.0


def _is_text(task: Task) -> bool:
    return getattr(task.data, "canaries", None) is not None


def _quality(model: nn.Module, task: Task, hits: tuple[torch.Tensor, torch.Tensor], rows: int) -> float | None:
    """What an edit must keep: a language model's held-out perplexity (None without held-out text), else the
    test accuracy."""
    if _is_text(task):
        from .memorization import heldout_perplexity
        return heldout_perplexity(model, task.data, batch_size=rows)
    return float(hits[1].float().mean()) if len(hits[1]) else None


def _cost(task: Task, base: float | None, now: float | None) -> float | None:
    """The edit's cost: relative perplexity increase (text), accuracy points lost (classification)."""
    if base is None or now is None:
        return None
    return now / base - 1.0 if _is_text(task) else base - now


def _cost_text(task: Task, cost: float | None) -> str:
    if cost is None:
        return "cost not measured (no held-out data)"
    return f"held-out perplexity {100 * cost:+.2f}%" if _is_text(task) else f"test accuracy {-100 * cost:+.2f} points"


def _within(step: dict, cfg: LocalizeConfig) -> bool:
    return cfg.max_cost is None or step["cost"] is None or step["cost"] <= cfg.max_cost


def _chosen(steps: list[dict], cfg: LocalizeConfig) -> dict:
    """The smallest edit that brings extraction to `until` within `max_cost`; else the largest edit within the
    cost (the most removed at an acceptable price); else the smallest tried."""
    for step in steps:
        if step["extracted"] <= cfg.until and _within(step, cfg):
            return step
    ok = [s for s in steps if _within(s, cfg)]
    return ok[-1] if ok else steps[0]


def _grown(k: int | list[int], candidates: Sequence[Layer | Matrix]) -> int | list[int] | None:
    """k doubled (per layer or matrix with a list), at most every unit; None when it cannot grow."""
    if isinstance(k, (int, np.integer)):
        total = sum(l.units for l in candidates)
        return None if k >= total else min(total, 2 * int(k))
    grown = [min(l.units, 2 * int(kj)) for l, kj in zip(candidates, k)]
    return None if grown == [int(kj) for kj in k] else grown


def _result(cfg, task, loc: _Localizer, candidates, k, scores, top, mask, before, after, elapsed) -> ProbeResult:
    order = np.lexsort((np.arange(len(scores)), -scores))
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(len(scores))
    unit_layer = np.concatenate([np.full(l.units, l.index) for l in candidates]).astype(np.int64)
    unit_index = np.concatenate([np.arange(l.units) for l in candidates]).astype(np.int64)
    seq_arrays, seq_summary = _extraction_summary(task, loc, before, after)
    per_layer = [{"index": l.index, "name": l.name, "units": l.units,
                  "zeroed": int((unit_layer[top] == l.index).sum())} for l in candidates]
    arrays = {
        "scores": scores.astype(np.float32), "unit_layer": unit_layer, "unit_index": unit_index, "rank": rank,
        "edit_mask": mask, "edit_layer": unit_layer[top], "edit_unit": unit_index[top],
        "layer_names": np.array([l.name for l in candidates]),
        "layer_index": np.array([l.index for l in candidates], dtype=np.int64),
        "layer_units": np.array([l.units for l in candidates], dtype=np.int64),
        **seq_arrays,
    }
    names_ = {l.index: l.name for l in candidates}
    rows = [{"rank": int(rank[i]), "layer": int(unit_layer[i]), "layer_name": names_[int(unit_layer[i])],
             "unit": int(unit_index[i]), "score": float(scores[i]), "zeroed": int(mask[i] == 0)}
            for i in order]  # best first: the report shows the top of the table
    summary = {
        "probe": PROBE_NAME, "method": cfg.method, "settings": cfg.settings(), "details": loc.details,
        "units": int(len(scores)), "zeroed": int(len(top)), "k": k, "per_layer": cfg.per_layer, "layers": per_layer,
        **seq_summary, "elapsed_s": round(elapsed, 3),
    }
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def _extraction_summary(task, loc: _Localizer, before, after) -> tuple[dict, dict]:
    """(arrays, summary) of the localized sequences' extraction and the subsets' accuracy, before and with the edit."""
    seqs = loc.seqs
    acc_before = task.accuracy(before[0][None], before[1][None])[0]
    acc_after = task.accuracy(after[0][None], after[1][None])[0]

    def accs(a):
        return {f"{s}_acc": (None if np.isnan(v) else float(v)) for s, v in zip(task.subsets, a)}

    ext_b, ext_a = before[0].numpy()[seqs], after[0].numpy()[seqs]
    arrays = {"sequences": seqs, "others": loc.others, "extracted_before": ext_b, "extracted_after": ext_a,
              "trace": np.asarray(loc.trace, dtype=np.float32)}
    summary = {"sequences": int(len(seqs)), "others": int(len(loc.others)),
               "extracted_before": float(ext_b.mean()) if len(seqs) else None,
               "extracted_after": float(ext_a.mean()) if len(seqs) else None,
               "accuracy_before": accs(acc_before), "accuracy_after": accs(acc_after)}
    return arrays, summary


def _weight_result(cfg, task, loc: _Localizer, candidates: list[Layer], matrices: list[Matrix], k, scores, top,
                   before, after, elapsed) -> ProbeResult:
    """A weight edit's result: the scores (P,), the zeroed weights' positions and the matrices (no per-weight
    index arrays: P may be millions)."""
    offsets = loc.masks.offsets
    which = np.searchsorted(offsets, top, side="right") - 1  # (k,) matrix of each zeroed weight
    within = top - offsets[which]
    seq_arrays, seq_summary = _extraction_summary(task, loc, before, after)
    by_layer = {l.index: [m for m in matrices if m.layer == l.index] for l in candidates}
    zeroed_per = np.bincount(which, minlength=len(matrices))
    arrays = {
        "scores": scores.astype(np.float32), "edit_weight": top.astype(np.int64), "edit_matrix": which.astype(np.int64),
        "edit_index": within.astype(np.int64),
        "weight_names": np.array([m.name for m in matrices]),
        "weight_layer": np.array([m.layer for m in matrices], dtype=np.int64),
        "weight_numel": np.array([m.units for m in matrices], dtype=np.int64),
        "layer_names": np.array([l.name for l in candidates]),
        "layer_index": np.array([l.index for l in candidates], dtype=np.int64),
        "layer_units": np.array([sum(m.units for m in by_layer[l.index]) for l in candidates], dtype=np.int64),
        **seq_arrays,
    }
    rows = [{"rank": r, "layer": matrices[j].layer, "layer_name": matrices[j].layer_name, "matrix": matrices[j].name,
             "index": int(i), "score": float(scores[w]), "zeroed": 1}
            for r, (w, j, i) in enumerate(zip(top.tolist(), which.tolist(), within.tolist()))]  # the edit, best first
    summary = {
        "probe": PROBE_NAME, "method": cfg.method, "settings": cfg.settings(), "details": loc.details,
        "units": int(len(scores)), "zeroed": int(len(top)), "k": k, "per_layer": cfg.per_layer, "unit_kind": "weights",
        "layers": [{"index": l.index, "name": l.name, "units": int(sum(m.units for m in by_layer[l.index])),
                    "zeroed": int(sum(zeroed_per[m.index] for m in by_layer[l.index]))} for l in candidates],
        "matrices": [{"name": m.name, "layer": m.layer, "shape": list(m.shape), "weights": m.units,
                      "zeroed": int(zeroed_per[m.index])} for m in matrices],
        **seq_summary, "elapsed_s": round(elapsed, 3),
    }
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def _check(model: nn.Module, data, cfg: LocalizeConfig, ctx: Context) -> None:
    _plan(model, data, cfg, note=lambda line: None)  # every bad input fails here, before anything is written


def _compute(model: nn.Module, data, cfg: LocalizeConfig, ctx: Context) -> ProbeResult | None:
    resume = {}
    if cfg.method == "greedy" and ctx.partial is not None:  # greedy removal keeps its records: resumable, sharded
        _, state = ctx.partial.load()

        def save(records, elapsed: float) -> None:
            ctx.partial.save(state={"records": [_to_json(r) for r in records], "seconds": round(elapsed, 3)})
        resume = {"done": [_from_json(r) for r in state.get("records", [])],
                  "done_seconds": float(state.get("seconds") or 0.0), "on_chunk": save, "mine": ctx.partial.mine}
    result = localize_units(model, data, cfg, progress=ctx.progress, log=ctx.log, note=ctx.note, resume=resume)
    if result is None:  # a shard of greedy removal: its records are saved
        return None
    if ctx.epoch is not None:
        result.summary["epoch"] = ctx.epoch
    return result


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    before, after = s["accuracy_before"], s["accuracy_after"]
    others = ", ".join(f"{k[:-4]} {pct(before[k])} -> {pct(after[k])}" for k in before)
    what = "weights" if s.get("unit_kind") == "weights" else "units"
    return [f"{s['method']}: {s['sequences']} sequences, {s['units']} {what}; top {s['zeroed']} zeroed: extraction "
            f"{pct(s['extracted_before'])} -> {pct(s['extracted_after'])} ({s['elapsed_s']:.1f}s scoring)",
            f"with the edit: {others}"]


PROBE = Probe(PROBE_NAME, "localize", LocalizeConfig, _compute, check=_check, describe=_describe,
              layers_option="layers", shards=True, merge_state=_merge_states,
              split_when=lambda cfg: cfg.method == "greedy", split_when_text="with --method greedy (by sequence)",
              help="score units for the memorized sequences with one of the field's methods and zero the top k")


def localize(target, data=None, cfg: LocalizeConfig | None = None, *, save: bool = True, progress: bool = False,
             log: Callable[[str], None] | None = None, **options) -> ProbeResult:
    """Localize the memorized sequences of a run directory (``memloc localize RUN``, saved into RUN/probes/localize/)
    or of a trained model with its `data`, with one method: ``localize(model, data, method="zero-out", k=10)``.

    `cfg` a :class:`LocalizeConfig`, or `options` its fields. Result arrays: ``scores`` (U,) per (``unit_layer``,
    ``unit_index``), ``edit_mask`` (U,), ``extracted_before`` / ``extracted_after`` per localized sequence; apply
    the edit with ``with edited(model, result): ...``.
    """
    return run_probe(PROBE, target, data, cfg, save=save, progress=progress, log=log, **options)
