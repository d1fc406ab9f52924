"""Layer retraining (paper probe 3): reset one layer to its initialisation and train only it, on clean examples.

For each layer: start from the final model, put the layer (parameters and its
norm's statistics) back to epoch 0, freeze every other parameter
(`requires_grad` False) and every other BatchNorm (eval mode, so its running
statistics stay final), and train only the layer, its own norm in train mode,
on the clean training examples only: SGD with momentum, a one-cycle schedule
stepped per iteration (linear up to `lr` at `peak_epoch`, linear down to 0 at
the end). Accuracy on every subset is measured after the reset (epoch 0) and
after each epoch. The published code trained every layer (it set
`requires_grad` on copies) and trained on the noisy examples (it inverted the
clean mask twice); the tests rule out both.

Result (`RUN/probes/retraining/`): arrays.npz with `accuracy` (layers,
epochs + 1, subsets), `layer_names`, `epochs` (0..E), `subsets`, `final`;
retraining.csv one row per (layer, epoch, subset); summary.json.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import data as data_mod
from ..data import Dataset
from ..errors import ConfigError, DataError, RunError
from ..models import NORM_TYPES, Layer, layers as find_layers, select_layers
from ..runs import RunDir
from ..precision import autocast
from ..tasks import Task, task_of
from ..training import TrainConfig, epoch_seed, learning_rate, seeded
from .base import ProbeResult, swapped_state
from .sweep import (accuracy_dict, clear_partial, evaluate_subsets, layer_keys, layer_state, load_partial,
                    module_modes, progress_bar, save_partial, tidy_rows)

PROBE = "retraining"


@dataclass
class RetrainConfig:
    """How each layer is retrained (the paper: 20 epochs, one-cycle to lr 0.1 at epoch 10)."""

    epochs: int = 20
    lr: float = 0.1
    peak_epoch: float = 10
    batch_size: int = 512
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"retraining epochs must be at least 1, not {self.epochs}")
        if not (self.lr > 0) or math.isinf(self.lr):
            raise ConfigError(f"learning rate must be positive, not {self.lr}")
        if not (0 <= self.peak_epoch < self.epochs):
            raise ConfigError(f"--peak-epoch {self.peak_epoch} must lie in [0, {self.epochs}) (the retraining epochs)")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {self.batch_size}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ConfigError("momentum and weight decay must not be negative")

    def schedule(self) -> TrainConfig:
        """The one-cycle schedule as a TrainConfig for `training.learning_rate` (warm-up = peak_epoch / epochs)."""
        return TrainConfig(epochs=self.epochs, lr=self.lr, schedule="onecycle", warmup=self.peak_epoch / self.epochs,
                           batch_size=self.batch_size)


@contextlib.contextmanager
def only_layer_trainable(model: nn.Module, layer: Layer) -> Iterator[nn.Module]:
    """Inside: only `layer`'s parameters require grad, only its norm is in train mode; flags restored after."""
    grads = [(p, p.requires_grad) for p in model.parameters()]
    mine = set(layer.params)
    modules = dict(model.named_modules())
    with module_modes(model):
        try:
            for name, p in model.named_parameters():
                p.requires_grad_(name in mine)
            model.eval()  # every other BatchNorm, dropout, ...: frozen statistics, no dropout
            for m in layer.modules:
                if isinstance(modules[m], NORM_TYPES):
                    modules[m].train()  # the layer's own norm learns its statistics again
            yield model
        finally:
            for p, g in grads:
                p.requires_grad_(g)


def retrain_model(model: nn.Module, data: Dataset, init_state: Mapping[str, torch.Tensor],
                  cfg: RetrainConfig | None = None, *, layers: Sequence[str] | None = None, progress: bool = False,
                  run: RunDir | None = None, on_step: Callable[[torch.Tensor], None] | None = None) -> ProbeResult:
    """Retrain each layer of the (final) `model` from `init_state` (epoch 0) on the clean examples only.

    Each layer is reset, trained and put back (`swapped_state`), so the model is
    unchanged afterwards, even on error. `on_step(idx)` is called with the
    dataset positions (B,) of every training batch (for logging and tests).
    With `run`, finished layers are recorded in RUN/probes/retraining/partial.npz
    and a rerun with the same settings skips them.
    """
    cfg = cfg or RetrainConfig()
    task = task_of(data)
    ref, mem = task.reference_kind, task.memorized_kind
    reference = task.kind_mask(ref)
    if reference is None:
        raise DataError(f"retraining trains on the {ref} examples only and this run's {mem} examples are not known: "
                        "give the run a noise mask (--noise-mask) or use a run with injected noise")
    clean = torch.nonzero(reference.cpu()).flatten()  # dataset positions of the reference (clean) examples
    if len(clean) == 0:
        raise DataError(f"retraining needs {ref} training examples and every example of this run is {mem}")
    all_layers = find_layers(model)
    picked = select_layers(all_layers, list(layers) if layers else None)
    device = next(model.parameters()).device
    settings = {"layers": [l.name for l in picked], "epochs": cfg.epochs, "lr": cfg.lr, "peak_epoch": cfg.peak_epoch,
                "batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                "seed": cfg.seed, "num_train": task.num_train}
    resets = {l.name: layer_state(init_state, layer_keys(model, l), source="the initial state") for l in picked}
    done = load_partial(run, PROBE, settings)
    todo = [l for l in picked if l.name not in done]
    steps = math.ceil(len(clean) / cfg.batch_size)
    sched = cfg.schedule()
    bar = progress_bar(len(todo) * cfg.epochs * steps, "retrain", progress, unit="step")
    t0 = time.perf_counter()
    try:
        for layer in todo:
            done[layer.name] = _retrain_layer(model, task, layer, resets[layer.name], cfg, sched, clean, steps, device,
                                              bar, on_step)
            save_partial(run, PROBE, settings, done)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    final = evaluate_subsets(model, task, batch_size=cfg.eval_batch_size, device=device)
    names = [l.name for l in picked]
    acc = np.stack([done[n] for n in names])  # (L, E+1, S)
    summary = {
        "probe": PROBE, "layers": names, "epochs": cfg.epochs, "lr": cfg.lr, "peak_epoch": cfg.peak_epoch,
        "batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
        f"num_{ref}_trained_on": int(len(clean)), "subsets": list(task.subsets),
        "final": accuracy_dict(final, task.subsets),
        "after_reset": {n: accuracy_dict(acc[i, 0], task.subsets) for i, n in enumerate(names)},
        "after_retraining": {n: accuracy_dict(acc[i, -1], task.subsets) for i, n in enumerate(names)},
        "seconds": round(seconds, 3),
    }
    if not bool(task.kind_mask(mem).any()):
        summary["note"] = f"the run has no {mem} examples: {mem}-train accuracy is not measured"
    arrays = {"accuracy": acc, "layer_names": np.array(names), "epochs": np.arange(cfg.epochs + 1),
              "subsets": np.array(task.subsets), "final": final}
    return ProbeResult(PROBE, summary, arrays,
                       tidy_rows(names, range(cfg.epochs + 1), acc, task.subsets, step_name="epoch"))


def _retrain_layer(model: nn.Module, task: Task, layer: Layer, reset, cfg: RetrainConfig, sched: TrainConfig,
                   clean: torch.Tensor, steps: int, device: torch.device, bar, on_step) -> np.ndarray:
    """Accuracy (epochs + 1, S) of one layer's retraining; the model is restored on return."""
    rows = []
    with swapped_state(model, reset), only_layer_trainable(model, layer):
        params = [p for n, p in model.named_parameters() if n in set(layer.params)]
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        rows.append(evaluate_subsets(model, task, batch_size=cfg.eval_batch_size, device=device))
        for epoch in range(1, cfg.epochs + 1):
            with seeded(epoch_seed(cfg.seed, epoch), device):
                order = clean[torch.randperm(len(clean))]  # only clean positions ever enter a batch
            for step, (xb, yb, idx) in enumerate(data_mod.batches(task.data.x_train, task.targets("given"),
                                                                  batch_size=cfg.batch_size, order=order, device=device)):
                if on_step is not None:
                    on_step(idx)
                for g in opt.param_groups:
                    g["lr"] = learning_rate((epoch - 1) * steps + step, cfg.epochs * steps, sched)
                with autocast(device):
                    out = model(task.inputs(xb, device)).float()  # (B, K)
                loss = task.loss(out, yb).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
            rows.append(evaluate_subsets(model, task, batch_size=cfg.eval_batch_size, device=device))
            if bar is not None:
                acc = accuracy_dict(rows[-1], task.subsets)
                ref, mem = task.reference_kind, task.memorized_kind
                bar.set_postfix_str(f"{layer.name} ep {epoch} {ref} {_pct(acc[f'{ref}_train_acc'])} "
                                    f"{mem} {_pct(acc[f'{mem}_train_acc'])}")
    return np.stack(rows)  # (E+1, S)


def _pct(v) -> str:
    return " - " if v is None else f"{100 * v:.1f}"


def retrain(loaded, cfg: RetrainConfig | None = None, *, layers: Sequence[str] | None = None, progress: bool = False,
            save: bool = True) -> ProbeResult:
    """Layer retraining of a run (a LoadedRun from `open_run`, or a run directory path).

    Needs the final model and the initialisation: the epoch-0 checkpoint, or,
    for a run imported from a trained checkpoint without one, the
    initialisation rebuilt from the run's seed. With `save`, writes
    RUN/probes/retraining/ and marks the stage done.
    """
    from ..experiment import make_model, open_run
    cfg = cfg or RetrainConfig()
    if not hasattr(loaded, "run"):
        loaded = open_run(loaded)
    run = loaded.run
    saved = run.saved_epochs()
    if not saved:
        raise RunError(f"{run.path} has no checkpoints: retraining needs the trained model (train with `memloc train`)")
    if not loaded.data.noise_known:
        raise DataError(f"{run.path} has no noise mask: retraining trains on the clean examples only, so it needs "
                        "to know which are noisy (give --noise-mask when importing the run)")
    model = loaded.model()
    if layers:
        select_layers(find_layers(model), list(layers))  # unknown names fail before any compute
    if 0 in saved:
        init, init_source = run.load_checkpoint(0), "epoch 0 checkpoint"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(loaded.config.train.seed)
            init = make_model(loaded.config.model, loaded.data).state_dict()
        init_source = "rebuilt from the run's seed (no epoch 0 checkpoint)"
    with run.working(PROBE) if save else contextlib.nullcontext():
        result = retrain_model(model, loaded.data, init, cfg, layers=layers, progress=progress, run=run)
        result.summary.update(run=str(run.path), final_epoch=saved[-1], init=init_source)
        if save:
            result.save(run)
            clear_partial(run, PROBE)
            run.set_stage(PROBE, "done", seconds=result.summary["seconds"])
    return result
