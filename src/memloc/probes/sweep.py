"""The layer sweep both rewinding and retraining are made of.

For one layer at a time, put other tensors into that layer (its weights from an
earlier epoch, or its initialization, then trained) and measure the accuracy of
the whole model on every subset of the task (clean-train, noisy-train,
rare-train and test for classification). This module holds what the two
probes share:

- `sweep_states(...)`: whether the model's predictions match the targets, for
  many states of one layer, batch by batch: each batch is read and pushed
  through the part of the model before the layer once (`cutting.split_at`; the
  activations entering a layer do not depend on its state), the rest once per
  state. Models that fx cannot trace get full forward passes (same numbers).
- `sweep_accuracy(...)`: the same on both splits -> accuracy per subset
  (`Task.accuracy`, the one subset-accuracy function).
- `PrefixCache`: the activations entering one layer for every example, computed
  once, when nothing before the layer changes while the layer trains
  (retraining with frozen norms): training and evaluating then run only the
  rest of the model.
- partial progress (`load_partial` / `save_partial`) so a killed probe resumes
  with the layers it had not finished.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.cutting import split_at
from ..core.errors import ConfigError
from ..core.files import load_npz, save_npz
from ..core.layers import Layer
from ..core.precision import autocast, channels_last
from ..core.runs import RunDir
from ..core.tasks import Task
from ..tasks.classification import data as data_mod

Split = tuple[Callable[..., tuple], Callable[..., torch.Tensor]]


# ----------------------------------------------------------------------------- states of one layer

def layer_keys(model: nn.Module, layer: Layer, *, buffers: bool = True) -> list[str]:
    """State-dict names of `layer` (parameters; with `buffers`, its norm's statistics and batch counter)."""
    own = model.state_dict()
    keys = list(layer.params)
    if buffers:
        keys += list(layer.buffers)
        # the batch counter travels with the statistics (it drives BatchNorm's momentum=None averaging)
        keys += [f"{m}.num_batches_tracked" for m in layer.modules if f"{m}.num_batches_tracked" in own]
    return keys


def layer_state(state: Mapping[str, torch.Tensor], keys: Sequence[str], *, source: str = "the checkpoint") -> dict:
    """The tensors of `keys` from a full state dict; a missing one fails with one line."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConfigError(f"{source} has no tensor {missing[0]!r}: it comes from another model")
    return {k: state[k] for k in keys}


@contextlib.contextmanager
def module_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's train/eval flag on exit (`model.train(b)` would reset them all alike)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, t in flags:
            m.training = t


# ----------------------------------------------------------------------------- the sweep

@torch.no_grad()
def sweep_states(model: nn.Module, task: Task, split: str, layer: Layer | None,
                 states: Sequence[Mapping[str, torch.Tensor]], *, batch_size: int = 1024,
                 device: torch.device | None = None, cut: bool = True,
                 on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Hits (S, N) bool of `model` with each of the S layer `states` in turn, on the task's "train" or "test"
    examples: whether the prediction matches the given target (a memorized example: still memorized).

    Eval mode (BatchNorm on running statistics). Batch by batch: the prefix
    before `layer` runs once per batch and the suffix once per state, on a copy
    of the prefix output (an in-place op in the suffix must not spoil it for
    the next state). The model's tensors and train/eval flags are restored on
    exit, even on error. `layer=None` or `cut=False`: full forward passes.
    """
    device = device or next(model.parameters()).device
    x, y = (task.data.x_train, task.targets("given")) if split == "train" else (task.data.x_test, task.targets("test"))
    keys = sorted({k for s in states for k in s})
    own = model.state_dict()
    if any(set(s) != set(keys) for s in states):
        raise ConfigError("every state of a sweep must hold the same tensors")
    # the states on the device, stacked per tensor: (S, *shape)
    stacks = {k: torch.stack([s[k].to(device, own[k].dtype) for s in states]) for k in keys}
    parts = split_at(model, layer) if (cut and layer is not None) else None
    n = x.shape[0]
    out = torch.empty(len(states), n, dtype=torch.bool, device=device)
    from .base import swapped_state
    with module_modes(model), swapped_state(model, {k: own[k] for k in keys}):
        model.eval()
        for xb, yb, idx in data_mod.batches(x, y, batch_size=batch_size, device=device):
            xin = task.inputs(xb, device)
            idx = idx.to(device)
            with autocast(device):
                live = parts[0](xin) if parts is not None else None
            for si in range(len(states)):
                for k in keys:
                    own[k].copy_(stacks[k][si])
                # no weight cache: autocast would keep the bf16 copy of the first state's weights for every state
                with autocast(device, cache=False):
                    if parts is None:
                        logits = model(xin)
                    else:
                        args = live if si == len(states) - 1 else tuple(
                            a.clone() if isinstance(a, torch.Tensor) else a for a in live)
                        logits = parts[1](*args)
                out[si, idx] = task.match(task.predict(logits.float()), yb.to(device))
            if on_batch is not None:
                on_batch(len(idx))
    return out


def sweep_accuracy(model: nn.Module, task: Task, layer: Layer | None, states: Sequence[Mapping[str, torch.Tensor]],
                   *, batch_size: int = 1024, device: torch.device | None = None, cut: bool = True,
                   on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Accuracy (S, len(task.subsets)) of the model with each layer state (`sweep_states` on both splits)."""
    kw = dict(batch_size=batch_size, device=device, cut=cut, on_batch=on_batch)
    return task.accuracy(sweep_states(model, task, "train", layer, states, **kw),
                         sweep_states(model, task, "test", layer, states, **kw))


def evaluate_subsets(model: nn.Module, task: Task, *, batch_size: int = 1024,
                     device: torch.device | None = None) -> np.ndarray:
    """Accuracy (len(task.subsets),) of the model as it is, in eval mode; the model's flags are kept."""
    return sweep_accuracy(model, task, None, [{}], batch_size=batch_size, device=device)[0]


def memory_budget(device: torch.device) -> int:
    """Bytes a cache may take on `device`: a quarter of the GPU's free memory, an eighth of the host's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
    except (ValueError, OSError, AttributeError):
        return 2 << 30


class PrefixCache:
    """The values entering `layer` (the prefix's outputs, `cutting.split_at`) for every train and test example.

    Valid while nothing before the layer changes: every module before it frozen
    and in eval mode, inputs without augmentation (retraining with frozen
    norms). Built once in eval-sized batches in dataset order, under the
    arithmetic in force, so that `accuracy()` computes what `evaluate_subsets`
    computes with the full model, and a training batch through `suffix` what
    the full model gives on the same inputs (the prefix's per-example values
    do not depend on the batch it is in, up to the last bit of a convolution
    algorithm chosen per batch size). Values that are the same for every batch
    (a language model's positions) are kept once. `build` returns None when the
    model cannot be cut or the cache would not fit in `memory_budget`: callers
    then run the whole model.
    """

    def __init__(self, suffix, train: list, test: list, per_example: list[bool], task: Task, device: torch.device,
                 batch_size: int):
        self.suffix, self.train, self.test, self.per_example = suffix, train, test, per_example
        self.task, self.device, self.batch_size = task, device, batch_size

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, task: Task, layer: Layer, *, batch_size: int = 1024,
              device: torch.device | None = None, budget: int | None = None) -> "PrefixCache | None":
        device = device or next(model.parameters()).device
        parts = split_at(model, layer)
        if parts is None:
            return None
        budget = memory_budget(device) if budget is None else budget
        x_tr, x_te = task.data.x_train, task.data.x_test
        n_all = int(x_tr.shape[0]) + int(x_te.shape[0])

        def prefix(xb: torch.Tensor) -> tuple:
            with autocast(device):
                return parts[0](task.inputs(xb.to(device, non_blocking=True), device))
        # which values are per example (a row per example, for one example and for a batch) and which are the
        # same for every batch (e.g. a language model's positions): those are kept once
        one, first = prefix(x_tr[:1]), prefix(x_tr[:batch_size])
        b = int(min(batch_size, x_tr.shape[0]))
        if b < 2 or not all(isinstance(t, torch.Tensor) for t in first):
            return None
        per_example = [t.dim() > 0 and t.shape[0] == b and u.dim() > 0 and u.shape[0] == 1 for t, u in zip(first, one)]
        if not any(per_example):
            return None
        bytes_per_example = sum(t[0].numel() * t.element_size() for t, p in zip(first, per_example) if p)
        if bytes_per_example * n_all > budget:
            return None
        store: dict[str, list] = {}
        for split, x in (("train", x_tr), ("test", x_te)):
            chunks = [[t.detach() for t in (first if split == "train" and start == 0 else prefix(x[start:start + b]))]
                      for start in range(0, int(x.shape[0]), b)]
            store[split] = [torch.cat([c[i] for c in chunks]) if p else first[i].detach()
                            for i, p in enumerate(per_example)] if chunks else []
        return cls(parts[1], store["train"], store["test"], per_example, task, device, b)

    def _take(self, tensors: list, idx: torch.Tensor) -> tuple:
        """A fresh copy of each cached per-example value at positions `idx` (the suffix may work in place), in
        the layout of the arithmetic in force; the values shared by every batch as they are."""
        out = []
        for t, p in zip(tensors, self.per_example):
            if not p:
                out.append(t)
                continue
            v = t.index_select(0, idx.to(t.device))
            if v.dim() == 4 and channels_last(self.device):
                v = v.contiguous(memory_format=torch.channels_last)
            out.append(v)
        return tuple(out)

    def forward(self, idx: torch.Tensor, split: str = "train") -> torch.Tensor:
        """The model's outputs (B, ...) on the examples at positions `idx` of `split`, from the cache on (call it
        under autocast, as the model would be)."""
        return self.suffix(*self._take(self.train if split == "train" else self.test, idx))

    @torch.no_grad()
    def accuracy(self) -> np.ndarray:
        """Accuracy (len(task.subsets),) of the model as it is now, in eval mode; the modules' flags are kept."""
        hits = {}
        with module_modes(self.suffix):
            self.suffix.eval()
            for split, cached, y in (("train", self.train, self.task.targets("given")),
                                     ("test", self.test, self.task.targets("test"))):
                n = next((int(t.shape[0]) for t, p in zip(cached, self.per_example) if p), 0)
                out = torch.empty(1, n, dtype=torch.bool, device=self.device)
                for start in range(0, n, self.batch_size):
                    idx = torch.arange(start, min(n, start + self.batch_size), device=self.device)
                    with autocast(self.device):
                        logits = self.forward(idx, split)
                    target = y[idx.to(y.device)].to(self.device)
                    out[0, idx] = self.task.match(self.task.predict(logits.float()), target)
                hits[split] = out
        return self.task.accuracy(hits["train"], hits["test"])[0]


# ----------------------------------------------------------------------------- results and resume

def accuracy_dict(acc: np.ndarray, subsets: Sequence[str]) -> dict[str, float | None]:
    """(len(subsets),) -> {"<subset>_acc": ...} with None for NaN (JSON-able)."""
    return {f"{s}_acc": (None if np.isnan(v) else round(float(v), 6)) for s, v in zip(subsets, acc)}


def tidy_rows(layer_names: Sequence[str], steps: Sequence[int], acc: np.ndarray, subsets: Sequence[str], *,
              step_name: str) -> list[dict]:
    """One row per (layer, step, subset) of acc (L, T, S); empty subsets left out."""
    rows = []
    for li, name in enumerate(layer_names):
        for ti, step in enumerate(steps):
            for si, sub in enumerate(subsets):
                v = acc[li, ti, si]
                if not np.isnan(v):
                    rows.append({"layer": name, "layer_index": li, step_name: int(step), "subset": sub,
                                 "accuracy": round(float(v), 6)})
    return rows


def _partial_path(run: RunDir, probe: str):
    return run.probe_dir(probe) / "partial.npz"


def load_partial(run: RunDir | None, probe: str, settings: dict) -> dict[str, np.ndarray]:
    """Per-layer results a killed run of the probe left behind with the same settings ({} otherwise)."""
    if run is None:
        return {}
    p = run.path / "probes" / probe / "partial.npz"
    if not p.exists():
        return {}
    try:
        z = load_npz(p)
    except Exception:  # a corrupt leftover is just recomputed
        return {}
    if "settings" not in z or json.loads(str(z["settings"])) != json.loads(json.dumps(settings)):
        return {}
    return {str(k)[len("layer:"):]: v for k, v in z.items() if str(k).startswith("layer:")}


def save_partial(run: RunDir | None, probe: str, settings: dict, done: Mapping[str, np.ndarray]) -> None:
    """Atomically record the finished layers (the resume point)."""
    if run is None:
        return
    save_npz(_partial_path(run, probe), settings=np.array(json.dumps(settings)),
             **{f"layer:{k}": v for k, v in done.items()})


def clear_partial(run: RunDir | None, probe: str) -> None:
    if run is not None:
        p = run.path / "probes" / probe / "partial.npz"
        if p.exists():
            p.unlink()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img"):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False)
