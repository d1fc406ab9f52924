"""Drawing helpers shared by the report and the probes: matplotlib on demand, PNG bytes, image galleries.

matplotlib is imported inside these functions only (the core import stays light);
`png` writes no version stamp, so a figure rebuilt from the same files is the
same bytes.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend, with the report's style."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: rebuilds are identical
    plt.close(fig)
    return buf.getvalue()


def gallery_figure(images: np.ndarray, titles: Sequence[str], *, colors: Sequence[str] | None = None,
                   suptitle: str | None = None, columns: int = 8):
    """A grid of images (T, C, H, W) (uint8, or floats in [0, 1]) with a small title each."""
    plt = pyplot()
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        img = np.asarray(images[k]).astype(np.float32)
        img = img / 255.0 if np.asarray(images).dtype == np.uint8 else img
        if img.ndim == 3:  # (C, H, W) -> (H, W[, C])
            img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        ax.set_title(titles[k], fontsize=7, color=colors[k] if colors is not None else "black")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig
