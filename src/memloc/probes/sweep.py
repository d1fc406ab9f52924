"""The layer sweep both rewinding and retraining are made of.

For one layer at a time, put other tensors into that layer (its weights from an
earlier epoch, or its initialisation, then trained) and measure clean-train,
noisy-train, rare-train and test accuracy of the whole model. This module holds
what the two probes share:

- `split_at(model, layer)`: the model cut into a prefix (everything that runs
  before the layer) and a suffix (the layer and everything after it), by
  torch.fx. For a fixed input the prefix output does not depend on the layer,
  so it is computed once and reused for every state the layer is given.
  Models that fx cannot trace fall back to full forward passes (same numbers).
- `sweep_states(...)`: the predictions of the model for many states of one
  layer, batch by batch: each batch is read and pushed through the prefix once.
- `subset_accuracy(...)`: predictions -> accuracy per subset (`SUBSETS`).
- partial progress (`load_partial` / `save_partial`) so a killed probe resumes
  with the layers it had not finished.
"""

from __future__ import annotations

import contextlib
import json
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import data as data_mod
from ..data import Dataset
from ..errors import ConfigError
from ..models import Layer
from ..cutting import split_at
from ..runs import RunDir, load_npz, save_npz
from ..precision import autocast
from ..training import model_input

SUBSETS = ("clean_train", "noisy_train", "rare_train", "test")

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
def sweep_states(model: nn.Module, x: torch.Tensor, layer: Layer | None, states: Sequence[Mapping[str, torch.Tensor]],
                 *, batch_size: int = 1024, device: torch.device | None = None, split: bool = True,
                 on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Predicted classes (S, N) int64 of `model` with each of the S layer `states` in turn, for images x (N, C, H, W).

    Eval mode (BatchNorm on running statistics). Batch by batch: the prefix
    before `layer` runs once per batch and the suffix once per state, on a copy
    of the prefix output (an in-place op in the suffix must not spoil it for
    the next state). The model's tensors and train/eval flags are restored on
    exit, even on error. `layer=None` or `split=False`: full forward passes.
    """
    device = device or next(model.parameters()).device
    keys = sorted({k for s in states for k in s})
    own = model.state_dict()
    if any(set(s) != set(keys) for s in states):
        raise ConfigError("every state of a sweep must hold the same tensors")
    # the states on the device, stacked per tensor: (S, *shape)
    stacks = {k: torch.stack([s[k].to(device, own[k].dtype) for s in states]) for k in keys}
    parts = split_at(model, layer) if (split and layer is not None) else None
    n = x.shape[0]
    out = torch.empty(len(states), n, dtype=torch.long, device=device)
    from .base import swapped_state
    with module_modes(model), swapped_state(model, {k: own[k] for k in keys}):
        model.eval()
        for xb, _, idx in data_mod.batches(x, torch.zeros(n, dtype=torch.long, device=x.device),
                                           batch_size=batch_size, device=device):
            xin = model_input(xb, device)
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
                out[si, idx] = logits.float().argmax(1)
            if on_batch is not None:
                on_batch(len(idx))
    return out


def subset_masks(data: Dataset) -> dict[str, torch.Tensor | None]:
    """(N,) bool masks of the training subsets; None for a subset that is empty or unknown."""
    noisy = data.is_noisy if data.noise_known else None
    clean = ~data.is_noisy if data.noise_known else torch.ones_like(data.is_noisy)
    masks = {"clean_train": clean, "noisy_train": noisy, "rare_train": data.is_rare}
    return {k: (m if m is not None and bool(m.any()) else None) for k, m in masks.items()}


def subset_accuracy(pred_train: torch.Tensor, pred_test: torch.Tensor, data: Dataset) -> np.ndarray:
    """Accuracy (S, len(SUBSETS)) float64 from predictions (S, N_train), (S, N_test); NaN for an empty subset.

    Training subsets are scored against the given labels (a noisy example
    counts as correct when the model predicts its wrong, memorized label).
    """
    masks = subset_masks(data)
    y = data.y_train.to(pred_train.device)
    correct = pred_train == y  # (S, N)
    cols = []
    for name in SUBSETS[:3]:
        m = masks[name]
        if m is None:
            cols.append(torch.full((pred_train.shape[0],), float("nan"), dtype=torch.float64))
        else:
            m = m.to(correct.device)
            cols.append((correct & m).sum(1).double().cpu() / int(m.sum()))
    if pred_test.shape[1]:
        cols.append((pred_test == data.y_test.to(pred_test.device)).double().mean(1).cpu())
    else:
        cols.append(torch.full((pred_train.shape[0],), float("nan"), dtype=torch.float64))
    return torch.stack(cols, 1).numpy()  # (S, 4)


def evaluate_subsets(model: nn.Module, data: Dataset, *, batch_size: int = 1024,
                     device: torch.device | None = None) -> np.ndarray:
    """Accuracy (len(SUBSETS),) of the model as it is, in eval mode; the model's flags are kept."""
    pt = sweep_states(model, data.x_train, None, [{}], batch_size=batch_size, device=device)
    pe = sweep_states(model, data.x_test, None, [{}], batch_size=batch_size, device=device)
    return subset_accuracy(pt, pe, data)[0]


# ----------------------------------------------------------------------------- results and resume

def accuracy_dict(acc: np.ndarray) -> dict[str, float | None]:
    """(len(SUBSETS),) -> {"clean_train_acc": ..., ...} with None for NaN (JSON-able)."""
    return {f"{s}_acc": (None if np.isnan(v) else round(float(v), 6)) for s, v in zip(SUBSETS, acc)}


def tidy_rows(layer_names: Sequence[str], steps: Sequence[int], acc: np.ndarray, *, step_name: str) -> list[dict]:
    """One row per (layer, step, subset) of acc (L, T, S); empty subsets left out."""
    rows = []
    for li, name in enumerate(layer_names):
        for ti, step in enumerate(steps):
            for si, sub in enumerate(SUBSETS):
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
