"""The flipping probe: the examples flipped and the others kept, the plan, `flip_units` over the search engine
(`search`), the result, its registration and `flip` (the semantics: `search`)."""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ...core.errors import ConfigError, DataError, RunError
from ...core.example_files import check_indices
from ...core.layers import Layer, select_layers
from ...core.layers import layers as find_layers
from ...core.options import fitted
from ...core.precision import cudnn_autotune
from ...core.tasks import Task, task_of
from ..base import ProbeResult
from ..engine import Context, Probe, run_probe
from .config import PROBE_NAME, FlipConfig, FlipRecord, accuracy_names
from .search import _Flipper, _run_batched

# ----------------------------------------------------------------------------- example choice

def select_examples(data, kinds: Sequence[str], n: int, *, seed: int = 0, fit: Callable[[int, str], int] | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """`n` distinct training examples of each kind, a seeded choice; returns (indices (E,), kinds). `fit(available,
    kind)` gives the count for a kind with fewer than `n` (a default shrinks, `options.fitted`); without it, fewer
    is refused in one line."""
    task = task_of(data)
    masks = {k: task.kind_mask(k) for k in kinds}
    unknown = [k for k, m in masks.items() if m is None]
    if unknown:
        raise DataError(f"this run's data has no known noise mask, so its {' and '.join(unknown)} examples are "
                        "unknown: retrain with --noise-mask FILE, or pass --indices FILE")
    members = {k: m.cpu().numpy() for k, m in masks.items()}
    rng = np.random.default_rng(seed)
    taken = np.zeros(task.num_train, dtype=bool)
    out, out_kinds = [], []
    for k in kinds:
        pool = np.flatnonzero(members[k] & ~taken)
        if len(pool) == 0:
            hint = " (pass --rare-scores when training)" if k == "rare" else ""
            raise DataError(f"the run has no {k} training examples{hint}: choose other --kind")
        m = n
        if len(pool) < n:
            if fit is None:
                raise DataError(f"--examples {n} is more than the {len(pool)} {k} training examples available: "
                                f"pass --examples {len(pool)} or fewer")
            m = fit(len(pool), k)
        pick = np.sort(rng.choice(pool, size=m, replace=False))
        taken[pick] = True
        out.append(pick)
        out_kinds += [k] * m
    return np.concatenate(out).astype(np.int64), out_kinds


def kinds_of(data, indices: np.ndarray) -> list[str]:
    """The kind of each given example: the memorized kind first, then the others, the reference kind last
    (classification: noisy, then rare, else clean)."""
    task = task_of(data)
    n = task.num_train
    check_indices(indices, n)
    order = [task.memorized_kind] + [k for k in task.kinds if k not in (task.memorized_kind, task.reference_kind)]
    masks = [(k, m.cpu().numpy()) for k in order if (m := task.kind_mask(k)) is not None]
    return [next((k for k, m in masks if m[i]), task.reference_kind) for i in indices]


# ----------------------------------------------------------------------------- the public functions

def candidate_layers(model: nn.Module, cfg: FlipConfig) -> list[Layer]:
    """The layers whose units may be removed: `cfg.layers`, or all but the classifier (unless included).

    A transformer that names its layers (attention heads and MLP neurons as units) offers those by default:
    its embedding and unembedding features are not units (`--layers` may still name them)."""
    all_layers = find_layers(model)
    if cfg.layers:
        return select_layers(all_layers, list(cfg.layers))
    blocks = [l for l in all_layers if l.kind in ("attention", "mlp")]
    if blocks:
        return blocks + ([l for l in all_layers if l.kind == "unembedding"] if cfg.include_classifier else [])
    return all_layers if cfg.include_classifier or len(all_layers) == 1 else all_layers[:-1]


def _plan(model: nn.Module, data, cfg: FlipConfig, note: Callable[[str], None] | None = None):
    """Everything decided before any compute: candidates, examples, others, evaluation points, budget. A default
    count larger than the data shrinks to it with one line to `note` (a Python warning without one); a count the
    user set is refused (`options.fitted`)."""
    task = task_of(data)
    data = task.data
    candidates = candidate_layers(model, cfg)
    total = sum(l.units for l in candidates)
    budget = cfg.max_units if cfg.max_units is not None else max(1, math.ceil(cfg.budget * total))
    budget = min(budget, total)
    if cfg.indices is not None:
        check_indices(cfg.indices, task.num_train)  # its file and line named, before the int64 array
        idx = np.asarray(cfg.indices, dtype=np.int64)
        kinds = kinds_of(task, idx)
    else:
        chosen = cfg.kinds if cfg.kinds is not None else (task.reference_kind, task.memorized_kind)
        for k in chosen:
            if k not in task.kinds:
                raise ConfigError(f"unknown kind {k!r}: choose from {', '.join(task.kinds)}, e.g. --kind "
                                  f"{task.reference_kind},{task.memorized_kind}")
        idx, kinds = select_examples(task, chosen, cfg.examples, seed=cfg.seed, fit=lambda available, kind: fitted(
            cfg, "examples", available, f"{kind} training examples available", note))
    n = task.num_train
    # drawn from all training examples, independently of the chosen ones, so that any two selections
    # (and the batched and sequential modes on a sample) share the same others
    rng = np.random.default_rng([cfg.seed, 1])
    others = np.sort(rng.choice(n, size=fitted(cfg, "others", n, "training examples", note), replace=False))
    if cfg.eval_subsample is not None:
        rng = np.random.default_rng([cfg.seed, 2])
        k = fitted(cfg, "eval_subsample", n, "training examples", note)
        ev_tr = np.sort(rng.choice(n, size=k, replace=False))
        nte = len(data.y_test)
        ev_te = np.sort(rng.choice(nte, size=min(nte, k), replace=False))
    else:
        ev_tr, ev_te = np.arange(n), np.arange(len(data.y_test))
    if not cfg.eval_test:
        ev_te = ev_te[:0]
    return candidates, budget, idx, kinds, others, ev_tr, ev_te


def flip_units(model: nn.Module, data, cfg: FlipConfig | None = None, *,
               done: Sequence[FlipRecord] = (), done_seconds: float = 0.0,
               on_chunk: Callable[[list[FlipRecord], float], None] | None = None,
               progress: bool = False, log: Callable[[str], None] | None = None,
               note: Callable[[str], None] | None = None, mine: Callable[[list], list] = list) -> ProbeResult | None:
    """Greedy unit removal for the chosen training examples of `model` (eval mode) on `data`.

    `done` are records of an earlier, interrupted call with the same config
    (those examples are skipped) and `done_seconds` the time it spent; `on_chunk`
    receives all records so far and the search time so far after each chunk of
    examples (to save them). The summary's time and rate count every call's
    search. `mine` picks this call's share of the (example, kind) list (a shard,
    `Partial.mine`): when the others' examples are not among the records, the
    call only adds its own to them (`on_chunk`) and returns None. The model is
    unchanged afterwards. A default count larger than the data shrinks to it with one line to `note` (else `log`;
    a Python warning without either).
    """
    cfg = cfg or FlipConfig()
    task = task_of(data)
    candidates, budget, idx, kinds, others, ev_tr, ev_te = _plan(model, task, cfg, note=note or log)
    fl = _Flipper(model, task, cfg, candidates, others, ev_tr, ev_te, budget)
    records = {r.index: r for r in done}
    with fl.masks.installed(), cudnn_autotune(False):
        base = fl.accuracies(torch.ones(1, fl.masks.total, device=fl.device))[0]  # the unedited model
    share = mine([(int(e), k) for e, k in zip(idx, kinds)])
    todo = [(e, k) for e, k in share if e not in records]
    if log:
        log(f"flipping {len(share)} examples{'' if len(share) == len(idx) else f' of {len(idx)} (a shard)'} "
            f"({len(share) - len(todo)} already done), {fl.masks.total} units in "
            f"{len(candidates)} layers, cap {budget} units, {len(others)} others, "
            f"{'sequential' if cfg.sequential else f'batches of {cfg.batch_examples}'}")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(share), initial=len(share) - len(todo), desc="flip", unit="example")
    t0 = time.perf_counter()

    def got(recs: list[FlipRecord]) -> None:
        for r in recs:
            records[r.index] = r
        if on_chunk:
            on_chunk(list(records.values()), done_seconds + time.perf_counter() - t0)

    try:
        chunk = 1 if cfg.sequential else cfg.batch_examples
        with cudnn_autotune(False):
            _run_batched(fl, todo, on_done=got, chunk=chunk, sequential=cfg.sequential,
                         tick=(lambda: bar.update(1)) if bar is not None else (lambda: None))
    finally:
        if bar is not None:
            bar.close()
    elapsed = done_seconds + time.perf_counter() - t0
    if any(int(e) not in records for e in idx):  # a shard: the other examples are flipped elsewhere
        return None
    ordered = [records[int(e)] for e in idx]
    return build_result(ordered, task, cfg, candidates, budget, base, elapsed=elapsed, num_others=len(others),
                        eval_sizes=(len(ev_tr), len(ev_te)), precision="bf16" if fl.bf16 else "fp32")



def build_result(records: list[FlipRecord], task: Task, cfg: FlipConfig, candidates: list[Layer], budget: int,
                 base: dict, *, elapsed: float | None = None, num_others: int = 0,
                 eval_sizes: tuple[int, int] = (0, 0), precision: str | None = None) -> ProbeResult:
    """Arrays, tidy rows and the summary of a list of records."""
    E, L = len(records), len(candidates)
    width = max([budget] + [r.num_units for r in records])
    pos = {l.index: j for j, l in enumerate(candidates)}
    ul = np.full((E, width), -1, dtype=np.int32)
    ui = np.full((E, width), -1, dtype=np.int32)
    counts = np.zeros((E, L), dtype=np.int32)
    acc_names = accuracy_names(task)
    accs = {k: np.full(E, np.nan) for k in acc_names}
    for i, r in enumerate(records):
        for j, (layer, unit) in enumerate(r.units):
            ul[i, j], ui[i, j] = layer, unit
            counts[i, pos[layer]] += 1
        for k in acc_names:
            v = r.acc.get(k)
            accs[k][i] = np.nan if v is None else v
    arrays = {
        "index": np.array([r.index for r in records], dtype=np.int64),
        "kind": np.array([r.kind for r in records]),
        "label": np.array([r.label for r in records], dtype=np.int64),
        "true_label": np.array([r.true_label for r in records], dtype=np.int64),
        "already_wrong": np.array([r.already_wrong for r in records], dtype=bool),
        "flipped": np.array([r.flipped for r in records], dtype=bool),
        "num_units": np.array([r.num_units for r in records], dtype=np.int64),
        "unit_layer": ul, "unit_index": ui, "layer_counts": counts,
        "layer_names": np.array([l.name for l in candidates]),
        "layer_index": np.array([l.index for l in candidates], dtype=np.int64),
        **{f"{k}_after": v for k, v in accs.items()},
    }
    rows = [{"index": r.index, "kind": r.kind, "label": r.label, "true_label": r.true_label,
             "already_wrong": int(r.already_wrong), "flipped": int(r.flipped), "num_units": r.num_units,
             "units": " ".join(f"{a}:{b}" for a, b in r.units),
             **{f"{k}_after": ("" if r.acc.get(k) is None else round(r.acc[k], 6)) for k in acc_names}}
            for r in records]
    kinds = {}
    for k in dict.fromkeys(r.kind for r in records):
        sel = np.array([r.kind == k and not r.already_wrong for r in records])
        n_units = arrays["num_units"][sel]
        fl = arrays["flipped"][sel]
        lc = counts[sel].sum(0)

        def drop(name):
            b = base.get(name)
            v = accs[name][sel]
            return None if b is None or not np.isfinite(v).any() else float(b - np.nanmean(v))
        kinds[k] = {
            "examples": int(sum(r.kind == k for r in records)),
            "already_wrong": int(sum(r.kind == k and r.already_wrong for r in records)),
            "searched": int(sel.sum()),
            "flipped": int(fl.sum()),
            "flipped_share": float(fl.mean()) if sel.any() else None,  # of the searched (not already wrong)
            "median_units": float(np.median(n_units)) if sel.any() else None,
            "mean_units": float(n_units.mean()) if sel.any() else None,
            "share_flipped_under_10": float((fl & (n_units < 10)).mean()) if sel.any() else None,
            "mean_train_acc_drop": drop("train_acc"),
            f"mean_{task.reference_kind}_train_acc_drop": drop(f"{task.reference_kind}_train_acc"),
            "mean_test_acc_drop": drop("test_acc"),
            "layer_share": [float(v) for v in (lc / max(1, lc.sum()))],
            "layers_used": int((lc > 0).sum()),
            "mean_layers_per_example": float((counts[sel] > 0).sum(1).mean()) if sel.any() else None,
        }
    summary = {
        "probe": PROBE_NAME, "settings": cfg.settings(), "mode": "sequential" if cfg.sequential else "batched",
        "precision": precision,
        "budget_units": budget, "candidate_units": int(sum(l.units for l in candidates)),
        "layers": [{"index": l.index, "name": l.name, "units": l.units} for l in candidates],
        "others": num_others, "eval_train_examples": eval_sizes[0], "eval_test_examples": eval_sizes[1],
        "accuracy_before": base, "kinds": kinds, "examples": E,
        "elapsed_s": None if elapsed is None else round(elapsed, 3),
        "examples_per_s": None if not elapsed else round(E / elapsed, 4),
    }
    return ProbeResult(PROBE_NAME, summary, arrays, rows)


def _to_json(r: FlipRecord) -> dict:
    return {"index": r.index, "kind": r.kind, "label": r.label, "true_label": r.true_label,
            "already_wrong": r.already_wrong, "flipped": r.flipped, "units": [list(u) for u in r.units], "acc": r.acc}


def _from_json(d: dict) -> FlipRecord:
    return FlipRecord(d["index"], d["kind"], d["label"], d["true_label"], d["already_wrong"], d["flipped"],
                      [tuple(u) for u in d["units"]], d["acc"])


def _check(model: nn.Module, data, cfg: FlipConfig, ctx: Context) -> None:
    _plan(model, data, cfg, note=lambda line: None)  # every bad input fails here, before anything is written


def _compute(model: nn.Module, data, cfg: FlipConfig, ctx: Context) -> ProbeResult:
    """Greedy removal resuming the records of an interrupted call (kept after every chunk of examples)."""
    _, state = ctx.partial.load()
    done = [_from_json(r) for r in state.get("records", [])]

    def save(records: list[FlipRecord], elapsed: float) -> None:
        ctx.partial.save(state={"records": [_to_json(r) for r in records], "seconds": round(elapsed, 3)})

    result = flip_units(model, data, cfg, done=done, done_seconds=float(state.get("seconds") or 0.0), on_chunk=save,
                        progress=ctx.progress, log=ctx.log, note=ctx.note, mine=ctx.partial.mine)
    if result is None:  # a shard: its records are saved (`on_chunk`)
        return None
    save(_records_of(result), result.summary["elapsed_s"] or 0.0)
    if ctx.epoch is not None:
        result.summary["epoch"] = ctx.epoch
    return result


def _describe(result: ProbeResult) -> list[str]:
    def pct(v):
        return "  -  " if v is None else f"{100 * v:5.1f}"
    return [f"{kind:6s} {k['examples']} examples: median {k['median_units']} units, "
            f"flipped {pct(k['flipped_share'])}%, "
            f"< 10 units {pct(k['share_flipped_under_10'])}%, train-acc drop {pct(k['mean_train_acc_drop'])} points, "
            f"{k['layers_used']} layers used" for kind, k in result.summary["kinds"].items()]


def _merge_states(states: list[dict]) -> dict:
    """The shards' records as one call's: every record once, the search seconds added up."""
    records = [r for s in states for r in s.get("records", [])]
    seen = [r["index"] for r in records]
    if len(set(seen)) != len(seen):
        raise RunError("two flipping shards hold the same example: they come from different splits; run the shards "
                       "again with --overwrite")
    return {"records": records, "seconds": round(sum(float(s.get("seconds") or 0.0) for s in states), 3)}


PROBE = Probe(PROBE_NAME, "flip", FlipConfig, _compute, check=_check, describe=_describe, guards=True,
              shards=True, merge_state=_merge_states,
              layers_option="layers", overwrite_help="replace a flipping probe made with other settings",
              help="greedy unit removal: the units to zero until each chosen example's prediction flips")


def flip(target, data=None, cfg: FlipConfig | None = None, *, overwrite: bool = False, save: bool = True,
         progress: bool = False, log: Callable[[str], None] | None = None, **options) -> ProbeResult:
    """Greedy unit removal (the paper's neuron flipping) on a run directory or on any trained model.

    `target`: a run directory (``memloc flip RUN``: its final model, or `epoch`; saved into the run, a rerun
    with the same settings continues an interrupted one, other settings over an existing probe need
    `overwrite`), or a trained model with its training `data`. `cfg` a :class:`FlipConfig`, or `options`
    its fields (e.g. ``examples=20, kinds=("noisy",), layers=[...]``). Result arrays (E examples):
    ``index`` (E,), ``num_units`` (E,), ``flipped`` (E,), ``unit_layer`` / ``unit_index`` (E, cap),
    ``layer_counts`` (E, L).
    """
    return run_probe(PROBE, target, data, cfg, overwrite=overwrite, save=save, progress=progress, log=log, **options)


def _records_of(result: ProbeResult) -> list[FlipRecord]:
    a = result.arrays
    out = []
    for i in range(len(a["index"])):
        n = int(a["num_units"][i])
        units = [(int(a["unit_layer"][i, j]), int(a["unit_index"][i, j])) for j in range(n)]
        acc = {k[:-6]: (None if not np.isfinite(a[k][i]) else float(a[k][i])) for k in a if k.endswith("_after")}
        out.append(FlipRecord(int(a["index"][i]), str(a["kind"][i]), int(a["label"][i]), int(a["true_label"][i]),
                              bool(a["already_wrong"][i]), bool(a["flipped"][i]), units, acc))
    return out
