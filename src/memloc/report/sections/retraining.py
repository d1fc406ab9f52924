"""The layer retraining section: each layer reset and retrained alone on the reference subset, per epoch."""

from __future__ import annotations

from functools import partial

import numpy as np

from ...core.figures import pyplot
from ..words import TASKS, TaskWords, _subset_style
from .sweep import _layer_sweep_section


def _retraining_figure(acc: np.ndarray, names: list[str], epochs: np.ndarray, subsets: list[str], *,
                       task: TaskWords = TASKS["classification"]):
    plt = pyplot()
    cols = min(5, len(names))
    rws = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rws, cols, figsize=(2.6 * cols, 2.2 * rws + 0.4), sharex=True, sharey=True, squeeze=False)
    for i, n in enumerate(names):
        ax = axes[i // cols][i % cols]
        for s in (task.reference, task.memorized, "test"):
            if s in subsets:
                label, color = _subset_style(s, task)
                ax.plot(epochs, 100 * acc[i, :, subsets.index(s)], color=color, label=label)
        ax.set_title(f"{i + 1} {n}", fontsize=8)
        ax.set_ylim(-2, 102)
    for j in range(len(names), rws * cols):
        axes[j // cols][j % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("retraining epoch")
    for r in axes:
        r[0].set_ylabel("accuracy (%)" if task.name == "classification" else "rate (%)")
    axes[0][0].legend(fontsize=7)
    return fig


retraining_section = partial(
    _layer_sweep_section, probe="retraining", command="retrain", title="Layer retraining", draw=_retraining_figure,
    caption={"classification": "Each layer reset to its initialization and retrained alone on "
             "the clean examples only (every other layer frozen): accuracy per retraining epoch. "
             "Look for noisy-train coming back without a noisy example seen (the paper: most "
             "layers). Only a layer whose reset took noisy-train below 90% (epoch 0 here) can "
             "come back; one the reset left above it was never lost and is not counted. "
             "RESULTS.md has which retraining choices decide it.",
             "lm": "Each layer reset to its initialization and retrained alone on the corpus "
             "sequences only (every other layer frozen): extraction rates and held-out token "
             "accuracy per retraining epoch."},
    table={"classification": "Accuracy per retrained layer and epoch",
           "lm": "Extraction rate (held-out token accuracy for test) per retrained layer and "
           "epoch"})
