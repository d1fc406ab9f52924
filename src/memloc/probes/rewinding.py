"""Layer rewinding (paper probe 2): one layer back to an earlier epoch inside the final model.

For every layer and every saved epoch, the layer's parameters and its
BatchNorm statistics (unless `keep_bn_stats`) are put back to their values at
that epoch, the rest of the final model is kept, and clean-train, noisy-train,
rare-train and test accuracy are measured (eval mode). Unlike the published
code, the BatchNorm statistics travel with the weights by default, and every
saved epoch is checked, not 0-14 in steps of 2.

Speed: the activations entering a layer do not depend on the layer's state, so
for each batch the part of the model before the layer runs once and only the
rest runs once per epoch (`sweep.split_at`); the data is read once per layer.

Needs the per-epoch states: a run's checkpoints, or `states=` ({epoch: state
dict}, or a run directory `memloc.train(..., run=PATH)` wrote) with a model in hand.

Result (`RUN/probes/rewinding/`): arrays.npz with `accuracy` (layers, epochs,
subsets), `layer_names`, `epochs`, `subsets`, `final` (subsets,); rewinding.csv
one row per (layer, epoch, subset); summary.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, RunError
from ..core.layers import layers as find_layers
from ..core.layers import select_layers
from ..core.options import check_ranges, ints, names, option
from ..core.runs import RunDir
from ..core.tasks import task_of
from .base import ProbeResult
from .engine import Context, Partial, Probe, run_probe
from .sweep import accuracy_dict, evaluate_subsets, layer_keys, layer_state, progress_bar, sweep_accuracy, tidy_rows

PROBE_NAME = "rewinding"
States = Mapping[int, Mapping[str, torch.Tensor]] | Callable[[int], Mapping[str, torch.Tensor]]


@dataclass
class RewindConfig:
    """Which layers go back to which saved epochs (default: every layer to every saved epoch)."""

    layers: tuple[str, ...] | None = option(None, "comma-separated layer names or indices (default: all)",
                                            parse=names)
    epochs: tuple[int, ...] | None = option(None, "comma-separated saved epochs to rewind to (default: all saved)",
                                            parse=ints, at_least=0)
    every: int | None = option(None, "every K-th saved epoch (the last one always included)", at_least=1)
    keep_bn_stats: bool = option(False, "leave the BatchNorm statistics final (weights only)")
    batch_size: int = option(1024, "evaluation batch size", result=False, at_least=1)
    device: str = option("auto", "auto, cpu or cuda", result=False)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.layers is not None:
            self.layers = tuple(str(n) for n in self.layers)
        if self.epochs is not None:
            self.epochs = tuple(int(e) for e in self.epochs)
        if self.epochs is not None and self.every is not None:
            raise ConfigError("pass either --epochs or --every, not both")


def rewind_model(model: nn.Module, data: Any, states_by_epoch: States, *, epochs: Sequence[int] | None = None,
                 layers: Sequence[str] | None = None, keep_bn_stats: bool = False, batch_size: int = 1024,
                 progress: bool = False, partial: Partial | None = None, split: bool = True) -> ProbeResult | None:
    """Rewind each layer of the (final) `model` to each epoch's state and measure accuracy.

    `states_by_epoch`: {epoch: state dict} or a function epoch -> state dict
    (then `epochs` is required); only the layers' tensors are used. `layers`:
    names or indices (default all). `partial` keeps the finished layers, so
    that an interrupted call resumes with the others. The model is unchanged
    afterwards, even on error.
    """
    if epochs is None:
        if callable(states_by_epoch):
            raise ConfigError("pass the epochs to rewind to when the states come from a function")
        epochs = sorted(states_by_epoch)
    epochs = [int(e) for e in epochs]
    if not epochs:
        raise ConfigError("no epochs to rewind to: pass at least one saved epoch")
    if len(set(epochs)) != len(epochs):
        raise ConfigError(f"epochs to rewind to are repeated: {epochs}")
    get = states_by_epoch if callable(states_by_epoch) else (lambda e: states_by_epoch[e])
    if not callable(states_by_epoch):
        missing = [e for e in epochs if e not in states_by_epoch]
        if missing:
            raise ConfigError(f"no state for epoch {missing[0]}: the states hold epochs {sorted(states_by_epoch)}")
    task = task_of(data)
    all_layers = find_layers(model)
    picked = select_layers(all_layers, list(layers) if layers else None)
    device = next(model.parameters()).device

    keys = {l.name: layer_keys(model, l, buffers=not keep_bn_stats) for l in picked}
    partial = partial or Partial()
    done = dict(partial.load()[0])
    todo = [l for l in partial.mine(picked) if l.name not in done]  # this call's layers (all, or a shard's)
    t0 = time.perf_counter()
    # the layers' tensors at every epoch, read once per checkpoint (kept on the host until a layer is swept)
    per_epoch: dict[int, dict[str, torch.Tensor]] = {}
    if todo:
        wanted = sorted({k for l in todo for k in keys[l.name]})
        for e in epochs:
            per_epoch[e] = layer_state(get(e), wanted, source=f"the state of epoch {e}")
    n_all = task.num_train + int(len(task.data.x_test))
    bar = progress_bar(n_all * len(todo), "rewind", progress)
    try:
        for layer in todo:
            states = [{k: per_epoch[e][k] for k in keys[layer.name]} for e in epochs]
            tick = bar.update if bar is not None else None
            done[layer.name] = sweep_accuracy(model, task, layer, states, batch_size=batch_size, device=device,
                                              cut=split, on_batch=tick)  # (E, S)
            partial.save(done)
            if bar is not None:
                bar.set_postfix_str(f"{layer.name} done")
    finally:
        if bar is not None:
            bar.close()
    if partial.sharded:  # a shard: the other layers are done elsewhere, `memloc merge` joins them
        return None
    seconds = time.perf_counter() - t0

    final = evaluate_subsets(model, task, batch_size=batch_size, device=device)
    acc = np.stack([done[l.name] for l in picked])  # (L, E, S)
    names = [l.name for l in picked]
    first = epochs.index(min(epochs))
    summary = {
        "probe": PROBE_NAME, "layers": names, "epochs": epochs, "keep_bn_stats": keep_bn_stats,
        "subsets": list(task.subsets), "final": accuracy_dict(final, task.subsets), "memorized_known": task.known,
        # headline: each layer rewound to the earliest epoch asked for
        "earliest_epoch": min(epochs),
        "at_earliest_epoch": {n: accuracy_dict(acc[i, first], task.subsets) for i, n in enumerate(names)},
        "seconds": round(seconds, 3),
    }
    memorized = task.kind_mask(task.memorized_kind)
    if memorized is None or not bool(memorized.any()):
        summary["note"] = (f"no known {task.memorized_kind} examples: {task.memorized_kind}-train accuracy is not "
                           f"measured (the other subsets are)")
    arrays = {"accuracy": acc, "layer_names": np.array(names), "epochs": np.array(epochs),
              "subsets": np.array(task.subsets), "final": final}
    return ProbeResult(PROBE_NAME, summary, arrays, tidy_rows(names, epochs, acc, task.subsets, step_name="epoch"))


def _states(model: nn.Module, ctx: Context) -> tuple[Callable[[int], Mapping[str, torch.Tensor]], list[int]]:
    """The per-epoch states (a getter and the epochs it has): the run's checkpoints, or the caller's `states`."""
    states = ctx.sources.get("states")
    if ctx.run is None and states is None:
        raise RunError("rewinding needs training history: pass states= a RunDir that memloc.train(..., run=PATH) "
                       "wrote per-epoch checkpoints into, or {epoch: state_dict}")
    if states is None or isinstance(states, (str, Path, RunDir)):
        run = ctx.run if states is None else (states if isinstance(states, RunDir) else RunDir.open(states))
        saved = run.saved_epochs()
        if len(saved) < 2:
            fix = "train with --checkpoint-every 1" if states is None else "train with memloc.train(..., run=PATH)"
            raise RunError(f"rewinding needs per-epoch checkpoints and {run.path} has {len(saved)}: {fix}")
        return run.load_checkpoint, saved
    if isinstance(states, Mapping):
        if not states:
            raise ConfigError("states holds no epochs: pass {epoch: state_dict} with at least one epoch")
        return (lambda e: states[e]), sorted(int(e) for e in states)
    raise ConfigError(f"states must be a RunDir, a run path or {{epoch: state_dict}}, not {type(states).__name__}")


def _check(model: nn.Module, data: Any, cfg: RewindConfig, ctx: Context) -> None:
    _, saved = _states(model, ctx)
    choose_epochs(saved, epochs=cfg.epochs, every=cfg.every)
    if cfg.layers:
        select_layers(find_layers(model), list(cfg.layers))  # unknown names fail before any compute


def _compute(model: nn.Module, data: Any, cfg: RewindConfig, ctx: Context) -> ProbeResult | None:
    get, saved = _states(model, ctx)
    chosen = choose_epochs(saved, epochs=cfg.epochs, every=cfg.every)
    result = rewind_model(model, data, get, epochs=chosen, layers=cfg.layers, keep_bn_stats=cfg.keep_bn_stats,
                          batch_size=cfg.batch_size, progress=ctx.progress, partial=ctx.partial)
    if result is None:  # a shard: its layers are kept in ctx.partial
        return None
    result.summary["final_epoch"] = saved[-1]
    return result


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary
    shown = [k for k, v in s["final"].items() if v is not None]  # subsets this run measures

    def accs(acc: dict) -> str:
        return "  ".join(f"{k[:-4].replace('_', '-')} {_pct(acc[k])}" for k in shown)
    lines = ["final model: " + accs(s["final"]), f"each layer rewound to epoch {s['earliest_epoch']}:"]
    lines += [f"  {name:24s} {accs(acc)}" for name, acc in s["at_earliest_epoch"].items()]
    return lines


def _pct(v) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


PROBE = Probe(PROBE_NAME, "rewind", RewindConfig, _compute, check=_check, describe=_describe, layers_option="layers",
              shards=True,
              help="layer rewinding: each layer back to each saved epoch inside the final model")


def rewind(target: Any, data: Any = None, cfg: RewindConfig | None = None, *, states: Any = None, save: bool = True,
           progress: bool = False, log: Callable[[str], None] | None = None, **options: Any) -> ProbeResult:
    """Layer rewinding: each layer back to each earlier epoch inside the final model. Needs training history.

    `target`: a run directory (``memloc rewind RUN``; saved into it unless `save` is False), or a trained
    model with its `data` and `states` (a RunDir, or path, that :func:`memloc.train` wrote checkpoints
    into, or ``{epoch: state_dict}``). `cfg` a :class:`RewindConfig`, or `options` its fields (``layers``,
    ``epochs``, ``every``, ``keep_bn_stats``, ``batch_size``). Result arrays: ``accuracy`` (layers,
    epochs, subsets), ``layer_names``, ``epochs``, ``subsets``, ``final``.
    """
    return run_probe(PROBE, target, data, cfg, sources={"states": states}, save=save, progress=progress, log=log,
                     **options)


def choose_epochs(saved: Sequence[int], *, epochs: Sequence[int] | None = None, every: int | None = None) -> list[int]:
    """The epochs to rewind to, checked against the saved ones (one clear line if one is missing)."""
    if epochs is not None and every is not None:
        raise ConfigError("pass either --epochs or --every, not both")
    if epochs is not None:
        missing = [e for e in epochs if e not in saved]
        if missing:
            raise RunError(
                f"epoch {missing[0]} was not saved: the saved epochs are "
                f"{', '.join(map(str, saved)) if len(saved) <= 8 else f'{saved[0]}..{saved[-1]} ({len(saved)})'}")
        return sorted(set(int(e) for e in epochs))
    if every is not None:
        if every < 1:
            raise ConfigError(f"--every must be at least 1, not {every}")
        chosen = list(saved[::every])
        if saved[-1] not in chosen:
            chosen.append(saved[-1])
        return chosen
    return list(saved)
