"""The example-tied dropout section: the model before (tied) and after (drop) removing its memorization units."""

from __future__ import annotations

import numpy as np

from ...core.figures import gallery_figure, png, pyplot
from ...core.runs import RunDir
from ..html import Figure, Section, Table
from ..words import _pct, task_words
from .generic import _probe
from .sinks import sinks_section


def dropout_section(run: RunDir, title: str | None = None) -> Section:
    """Before (tied) and after (drop) removing the memorization units: the image summary, or a language model's
    memorization sinks (`sinks_section`); titled "Example-tied dropout" or "Memorization sinks" unless `title`."""
    lm = task_words(run).name == "lm"
    sec, summary, arrays = _probe(run, "dropout", "evaluate --drop-memorization",
                                  title or ("Memorization sinks" if lm else "Example-tied dropout"))
    if summary is None:
        sec.missing = f"not run: `memloc evaluate {run.path} --drop-memorization`"
        return sec
    if "repeated_before" in summary:  # memloc.methods.sinks's summary
        sec.title = title or "Memorization sinks"
        return sinks_section(summary, sec)
    s = summary
    rows = [{"measure": "clean-train accuracy", "before (tied)": _pct(s["clean_before"]),
             "after (drop)": _pct(s["clean_after"])},
            {"measure": "noisy-train accuracy (given labels)", "before (tied)": _pct(s["noisy_before"]),
             "after (drop)": _pct(s["noisy_after"])},
            {"measure": "noisy examples predicted as their true label",
             "before (tied)": _pct(s.get("noisy_true_before")),
             "after (drop)": _pct(s.get("noisy_true_after"))},
            {"measure": "test accuracy", "before (tied)": _pct(s["test_eval"]) + " (eval mode)",
             "after (drop)": _pct(s["test_drop"])}]
    sec.tables.append(Table("summary_dropout", f"p_gen {s['p_gen']}, p_mem {s['p_mem']}, drop scale {s['drop_scale']}",
                            rows))
    sec.figures.append(Figure("dropout_before_after", "The example-tied model before (each training example through "
                              "its own masks: 'tied') and after dropping every memorization unit ('drop'). Look for "
                              "noisy-train falling to a few percent while clean-train and test barely move; test "
                              "before the drop is measured in eval mode (every unit on at its expectation), as are "
                              "the model's per-epoch learning curves.", png(_before_after_figure(s))))
    images = arrays.get("forgotten_images")
    if images is not None and len(images):
        labels = arrays.get("forgotten_labels")
        titles = [f"label {int(v)}" for v in labels] if labels is not None else [""] * len(images)
        sec.figures.append(Figure("dropout_forgotten", "Clean training examples forgotten by the drop (right before, "
                                  "wrong after), with their labels.", png(gallery_figure(images[:32], titles[:32]))))
    sec.notes.append(f"{s['forgotten_clean']} clean examples forgotten by the drop "
                     "(indices in probes/dropout/arrays.npz).")
    return sec


def _before_after_figure(s: dict):
    """Grouped bars: clean-train, noisy-train and test accuracy, before (tied) and after (drop) the drop."""
    plt = pyplot()
    groups = [("clean-train", s.get("clean_before"), s.get("clean_after")),
              ("noisy-train", s.get("noisy_before"), s.get("noisy_after")),
              ("test", s.get("test_eval"), s.get("test_drop"))]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(groups))
    for j, (label, color) in enumerate((("before (tied)", "tab:gray"), ("after (drop)", "tab:orange"))):
        vals = [np.nan if g[1 + j] is None else 100 * g[1 + j] for g in groups]
        bars = ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, label=label, color=color)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [g[0] for g in groups])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 112)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
