"""The training sections of a run: learning curves and gradient accounting (clean against noisy, per layer)."""

from __future__ import annotations

import numpy as np

from ...core.figures import png, pyplot
from ...core.runs import RunDir
from ..html import Figure, Section, Table
from ..words import SUBSET_STYLE, _subset_style, layer_label, task_words


def learning_curves(run: RunDir) -> Section:
    sec = Section("Learning curves")
    task = task_words(run)
    metrics = run.read_metrics()
    if not metrics:
        sec.missing = f"no metrics.jsonl: train with `memloc train --out {run.path}`"
        return sec
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [m["epoch"] for m in metrics]
    for key in [k for k in SUBSET_STYLE if k != "test"] + ["test"]:  # test last, as in each task's subsets
        label, color = _subset_style(key, task)
        vals = [m.get(f"{key}_acc") for m in metrics]
        if any(v is not None for v in vals):
            ax.plot(epochs, [np.nan if v is None else 100 * v for v in vals], label=label, color=color)
    ax.set_xlabel("epoch")
    lm = task.name == "lm"
    ax.set_ylabel(f"{task.measure} (%)" if lm else "accuracy (%) against the given labels")
    ax.set_ylim(-2, 102)
    ax.legend(loc="upper left" if lm else "lower right")
    ax.set_title(("extraction and token accuracy" if lm else "accuracy") + " after each epoch (eval mode)")
    caption = ("Corpus-train extraction (greedy decoding reproduces a training sequence's suffix from its prefix), "
               "canary-train extraction (a trained canary's secret), held-out canary extraction (never trained: the "
               "reference) and held-out token accuracy, after each epoch."
               if lm else "Clean-train, noisy-train (memorized given labels) and test accuracy after each epoch. Look "
               "for the clean examples learned first and the noisy ones later, in a window of their own (the "
               "learning window the gradient claims use).")
    sec.figures.append(Figure("learning_curves", caption, png(fig)))
    sec.tables.append(Table("metrics", "Per-epoch metrics", metrics))
    return sec


def _windows(epochs: int) -> list[tuple[int, int]]:
    k = max(1, int(np.ceil(epochs / 4)))
    return [(a, min(a + k, epochs)) for a in range(0, epochs, k)]


def gradient_accounting(run: RunDir) -> Section:
    sec = Section("Gradient accounting")
    task = task_words(run)
    ref, mem = task.reference_kind, task.memorized_kind
    if not run.has("gradients.npz"):
        sec.missing = ("no gradients.npz: the run was trained with --no-gradient-accounting or has no "
                       f"{mem} {task.examples}")
        return sec
    g = run.load_arrays("gradients.npz", "layer_names", "clean_norm", "noisy_norm", "cosine")
    names, clean, noisy, cos = list(g["layer_names"]), g["clean_norm"], g["noisy_norm"], g["cosine"]
    epochs = clean.shape[1]
    plt = pyplot()
    wins = _windows(epochs)
    fig, axes = plt.subplots(1, len(wins), figsize=(3.4 * len(wins), 3.9), squeeze=False)  # each panel its scale
    x = np.arange(len(names))
    for ax, (a, b) in zip(axes[0], wins):
        ax.bar(x - 0.2, clean[:, a:b].mean(1), 0.4, label=ref, color="tab:blue")
        ax.bar(x + 0.2, noisy[:, a:b].mean(1), 0.4, label=mem, color="tab:red")
        ax.set_xticks(x, [layer_label(i, n) for i, n in enumerate(names)], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"epochs {a + 1}–{b}")
    axes[0][0].set_ylabel("summed gradient norm / sqrt(#params)")
    axes[0][0].legend()
    sec.figures.append(Figure("gradient_norms", f"Norm of the epoch-summed gradient of the {ref} and of the {mem} "
                              f"{task.examples} per layer, divided by sqrt(number of parameters), averaged over epoch "
                              "windows; each panel has its own scale (the norms shrink as training converges). Look "
                              f"for the {mem} bars matching the {ref} ones although the {mem} {task.examples} are few.",
                              png(fig)))
    fig, ax = plt.subplots(figsize=(max(5, 0.15 * epochs + 2), 0.35 * len(names) + 1.5))
    im = ax.imshow(cos, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest",
                   extent=(0.5, epochs + 0.5, len(names) + 0.5, 0.5))
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer")
    ax.set_yticks(range(1, len(names) + 1), [layer_label(i, n) for i, n in enumerate(names)])
    ax.grid(False)
    fig.colorbar(im, ax=ax, label=f"cosine({ref} gradient, {mem} gradient)")
    sec.figures.append(Figure("gradient_cosine", f"Cosine similarity between the {ref} and the {mem} epoch-summed "
                              "gradient, per layer and epoch. Look for deep red (opposed directions) while the "
                              f"{mem} {task.examples} are being learned.", png(fig)))
    rows = [{"layer": n, "epoch": e + 1, f"{ref}_norm": float(clean[i, e]), f"{mem}_norm": float(noisy[i, e]),
             "cosine": float(cos[i, e])} for i, n in enumerate(names) for e in range(epochs)]
    sec.tables.append(Table("gradients", "Per layer and epoch", rows))
    window = _learning_window(run.read_metrics(), f"{mem}_train_acc")
    note = (f"Share of (layer, epoch) cells with cosine below −0.75: {100 * (cos < -0.75).mean():.0f}% over every "
            "epoch and layer")
    if window is not None:
        a, b = window[0] - 1, window[1]
        body = cos[: max(1, len(names) - 1), a:b]
        note += (f"; {100 * (body < -0.75).mean():.0f}% in the learning window (epochs {a + 1}–{b}, where {mem}-train "
                 "accuracy goes from 25% to 90%; the classifier left out), the number the claims table uses")
    sec.notes.append(note + ".")
    return sec


def _learning_window(metrics: list[dict], key: str) -> tuple[int, int] | None:
    """(first epoch with memorized-train accuracy `key` >= 25%, first with >= 90%), 1-based; None when never
    reached."""
    noisy = np.array([np.nan if m.get(key) is None else m[key] for m in metrics])
    if not len(noisy) or not np.isfinite(noisy).any():
        return None
    lo, hi = np.nonzero(noisy >= 0.25)[0], np.nonzero(noisy >= 0.9)[0]
    return (int(lo[0]) + 1, int(hi[0]) + 1) if len(lo) and len(hi) else None
