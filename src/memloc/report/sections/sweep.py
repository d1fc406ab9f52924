"""The section of a layer sweep (rewinding, retraining: one figure and its table per layer and epoch)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...core.figures import png
from ...core.runs import RunDir
from ..html import Figure, Section, Table
from ..words import task_words
from .generic import _probe


def _layer_sweep_section(run: RunDir, probe: str, command: str, title: str, draw: Callable,
                         caption: dict[str, str], table: dict[str, str]) -> Section:
    """The section of a layer sweep (rewinding, retraining): `draw(acc, names, epochs, subsets, task=...)` and its
    table; `caption` and `table` are worded per task."""
    sec, summary, arrays = _probe(run, probe, command, title)
    if summary is None:
        return sec
    task = task_words(run)
    acc, names, epochs, subsets = (arrays["accuracy"], list(arrays["layer_names"]), arrays["epochs"],
                                   [str(s) for s in arrays["subsets"]])
    sec.figures.append(Figure(probe, caption[task.name], png(draw(acc, names, epochs, subsets, task=task))))
    sec.tables.append(Table(probe, table[task.name], _layer_epoch_rows(acc, names, epochs, subsets)))
    return sec


def _layer_epoch_rows(acc: np.ndarray, names, epochs, subsets) -> list[dict]:
    """Tidy rows of a (layers, epochs, subsets) accuracy array: one per layer and epoch."""
    return [{"layer": n, "epoch": int(e), **{f"{s}_acc": float(acc[i, j, k]) for k, s in enumerate(subsets)}}
            for i, n in enumerate(names) for j, e in enumerate(epochs)]
