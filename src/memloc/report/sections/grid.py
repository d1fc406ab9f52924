"""A study's example-tied dropout grid and its baselines (grid.csv): the trade-off figure and where each
method's protection comes from."""

from __future__ import annotations

import numpy as np

from ...core.figures import pyplot
from ..words import _fixed


def grid_tradeoff_figure(rows: list[dict]):
    """Noisy-train after the drop (%) against the clean-train cost (points), one marker per grid.csv row; None
    when no row has both numbers."""
    def num(r: dict, key: str) -> float | None:
        try:
            return float(r.get(key) or "nan")
        except ValueError:
            return None
    points = []
    for r in rows:
        before, after, noisy = num(r, "clean_before"), num(r, "clean_after"), num(r, "noisy_after")
        if None in (before, after, noisy) or not np.isfinite([before, after, noisy]).all():
            continue
        method = str(r.get("method") or "")
        label = f"{r.get('p_gen')}, {r.get('p_mem')}" if method == "example_tied" else str(r.get("cell") or method)
        points.append((before - after, noisy, method, label))
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    style = {"example_tied": ("o", "tab:orange"), "plain": ("s", "tab:gray"), "dropout": ("^", "tab:blue"),
             "sparse": ("v", "tab:purple"), "elr": ("D", "tab:green")}
    shown = set()
    for cost, noisy, method, label in points:
        marker, color = style.get(method, ("x", "black"))
        ax.scatter(cost, noisy, marker=marker, color=color, s=40,
                   label=None if method in shown else method.replace("_", "-"))
        shown.add(method)
        ax.annotate(label, (cost, noisy), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("clean-train cost of the drop (points)")
    ax.set_ylabel("noisy-train after the drop (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def protection_notes(rows: list[dict]) -> list[str]:
    """Where each method's protection comes from, read off grid.csv rows: a plain model memorizes the noisy labels,
    early-learning regularization never learns them (prevention: nothing to remove), example-tied dropout learns them
    and its drop removes them (localization). Empty without a plain row and an ELR or example-tied row."""
    def num(r: dict, key: str) -> float | None:  # grid.csv's cells are text; empty for "not measured"
        try:
            v = float(r.get(key))
        except (TypeError, ValueError):
            return None
        return v if np.isfinite(v) else None
    plain = next((r for r in rows if r.get("method") == "plain"), None)
    if plain is None or num(plain, "noisy_after") is None:
        return []
    notes = [f"Plain training memorizes {num(plain, 'noisy_after'):.1f}% of the noisy labels (test "
             f"{_fixed(num(plain, 'test_eval'), 1)}%)."]
    for r in rows:
        if r.get("method") == "elr" and num(r, "noisy_after") is not None:
            notes.append(f"ELR ({r.get('cell')}) prevents it: the noisy labels are learned to "
                         f"{num(r, 'noisy_after'):.1f}% only ({_fixed(num(r, 'noisy_true_after'), 1)}% predicted as "
                         f"their true class), test {_fixed(num(r, 'test_eval'), 1)}%; there is nothing to remove.")
    tied = [r for r in rows if r.get("method") == "example_tied" and num(r, "noisy_after") is not None]
    if tied:
        best = min(tied, key=lambda r: num(r, "noisy_after"))
        notes.append(f"Example-tied dropout ({best.get('cell')}) localizes it: {_fixed(num(best, 'noisy_before'), 1)}% "
                     f"memorized, {num(best, 'noisy_after'):.1f}% after the memorization units are dropped (clean "
                     f"{_fixed(num(best, 'clean_after'), 1)}%, test {_fixed(num(best, 'test_drop'), 1)}% after the "
                     "drop): removable, and inspectable before it is removed.")
    return notes if len(notes) > 1 else []
