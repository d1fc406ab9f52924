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

Result (`RUN/probes/rewinding/`): arrays.npz with `accuracy` (layers, epochs,
subsets), `layer_names`, `epochs`, `subsets`, `final` (subsets,); rewinding.csv
one row per (layer, epoch, subset); summary.json.
"""

from __future__ import annotations

import contextlib

import time
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..data import Dataset
from ..errors import ConfigError, RunError
from ..models import layers as find_layers, select_layers
from ..runs import RunDir
from .base import ProbeResult
from ..tasks import task_of
from .sweep import (accuracy_dict, clear_partial, evaluate_subsets, layer_keys, layer_state, load_partial,
                    progress_bar, save_partial, sweep_accuracy, tidy_rows)

PROBE = "rewinding"
States = Mapping[int, Mapping[str, torch.Tensor]] | Callable[[int], Mapping[str, torch.Tensor]]


def rewind_model(model: nn.Module, data: Dataset, states_by_epoch: States, *, epochs: Sequence[int] | None = None,
                 layers: Sequence[str] | None = None, keep_bn_stats: bool = False, batch_size: int = 1024,
                 progress: bool = False, run: RunDir | None = None, split: bool = True) -> ProbeResult:
    """Rewind each layer of the (final) `model` to each epoch's state and measure accuracy.

    `states_by_epoch`: {epoch: state dict} or a function epoch -> state dict
    (then `epochs` is required); only the layers' tensors are used. `layers`:
    names or indices (default all). With `run`, finished layers are recorded in
    RUN/probes/rewinding/partial.npz and a rerun with the same settings skips
    them. The model is unchanged afterwards, even on error. Nothing is written
    besides the partial record; `ProbeResult.save(run)` writes the result.
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
    settings = {"layers": [l.name for l in picked], "epochs": epochs, "keep_bn_stats": keep_bn_stats,
                "num_train": task.num_train, "num_test": int(len(task.data.x_test))}

    keys = {l.name: layer_keys(model, l, buffers=not keep_bn_stats) for l in picked}
    done = load_partial(run, PROBE, settings)
    todo = [l for l in picked if l.name not in done]
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
            save_partial(run, PROBE, settings, done)
            if bar is not None:
                bar.set_postfix_str(f"{layer.name} done")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0

    final = evaluate_subsets(model, task, batch_size=batch_size, device=device)
    acc = np.stack([done[l.name] for l in picked])  # (L, E, S)
    names = [l.name for l in picked]
    first = epochs.index(min(epochs))
    summary = {
        "probe": PROBE, "layers": names, "epochs": epochs, "keep_bn_stats": keep_bn_stats,
        "subsets": list(task.subsets), "final": accuracy_dict(final, task.subsets), "noise_known": task.known,
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
    return ProbeResult(PROBE, summary, arrays, tidy_rows(names, epochs, acc, task.subsets, step_name="epoch"))


def rewind(loaded, *, layers: Sequence[str] | None = None, epochs: Sequence[int] | None = None, every: int | None = None,
           keep_bn_stats: bool = False, batch_size: int = 1024, progress: bool = False, save: bool = True) -> ProbeResult:
    """Layer rewinding of a run (a LoadedRun from `open_run`, or a run directory path).

    `epochs`: which saved epochs (default all); `every`: every k-th saved epoch
    (the last one always included). Checks everything before any compute;
    with `save`, writes RUN/probes/rewinding/ and marks the stage done.
    """
    from ..experiment import open_run
    if not hasattr(loaded, "run"):
        loaded = open_run(loaded)
    run = loaded.run
    saved = run.saved_epochs()
    if len(saved) < 2:
        raise RunError(f"rewinding needs per-epoch checkpoints and {run.path} has {len(saved)}: "
                       "train with --checkpoint-every 1")
    chosen = choose_epochs(saved, epochs=epochs, every=every)
    model = loaded.model()  # the final model
    if layers:
        select_layers(find_layers(model), list(layers))  # unknown names fail before any compute
    with run.working(PROBE) if save else contextlib.nullcontext():
        result = rewind_model(model, loaded.data, run.load_checkpoint, epochs=chosen, layers=layers,
                              keep_bn_stats=keep_bn_stats, batch_size=batch_size, progress=progress, run=run)
        result.summary["run"] = str(run.path)
        result.summary["final_epoch"] = saved[-1]
        if save:
            result.save(run)
            clear_partial(run, PROBE)
            run.set_stage(PROBE, "done", seconds=result.summary["seconds"])
    return result


def choose_epochs(saved: Sequence[int], *, epochs: Sequence[int] | None = None, every: int | None = None) -> list[int]:
    """The epochs to rewind to, checked against the saved ones (one clear line if one is missing)."""
    if epochs is not None and every is not None:
        raise ConfigError("pass either --epochs or --every, not both")
    if epochs is not None:
        missing = [e for e in epochs if e not in saved]
        if missing:
            raise RunError(f"epoch {missing[0]} was not saved: the saved epochs are "
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
