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
* **Methods**: `methods`, one scoring function each (the losses, each method's definition and its
  defaults there), named in its table `SCORERS`.

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

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from torch import nn

from ...core.errors import ConfigError, DataError
from ...core.example_files import check_indices, indices_of, read_indices
from ...core.layers import Layer, select_layers
from ...core.layers import layers as find_layers
from ...core.options import INT64_MAX, check_ranges, fitted, given_option, names, option
from ...core.options import settings as option_settings
from ...core.tasks import task_of
from ...core.weights import Matrix, weight_matrices
from ..base import ProbeResult
from ..engine import Context, Probe, run_probe
from ..flipping.config import FlipConfig
from ..flipping.probe import _from_json, _merge_states, _to_json
from ..flipping.probe import candidate_layers as flip_candidates
from .edit import _cost, _cost_text, _heldout, _hits, _is_text, _rows, _share, scoped_edit, top_units
from .methods import RECOMPUTE_BELOW, SCORERS, _Localizer

PROBE_NAME = "localize"
ALL_METHODS = tuple(SCORERS)
METHODS = tuple(m for m, (_, kinds) in SCORERS.items() if "neurons" in kinds)  # the methods of neurons and heads
WEIGHT_METHODS = tuple(m for m, (_, kinds) in SCORERS.items() if "weights" in kinds)  # TinyMem's, the baseline
UNIT_KINDS = ("neurons", "weights")


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
    recompute: str = option("auto", "gradient checkpointing of a language model's blocks in the methods that "
                            "backpropagate (their activations computed again in the backward pass, not kept): auto "
                            f"(when fewer than {RECOMPUTE_BELOW} rows would fit a pass otherwise), on or off",
                            choices=("auto", "on", "off"), result=False)
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


def memorized_sequences(model: nn.Module, data, *, batch_size: int = 256, memo: dict | None = None) -> np.ndarray:
    """Indices (S,) of the training sequences of the memorized kind (canaries) that the model extracts in context.

    `memo`: where the extraction of every training row is kept (``memo["train_hits"]``, (N,) bool) for the caller
    to reuse as its measurement before an edit (the model unedited, no autocast either time), and read from when
    already there."""
    task = task_of(data)
    kind = task.kind_mask(task.memorized_kind)
    if kind is None:
        raise DataError(f"this run's data does not say which examples are {task.memorized_kind}: pass --indices FILE")
    kind = kind.cpu().numpy()
    if not kind.any():
        raise DataError(f"this run has no {task.memorized_kind} training sequences, so nothing memorized to localize: "
                        f"train with {task.memorized_kind}s, or pass --indices FILE")
    memo = {} if memo is None else memo
    if "train_hits" not in memo:
        memo["train_hits"] = _hits(model, task, "train", batch_size=batch_size)
    hits = memo["train_hits"].numpy()
    idx = np.flatnonzero(hits & kind)
    if not len(idx):
        raise DataError(f"the model extracts none of its {int(kind.sum())} {task.memorized_kind} training sequences: "
                        "nothing memorized to localize (train longer or with more repeats, or pass --indices FILE)")
    return idx


def _plan(model: nn.Module, data, cfg: LocalizeConfig, note: Callable[[str], None] | None = None,
          memo: dict | None = None
          ) -> tuple[list[Layer], list[Layer] | list[Matrix], int | list[int], np.ndarray, np.ndarray]:
    """Everything decided before any compute: candidate layers, their units (the layers themselves; with weights
    their matrices), k, the localized sequences and the others (a default count of them larger than the data shrinks
    with one line to `note`, `options.fitted`). `memo`: `memorized_sequences`'."""
    task = task_of(data)
    candidates = candidate_layers(model, cfg)
    units = weight_matrices(model, candidates) if cfg.units == "weights" else candidates
    k = units_to_zero(units, cfg)
    n = task.num_train
    if cfg.indices is not None:
        check_indices(cfg.indices, n, "sequence")  # its file and line named, before the int64 array
        seqs = np.asarray(cfg.indices, dtype=np.int64)
    else:
        seqs = memorized_sequences(model, task, batch_size=_rows(cfg, model, task.data.x_train, backward=False),
                                   memo=memo)
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


# ----------------------------------------------------------------------------- the probe

def localize_units(model: nn.Module, data, cfg: LocalizeConfig | None = None, *, progress: bool = False,
                   log: Callable[[str], None] | None = None, note: Callable[[str], None] | None = None,
                   resume: dict | None = None, memo: dict | None = None) -> ProbeResult | None:
    """Score every candidate unit of `model` for its memorized sequences with `cfg.method`, propose the top-k edit
    and measure extraction before and with it. The model is unchanged afterwards, even when this raises.

    `resume` (greedy only): `flip_units`'s done / done_seconds / on_chunk / mine, to continue an interrupted search
    or do one shard of it (then None is returned: the shard's records are kept by `on_chunk`). A default count
    larger than the data shrinks with one line to `note` (else `log`; a Python warning without either). `memo`: the
    extraction of every training row by this model, when a check before already measured it (`memorized_sequences`):
    the pass that chooses the sequences is the measurement before the edit, not repeated."""
    cfg = cfg or LocalizeConfig()
    memo = {} if memo is None else memo
    note = note or log
    log = log or (lambda s: None)
    task = task_of(data)
    candidates, units, k, seqs, others = _plan(model, task, cfg, note, memo)
    loc = _Localizer(model, task, cfg, units, seqs, others, k, log)
    what = f"weights in {len(units)} matrices of" if cfg.units == "weights" else "units in"
    log(f"localize: {cfg.method} on {len(seqs)} sequences, {loc.U} {what} {len(candidates)} layers, "
        f"{len(others)} others")
    t0 = time.perf_counter()
    score = SCORERS[cfg.method][0]
    if cfg.method == "greedy":  # flipping searches on its own frozen copy
        scores = score(loc, progress=progress, **(resume or {}))
        if scores is None:
            return None
    else:
        with loc.masks.installed(), loc.recomputing():
            scores = score(loc)
    scoring = time.perf_counter() - t0  # the method's own time; the before/after measurement is not in it
    scores = scores.double().numpy()
    rows = _rows(cfg, model, task.data.x_train, backward=False)
    train_before = memo.get("train_hits")  # the plan's pass over the unedited model: not measured again
    if train_before is None:
        train_before = _hits(model, task, "train", batch_size=rows)
    test_before, quality_before = _heldout(model, task, batch_size=rows, quality=cfg.until is not None)
    before = (train_before, test_before)
    sweep: list[dict] = []
    while True:
        top = top_units(scores, units, k)
        mask = np.ones(loc.U, dtype=np.float32)
        mask[top] = 0.0
        with scoped_edit(model, units, mask):
            test_after, quality = _heldout(model, task, batch_size=rows, quality=cfg.until is not None)
            after = (_hits(model, task, "train", batch_size=rows), test_after)
        if cfg.until is None:
            break
        if not sweep:
            sweep.append({"k": 0, "extracted": _share(before[0], loc.seqs), "quality": quality_before})
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
            t1 = time.perf_counter()
            with loc.masks.installed(), loc.recomputing():
                scores = score(loc).double().numpy()
            scoring += time.perf_counter() - t1
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
        return _weight_result(cfg, task, loc, candidates, units, k, scores, top, before, after, (scoring, elapsed))
    return _result(cfg, task, loc, candidates, k, scores, top, mask, before, after, (scoring, elapsed))


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


def _result(cfg, task, loc: _Localizer, candidates, k, scores, top, mask, before, after, times) -> ProbeResult:
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
        **seq_summary, **_times(times),
    }
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def _times(times: tuple[float, float]) -> dict:
    """scoring_s: the method's own time (every learning round of an --until search); elapsed_s: with the
    extraction of every training and held-out row before and with the edit."""
    return {"scoring_s": round(times[0], 3), "elapsed_s": round(times[1], 3)}


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
                   before, after, times) -> ProbeResult:
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
        **seq_summary, **_times(times),
    }
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def _check(model: nn.Module, data, cfg: LocalizeConfig, ctx: Context) -> None:
    # every bad input fails here, before anything is written; the extraction pass it makes is kept for `_compute`
    _plan(model, data, cfg, note=lambda line: None, memo=ctx.scratch)


def _compute(model: nn.Module, data, cfg: LocalizeConfig, ctx: Context) -> ProbeResult | None:
    resume = {}
    if cfg.method == "greedy" and ctx.partial is not None:  # greedy removal keeps its records: resumable, sharded
        _, state = ctx.partial.load()

        def save(records, elapsed: float) -> None:
            ctx.partial.save(state={"records": [_to_json(r) for r in records], "seconds": round(elapsed, 3)})
        resume = {"done": [_from_json(r) for r in state.get("records", [])],
                  "done_seconds": float(state.get("seconds") or 0.0), "on_chunk": save, "mine": ctx.partial.mine}
    result = localize_units(model, data, cfg, progress=ctx.progress, log=ctx.log, note=ctx.note, resume=resume,
                            memo=ctx.scratch)
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
            f"{pct(s['extracted_before'])} -> {pct(s['extracted_after'])} ({s.get('scoring_s', s['elapsed_s']):.1f}s "
            f"scoring, {s['elapsed_s']:.1f}s in all)",
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
