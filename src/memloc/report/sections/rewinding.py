"""The layer rewinding section: each layer put back to an earlier epoch, accuracy per layer and epoch."""

from __future__ import annotations

from functools import partial

import numpy as np

from ...core.figures import pyplot
from ..words import TASKS, TaskWords, _subset_title, layer_label
from .sweep import _layer_sweep_section


def _rewinding_figure(acc: np.ndarray, names: list[str], epochs: np.ndarray, subsets: list[str], *,
                      task: TaskWords = TASKS["classification"]):
    plt = pyplot()
    shown = [s for s in (task.reference, task.memorized, "test")
             if s in subsets and not np.all(np.isnan(acc[:, :, subsets.index(s)]))]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 0.35 * len(names) + 1.8), squeeze=False)
    for ax, s in zip(axes[0], shown):
        im = ax.imshow(100 * acc[:, :, subsets.index(s)], aspect="auto", cmap="viridis", vmin=0, vmax=100,
                       interpolation="nearest")
        step = max(1, len(epochs) // 8)
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
        ax.set_yticks(range(len(names)), [layer_label(i, n) for i, n in enumerate(names)])
        ax.set_xlabel("epoch the layer is rewound to")
        ax.set_title(_subset_title(s, task))
        ax.grid(False)
        fig.colorbar(im, ax=ax)
    axes[0][0].set_ylabel("rewound layer")
    return fig


rewinding_section = partial(
    _layer_sweep_section, probe="rewinding", command="rewind", title="Layer rewinding", draw=_rewinding_figure,
    caption={"classification": "Accuracy of the final model with one layer (rows) put back to its "
             "weights and BatchNorm statistics at an earlier epoch (columns). Look for the layers "
             "whose rewinding to before the learning window takes noisy-train down while "
             "clean-train stays: where the memorization sits.",
             "lm": "Extraction rates and held-out token accuracy of the final model with one "
             "layer (rows) put back to its weights at an earlier epoch (columns)."},
    table={"classification": "Accuracy per rewound layer and epoch",
           "lm": "Extraction rate (held-out token accuracy for test) per rewound layer and "
           "epoch"})
