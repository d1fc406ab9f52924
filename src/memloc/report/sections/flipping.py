"""The flipping section (greedy unit removal): units to flip per kind, their cost and layers; for a language
model, units per canary by repeat count and per layer."""

from __future__ import annotations

import numpy as np

from ...core.figures import png, pyplot
from ...core.runs import RunDir
from ..html import Figure, Section, Table
from ..words import _num, layer_label, task_words
from .generic import _load_probe, _probe


def flipping(run: RunDir) -> Section:
    sec, summary, arrays = _probe(run, "flipping", "flip", "Greedy unit removal (flipping)")
    if summary is None:
        return sec
    task = task_words(run)
    kinds = [k for k in ("clean", "noisy", "rare", "corpus", "canary") if k in summary["kinds"]]
    colors = {"clean": "tab:blue", "noisy": "tab:red", "rare": "tab:purple", "corpus": "tab:blue", "canary": "tab:red"}
    measure = task.measure.split()[0]  # accuracy, extraction
    searched = ~arrays["already_wrong"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k in kinds:  # one cumulative curve per kind (overlaid histograms hide each other's bins)
        sel = searched & (arrays["kind"] == k)
        units = np.sort(arrays["num_units"][sel & arrays["flipped"]])
        if not sel.any():
            continue
        share = 100 * np.arange(1, len(units) + 1) / int(sel.sum())  # never-flipped examples keep it below 100%
        axes[0].step(np.concatenate([[0], units]), np.concatenate([[0], share]), where="post", color=colors[k],
                     label=f"{k} (median {_num(summary['kinds'][k]['median_units'])}, n = {int(sel.sum())})")
    axes[0].axvline(10, color="gray", lw=0.8, ls="--")
    axes[0].set_xlabel(f"units zeroed until the {task.flipped}")
    axes[0].set_ylabel(f"{task.examples} flipped with at most that many (%)")
    axes[0].set_ylim(0, 102)
    if axes[0].get_legend_handles_labels()[0]:  # examples flipped by index (no kind known): no curve to name
        axes[0].legend(fontsize=8)
    drops = [100 * (summary["kinds"][k]["mean_train_acc_drop"] or 0) for k in kinds]
    axes[1].bar(kinds, drops, color=[colors[k] for k in kinds])
    axes[1].set_ylabel(f"training {measure} drop after removal (points)")
    axes[1].set_title("cost of the removal to the rest of the data")
    names = [str(n) for n in arrays["layer_names"]]
    x = np.arange(len(names))
    w = 0.8 / max(1, len(kinds))
    for i, k in enumerate(kinds):
        axes[2].bar(x + (i - (len(kinds) - 1) / 2) * w, 100 * np.array(summary["kinds"][k]["layer_share"]), w,
                    color=colors[k], label=k)
    axes[2].set_xticks(x, [layer_label(int(i), n) for i, n in zip(arrays["layer_index"], names)], rotation=60,
                       ha="right", fontsize=7)
    axes[2].set_ylabel("share of removed units (%)")
    axes[2].legend()
    until = "each example's prediction flips" if task.name == "classification" else f"each {task.flipped}"
    sec.figures.append(Figure("flipping", f"Left: share of each kind flipped with at most k units zeroed until "
                              f"{until} (cumulative; the dashed line at 10 units is the paper's). Middle: mean drop of "
                              f"training {measure} of the edited models. Right: the layers the removed units come "
                              "from.", png(fig)))
    rows = [{"kind": k, **{key: v for key, v in summary["kinds"][k].items() if key != "layer_share"}} for k in kinds]
    sec.tables.append(Table("summary_flipping", "Per kind of example", rows, transpose=True))
    sec.notes.append(f"{summary['examples']} {task.examples}, {summary['others']} other {task.examples} in the "
                     "objective, "
                     f"removal cap {summary['budget_units']} of {summary['candidate_units']} units.")
    if task.name == "lm":
        _canary_flipping(run, arrays, sec)
    return sec


def _canary_repeats(run: RunDir) -> dict[int, int] | None:
    """Canary id -> its repeat count (the memorization probe's canary_id and repeat_group); None without them."""
    _, arr = _load_probe(run, "memorization")
    if arr is None or "canary_id" not in arr or "repeat_group" not in arr:
        return None
    return {int(c): int(r) for c, r in zip(arr["canary_id"], arr["repeat_group"])}


def _searched_canaries(arrays: dict) -> np.ndarray:
    """(E,) the flipping probe's canary sequences that were searched (extracted before any removal)."""
    searched = ~arrays["already_wrong"].astype(bool)
    return searched & (arrays["kind"] == "canary") if "kind" in arrays else searched


def _units_by_repeats(arrays: dict, repeats: dict[int, int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per repeat count, over the searched canary sequences: units removed (n,) and whether it stopped being
    extracted (n,). A sequence's canary is its flipping label."""
    rep = np.array([repeats.get(int(c), 0) for c in arrays["label"]], dtype=np.int64)  # (E,)
    flipped = arrays["flipped"].astype(bool) if "flipped" in arrays else np.ones(len(rep), bool)
    sel = _searched_canaries(arrays) & (rep > 0)
    return {int(r): (arrays["num_units"][sel & (rep == r)], flipped[sel & (rep == r)])
            for r in sorted(set(rep[sel].tolist()))}


def _units_per_layer(arrays: dict) -> tuple[list[str], np.ndarray] | None:
    """The flipping probe's candidate layers by name and the units removed from each (L,), over the searched
    canaries; None without unit_layer."""
    if "unit_layer" not in arrays or "layer_index" not in arrays:
        return None
    removed = arrays["unit_layer"][_searched_canaries(arrays)]  # (searched, cap): model layer index, -1 past the end
    counts = np.array([int((removed == i).sum()) for i in arrays["layer_index"]])
    return [str(n) for n in arrays["layer_names"]], counts


def _canary_flipping_figure(by_repeats: dict[int, tuple[np.ndarray, np.ndarray]] | None,
                            per_layer: tuple[list[str], np.ndarray] | None):
    """Left: units removed per canary, one column per repeat count (box of the removed canaries, every canary a
    point). Right: units removed per layer."""
    plt = pyplot()
    panels = [p for p in ("repeats", "layers") if (by_repeats if p == "repeats" else per_layer)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "repeats":
            reps = list(by_repeats)
            done = [units[flipped] for units, flipped in by_repeats.values()]
            shown = [i for i, d in enumerate(done) if len(d)]
            if shown:
                ax.boxplot([done[i] for i in shown], positions=shown, widths=0.5, showfliers=False,
                           medianprops={"color": "black"})
            units = np.concatenate([u for u, _ in by_repeats.values()])  # (searched,)
            flipped = np.concatenate([f for _, f in by_repeats.values()])
            # each column's points spread evenly across it (no random jitter: rebuilds are identical)
            x = np.concatenate([i + (np.linspace(-0.18, 0.18, len(u)) if len(u) > 1 else np.zeros(len(u)))
                                for i, (u, _) in enumerate(by_repeats.values())])
            ax.scatter(x[flipped], units[flipped], s=14, color="tab:red", alpha=0.7, zorder=3,
                       label="no longer extracted")
            if (~flipped).any():
                ax.scatter(x[~flipped], units[~flipped], s=18, facecolors="none", edgecolors="tab:red", zorder=3,
                           label="still extracted at the cap")
            ax.set_xticks(range(len(reps)), [f"{r}\n(n = {len(by_repeats[r][0])})" for r in reps])
            ax.set_xlim(-0.6, len(reps) - 0.4)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("training sequences holding the canary (repeats)")
            ax.set_ylabel("units zeroed")
            ax.legend(fontsize=7)
            ax.set_title("units removed per canary sequence, by repeat count")
        else:
            names, counts = per_layer
            ax.bar(range(len(names)), counts, color="tab:red")
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
            ax.set_ylabel("units removed (all canaries)")
            ax.set_title("where the removed units are")
    return fig


def _canary_flipping(run: RunDir, arrays: dict, sec: Section) -> None:
    """The language model's flipping figure and table: units per canary by repeat count, units per layer."""
    repeats = _canary_repeats(run)
    by_repeats = _units_by_repeats(arrays, repeats) if repeats is not None and "label" in arrays else None
    per_layer = _units_per_layer(arrays)
    if repeats is None:
        sec.notes.append(f"Units by repeat count need the memorization probe: `memloc memorization {run.path}`.")
    if not by_repeats and per_layer is None:
        return
    sec.figures.append(Figure("flipping_canaries", "Left: units zeroed per searched canary sequence until it is no "
                              "longer extracted, one column per repeat count of its canary (box: the sequences no "
                              "longer extracted; open circles: still extracted when the cap was reached). Right: the "
                              "units removed from each layer, over all searched canary sequences.",
                              png(_canary_flipping_figure(by_repeats, per_layer))))
    if by_repeats:
        rows = []
        for r, (units, flipped) in by_repeats.items():
            done = units[flipped]
            rows.append({"repeats": r, "searched": len(units), "no longer extracted": int(flipped.sum()),
                         "median units": float(np.median(done)) if len(done) else None,
                         "mean units": round(float(done.mean()), 2) if len(done) else None})
        sec.tables.append(Table("summary_flipping_repeats", "Units zeroed per canary sequence by repeat count (the "
                                "sequences no longer extracted)", rows))
