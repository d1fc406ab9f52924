"""Layer retraining (paper probe 3): reset one layer to its initialization and train only it, on clean examples.

For each layer: start from the final model, put the layer (parameters and its
norm's statistics) back to epoch 0, freeze every other parameter
(`requires_grad` False) and every other BatchNorm (eval mode, so its running
statistics stay final), and train only the layer, its own norm in train mode,
on the clean training examples only: SGD with momentum, a one-cycle schedule
stepped per iteration (linear up to `lr` at `peak_epoch`, linear down to 0 at
the end). Accuracy on every subset is measured after the reset (epoch 0) and
after each epoch. The published code trained every layer (it set
`requires_grad` on copies) and trained on the noisy examples (it inverted the
clean mask twice); the tests rule out both by default, and both are controls
(`trainable` "all", `examples` "all": issue #38). Its other choices are options
(`bn_mode` "train": the whole model in train mode, every BatchNorm re-estimating
its statistics; `lr` 0.01; `stop_at` 1.0: early stop at 100% clean-train
accuracy), as is `reset` "reinit" (a fresh draw instead of the initialization).

Result (`RUN/probes/retraining/`): arrays.npz with `accuracy` (layers,
epochs + 1, subsets), `layer_names`, `epochs` (0..E), `subsets`, `final`;
retraining.csv one row per (layer, epoch, subset); summary.json.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, DataError, RunError
from ..core.layers import NORM_TYPES, Layer, select_layers
from ..core.layers import layers as find_layers
from ..core.options import INT64_MAX, check_ranges, fitted, given_option, names, option
from ..core.precision import autocast
from ..core.runs import RunDir
from ..core.tasks import Task, task_of
from ..core.training import TrainConfig, epoch_seed, learning_rate, seeded
from ..tasks.classification import data as data_mod
from ..tasks.experiment import make_model
from .base import ProbeResult, swapped_state
from .engine import Context, Partial, Probe, run_probe
from .sweep import (
    PrefixCache,
    accuracy_dict,
    evaluate_subsets,
    layer_keys,
    layer_state,
    module_modes,
    progress_bar,
    tidy_rows,
)

PROBE_NAME = "retraining"


@dataclass
class RetrainConfig:
    """How each layer is retrained (the paper: 20 epochs, one-cycle to lr 0.1 at epoch 10)."""

    epochs: int = option(20, "retraining epochs per layer", at_least=1)
    lr: float = option(0.1, "peak learning rate of the one-cycle schedule", above=0)
    peak_epoch: float | None = option(None, "epoch of the peak learning rate (default: half the epochs, the "
                                      "paper's 10 of 20)", at_least=0)
    batch_size: int = option(512, "training batch size (the default: all the clean examples where there are fewer)",
                             at_least=1)
    momentum: float = option(0.9, cli=False, at_least=0, below=1)
    weight_decay: float = option(5e-4, cli=False, at_least=0)
    optimizer: str = option("sgd", "sgd (momentum: the paper's) or adamw (betas 0.9, 0.95: language models)",
                            choices=("sgd", "adamw"))
    seed: int = option(0, "seed of the training order (and of --reset reinit)", at_least=0, at_most=INT64_MAX)
    bn_mode: str = option("frozen", "frozen: every other norm keeps its final statistics (the paper's text); train: "
                          "the whole model in train mode while the layer trains, so every BatchNorm re-estimates its "
                          "statistics on the retraining batches (what the published code did)",
                          choices=("frozen", "train"))
    reset: str = option("init", "init: the layer back to its initialization; reinit: a fresh random "
                        "initialization drawn with --seed", choices=("init", "reinit"))
    cache: bool = option(True, "recompute the layers before the retrained one at every step (by default their "
                         "outputs are computed once per layer: they are frozen; with --bn-mode frozen only)",
                         negate="--no-cache", result=False)
    trainable: str = option("layer", "layer: only the reset layer trains (the paper); all: every layer trains, the "
                            "reset one with them (the published code's requires_grad on copies; a control: on clean "
                            "examples the whole network then forgets the noisy labels; use with --bn-mode train)",
                            choices=("layer", "all"))
    examples: str = option("clean", "clean: retrain on the clean examples only (the paper); all: the noisy ones too, "
                           "with their noisy labels (the published code's clean mask inverted twice; a control)",
                           choices=("clean", "all"))
    stop_at: float | None = option(None, "stop a layer once its reference-train accuracy reaches this after an "
                                   "epoch (the published code: 1.0; later epochs repeat the stopped model's row)",
                                   above=0, at_most=1)
    eval_batch_size: int = option(1024, cli=False, result=False, at_least=1)
    layers: tuple[str, ...] | None = option(None, "comma-separated layer names or indices (default: all)",
                                            parse=names)
    device: str = option("auto", "auto, cpu or cuda", result=False)
    given: tuple[str, ...] | None = given_option()

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.peak_epoch is None:
            self.peak_epoch = self.epochs // 2 if self.epochs % 2 == 0 else self.epochs / 2
        if not (0 <= self.peak_epoch < self.epochs):
            raise ConfigError(f"peak_epoch (--peak-epoch) {self.peak_epoch:g} must lie in [0, {self.epochs}), the "
                              "retraining epochs: leave it out for half of them")
        if self.layers is not None:
            self.layers = tuple(str(n) for n in self.layers)

    def schedule(self) -> TrainConfig:
        """The one-cycle schedule as a TrainConfig for `training.learning_rate` (warm-up = peak_epoch / epochs)."""
        return TrainConfig(epochs=self.epochs, lr=self.lr, schedule="onecycle", warmup=self.peak_epoch / self.epochs,
                           batch_size=self.batch_size)


@contextlib.contextmanager
def only_layer_trainable(model: nn.Module, layer: Layer, bn_mode: str = "frozen",
                         trainable: str = "layer") -> Iterator[nn.Module]:
    """Inside: only `layer`'s parameters require grad (`trainable` "all": every parameter); flags and modes restored
    after.

    bn_mode "frozen": only the layer's own norm is in train mode (every other
    BatchNorm keeps its statistics, no dropout); "train": the whole model in
    train mode, as a model left in `train()` (every BatchNorm re-estimates its
    statistics on the batches, dropout active).
    """
    grads = [(p, p.requires_grad) for p in model.parameters()]
    mine = set(layer.params)
    modules = dict(model.named_modules())
    with module_modes(model):
        try:
            for name, p in model.named_parameters():
                p.requires_grad_(name in mine or trainable == "all")
            if bn_mode == "train":
                model.train()
            else:
                model.eval()  # every other BatchNorm, dropout, ...: frozen statistics, no dropout
                for m in layer.modules:
                    if isinstance(modules[m], NORM_TYPES):
                        modules[m].train()  # the layer's own norm learns its statistics again
            yield model
        finally:
            for p, g in grads:
                p.requires_grad_(g)


def reinitialize(model: nn.Module, layer: Layer, seed: int) -> None:
    """Draw the layer's tensors afresh: `reset_parameters()` of every module whose own parameters all belong to it.

    Seeded by (seed, layer index), independent of the global RNG (restored after).
    """
    mine = set(layer.params)
    device = next(model.parameters()).device
    done = False
    with seeded(epoch_seed(seed + 7_777, layer.index), device):
        for name, module in model.named_modules():
            own = [f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False)]
            if own and all(n in mine for n in own) and hasattr(module, "reset_parameters"):
                module.reset_parameters()
                done = True
    if not done:
        raise ConfigError(f"--reset reinit: layer {layer.name} has no module with reset_parameters(); "
                          "use --reset init")


def retrain_model(model: nn.Module, data: Any, init_state: Mapping[str, torch.Tensor],
                  cfg: RetrainConfig | None = None, *, layers: Sequence[str] | None = None, progress: bool = False,
                  partial: Partial | None = None, on_step: Callable[[torch.Tensor], None] | None = None,
                  note: Callable[[str], None] | None = None) -> ProbeResult | None:
    """Retrain each layer of the (final) `model` from `init_state` (epoch 0) on the clean examples only.

    Each layer is reset, trained and put back (`swapped_state`), so the model is
    unchanged afterwards, even on error. `on_step(idx)` is called with the
    dataset positions (B,) of every training batch (for logging and tests).
    `partial` keeps the finished layers, so that an interrupted call resumes
    with the others. A default batch size larger than the clean examples shrinks to them with one line to `note`
    (a Python warning without one; `options.fitted`).
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
    if cfg.examples == "all":  # the control: every training example, the memorized ones with their given labels
        clean = torch.arange(len(reference))
    trained_on = ref if cfg.examples == "clean" else f"all ({ref} and {mem}, with their given labels)"
    cfg = replace(cfg, batch_size=fitted(cfg, "batch_size", len(clean), f"{trained_on} training examples", note))
    all_layers = find_layers(model)
    picked = select_layers(all_layers, list(layers) if layers else None)
    device = next(model.parameters()).device
    resets = {l.name: layer_state(init_state, layer_keys(model, l), source="the initial state") for l in picked}
    partial = partial or Partial()
    done = dict(partial.load()[0])
    todo = [l for l in partial.mine(picked) if l.name not in done]  # this call's layers (all, or a shard's)
    steps = math.ceil(len(clean) / cfg.batch_size)
    sched = cfg.schedule()
    bar = progress_bar(len(todo) * cfg.epochs * steps, "retrain", progress, unit="step")
    t0 = time.perf_counter()
    try:
        for layer in todo:
            done[layer.name] = _retrain_layer(model, task, layer, resets[layer.name], cfg, sched, clean, steps, device,
                                              bar, on_step)
            partial.save(done)
    finally:
        if bar is not None:
            bar.close()
    if partial.sharded:  # a shard: the other layers are done elsewhere, `memloc merge` joins them
        return None
    seconds = time.perf_counter() - t0
    final = evaluate_subsets(model, task, batch_size=cfg.eval_batch_size, device=device)
    names = [l.name for l in picked]
    acc = np.stack([done[n] for n in names])  # (L, E+1, S)
    summary = {
        "probe": PROBE_NAME, "layers": names, "epochs": cfg.epochs, "lr": cfg.lr, "peak_epoch": cfg.peak_epoch,
        "batch_size": cfg.batch_size, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
        "bn_mode": cfg.bn_mode, "reset": cfg.reset, "stop_at": cfg.stop_at, "trainable": cfg.trainable,
        "examples": cfg.examples, f"num_{ref}_trained_on": int(reference.cpu()[clean].sum()),
        "num_trained_on": int(len(clean)), "trained_on": trained_on, "subsets": list(task.subsets),
        "final": accuracy_dict(final, task.subsets),
        "after_reset": {n: accuracy_dict(acc[i, 0], task.subsets) for i, n in enumerate(names)},
        "after_retraining": {n: accuracy_dict(acc[i, -1], task.subsets) for i, n in enumerate(names)},
        "seconds": round(seconds, 3),
    }
    if cfg.stop_at is not None:
        r = list(task.subsets).index(f"{ref}_train")
        summary["stopped_at_epoch"] = {n: _first_epoch(acc[i, 1:, r] >= cfg.stop_at) for i, n in enumerate(names)}
    if not bool(task.kind_mask(mem).any()):
        summary["note"] = f"the run has no {mem} examples: {mem}-train accuracy is not measured"
    arrays = {"accuracy": acc, "layer_names": np.array(names), "epochs": np.arange(cfg.epochs + 1),
              "subsets": np.array(task.subsets), "final": final}
    return ProbeResult(PROBE_NAME, summary, arrays,
                       tidy_rows(names, range(cfg.epochs + 1), acc, task.subsets, step_name="epoch"))


def _retrain_layer(model: nn.Module, task: Task, layer: Layer, reset, cfg: RetrainConfig, sched: TrainConfig,
                   clean: torch.Tensor, steps: int, device: torch.device, bar, on_step) -> np.ndarray:
    """Accuracy (epochs + 1, S) of one layer's retraining; the model is restored on return."""
    rows = []
    ref_key = f"{task.reference_kind}_train_acc"
    if cfg.trainable == "all":  # every tensor moves: all of them come back afterwards
        reset = {**{k: v.detach().clone() for k, v in model.state_dict().items()}, **reset}
    elif cfg.bn_mode == "train":  # every norm's statistics move: all buffers come back afterwards too
        reset = {**{k: v.detach().clone() for k, v in model.named_buffers()}, **reset}
    with swapped_state(model, reset), only_layer_trainable(model, layer, cfg.bn_mode, cfg.trainable):
        if cfg.reset == "reinit":
            reinitialize(model, layer, cfg.seed)
        params = [p for n, p in model.named_parameters() if n in set(layer.params) or cfg.trainable == "all"]
        if cfg.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        # frozen norms and layers before it, no augmentation: what enters the layer never changes, so it is
        # computed once
        cache = PrefixCache.build(model, task, layer, batch_size=cfg.eval_batch_size, device=device) \
            if cfg.bn_mode == "frozen" and cfg.trainable == "layer" and cfg.cache else None

        def evaluate() -> np.ndarray:
            return cache.accuracy() if cache is not None else \
                evaluate_subsets(model, task, batch_size=cfg.eval_batch_size, device=device)
        rows.append(evaluate())
        targets = task.targets("given")
        for epoch in range(1, cfg.epochs + 1):
            with seeded(epoch_seed(cfg.seed, epoch), device):
                order = clean[torch.randperm(len(clean))]  # only clean positions ever enter a batch (the paper)
            # from the cache only the positions and targets are read: no batch of images is copied
            inputs = targets[:, None] if cache is not None else task.data.x_train
            for step, (xb, yb, idx) in enumerate(data_mod.batches(inputs, targets, batch_size=cfg.batch_size,
                                                                  order=order, device=device)):
                if on_step is not None:
                    on_step(idx)
                for g in opt.param_groups:
                    g["lr"] = learning_rate((epoch - 1) * steps + step, cfg.epochs * steps, sched)
                with autocast(device):
                    out = (cache.forward(idx) if cache is not None else model(task.inputs(xb, device))).float()
                loss = task.loss(out, yb).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.update(1)
            rows.append(evaluate())
            acc = accuracy_dict(rows[-1], task.subsets)
            if bar is not None:
                ref, mem = task.reference_kind, task.memorized_kind
                bar.set_postfix_str(f"{layer.name} ep {epoch} {ref} {_pct(acc[ref_key])} "
                                    f"{mem} {_pct(acc[f'{mem}_train_acc'])}")
            if cfg.stop_at is not None and acc[ref_key] is not None and acc[ref_key] >= cfg.stop_at:
                if bar is not None:
                    bar.update((cfg.epochs - epoch) * steps)
                rows.extend([rows[-1]] * (cfg.epochs - epoch))  # the stopped model: the same accuracy after
                break
    return np.stack(rows)  # (E+1, S)


def _first_epoch(reached: np.ndarray) -> int | None:
    """1-based epoch of the first True (None: never)."""
    hits = np.flatnonzero(reached)
    return int(hits[0]) + 1 if len(hits) else None


def _pct(v) -> str:
    return " - " if v is None else f"{100 * v:.1f}"


def _init_state(model: nn.Module, data: Any, ctx: Context) -> tuple[Mapping[str, torch.Tensor], str]:
    """The initialization: the caller's `init_state`, the run's epoch-0 checkpoint, or rebuilt from its seed."""
    init = ctx.sources.get("init_state")
    if init is not None:
        if isinstance(init, (str, Path)):
            init = RunDir.open(init)
        if isinstance(init, RunDir):
            return init.load_checkpoint(0), f"epoch 0 checkpoint of {init.path}"
        return init, "the given init_state"
    if ctx.run is None:
        raise RunError("retraining needs the initialization: pass init_state= the model's state dict before "
                       "training (copy.deepcopy(model.state_dict())), or the RunDir memloc.train wrote (epoch 0)")
    if 0 in ctx.run.saved_epochs():
        return ctx.run.load_checkpoint(0), "epoch 0 checkpoint"
    loaded = ctx.loaded
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(loaded.config.train.seed)
        return make_model(loaded.config.model, loaded.data).state_dict(), \
            "rebuilt from the run's seed (no epoch 0 checkpoint)"


def _check(model: nn.Module, data: Any, cfg: RetrainConfig, ctx: Context) -> None:
    task = task_of(data)
    if task.kind_mask(task.reference_kind) is None:
        where = (f"{ctx.run.path} has no noise mask" if ctx.run is not None
                 else "the data's noisy examples are not known")
        raise DataError(f"{where}: retraining trains on the {task.reference_kind} examples only, so it needs to know "
                        f"which are {task.memorized_kind} (give --noise-mask when importing a run, or noise_mask= "
                        "to memloc.wrap_data)")
    if cfg.layers:
        select_layers(find_layers(model), list(cfg.layers))  # unknown names fail before any compute
    clean = int(task.kind_mask(task.reference_kind).sum())
    fitted(cfg, "batch_size", max(1, clean), f"{task.reference_kind} training examples", lambda line: None)
    if ctx.run is None:
        _init_state(model, data, ctx)


def _compute(model: nn.Module, data: Any, cfg: RetrainConfig, ctx: Context) -> ProbeResult | None:
    init, source = _init_state(model, data, ctx)
    result = retrain_model(model, data, init, cfg, layers=cfg.layers, progress=ctx.progress, partial=ctx.partial,
                           note=ctx.note)
    if result is None:  # a shard: its layers are kept in ctx.partial
        return None
    result.summary["init"] = source
    if ctx.epoch is not None:
        result.summary["final_epoch"] = ctx.epoch
    return result


def _describe(result: ProbeResult) -> list[str]:
    s = result.summary
    shown = [k for k, v in s["final"].items() if v is not None]
    alone = "every layer trained" if s.get("trainable") == "all" else "alone"
    on = s.get("trained_on", "clean")
    lines = [f"each layer reset to its initialization, then retrained ({alone}) {s['epochs']} epochs on "
             + (f"{on} examples only:" if s.get("examples", "clean") == "clean" else f"{on} examples:")]
    for name in s["layers"]:
        a, b = s["after_reset"][name], s["after_retraining"][name]
        lines.append(f"  {name:24s} " + "  ".join(f"{k[:-4].replace('_', '-')} {_pct(a[k])} -> {_pct(b[k])}"
                                                 for k in shown))
    return lines


PROBE = Probe(PROBE_NAME, "retrain", RetrainConfig, _compute, check=_check, describe=_describe, layers_option="layers",
              shards=True,
              help="layer retraining: reset one layer to init, train only it on clean examples")


def retrain(target: Any, data: Any = None, init_state: Any = None, cfg: RetrainConfig | None = None, *,
            save: bool = True, progress: bool = False, log: Callable[[str], None] | None = None,
            **options: Any) -> ProbeResult:
    """Layer retraining: each layer reset to its initialization and trained alone on the clean examples.

    `target`: a run directory (``memloc retrain RUN``; the initialization is its epoch-0 checkpoint, or
    rebuilt from its seed), or a trained model with its `data` and `init_state` (the state dict before
    training, ``copy.deepcopy(model.state_dict())``, or the RunDir :func:`memloc.train` wrote). `cfg` a
    :class:`RetrainConfig`, or `options` its fields (e.g. ``epochs=20, layers=[...]``). Needs the noisy
    examples known. Result arrays: ``accuracy`` (layers, epochs + 1, subsets).
    """
    return run_probe(PROBE, target, data, cfg, sources={"init_state": init_state}, save=save, progress=progress,
                     log=log, **options)
