"""Drawing helpers shared by the report and the probes: matplotlib on demand, PNG bytes, example galleries.

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
    """A grid of examples with a small title each, drawn as their shape allows: images (T, C, H, W) (uint8, or
    floats: [0, 1] as they are, any other range scaled to it), sequences (T, C, L) and features (T, F) as line
    plots, anything else as the first values in text. Never fails on the data's shape."""
    plt = pyplot()
    images = np.asarray(images)
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.5 * rows), squeeze=False)
    lo, hi = _display_range(images)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k >= n:
            continue
        example = images[k]
        if example.ndim == 3:
            _draw_image(ax, example, images.dtype, lo, hi)
        elif example.ndim in (1, 2) and example.shape[-1] > 1:
            _draw_lines(ax, example, lo, hi)
        else:
            _draw_text(ax, example)
        ax.set_title(titles[k], fontsize=7, color=colors[k] if colors is not None else "black")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig


def _display_range(examples: np.ndarray) -> tuple[float, float]:
    """The value range every example is drawn in: [0, 1] for pixels (uint8 is divided by 255), else the gallery's
    own minimum and maximum (one scale, so examples compare)."""
    if examples.dtype == np.uint8 or not examples.size:
        return 0.0, 1.0
    finite = examples[np.isfinite(examples)] if examples.dtype.kind == "f" else examples
    if not finite.size:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0 and hi <= 1:
        return 0.0, 1.0
    return lo, hi if hi > lo else lo + 1.0


def _draw_image(ax, img: np.ndarray, dtype, lo: float, hi: float) -> None:
    """(C, H, W): gray for one channel, RGB(A) for 3 (4), the first channel of any other count."""
    img = img.astype(np.float32)
    img = img / 255.0 if dtype == np.uint8 else (img - lo) / (hi - lo)
    img = np.clip(img, 0, 1)
    img = img[0] if img.shape[0] not in (3, 4) else img.transpose(1, 2, 0)  # (H, W) or (H, W, C)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)


def _draw_lines(ax, example: np.ndarray, lo: float, hi: float, max_channels: int = 8) -> None:
    """(L,) or (C, L): one line per channel (the first `max_channels`), on the gallery's value range."""
    lines = np.atleast_2d(example.astype(np.float32))[:max_channels]  # (C, L)
    if example.dtype == np.uint8:
        lines, lo, hi = lines / 255.0, 0.0, 1.0
    ax.axis("on")
    for line in lines:
        ax.plot(np.arange(line.shape[0]), line, linewidth=0.7)
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _draw_text(ax, example: np.ndarray, max_values: int = 6) -> None:
    """Any other shape: its shape and first values, as text."""
    flat = example.reshape(-1)
    values = ", ".join(f"{v:.3g}" for v in flat[:max_values].astype(np.float64)) + (", ..." if flat.size > max_values
                                                                                     else "")
    ax.text(0.5, 0.5, f"shape {tuple(example.shape)}\n{values}", ha="center", va="center", fontsize=6, wrap=True,
            transform=ax.transAxes)
