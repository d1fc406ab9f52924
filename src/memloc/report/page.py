"""Figures and the self-contained HTML report, rebuilt from a run (or study) directory's files alone.

`build_report(path)` reads what a run or study wrote — metrics, gradients,
probe results — and writes `report/report.html` (every figure embedded as a
PNG data URI, no outside resources), `report/figures/*.png` and
`report/tables/*.csv`. It never trains or evaluates a model: a section whose
files are missing is listed as missing, with the command that makes it.
Rebuilding from the same files gives the same figures and numbers.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.errors import RunError
from ..core.figures import gallery_figure, png, pyplot
from ..core.runs import FORMAT_VERSION, RunDir, atomic_write, study_cells, study_stages, write_text
from ..probes import registered
from ..probes.base import ProbeResult, probe_command
from ..tasks.experiment import AUDIT_FILE, HISTORY, REMOVAL
from . import verdicts


@dataclass
class Figure:
    name: str  # file stem
    caption: str
    png: bytes


@dataclass
class Table:
    name: str
    caption: str
    rows: list[dict]
    transpose: bool = False  # show one row per column (a wide table of a few rows, e.g. per kind of example)


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: str | None = None  # why there is nothing here, and the command that makes it


# ----------------------------------------------------------------------------- plotting helpers

def _num(v) -> str:
    return "—" if v is None else f"{v:g}"


def layer_label(i: int, name: str) -> str:
    """A layer as every figure names it: its 1-based position and a short name ("5 conv3", "4 res1.1")."""
    short = re.sub(r"\.0$", "", str(name).replace(".block.", "."))
    return f"{i + 1} {short}"


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.1f}%"


SUBSET_STYLE = {"clean_train": ("clean-train", "tab:blue"), "noisy_train": ("noisy-train", "tab:red"),
                "rare_train": ("rare-train", "tab:purple"), "test": ("test", "tab:green"),
                "corpus_train": ("corpus-train extraction", "tab:blue"),
                "canary_train": ("canary-train extraction", "tab:red"),
                "canary_heldout": ("held-out canary extraction", "tab:gray")}
LM_SUBSET_STYLE = {"test": ("held-out token accuracy", "tab:green")}  # "test" of a language model


def _subset_style(subset: str, task: TaskWords) -> tuple[str, str]:
    return (LM_SUBSET_STYLE if task.name == "lm" else {}).get(subset) or SUBSET_STYLE[subset]


def _subset_title(subset: str, task: TaskWords) -> str:
    """A panel's title: the subset and what its number measures (the language model's labels say it already)."""
    label = _subset_style(subset, task)[0]
    return f"{label} (%)" if task.name == "lm" else f"{label} accuracy (%)"


# ----------------------------------------------------------------------------- what the page compares, per task

@dataclass(frozen=True)
class TaskWords:
    """How the page speaks of one task (memloc.tasks): the subsets it compares and the words for its numbers."""

    name: str
    memorized: str  # the memorized subset; its kind is the name without "_train"
    reference: str  # the reference subset
    examples: str  # what a training example is called
    measure: str  # what a subset's number is, on an axis
    flipped: str  # when the flipping probe stops removing units from one example

    @property
    def memorized_kind(self) -> str:
        return self.memorized.removesuffix("_train")

    @property
    def reference_kind(self) -> str:
        return self.reference.removesuffix("_train")


TASKS = {"classification": TaskWords("classification", "noisy_train", "clean_train", "examples", "accuracy",
                                     "prediction flips"),
         "lm": TaskWords("lm", "canary_train", "corpus_train", "sequences", "extraction rate / token accuracy",
                         "sequence is no longer extracted")}
TASK_PROBES = {"memorization": "lm", "detection": "classification"}  # probes that measure one task only


def task_words(run: RunDir | None) -> TaskWords:
    """The task of a run (config.json's "task"; classification when absent or unknown)."""
    try:
        name = run.config.get("task") if run is not None else None
    except RunError:
        name = None
    return TASKS[name] if isinstance(name, str) and name in TASKS else TASKS["classification"]


# ----------------------------------------------------------------------------- sections of a run

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


def _probe(run: RunDir, probe: str, command: str, title: str) -> tuple[Section, dict | None, dict | None]:
    sec = Section(title)
    d = run.path / "probes" / probe
    if not (d / "summary.json").exists():
        sec.missing = f"not run: `memloc {command} {run.path}`"
        return sec, None, None
    result = ProbeResult.load(run, probe)
    return sec, result.summary, result.arrays


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


def detection(run: RunDir) -> Section:
    from ..probes.detection import gallery, roc_figure
    sec, summary, arrays = _probe(run, "detection", "detect", "Detecting mislabeled examples")
    if summary is None:
        return sec
    result = ProbeResult("detection", summary, arrays)
    quality = summary.get("quality") or []
    if quality:
        sec.figures.append(Figure("detection_roc", "ROC of each per-example score for finding the mislabeled examples. "
                                  "Look for curves hugging the top left (AUROC near 1); the diagonal is chance.",
                                  png(roc_figure(result))))
        sec.tables.append(Table("summary_detection", "Quality of each score against the known noise", quality))
    elif summary.get("quality_note"):
        sec.notes.append(str(summary["quality_note"]))
    if "top_images" in arrays and len(arrays["top_images"]):
        sec.figures.append(Figure("detection_suspects", f"The top suspects by {summary.get('rank_by')}: index, given "
                                  "label (y) and the final model's prediction (p).", png(gallery(result))))
    return sec


# ----------------------------------------------------------------------------- layer-wise decodability (depth)

DEPTH_KINDS = {"clean": "tab:blue", "noisy": "tab:red", "rare": "tab:purple", "all": "black"}


def _depth_curves_figure(arrays: dict, names: list[str], threshold: float):
    """k-NN (solid) and linear (dashed) accuracy per layer for clean / noisy / rare: given label, true label."""
    plt = pyplot()
    subsets = [str(v) for v in arrays["subsets"]]
    panels = [("given", "given label")] + ([("true", "true label")] if np.isfinite(arrays["knn_true_acc"]).any()
                                           else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.2), squeeze=False, sharey=True)
    x = np.arange(len(names))
    for ax, (label, title) in zip(axes[0], panels):
        for kind, color in list(DEPTH_KINDS.items())[:3]:
            for probe, style in (("knn", "-"), ("linear", "--")):
                acc = arrays.get(f"{probe}_{label}_acc")
                if acc is None or not np.isfinite(acc[:, subsets.index(kind)]).any():
                    continue
                ax.plot(x, 100 * acc[:, subsets.index(kind)], style, color=color, marker="o", ms=3,
                        label=f"{kind} ({'k-NN' if probe == 'knn' else 'linear'})")
        if label == "given":
            ax.plot(x, 100 * arrays["knn_agree"][:, subsets.index("all")], ":", color="black",
                    label="k-NN = final prediction (all)")
        ax.axhline(100 * threshold, color="grey", lw=0.8)
        ax.set_xticks(x, [f"{i} {n}" for i, n in enumerate(names)], rotation=60, ha="right", fontsize=7)
        ax.set_ylim(-2, 102)
        ax.set_title(f"probe predicts the {title}")
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("probe accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _depth_histogram_figure(arrays: dict, names: list[str]):
    """Share of the clean / noisy / rare examples at each prediction depth (0..P; P: only the output agrees)."""
    plt = pyplot()
    depth = np.asarray(arrays["depth"])
    noisy = np.asarray(arrays["is_noisy"], dtype=bool)
    kinds = ({"clean": ~noisy, "noisy": noisy} if noisy.any() else {"all": np.ones_like(noisy)}) | {
        "rare": np.asarray(arrays["is_rare"], dtype=bool)}
    kinds = {k: m for k, m in kinds.items() if m.any()}
    P = len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * (P + 1) + 2), 3.8))
    w = 0.8 / max(1, len(kinds))
    for i, (kind, m) in enumerate(kinds.items()):
        share = np.bincount(depth[m], minlength=P + 1)[: P + 1] / m.sum()
        ax.bar(np.arange(P + 1) + (i - (len(kinds) - 1) / 2) * w, 100 * share, w, color=DEPTH_KINDS[kind],
               label=f"{kind} (median {np.median(depth[m]):g}, n={int(m.sum())})")
    ax.set_xticks(np.arange(P + 1), [f"{d} {n}" for d, n in enumerate(names)] + [f"{P} output only"], rotation=60,
                  ha="right", fontsize=7)
    ax.set_xlabel("prediction depth (the layer from which the k-NN probes agree)")
    ax.set_ylabel("share of the kind (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _spearman(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float | None]:
    """Spearman's rho and its p-value over the pairs where both are finite (None: fewer than 3, or a constant)."""
    from scipy.stats import spearmanr
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None, None
    rho, p = spearmanr(a, b)
    return float(rho), float(p)


def _depth_correlations(run: RunDir, arrays: dict) -> list[dict]:
    """Spearman correlation of prediction depth with the flipping probe's units-to-flip and with every detection
    score (as suspicion: higher = more suspicious), over all, clean and noisy examples."""
    depth = np.asarray(arrays["depth"], dtype=np.float64)
    n = len(depth)
    groups = {"all": np.ones(n, dtype=bool), "clean": ~arrays["is_noisy"], "noisy": arrays["is_noisy"]}
    others: dict[str, np.ndarray] = {}
    _, flip = _load_probe(run, "flipping")
    if flip is not None and "index" in flip and "num_units" in flip:
        units = np.full(n, np.nan)
        idx = np.asarray(flip["index"], dtype=np.int64)
        searched = ~np.asarray(flip["already_wrong"], dtype=bool) if "already_wrong" in flip else np.ones(len(idx),
                                                                                                           bool)
        if len(idx) and idx.max() < n:
            units[idx[searched]] = np.asarray(flip["num_units"], dtype=np.float64)[searched]
            others["units to flip (flipping probe)"] = units
    _, det = _load_probe(run, "detection")
    if det is not None and "scores" in det and det["scores"].shape[0] == n:
        for j, name in enumerate(str(v) for v in det["score_names"]):
            if name not in ("prediction_depth", "units_to_flip"):
                others[f"{name} (detection suspicion)"] = np.asarray(det["scores"][:, j], dtype=np.float64)
    rows = []
    for name, values in others.items():
        for group, m in groups.items():
            if not m.any() or (group != "all" and not arrays["is_noisy"].any()):
                continue
            rho, p = _spearman(depth[m], values[m])
            rows.append({"with": name, "examples": group, "n": int((m & np.isfinite(values)).sum()),
                         "spearman_rho": rho, "p_value": p})
    return rows


def depth_section(run: RunDir) -> Section:
    """Layer-wise decodability (k-NN and linear probes per layer) and prediction depth, from RUN/probes/depth/."""
    sec, summary, arrays = _probe(run, "depth", "depth", "Layer-wise decodability and prediction depth")
    if summary is None:
        return sec
    names = [str(n) for n in arrays["layer_names"]]
    subsets = [str(v) for v in arrays["subsets"]]
    sec.figures.append(Figure("depth_curves", "Decodability by layer: the share of clean, noisy and rare training "
                              f"examples whose label the k-NN probe (k = {summary['k']}, cosine, {summary['support']} "
                              "support examples; dashed: the linear probe) predicts from the layer's pooled "
                              "activations; left the given label, right the true one. Dotted: k-NN agrees with the "
                              "model's final prediction.",
                              png(_depth_curves_figure(arrays, names, summary.get("decodable_threshold", 0.5)))))
    sec.figures.append(Figure("depth_histogram", "Prediction depth (Baldock et al.) of the clean, noisy and rare "
                              "training examples: the first layer from which the k-NN probe of every later layer "
                              "agrees with the final prediction.", png(_depth_histogram_figure(arrays, names))))
    kinds = [k for k in ("clean", "noisy", "rare", "all") if summary["depth"].get(k)]
    sec.tables.append(Table("summary_depth", "Prediction depth per kind of example (0 = settled at the first layer, "
                            f"{len(names)} = only the output agrees)",
                            [{"kind": k, **summary["depth"][k]} for k in kinds]))
    rows = []
    for i, name in enumerate(names):
        row = {"layer": i, "name": name}
        for probe in ("knn", "linear"):
            for label in ("given", "true"):
                acc = arrays.get(f"{probe}_{label}_acc")
                if acc is None:
                    continue
                for kind in ("clean", "noisy", "rare"):
                    v = acc[i, subsets.index(kind)]
                    if np.isfinite(acc[:, subsets.index(kind)]).any():
                        row[f"{probe}_{label}_{kind}"] = float(v)
        rows.append(row)
    sec.tables.append(Table("depth_layers", "Probe accuracy per layer (probe_label_kind: k-NN or linear, predicting "
                            "the given or the true label, on the clean, noisy or rare examples)", rows))
    corr = _depth_correlations(run, arrays)
    if corr:
        sec.tables.append(Table("depth_correlations", "Spearman correlation of prediction depth with the units "
                                "zeroed until the prediction flips (examples the flipping probe searched) and with "
                                "the detection scores (oriented: higher = more suspicious)", corr))
    else:
        sec.notes.append(f"No flipping or detection probe to correlate with: `memloc flip {run.path}`, "
                         f"`memloc detect {run.path}`.")
    frm = summary.get("noisy_decodable_from")
    if summary["depth"].get("noisy"):
        at = "at no layer." if frm is None else f"from layer {frm} ({names[frm]}) of 0–{len(names) - 1}."
        sec.notes.append("Noisy examples' given labels are decodable (k-NN accuracy above "
                         f"{100 * summary.get('decodable_threshold', 0.5):.0f}%) {at}")
    return sec


def _depth_claim(base: RunDir, add: Callable) -> None:
    """Stephenson et al.'s claim, on the depth probe: the first layer at which the noisy examples' given-label k-NN
    accuracy exceeds 50% lies in the last third of the layers (position >= P - ceil(P/3)); beside it, the layer
    whose rewinding hurts the noisy examples most (the paper's view)."""
    s, arr = _load_probe(base, "depth")
    if s is None or not s["depth"].get("noisy"):
        return
    names = [str(n) for n in arr["layer_names"]]
    P = len(names)
    last = P - int(np.ceil(P / 3))  # the first position of the last third
    frm = s.get("noisy_decodable_from")
    med = {k: (s["depth"].get(k) or {}).get("median") for k in ("noisy", "clean")}
    ours = ("noisy given labels never above 50% k-NN accuracy" if frm is None else
            f"noisy given-label k-NN accuracy first above 50% at {names[frm]} (layer {frm + 1} of {P}; last third: "
            f"from layer {last + 1})")
    ours += f"; median prediction depth {_num(med['noisy'])} (noisy) vs {_num(med['clean'])} (clean)"
    rs, ra = _load_probe(base, "rewinding")
    mem = task_words(base).memorized
    if rs is not None and mem in [str(v) for v in ra["subsets"]]:
        acc = ra["accuracy"][:, :, [str(v) for v in ra["subsets"]].index(mem)]
        epochs = [int(e) for e in ra["epochs"]]
        # as the rewinding claim: the saved epoch nearest to the one before noisy-train accuracy reached 25%
        noisy = [m.get(f"{mem}_acc") for m in base.read_metrics()]
        start = next((e for e, v in enumerate(noisy) if v is not None and v >= 0.25), 0)
        j = int(np.argmin([abs(e - start) for e in epochs]))
        if np.isfinite(acc[:, j]).all():
            worst = int(np.argmin(acc[:, j]))
            rnames = [str(n) for n in ra["layer_names"]]
            ours += (f"; rewinding (to epoch {epochs[j]}) hurts the noisy examples most at {rnames[worst]} "
                     f"(layer {worst + 1} of {len(rnames)}: {_pct(acc[worst, j])} noisy-train)")
    add("noisy labels become decodable only in the last layers (Stephenson et al.)",
        "Stephenson et al.: later layers; the paper (rewinding): the critical layers are not the final ones",
        ours, verdicts.rule(None if frm is None else frm >= last,
                            measure="first layer where noisy examples' given-label k-NN accuracy exceeds 50%",
                            threshold=f"in the last third of the layers (from layer {last + 1} of {P})",
                            value=None if frm is None else frm + 1, n=f"{P} layers"))


def _float(v) -> float | None:
    """A number read from a probe's summary, None when it is null (or not a number)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) else None


def _fixed(v, digits: int) -> str:
    v = _float(v)
    return "—" if v is None else f"{v:.{digits}f}"


def _by_repeats(summary: dict) -> list[dict]:
    """The memorization probe's rows with a repeat count, ordered by repeats."""
    rows = summary.get("by_repeats")
    rows = [r for r in rows if isinstance(r, dict) and _float(r.get("repeats"))] if isinstance(rows, list) else []
    return sorted(rows, key=lambda r: float(r["repeats"]))


FORMAT_STYLE = {"secret": "tab:red", "random": "tab:purple", "record": "tab:orange", "all": "black"}


def _repeats_axis(ax, repeats: list[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(repeats, [f"{r:g}" for r in repeats])
    ax.minorticks_off()
    ax.set_xlabel("training sequences holding each canary (repeats, log2 axis)")


def _extraction_figure(rows: list[dict], heldout: float | None):
    """Extraction rate of the trained canaries (%) against repeats: a line per format and over all of them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    formats = sorted({str(r.get("format")) for r in rows} - {"all"}) + ["all"]
    for f in formats:
        pts = [(float(r["repeats"]), _float(r.get("trained_extracted"))) for r in rows if str(r.get("format")) == f]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, 100 * np.array(y), marker="o", color=FORMAT_STYLE.get(f, None), lw=2.2 if f == "all" else 1.2,
                    label="all formats" if f == "all" else f)
    pts = [(float(r["repeats"]), _float(r.get("in_context_extracted"))) for r in rows if r.get("format") == "all"]
    pts = [(x, y) for x, y in pts if y is not None]
    if pts:
        x, y = zip(*pts)
        ax.plot(x, 100 * np.array(y), ls=":", marker=".", color="black", label="all, in the training context")
    if heldout is not None:
        ax.axhline(100 * heldout, ls="--", color="tab:gray", label=f"held-out canaries ({_pct(heldout)})")
    _repeats_axis(ax, sorted({float(r["repeats"]) for r in rows}))
    ax.set_ylabel("canaries extracted (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("greedy decoding from the canary's prefix reproduces its secret")
    return fig


def _exposure_figure(rows: list[dict], most: float | None):
    """Mean exposure (bits) of the trained and of the held-out secret canaries against repeats."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for key, label, style in (("trained_exposure", "trained canaries", dict(color="tab:red", ls="-")),
                              ("heldout_exposure", "held-out canaries", dict(color="tab:gray", ls="--"))):
        pts = [(float(r["repeats"]), _float(r.get(key))) for r in rows]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", label=label, **style)
    if most is not None:
        ax.axhline(most, ls=":", color="black", label=f"largest possible ({most:.1f} bits)")
        ax.set_ylim(0, 1.15 * most)
    else:
        ax.set_ylim(bottom=0)
    _repeats_axis(ax, sorted({float(r["repeats"]) for r in rows}))
    ax.set_ylabel("mean exposure (bits)")
    ax.legend(fontsize=7, loc="center right")
    ax.set_title("exposure of the secret-number canaries")
    return fig


def _memorization_rows(rows: list[dict]) -> list[dict]:
    """The table of the by-repeats rows: rates in percent, losses in nats, exposures in bits, "—" for none."""
    in_context = any(_float(r.get("in_context_extracted")) is not None for r in rows)
    out = []
    for r in rows:
        row = {"repeats": f"{float(r['repeats']):g}", "format": str(r.get("format")),
               "canaries": _fixed(r.get("n"), 0), "extracted (trained)": _pct(_float(r.get("trained_extracted")))}
        if in_context:
            row["extracted in training context"] = _pct(_float(r.get("in_context_extracted")))
        row.update({"extracted (held-out)": _pct(_float(r.get("heldout_extracted"))),
                    "loss trained (nats)": _fixed(r.get("trained_loss"), 3),
                    "loss held-out (nats)": _fixed(r.get("heldout_loss"), 3),
                    "loss gap (nats)": _fixed(r.get("loss_gap"), 3),
                    "exposure trained (bits)": _fixed(r.get("trained_exposure"), 1),
                    "exposure held-out (bits)": _fixed(r.get("heldout_exposure"), 1)})
        out.append(row)
    return out


def _largest_exposure(run: RunDir) -> float | None:
    """log2 of a secret canary's candidates (10^digits): the exposure of a secret ranked first."""
    try:
        data = run.config.get("data")
    except RunError:
        return None
    digits = data.get("secret_digits") if isinstance(data, dict) else None
    return digits * float(np.log2(10)) if isinstance(digits, int) and not isinstance(digits, bool) else None


def memorization(run: RunDir) -> Section:
    """The canaries by repeat count (language models): extraction and exposure against held-out canaries."""
    sec, summary, arrays = _probe(run, "memorization", "memorization", "Where memorization rises with repetition")
    if summary is None:
        return sec
    rows = _by_repeats(summary)
    if not rows:
        sec.notes.append("The probe measured no trained canary (its summary has no rows by repeat count).")
        return sec
    if "extracted" in arrays and "trained" in arrays and (~arrays["trained"].astype(bool)).any():
        heldout = float(arrays["extracted"].astype(bool)[~arrays["trained"].astype(bool)].mean())
    else:  # the rows' held-out rates, weighted by the canaries of each repeat group
        held = [(_float(r.get("heldout_extracted")), _float(r.get("n")) or 0.0) for r in rows
                if r.get("format") == "all"]
        held = [(v, n) for v, n in held if v is not None]
        heldout = sum(v * n for v, n in held) / max(sum(n for _, n in held), 1) if held else None
    sec.figures.append(Figure("memorization_extraction", "Share of the trained canaries that greedy decoding "
                              "reproduces from the canary's own prefix, by the number of training sequences holding "
                              "each canary (log2 axis), per canary format and over all formats (black; dotted: "
                              "extracted in its training context). Dashed: the held-out canaries, never trained, as "
                              "reference.",
                              png(_extraction_figure(rows, heldout))))
    secret = [r for r in rows if r.get("format") == "secret"] or [r for r in rows if r.get("format") == "all"]
    if any(_float(r.get("trained_exposure")) is not None for r in secret):
        sec.figures.append(Figure("memorization_exposure", "Mean exposure of the secret-number canaries: log2 of the "
                                  "number of candidate secrets minus log2 of the secret's rank among them, for the "
                                  "trained canaries of each repeat count and the held-out canaries of the same group; "
                                  "dotted: the exposure of a secret ranked first.",
                                  png(_exposure_figure(secret, _largest_exposure(run)))))
    else:
        sec.notes.append("No exposure was measured (no secret-number canaries, or the probe ran with --no-exposure).")
    sec.tables.append(Table("summary_memorization", "Per repeat count and canary format (trained canaries against the "
                            "held-out ones of the same repeat group; loss gap: held-out minus trained)",
                            _memorization_rows(rows)))
    result = ProbeResult.load(run, "memorization")
    if result.rows:
        sec.tables.append(Table("memorization_canaries", "Each canary (memorization.csv)", result.rows))
    ppl, corpus = _float(summary.get("heldout_perplexity")), _float(summary.get("corpus_extracted"))
    methods = summary.get("exposure_methods")
    sec.notes.append(f"Held-out perplexity {_fixed(ppl, 2)}; corpus training sequences whose suffix is extracted: "
                     f"{_pct(corpus)}; held-out canaries extracted: {_pct(heldout)}"
                     + (f"; exposure by {', '.join(str(m) for m in methods)}" if isinstance(methods, list) and methods
                        else "") + ".")
    return sec


# ----------------------------------------------------------------------------- memorization sinks (language models)

SINK_MODES = (("before", "tied (its own sinks)", "tab:red"), ("after", "drop (sinks removed)", "tab:blue"))


def _fall(before, after) -> float | None:
    """The relative fall 1 - after / before of a rate (None unless before > 0)."""
    before, after = _float(before), _float(after)
    return None if before is None or after is None or before <= 0 else 1.0 - after / before


def _change(row: dict, key: str, show: Callable) -> str:
    """One measure of a sinks row, before (tied) → after (drop): "40.0% → 0.0%"."""
    return f"{show(row.get(f'{key}_before'))} → {show(row.get(f'{key}_after'))}"


def _sinks_rows(rows: list[dict]) -> list[dict]:
    """The table of the sinks rows over all formats by repeat count: each measure before → after."""
    pct, nats, bits = (lambda v: _pct(_float(v))), partial(_fixed, digits=3), partial(_fixed, digits=1)
    return [{"repeats": f"{float(r['repeats']):g}", "canaries": _fixed(r.get("n"), 0),
             "extracted from own prefix": _change(r, "trained_extracted", pct),
             "extracted in training context": _change(r, "in_context_extracted", pct),
             "held-out extracted": _change(r, "heldout_extracted", pct),
             "loss trained (nats)": _change(r, "trained_loss", nats),
             "loss held-out (nats)": _change(r, "heldout_loss", nats),
             "loss gap (nats)": _change(r, "loss_gap", nats), "gap closed": pct(r.get("gap_closed")),
             "exposure trained (bits)": _change(r, "trained_exposure", bits)} for r in rows]


def _sinks_headline(s: dict) -> list[dict]:
    """The headline table: the canaries repeated >= s["repeated"] times, held-out perplexity and the corpus."""
    b, a = (s.get(k) if isinstance(s.get(k), dict) else {} for k in ("repeated_before", "repeated_after"))
    k = s.get("repeated")
    return [{"measure": f"canaries repeated ≥ {k}x extracted from their own prefix", "before (tied)":
             _pct(_float(b.get("extracted"))), "after (drop)": _pct(_float(a.get("extracted"))),
             "change": f"fall {_pct(_float(s.get('extraction_fall')))}"},
            {"measure": "... extracted in their training sequences (in context)",
             "before (tied)": _pct(_float(b.get("in_context"))), "after (drop)": _pct(_float(a.get("in_context"))),
             "change": f"fall {_pct(_fall(b.get('in_context'), a.get('in_context')))}"},
            {"measure": "held-out canaries of the same repeat groups extracted",
             "before (tied)": _pct(_float(b.get("heldout_extracted"))),
             "after (drop)": _pct(_float(a.get("heldout_extracted"))), "change": "—"},
            {"measure": "loss gap, held-out − trained (nats per secret token)",
             "before (tied)": _fixed(b.get("loss_gap"), 3), "after (drop)": _fixed(a.get("loss_gap"), 3),
             "change": f"closed {_pct(_float(s.get('gap_closed')))}"},
            {"measure": "exposure of the trained secret canaries (bits)", "before (tied)": _fixed(b.get("exposure"), 1),
             "after (drop)": _fixed(a.get("exposure"), 1), "change": "—"},
            {"measure": "held-out perplexity", "before (tied)": f"{_fixed(s.get('heldout_perplexity_eval'), 3)} "
             "(eval mode)", "after (drop)": _fixed(s.get("heldout_perplexity_drop"), 3),
             "change": f"rise {_pct(_float(s.get('perplexity_rise')))}"},
            {"measure": "corpus training sequences extracted", "before (tied)":
             _pct(_float(s.get("corpus_extracted_before"))), "after (drop)":
             _pct(_float(s.get("corpus_extracted_after"))), "change": "—"}]


def _sinks_figure(rows: list[dict]):
    """By repeat count (log2 axis), tied and drop: left, extraction (%) of the trained canaries in their training
    context (from their own prefix where that was not measured) and of the held-out ones; right, the loss gap."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.8))
    in_context = any(_float(r.get(f"in_context_extracted_{w}")) is not None for r in rows for w, _, _ in SINK_MODES)
    key = "in_context_extracted" if in_context else "trained_extracted"

    def line(ax, key, when, scale=1.0, **style):
        pts = [(float(r["repeats"]), _float(r.get(f"{key}_{when}"))) for r in rows]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, scale * np.array(y), **style)
    for when, label, color in SINK_MODES:
        line(axes[0], key, when, 100.0, marker="o", color=color, label=f"trained, {label}")
        line(axes[1], "loss_gap", when, marker="o", color=color, label=label)
    for when, label, _ in SINK_MODES:
        line(axes[0], "heldout_extracted", when, 100.0, color="tab:gray",
             ls="--" if when == "before" else ":", label=f"held-out, {label.split(' (')[0]}")
    axes[0].set_ylim(-2, 102)
    axes[0].set_ylabel("canaries extracted (%)")
    axes[0].set_title("extraction " + ("in the training context" if in_context else "from the canary's own prefix"))
    axes[1].axhline(0, color="black", lw=0.8, ls=":", label="no gap (as if never trained)")
    axes[1].set_ylabel("loss gap, held-out − trained (nats)")
    axes[1].set_title("the canaries' loss gap")
    repeats = sorted({float(r["repeats"]) for r in rows})
    for ax in axes:
        _repeats_axis(ax, repeats)
        ax.legend(fontsize=7)
    return fig


def sinks_section(summary: dict, sec: Section) -> Section:
    """A language model trained with memorization sinks (memloc.methods.sinks's summary), into `sec`: the headline
    table, the canaries by repeat count before (tied) and after (drop) removing the sinks, and their figure."""
    s = summary
    n = (s.get("repeated_before") or {}).get("n") if isinstance(s.get("repeated_before"), dict) else None
    sec.tables.append(Table("summary_dropout", f"Canaries repeated ≥ {s.get('repeated')}x (n = {_num(n)} trained) "
                            "before (tied: each through its own sinks) and after (drop: every sink neuron zeroed); "
                            f"p_gen {s.get('p_gen')}, p_mem {s.get('p_mem')}, {s.get('layers')} MLP layers with "
                            f"sinks tied per {s.get('tie')}, drop scale {s.get('drop_scale')}", _sinks_headline(s)))
    rows = [r for r in _by_repeats(s) if r.get("format") == "all"]
    if not rows:
        sec.notes.append("The evaluation measured no canary by repeat count (its summary has no rows).")
        return sec
    sec.figures.append(Figure("dropout_sinks", "By the number of training sequences holding each canary (log2 "
                              "axis), before (tied: each canary through its own sinks) and after (drop: the sinks "
                              "removed). Left: the trained canaries extracted in their training context, and the "
                              "held-out canaries (gray) as reference. Right: the loss gap, held-out minus trained "
                              "canaries' loss of the secret (0: no trace of training).",
                              png(_sinks_figure(rows))))
    sec.tables.append(Table("summary_dropout_repeats", "Per repeat count over all canary formats, before (tied) → "
                            "after (drop); loss gap: held-out minus trained; gap closed: 1 − after / before",
                            _sinks_rows(rows)))
    sec.notes.append("Held-out perplexity before is in eval mode (every neuron on, the sinks at their training "
                     "expectation), after with the sinks dropped; the full arrays are in probes/dropout/arrays.npz.")
    return sec


# How the report draws the paper's probes; any other registered probe gets `probe_section`.
PROBE_SECTIONS: dict[str, Callable[[RunDir], Section]] = {
    "rewinding": partial(_layer_sweep_section, probe="rewinding", command="rewind", title="Layer rewinding",
                         draw=_rewinding_figure,
                         caption={"classification": "Accuracy of the final model with one layer (rows) put back to its "
                                  "weights and BatchNorm statistics at an earlier epoch (columns). Look for the layers "
                                  "whose rewinding to before the learning window takes noisy-train down while "
                                  "clean-train stays: where the memorization sits.",
                                  "lm": "Extraction rates and held-out token accuracy of the final model with one "
                                  "layer (rows) put back to its weights at an earlier epoch (columns)."},
                         table={"classification": "Accuracy per rewound layer and epoch",
                                "lm": "Extraction rate (held-out token accuracy for test) per rewound layer and "
                                "epoch"}),
    "retraining": partial(_layer_sweep_section, probe="retraining", command="retrain", title="Layer retraining",
                          draw=_retraining_figure,
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
                                 "epoch"}),
    "flipping": flipping, "dropout": dropout_section, "detection": detection, "memorization": memorization}
PROBE_SECTIONS["depth"] = depth_section
TASK_PROBES["depth"] = "classification"  # class labels only: a language model's report does not list it


def probe_section(run: RunDir, probe) -> Section:
    """A probe without a section of its own: its headline numbers and its tidy rows, from its files."""
    sec, summary, _ = _probe(run, probe.name, probe.command, probe.help[:1].upper() + probe.help[1:])
    if summary is None:
        return sec
    result = ProbeResult.load(run, probe.name)
    headline = [{"measure": k, "value": v} for k, v in summary.items() if isinstance(v, (int, float, str, bool))
                and k not in ("run",)]
    if headline:
        sec.tables.append(Table(f"summary_{probe.name}", "Summary", headline))
    if result.rows:
        sec.tables.append(Table(probe.name, f"{probe.name}.csv", result.rows))
    return sec


# ----------------------------------------------------------------------------- assembly

_PERCENT_WORDS = ("acc", "share", "rate", "_after", "_before", "fraction")  # column names holding fractions
_NOT_MEASURED = "–"


def _header(key: str) -> str:
    """A column name for people: snake_case as words, `_acc` as "accuracy (%)" and fractions marked "(%)"."""
    words = key.replace("_acc", " accuracy").replace("_", " ").strip()
    return words + (" (%)" if _is_percent_column(key) else "")


def _is_percent_column(key: str) -> bool:
    k = key.lower()
    return any(w in k for w in _PERCENT_WORDS) and not any(w in k for w in ("epoch", "units", "layers", "auroc"))


def _cell_text(key: str, v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v in ("None", "nan", "")):
        return _NOT_MEASURED
    if isinstance(v, str):  # a CSV cell: a number written as text is still a number
        try:
            v = float(v) if re.fullmatch(r"-?\d+\.\d*(e-?\d+)?|-?\d+e-?\d+", v.strip()) else v
        except ValueError:
            pass
    if isinstance(v, float):
        if _is_percent_column(key) and -1.0 <= v <= 1.0:
            return f"{100 * v:.1f}"
        return f"{v:.4g}"
    return str(v)


def _table_html(rows: list[dict], limit: int = 40, *, transpose: bool = False) -> str:
    """A table people can read inside the page: readable headers, fractions as percentages with one decimal,
    "–" for what was not measured (with a footnote); with `transpose` a wide table of few rows shows one row
    per column; any other wide table scrolls inside its own box (long tables fold into <details>: render_html)."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[_cell_text(k, r.get(k)) for k in keys] for r in rows[:limit]]
    empty = [j for j in range(len(keys)) if len(keys) > 1 and all(c[j] == _NOT_MEASURED for c in cells)]
    if empty:  # a column with nothing measured (e.g. rare-train without rare examples): in the CSV only
        keys = [k for j, k in enumerate(keys) if j not in empty]
        cells = [[v for j, v in enumerate(c) if j not in empty] for c in cells]
    if transpose and len(cells) <= 6:  # e.g. flipping's per-kind table: 13 columns, 2 rows
        head = f"<th>{html.escape(_header(keys[0]))}</th>" + "".join(
            f"<th>{html.escape(c[0])}</th>" for c in cells)
        body = "".join(f"<tr><th>{html.escape(_header(k))}</th>" + "".join(
            f"<td>{html.escape(c[j])}</td>" for c in cells) + "</tr>" for j, k in enumerate(keys) if j > 0)
    else:
        head = "".join(f"<th>{html.escape(_header(k))}</th>" for k in keys)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in c) + "</tr>" for c in cells)
    table = f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    notes = []
    if any(v == _NOT_MEASURED for c in cells for v in c):
        notes.append(f"{_NOT_MEASURED}: not measured or not applicable (e.g. a run without rare examples).")
    if len(rows) > limit:
        notes.append(f"{len(rows) - limit} more rows in the CSV.")
    return table + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes)


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}\
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}.missing{color:#a60}.note{color:#555;font-size:.9em}.holds{color:#070}.fails{color:#b00}
.wide{max-width:100%;overflow-x:auto}details{margin:.5em 0}summary{cursor:pointer;color:#555;font-size:.9em}
@media print{body{max-width:none;margin:0}h1,h2,h3{break-after:avoid;page-break-after:avoid}
h2+*,h2+*+*{break-before:avoid;page-break-before:avoid}figure,tr,img{break-inside:avoid;page-break-inside:avoid}
.wide{overflow:visible}table{font-size:.7em}td,th{word-break:break-word}details>*{display:block}}"""


def _text_html(text: str) -> str:
    """Plain text (which may hold values read from a run's files) as HTML: everything escaped, `code` in backticks."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(str(text)))


def render_html(title: str, intro: list[str], sections: list[Section]) -> str:
    """The page. Every text is escaped here (intro lines and notes are plain text), so no value from a
    run's files, however tampered, can add markup or script."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{_text_html(line)}</p>" for line in intro]
    toc = "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a>{' (missing)' if s.missing else ''}</li>"
                  for i, s in enumerate(sections))
    parts.append(f"<ul>{toc}</ul>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.missing:
            parts.append(f"<p class='missing'>Missing: {html.escape(s.missing)}</p>")
        for note in s.notes:
            parts.append(f"<p class='note'>{_text_html(note)}</p>")
        for f in s.figures:
            data = base64.b64encode(f.png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(f.name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        for t in s.tables:  # after the figures; a long one folded (open in print)
            if not (t.name.startswith("summary") or len(t.rows) <= 40):
                parts.append(f"<p class='note'>{html.escape(t.caption)}: {len(t.rows)} rows in tables/{t.name}.csv</p>")
            elif len(t.rows) > 12 and not t.name.startswith("summary"):
                parts.append(f"<details><summary>{html.escape(t.caption)} ({len(t.rows)} rows; tables/{t.name}.csv)"
                             f"</summary>{_table_html(t.rows, transpose=t.transpose)}</details>")
            else:
                parts.append(f"<p class='note'>{html.escape(t.caption)}</p>"
                             f"{_table_html(t.rows, transpose=t.transpose)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def write_report(out_dir: Path, title: str, intro: list[str], sections: list[Section]) -> Path:
    """Write report.html, figures/*.png and tables/*.csv under `out_dir`; return the HTML path."""
    out_dir = Path(out_dir)
    for s in sections:  # each file atomically: a full disk leaves the files already there unchanged
        for f in s.figures:
            png = f.png
            atomic_write(out_dir / "figures" / f"{f.name}.png", lambda p, png=png: p.write_bytes(png))
        for t in s.tables:
            _write_csv(out_dir / "tables" / f"{t.name}.csv", t.rows)
    page = out_dir / "report.html"
    write_text(page, render_html(title, intro, sections))
    return page


def _has_example_tied_dropout(run: RunDir) -> bool:
    try:
        model = run.config.get("model")
        return isinstance(model, dict) and bool(model.get("p_gen") or model.get("example_tied_dropout"))
    except RunError:
        return False


def run_sections(run: RunDir) -> list[Section]:
    """The training sections, then one per registered probe (the example-tied one only for such a run, a probe of
    another task only when it ran, a probe the report has no section for only when it ran); a language model's
    memorization section comes first."""
    task = task_words(run)
    sections = [learning_curves(run), gradient_accounting(run)]
    first = []
    for name, probe in registered().items():
        ran = (run.path / "probes" / name / "summary.json").exists()
        if name == "dropout" and not _has_example_tied_dropout(run):
            continue
        if TASK_PROBES.get(name, task.name) != task.name and not ran:
            continue
        if name in PROBE_SECTIONS:
            (first if name == "memorization" and task.name == "lm" else sections).append(PROBE_SECTIONS[name](run))
        elif ran:
            sections.append(probe_section(run, probe))
    return first + sections


# ----------------------------------------------------------------------------- the paper's claims

def _load_probe(run: RunDir | None, probe: str) -> tuple[dict | None, dict | None]:
    if run is None or not (run.path / "probes" / probe / "summary.json").exists():
        return None, None
    result = ProbeResult.load(run, probe)
    return result.summary, result.arrays


def _holds(ok: bool | None) -> str:
    return "not measured" if ok is None else ("holds" if ok else "does not hold")


def claims(base: RunDir, drop: RunDir | None) -> list[dict]:
    """Each claim of the paper (REFERENCE.md) with our number beside it, from the files alone (a language model's
    claims: `lm_claims`). Each row states its measure, test, threshold, n and result; the verdict comes from
    `memloc.report.verdicts`."""
    if task_words(base).name == "lm":
        return lm_claims(base)
    return [row for row, _ in _decided_claims(base, drop)]


def _flip_groups(s: dict, arr: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per kind (clean, noisy): the searched examples' units to flip (+inf where the budget ran out: more than any
    flipped one), flipped mask, training-accuracy drop and layer counts (E_kind, L)."""
    kinds = np.array([str(k) for k in arr["kind"]])
    searched = ~np.asarray(arr["already_wrong"], dtype=bool)
    flipped = np.asarray(arr["flipped"], dtype=bool)
    units = np.where(flipped, arr["num_units"].astype(np.float64), np.inf)
    before = (s.get("accuracy_before") or {}).get("train_acc")
    after = arr.get("train_acc_after")
    drop = (np.full(len(kinds), np.nan) if before is None or after is None
            else before - np.asarray(after, dtype=np.float64))
    out = {}
    for k in ("clean", "noisy"):
        sel = searched & (kinds == k)
        out[k] = {"units": units[sel], "flipped": flipped[sel], "drop": drop[sel], "counts": arr["layer_counts"][sel]}
    return out


def _detection_verdict(arr: dict) -> verdicts.Verdict:
    """Units to flip as a detector, from the detection probe's per-example suspicion scores and noise mask."""
    names = [str(n) for n in arr.get("score_names", [])]
    if "units_to_flip" not in names or "is_noisy" not in arr:
        return verdicts.rule(None, measure="AUROC of units to flip against the noise mask", threshold="—",
                      result="the detection probe saved no units_to_flip scores or noise mask (rerun `memloc detect`)")
    return verdicts.detects(arr["scores"][:, names.index("units_to_flip")], arr["is_noisy"],
                            measure="AUROC of units to flip (fewer = more suspicious) against the noise mask")


def _decided_claims(base: RunDir, drop: RunDir | None) -> list[tuple[dict, verdicts.Verdict]]:
    """The classification claims: (table row, its decision)."""
    out: list[tuple[dict, verdicts.Verdict]] = []
    mem = task_words(base).memorized

    metrics = base.read_metrics()
    noisy = np.array([np.nan if m.get(f"{mem}_acc") is None else m[f"{mem}_acc"] for m in metrics])
    memorized = bool(len(noisy) and np.isfinite(noisy[-1]) and noisy[-1] >= 0.5)

    def add(claim, paper, ours, v: verdicts.Verdict | bool | None, *, needs_memorization=True):
        if not isinstance(v, verdicts.Verdict):
            v = verdicts.rule(v, measure="see the claim", threshold="see the claim")
        verdict = v.verdict
        if needs_memorization and not memorized and out:  # the first claim is the memorization itself
            verdict = "not measured: the model did not memorize the noisy examples (train longer)"
        out.append(({"claim": claim, "paper": paper, "ours": ours, **v.columns(), "verdict": verdict}, v))

    def unmeasured(reason: str) -> None:  # the last row's verdict overridden (the dropout model memorized nothing)
        out[-1][0]["verdict"] = reason

    window = _learning_window(metrics, f"{mem}_acc")  # the same window the gradient section states
    if metrics and np.isfinite(noisy).any():
        add("mislabeled examples are memorized (noisy-train accuracy at the end)", "~100%", _pct(noisy[-1]),
            verdicts.rule(bool(noisy[-1] >= 0.9), measure="noisy-train accuracy at the end of training",
                   threshold=">= 90%", value=float(noisy[-1]), n=f"{len(metrics)} epochs"))
        add("mislabeled examples are learned in a middle window of training", "mostly epochs 10–30 of 50",
            (f"25% → 90% between epochs {window[0]} and {window[1]} of {len(metrics)}" if window
             else "never reached 90%"),
            verdicts.rule(None if window is None else bool(window[0] > 1),
                   measure="epochs at which noisy-train accuracy first reaches 25% and 90%",
                   threshold="25% first reached after epoch 1", value=None if window is None else window[0]))
    if base.has("gradients.npz"):
        g = base.load_arrays("gradients.npz", "layer_names", "clean_norm", "noisy_norm", "cosine")
        a, b = (window[0] - 1, window[1]) if window else (0, g["cosine"].shape[1])
        body = slice(0, max(1, len(g["layer_names"]) - 1))  # every layer but the classifier
        ratio = g["noisy_norm"][body, a:b].sum(1) / np.maximum(g["clean_norm"][body, a:b].sum(1), 1e-30)
        share = (base.config.get("data") or {}).get("noise")
        share = f"they are {100 * share:g}% of the data" if isinstance(share, (int, float)) and share > 0 \
            else "a minority of the data"
        add(f"noisy examples' gradient norm is comparable to the clean ones' in every layer ({share})",
            "comparable", f"noisy/clean {ratio.min():.2f}–{ratio.max():.2f} over layers, epochs {a + 1}–{b}",
            verdicts.comparable_norms(ratio))
        cos = g["cosine"][body, a:b]
        add("clean and noisy gradients point in opposite directions", "cosine below −0.75 most of the time",
            f"mean cosine {cos.mean():.2f}; {100 * (cos < -0.75).mean():.0f}% of cells below −0.75",
            verdicts.opposed_cosine(cos))
    s, arr = _load_probe(base, "rewinding")
    if s is not None and mem in list(arr["subsets"]):
        subsets = list(arr["subsets"])
        acc = arr["accuracy"][:, :, subsets.index(mem)]
        epochs = list(arr["epochs"])
        target = (window[0] - 1) if window else 0
        j = int(np.argmin([abs(e - target) for e in epochs]))
        col = acc[:, j]
        if np.isfinite(col).all():
            names = list(arr["layer_names"])
            worst = int(np.argmin(col))
            add("rewinding the last layers to before the noisy examples were learned barely hurts them; "
                "the critical layers are not the final ones",
                "critical layers depend on dataset and architecture",
                f"rewound to epoch {epochs[j]}: last layer keeps {_pct(col[-1])} noisy; largest drop at layer "
                f"{worst + 1} ({names[worst]}, {_pct(col[worst])})",
                verdicts.rule(bool(worst != len(col) - 1 and col[-1] >= 0.5),
                       measure="noisy-train accuracy with each layer rewound to before the learning window",
                       threshold="largest drop not at the last layer, and the last layer keeps >= 50%",
                       value=float(col[-1]), n=f"{len(col)} layers"))
    s, arr = _load_probe(base, "retraining")
    if s is not None and mem in list(arr["subsets"]):
        subsets = list(arr["subsets"])
        reset, last = arr["accuracy"][:, 0, subsets.index(mem)], arr["accuracy"][:, -1, subsets.index(mem)]
        if np.isfinite(last).all():
            erased, back, kept = verdicts.erased_and_back(reset, last)
            add("retraining one layer on clean examples only brings noisy accuracy back for most layers",
                "near 100% for most layers (exceptions: layers 4–5 on CIFAR-10)",
                f"{int(back.sum())} of the {int(erased.sum())} layers the reset erased back to >= 90% noisy-train; "
                f"{int(kept.sum())} never lost (min after retraining {_pct(last.min())})",
                verdicts.recovery(reset, last, list(arr["layer_names"])))
    s, arr = _load_probe(base, "flipping")
    if s is not None and "clean" in s["kinds"] and "noisy" in s["kinds"]:
        c, n = s["kinds"]["clean"], s["kinds"]["noisy"]
        grp = _flip_groups(s, arr)
        add("noisy examples need far fewer units zeroed to flip", "around 5 (noisy) vs more (clean)",
            f"median {_num(n['median_units'])} (noisy) vs {_num(c['median_units'])} (clean)",
            verdicts.fewer_units(grp["noisy"]["units"], grp["clean"]["units"]))
        add("over 90% of noisy examples flip with fewer than 10 units", "> 90%",
            f"{_pct(n['share_flipped_under_10'])} (noisy), {_pct(c['share_flipped_under_10'])} (clean)",
            verdicts.share_under(grp["noisy"]["units"], grp["noisy"]["flipped"]))
        add("removing a noisy example's units costs less training accuracy than a clean one's",
            "about 10 points less drop",
            ("—" if n["mean_train_acc_drop"] is None or c["mean_train_acc_drop"] is None else
             f"{100 * n['mean_train_acc_drop']:.1f} (noisy) vs {100 * c['mean_train_acc_drop']:.1f} (clean) points"),
            verdicts.smaller_drop(grp["noisy"]["drop"], grp["clean"]["drop"]))
        spread = {k: verdicts.spread_over_layers(grp[k]["counts"]) for k in ("noisy", "clean")}
        add("the critical units are spread over many layers", "many layers, clean and noisy alike",
            "; ".join(f"{k}: {v.result or v.verdict}" for k, v in spread.items()),  # the measure, not a layer count
            verdicts.all_of(spread))
    s, _ = _load_probe(drop, "dropout")
    if s is not None:
        add("example-tied dropout: dropping the memorization units removes the mislabeled examples' labels",
            "noisy-train 100% → 0.1% (MNIST), 3.1% (CIFAR-10)",
            f"{_pct(s['noisy_before'])} → {_pct(s['noisy_after'])}",
            verdicts.rule(None if s["noisy_after"] is None else s["noisy_after"] <= 0.1,
                   measure="noisy-train accuracy after dropping the memorization units",
                   threshold="<= 10% (and >= 90% before)", value=s["noisy_after"]), needs_memorization=False)
        if s["noisy_before"] is not None and s["noisy_before"] < 0.9:
            unmeasured("not measured: the dropout model did not memorize the noisy examples (train longer)")
        if s["clean_before"] is not None and s["clean_after"] is not None:
            d = 100 * (s["clean_before"] - s["clean_after"])
            add("... at a small cost to clean training accuracy", "−0.8 points (MNIST), −9.2 (CIFAR-10)",
                f"{_pct(s['clean_before'])} → {_pct(s['clean_after'])} ({-d:+.1f} points)",
                verdicts.rule(d <= 5, measure="clean-train accuracy lost by dropping the memorization units",
                       threshold="<= 5 points", value=d), needs_memorization=False)
            if s["noisy_before"] is not None and s["noisy_before"] < 0.9:
                unmeasured(out[-2][0]["verdict"])  # the same reason: nothing was memorized to remove
    s, arr = _load_probe(base, "detection")
    if s is not None and s.get("quality"):
        best = max(s["quality"], key=lambda r: r["auroc"] if r["auroc"] is not None else -1)
        flip_rows = [r for r in s["quality"] if "flip" in str(r["score"])]
        ours = f"best {best['score']} AUROC {best['auroc']:.3f}"
        if flip_rows and flip_rows[0]["auroc"] is not None:
            ours += f"; units-to-flip AUROC {flip_rows[0]['auroc']:.3f} (n = {flip_rows[0]['n']})"
        add("the number of units to flip detects mislabeled examples", "suggested, not measured", ours,
            _detection_verdict(arr))
    _depth_claim(base, add)
    return out


# The paper's claims asked of a language model with canaries: key -> (claim, the paper's statement). Each row's
# number says what it measures and the threshold its verdict uses.
LM_CLAIMS = {
    "repetition": ("memorization rises with repetition",
                   "memorization grows with the number of times a sequence is seen"),
    "heldout": ("held-out canaries are never extracted",
                "a secret is extracted only when it was trained on (the reference)"),
    "gradient_norm": ("canaries' gradient norm is comparable to the corpus's in every layer",
                      "comparable in every layer (images: the memorized 10% of examples)"),
    "gradient_cosine": ("canary and corpus gradients point in opposite directions",
                        "cosine below −0.75 most of the time (images)"),
    "rewinding": ("memorization is not confined to the last layers: rewinding a middle layer removes canaries",
                  "critical layers depend on dataset and architecture; not only the final ones"),
    "retraining": ("retraining one layer on corpus sequences only brings the canaries back for most layers",
                   "near 100% for most layers (exceptions: layers 4–5 on CIFAR-10)"),
    "few_units": ("a few units remove a canary", "fewer than 10 units for over 90% of memorized examples"),
    "cost": ("removing them costs little held-out accuracy", "a small drop, less than for typical examples"),
    "harder": ("more repeats make a canary harder to remove (more units)",
               "more strongly learned examples need more units (typical vs memorized images)"),
}
MIN_CANARY_EXTRACTION = 0.2  # below it, "halved" and "within 10 points" of the final extraction say nothing
# asked only of a run trained with memorization sinks and evaluated (`memloc evaluate RUN --drop-memorization`)
LM_SINKS_CLAIM = ("memorization sinks: dropping the sinks removes the repeated canaries (>= {repeated}x) — extraction "
                  "falls >= 80% and the loss gap closes >= 50% — at <= 5% held-out perplexity (drop vs eval)",
                  "dropping the sinks closes more than 50% of the loss gap between repeated and held-out sequences, "
                  "with validation loss equal to standard training (MemSinks, Ghosal et al. ICML 2025: SmolLM 360M "
                  "and 1.7B)")


def _points(v: float) -> str:
    return f"{100 * v:+.1f} points"


def _times(n: float, word: str) -> str:
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def lm_claims(run: RunDir) -> list[dict]:
    """The paper's claims asked of a language model with canaries (LM_CLAIMS), each with our number, the measure
    and its threshold, from the run's files alone; a claim whose files are missing is "not measured" with the
    command that makes them; and LM_SINKS_CLAIM after the row of LM_CLAIMS when the run's memorization sinks were
    evaluated (`memloc evaluate RUN --drop-memorization`)."""
    rows: dict[str, tuple[str, str]] = {}

    def add(key: str, ours: str, ok: bool | str) -> None:
        rows[key] = (ours, ok if isinstance(ok, str) else _holds(ok))

    def missing(probe: str) -> str:
        return f"not measured (run `memloc {probe_command(probe)} {run.path}`)"

    mem, mem_arr = _load_probe(run, "memorization")
    if mem is None:
        for key in ("repetition", "heldout"):
            add(key, "—", missing("memorization"))
    else:
        _repetition_claim(mem, add)
        _heldout_claim(mem, mem_arr, add)
    if run.has("gradients.npz"):
        _gradient_claims(run.load_arrays("gradients.npz", "layer_names", "clean_norm", "noisy_norm", "cosine"), add)
    else:
        for key in ("gradient_norm", "gradient_cosine"):
            add(key, "—", "not measured (no gradients.npz: the run was trained with --no-gradient-accounting)")
    for probe, claim in (("rewinding", _rewinding_claim), ("retraining", _retraining_claim)):
        s, arr = _load_probe(run, probe)
        if s is None:
            add(probe, "—", missing(probe))
        else:
            claim(arr, add)
    flip, flip_arr = _load_probe(run, "flipping")
    if flip is None:
        for key in ("few_units", "cost", "harder"):
            add(key, "—", missing("flipping"))
    else:
        _unit_claims(flip, add)
        if mem is None:
            add("harder", "—", missing("memorization"))
        else:
            _harder_claim(flip_arr, _canary_repeats(run) or {}, add)
    out = [{"claim": claim, "paper": paper, "ours": rows[key][0], "verdict": rows[key][1]}
           for key, (claim, paper) in LM_CLAIMS.items()]
    sinks, _ = _load_probe(run, "dropout")
    if sinks is not None and "repeated_before" in sinks:  # a language model's memorization sinks (memloc.methods.sinks)
        ours, verdict = _sinks_claim(sinks)
        out.append({"claim": LM_SINKS_CLAIM[0].format(repeated=sinks.get("repeated")), "paper": LM_SINKS_CLAIM[1],
                    "ours": ours, "verdict": verdict})
    return out


def _sinks_claim(summary: dict) -> tuple[str, str]:
    """(our numbers, verdict) of LM_SINKS_CLAIM: the canaries repeated >= summary["repeated"] times, tied -> drop.
    Any part that fails makes it "does not hold"; a part that cannot be measured (extraction before the drop
    under MIN_CANARY_EXTRACTION, no loss gap, no perplexity) makes it "not measured" when none fails."""
    b, a = (summary.get(k) if isinstance(summary.get(k), dict) else {} for k in ("repeated_before", "repeated_after"))
    k = summary.get("repeated")
    extracted, fall = _float(b.get("extracted")), _float(summary.get("extraction_fall"))
    closed, rise = _float(summary.get("gap_closed")), _float(summary.get("perplexity_rise"))
    ours = (f"canaries repeated ≥ {k}x (n = {_num(b.get('n'))}): extraction {_pct(extracted)} → "
            f"{_pct(_float(a.get('extracted')))} (fall {_pct(fall)}); loss gap {_fixed(b.get('loss_gap'), 2)} → "
            f"{_fixed(a.get('loss_gap'), 2)} nats (closed {_pct(closed)}); held-out perplexity "
            f"{_fixed(summary.get('heldout_perplexity_eval'), 3)} (eval) → "
            f"{_fixed(summary.get('heldout_perplexity_drop'), 3)} (drop), "
            + ("—" if rise is None else f"{100 * rise:+.1f}%")
            + " (holds if extraction falls ≥ 80%, the gap closes ≥ 50% and perplexity rises ≤ 5%)")
    parts: list[tuple[bool | None, str]] = [
        (None if extracted is None or extracted < MIN_CANARY_EXTRACTION or fall is None else fall >= 0.8,
         f"not measured: the model extracts {_pct(extracted)} of the canaries repeated ≥ {k}x before the drop "
         "(train longer)"),
        (None if closed is None else closed >= 0.5,
         "not measured: no loss gap before the drop (no held-out canaries of those repeat groups, or the trained "
         "ones are not predicted better)"),
        (None if rise is None else rise <= 0.05, "not measured: no held-out perplexity")]
    if any(ok is False for ok, _ in parts):
        return ours, _holds(False)
    why = [reason for ok, reason in parts if ok is None]
    return ours, why[0] if why else _holds(True)


def _repetition_claim(summary: dict, add: Callable) -> None:
    """In-context extraction at the largest repeat count minus at the smallest (holds at >= 50 points), and the
    secret canaries' exposure rising from the smallest repeat count to the largest."""
    rows = [r for r in _by_repeats(summary) if r.get("format") == "all"]
    key, measure = "in_context_extracted", "in-context extraction"
    if not any(_float(r.get(key)) is not None for r in rows):  # an older probe: from the canary's own prefix
        key, measure = "trained_extracted", "extraction from the canary's own prefix"
    pts = [(float(r["repeats"]), _float(r.get(key))) for r in rows]
    pts = [(x, y) for x, y in pts if y is not None]
    if len(pts) < 2:
        add("repetition", "—", "not measured (the memorization probe has fewer than two repeat counts)")
        return
    (r0, e0), (r1, e1) = pts[0], pts[-1]
    ours = (f"{measure} {_pct(e1)} at {_times(r1, 'repeat')} − {_pct(e0)} at {_times(r0, 'repeat')} = "
            f"{_points(e1 - e0)} (holds if ≥ +50)")
    ok = e1 - e0 >= 0.5
    secret = [r for r in _by_repeats(summary) if r.get("format") == "secret"] or rows
    exp = [(float(r["repeats"]), _float(r.get("trained_exposure"))) for r in secret]
    exp = [(x, y) for x, y in exp if y is not None]
    if len(exp) >= 2:
        steps = np.diff([y for _, y in exp])
        ours += (f"; secret canaries' exposure {exp[0][1]:.1f} bits at {_times(exp[0][0], 'repeat')} → "
                 f"{exp[-1][1]:.1f} at {_times(exp[-1][0], 'repeat')} "
                 f"({'rising at every step' if (steps > 0).all() else 'not at every step'}; "
                 "holds if it rises)")
        ok = ok and exp[-1][1] > exp[0][1]
    else:
        ours += "; no exposure measured"
    add("repetition", ours, ok)


def _heldout_claim(summary: dict, arrays: dict, add: Callable) -> None:
    """Held-out extraction in every row by repeat count and format (holds if 0 in all)."""
    vals = [v for v in (_float(r.get("heldout_extracted")) for r in _by_repeats(summary)) if v is not None]
    if not vals:
        add("heldout", "—", "not measured (the memorization probe measured no held-out canary)")
        return
    ours = f"held-out extraction at most {_pct(max(vals))} over {len(vals)} rows (repeat count × format)"
    if "trained" in arrays and "extracted" in arrays:
        held = ~arrays["trained"].astype(bool)
        ours += f"; {int(arrays['extracted'].astype(bool)[held].sum())} of {int(held.sum())} held-out canaries"
    add("heldout", ours + " (holds if 0 in every row)", max(vals) == 0)


def _gradient_claims(g: dict, add: Callable) -> None:
    """Per layer, the mean over the first quarter of epochs of the per-epoch canary/corpus norm ratio (holds if
    within [0.5, 2] in every layer) and of the cosine (holds if below 0 in every layer)."""
    names = [str(n) for n in g["layer_names"]]
    epochs = g["cosine"].shape[1]
    quarter = max(1, epochs // 4)
    ratio = (g["noisy_norm"] / np.maximum(g["clean_norm"], 1e-30))[:, :quarter].mean(1)  # (layers,)
    lo, hi = int(np.argmin(ratio)), int(np.argmax(ratio))
    add("gradient_norm", f"canary/corpus norm per layer, epochs 1–{quarter} of {epochs}: {ratio[lo]:.2f} "
        f"({names[lo]}) to {ratio[hi]:.2f} ({names[hi]}) over {len(names)} layers (holds if within [0.5, 2] in "
        "every layer)", bool(ratio.min() >= 0.5 and ratio.max() <= 2.0))
    cos = g["cosine"][:, :quarter].mean(1)  # (layers,)
    whole = g["cosine"].mean(1)
    add("gradient_cosine", f"mean cosine per layer, epochs 1–{quarter}: {cos.min():.2f} to {cos.max():.2f} (all "
        f"epochs: {whole.min():.2f} to {whole.max():.2f}; holds if below 0 in every layer)", bool(cos.max() < 0))


def _sweep_columns(arrays: dict) -> tuple[list[str], np.ndarray, dict[str, int], str | None]:
    """A layer sweep's layer names, accuracy (layers, epochs, subsets), subset positions, and why it cannot be
    read for the canaries (None when it can)."""
    subsets = {str(s): i for i, s in enumerate(arrays["subsets"])}
    names = [str(n) for n in arrays["layer_names"]]
    if "canary_train" not in subsets or "final" not in arrays:
        return names, arrays["accuracy"], subsets, "not measured (the probe did not measure canary-train extraction)"
    final = float(arrays["final"][subsets["canary_train"]])
    if not final >= MIN_CANARY_EXTRACTION:
        return names, arrays["accuracy"], subsets, (f"not measured: the final model extracts {_pct(final)} of the "
                                                    "trained canaries (train longer)")
    return names, arrays["accuracy"], subsets, None


def _last_block_start(names: list[str]) -> int:
    """Position of the first layer of the last numbered block (blocks.3.attn; transformer.h.11.mlp), or of the
    last layer when no name carries a block number: it and every layer after it are "the last layers"."""
    blocks = [m.group(1) if (m := re.match(r"(.*?\d+)\.", n)) else None for n in names]
    numbered = [b for b in blocks if b is not None]
    return blocks.index(numbered[-1]) if numbered else len(names) - 1


def _rewinding_claim(arrays: dict, add: Callable) -> None:
    """Of the layers whose rewinding to epoch 0 keeps held-out token accuracy within 10 points of the final model,
    how many halve canary-train extraction (holds if at least 2, not all in the last block)."""
    names, acc, subsets, why = _sweep_columns(arrays)
    if why is None and "test" not in subsets:
        why = "not measured (the probe did not measure held-out token accuracy)"
    if why is not None:
        add("rewinding", "—", why)
        return
    epochs = [int(e) for e in arrays["epochs"]]
    j = epochs.index(0) if 0 in epochs else int(np.argmin(epochs))
    canary, test = acc[:, j, subsets["canary_train"]], acc[:, j, subsets["test"]]  # (layers,)
    final_canary, final_test = (float(arrays["final"][subsets[s]]) for s in ("canary_train", "test"))
    working = np.nonzero(test >= final_test - 0.10)[0]
    halving = [int(i) for i in working if canary[i] <= final_canary / 2]
    ours = (f"rewound to epoch {epochs[j]}: {len(halving)} of {len(working)} layers that keep held-out token "
            f"accuracy within 10 points of {_pct(final_test)} cut canary-train extraction ({_pct(final_canary)}) "
            "by at least half")
    if len(working):
        most = int(working[np.argmin(canary[working])])
        ours += f"; most: {names[most]} ({_pct(canary[most])})"
    add("rewinding", ours + " (holds if at least 2 such layers, not only in the last block)",
        len(halving) >= 2 and min(halving) < _last_block_start(names))


def _retraining_claim(arrays: dict, add: Callable) -> None:
    """Of the layers whose reset took canary-train extraction more than 10 points below the final model's (the
    reset erased the canaries), how many end back within 10 points after retraining alone on the corpus (holds if
    more than half; `verdicts.recovery`). Layers the reset left within 10 points are "never lost", not counted."""
    names, acc, subsets, why = _sweep_columns(arrays)
    if why is not None:
        add("retraining", "—", why)
        return
    reset, last = acc[:, 0, subsets["canary_train"]], acc[:, -1, subsets["canary_train"]]  # (layers,)
    final = float(arrays["final"][subsets["canary_train"]])
    bar = final - 0.10
    v = verdicts.recovery(reset, last, names, back=bar, what="canary-train extraction")
    erased, back, kept = verdicts.erased_and_back(reset, last, bar)
    best = int(np.argmax(np.where(erased, last, -np.inf))) if erased.any() else int(np.argmax(last))
    add("retraining", f"{int(back.sum())} of the {int(erased.sum())} layers whose reset took canary-train extraction "
        f"more than 10 points below the final {_pct(final)} end back within 10 points; {int(kept.sum())} never lost, "
        f"not counted (best erased {names[best]}: {_pct(last[best])}; holds if more than half of the erased)",
        v.verdict == verdicts.HOLDS if v.measured else
        f"not measured: no layer's reset took canary-train extraction more than 10 points below {_pct(final)}")


def _unit_claims(summary: dict, add: Callable) -> None:
    """Median units to remove a canary (holds below 10) and the mean held-out accuracy drop (holds below 2 points)."""
    k = summary.get("kinds", {}).get("canary")
    if not k or not k.get("searched"):
        for key in ("few_units", "cost"):
            add(key, "—", "not measured (no canary sequence was searched: the model extracts none)")
        return
    median = _float(k.get("median_units"))
    add("few_units", f"median {'—' if median is None else _times(median, 'unit')} "
        f"(mean {_fixed(k.get('mean_units'), 1)}; "
        f"{_pct(_float(k.get('share_flipped_under_10')))} removed with under 10) over {k['searched']} canary "
        "sequences (holds if the median is below 10)", None if median is None else median < 10)
    drop = _float(k.get("mean_test_acc_drop"))
    if drop is None:
        add("cost", "—", "not measured (the flipping probe did not evaluate held-out accuracy)")
        return
    train = _float(k.get("mean_train_acc_drop"))
    add("cost", f"mean held-out token accuracy drop {100 * drop:.1f} points"
        + ("" if train is None else f" (extraction of the training sequences: {100 * train:.1f})")
        + " (holds if below 2 points)",
        drop < 0.02)


def _harder_claim(arrays: dict, repeats: dict[int, int], add: Callable) -> None:
    """Mean units of the removed canaries at the largest repeat count against the smallest searched one."""
    if "label" not in arrays or not repeats:
        add("harder", "—", "not measured (the flipping or memorization arrays do not say each sequence's canary)")
        return
    by = {r: units[flipped] for r, (units, flipped) in _units_by_repeats(arrays, repeats).items() if flipped.any()}
    if len(by) < 2:
        add("harder", "—", "not measured (the removed canaries have fewer than two repeat counts)")
        return
    (r0, u0), (r1, u1) = min(by.items()), max(by.items())
    add("harder", f"mean units {u0.mean():.1f} at {_times(r0, 'repeat')} (n = {len(u0)}) → {u1.mean():.1f} at "
        f"{_times(r1, 'repeat')} "
        f"(n = {len(u1)}); medians {_num(float(np.median(u0)))} → {_num(float(np.median(u1)))} (holds if the mean "
        "rises)", bool(u1.mean() > u0.mean()))


def claims_summary(rows: list[dict]) -> str | None:
    """One paragraph in words, from the claims' verdicts: how many hold, which do not, what was not measured."""
    if not rows:
        return None
    kinds = {"holds": [], "does not hold": [], "other": []}
    for r in rows:
        v = str(r.get("verdict", ""))
        kinds[v if v in kinds else "other"].append(str(r["claim"]))
    text = f"Of the paper's {len(rows)} claims asked of this run, {len(kinds['holds'])} hold"
    if kinds["does not hold"]:
        text += f" and {len(kinds['does not hold'])} do not: " + "; ".join(kinds["does not hold"])
    text += "."
    if kinds["other"]:
        text += (f" {len(kinds['other'])} could not be decided (not measured, or too few examples for the test): "
                 + "; ".join(kinds["other"]) + ".")
    return text + " Each verdict states its measure, test and threshold in the table below."


def claims_section(base: RunDir, drop: RunDir | None) -> Section:
    sec = Section("Summary: the paper's claims, measured")
    rows = claims(base, drop)
    words = claims_summary(rows)
    if words:
        sec.notes.append(words)
    if not rows:
        sec.missing = "no stage has finished yet"
    sec.tables.append(Table("summary_claims", "Each claim with our number; verdicts compare direction and rough size",
                            rows))
    return sec


def _open_study(path: Path) -> tuple[RunDir, list[tuple[str, RunDir | None, RunDir | None]]]:
    study = RunDir.open(path, kind="study")
    cells = []
    for seed, noise, _, b, d in study_cells(study):
        cells.append((f"seed {seed}, noise {noise:g}", RunDir.open(b) if (b / "run.json").exists() else None,
                      RunDir.open(d) if (d / "run.json").exists() else None))
    return study, cells


def _seed_table(cells) -> Table | None:
    """Each claim over the seeds of each noise level: the overall verdict (`verdicts.over_seeds`), the mean of its
    value with its 95% t interval over the seeds (n), how many seeds agree, then every seed's number and verdict."""
    if len(cells) < 2:
        return None
    per: dict[tuple[str, str], list] = {}
    for label, b, d in cells:
        if b is None or task_words(b).name == "lm":
            continue
        seed, _, noise = label.partition(", ")  # "seed S, noise N" (`_open_study`)
        for row, v in _decided_claims(b, d):
            v = replace(v, verdict=row["verdict"])  # "not measured: ..." counts as not enough data
            per.setdefault((row["claim"], noise), []).append((f"{seed}: {row['ours']} ({row['verdict']})", v))
    rows = []
    for (claim, noise), items in per.items():
        over = verdicts.over_seeds([v for _, v in items])
        said = {v.verdict for _, v in items}
        # no seed measured, all for one reason (e.g. "not measured: the model did not memorize ..."): say that reason
        verdict = said.pop() if len(said) == 1 and not over.counts[verdicts.HOLDS] + over.counts[verdicts.FAILS] \
            else over.verdict
        rows.append({"claim": claim, "noise": noise, "threshold": items[0][1].threshold,
                     "over seeds": over.summary(), "verdict": verdict,
                     "per seed": " | ".join(t for t, _ in items)})
    return Table("summary_seeds", "Each claim over seeds (per noise level): holds when a majority of seeds hold and "
                 "none fails; the mean of its value with its 95% t interval over the seeds (n seeds); then every "
                 "seed", rows) if rows else None


def _numbers_over_seeds(cells) -> list[dict]:
    task = task_words(next((b for _, b, _ in cells if b is not None), None))
    mem = task.memorized
    keys = {"final test accuracy": lambda b, d: (b.read_metrics() or [{}])[-1].get("test_acc"),
            f"final {_subset_title(mem, task).removesuffix(' (%)')}":
                lambda b, d: (b.read_metrics() or [{}])[-1].get(f"{mem}_acc"),
            "noisy-train after the drop": lambda b, d: (_load_probe(d, "dropout")[0] or {}).get("noisy_after"),
            "clean-train after the drop": lambda b, d: (_load_probe(d, "dropout")[0] or {}).get("clean_after")}
    rows = []
    for name, fn in keys.items():
        vals = [fn(b, d) for _, b, d in cells if b is not None]
        vals = [100 * v for v in vals if v is not None]
        if vals:
            rows.append({"measure": name, "mean (%)": round(float(np.mean(vals)), 2),
                         "sd (%)": round(float(np.std(vals, ddof=1)), 2) if len(vals) > 1 else 0.0, "n": len(vals)})
    return rows


def build_study_report(path: Path) -> Path:
    study, cells = _open_study(path)
    info = study.info
    cfg = info["config"]
    label, base, drop = cells[0]
    base_cfg = cfg.get("base") if isinstance(cfg.get("base"), dict) else {}
    model, data = (base_cfg.get(k) if isinstance(base_cfg.get(k), dict) else {} for k in ("model", "data"))
    if model.get("name") is None and base is not None:  # chosen from the data when the run was made: its own config
        model = (base.config.get("model") or {}) if isinstance(base.config, dict) else {}
    name = str(model.get("name") or "the default model")
    if isinstance(model.get("width"), (int, float)):
        name += f" (width {model['width']:g})"
    seconds = sum(v.get("seconds") or 0 for v in info.get("stages", {}).values() if isinstance(v, dict))
    device = "not recorded"
    if base is not None and base.has("env.json"):  # where the base model was trained
        env = base.read_json("env.json")
        device = str(env.get("device", device)) if isinstance(env, dict) else device
    intro = [f"Study `{path}`, preset {cfg.get('preset')}: {name} on {data.get('dataset')}; seeds "
             f"{cfg['seeds']}, noise levels {cfg['noise_levels']}; device {device}; "
             f"{seconds / 60:.0f} min of stages. Rebuilt from the study's files; nothing was recomputed."]
    # the report's own stage is left out: rebuilding a finished study must give the same page
    stages = {k: v for k, v in info.get("stages", {}).items() if isinstance(v, dict)}
    done = {k for k, v in stages.items() if v.get("status") == "done"}
    skipped = {k: v.get("reason", "") for k, v in stages.items() if v.get("status") == "skipped"}
    unfinished = [k for k in study_stages(study) if k not in done and k not in skipped]
    for reason in dict.fromkeys(skipped.values()):  # one line per reason (e.g. the model did not memorize)
        keys = [k for k, r in skipped.items() if r == reason]
        intro.append(f"Skipped: {', '.join(keys)}. {reason[:1].upper() + reason[1:]}.")
    if unfinished:
        intro.append(f"The study is not finished (stages not done: {', '.join(unfinished) or 'not started'}): "
                     f"finish it with `memloc run --resume {path}`.")
    if base is None:
        sections = [Section("Summary", missing="the base model has not been trained yet")]
        return write_report(path / "report", "memloc study report", intro, sections)
    summary = claims_section(base, drop)
    over = _numbers_over_seeds(cells)
    if len(cells) > 1 and over:
        summary.tables.append(Table("summary_mean_sd", "Mean ± sd over seeds and noise levels", over))
    seeds = _seed_table(cells)
    if seeds:
        summary.tables.append(seeds)
    sections = [summary] + run_sections(base)
    if drop is not None:
        dsec = dropout_section(drop)
        curves = learning_curves(drop)
        for f in curves.figures:
            f.name, f.caption = "dropout_learning_curves", (
                "Example-tied dropout model during training, measured in eval mode (every unit on at its "
                "expectation, not each example's own mask), so noisy-train stays low here although the model "
                "memorizes them through their masks (the figure above, 'before (tied)'): " + f.caption)
        dsec.figures = dsec.figures + curves.figures  # before/after first: the answer, then how training went
        sections.append(dsec)
    else:
        sections.append(Section("Example-tied dropout", missing="the dropout model has not been trained yet"))
    grid_csv = path / "grid" / "grid.csv"
    if grid_csv.exists():
        rows = list(csv.DictReader(io.StringIO(grid_csv.read_text())))
        gsec = Section("Example-tied dropout grid and baselines", tables=[Table("grid", "grid.csv", rows)],
                       notes=protection_notes(rows))
        fig = grid_tradeoff_figure(rows)
        if fig is not None:
            gsec.figures.append(Figure("grid_tradeoff", "Each cell of the grid after its drop: noisy-train accuracy "
                                       "left (lower: more memorization removed) against the clean-train accuracy it "
                                       "cost (left: cheaper); one point per (p_gen, p_mem), baselines marked. Look "
                                       "for example-tied points near the bottom left and baselines that stay high.",
                                       png(fig)))
        sections.append(gsec)
    return write_report(path / "report", "memloc study report", intro, sections)


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


def build_report(path: str | Path | RunDir) -> Path:
    """Rebuild the report of a run or study directory from its files; returns the path of report.html."""
    path = Path(path.path if isinstance(path, RunDir) else path)
    if (path / "study.json").exists():
        return build_study_report(path)
    run = RunDir.open(path)
    cfg = run.read_json("config.json") if run.has("config.json") else {}
    data, model = (cfg.get(k) if isinstance(cfg.get(k), dict) else {} for k in ("data", "model"))
    lm = task_words(run).name == "lm"
    if run.has(AUDIT_FILE) and not lm:  # a classifier trained elsewhere: its examples first, then every probe
        audited = run.read_json(AUDIT_FILE)
        intro = [f"Audit `{path}` of the classifier `{audited.get('model')}` ({model.get('name')}, width "
                 f"{model.get('width')}) on {data.get('dataset')}: its weights copied into the run (sha256 in "
                 f"{AUDIT_FILE}), {len(audited.get('checkpoints') or [])} earlier states with it. Rebuilt from the "
                 "run's files; nothing was recomputed."]
        return write_report(path / "report", "memloc audit", intro, classifier_audit_sections(run) +
                            [sec for sec in run_sections(run) if sec.missing is None])
    if run.has(AUDIT_FILE):  # a model trained elsewhere: its sequences first, no claims about canaries
        audited = run.read_json(AUDIT_FILE)
        intro = [f"Audit `{path}` of the model in `{audited.get('model')}` (not copied; its files' sha256 in "
                 f"{AUDIT_FILE}) on the sequences of `{data.get('corpus')}`. Rebuilt from the run's files; nothing "
                 "was recomputed."]
        return write_report(path / "report", "memloc audit", intro, audit_sections(run) +
                            [sec for sec in run_sections(run) if sec.missing is None])
    if lm:
        what = _lm_run_words(model, data)
    else:
        what = f"{model.get('name')} (width {model.get('width')}) on {data.get('dataset')}, noise {data.get('noise')}"
    intro = [f"Run `{path}`: {what}. Run format version {FORMAT_VERSION}. Rebuilt from the run's files; nothing was "
             "recomputed."]
    sections = ([claims_section(run, None)] if lm else []) + run_sections(run)
    return write_report(path / "report", "memloc report", intro, sections)


def _lm_run_words(model: dict, data: dict) -> str:
    """A language-model run in words: the model, the corpus and its canaries (config.json as it is, unchecked)."""
    def listed(v) -> str:
        return ", ".join(str(x) for x in v) if isinstance(v, list) else str(v)
    size = [w.format(model[k]) for k, w in (("n_layer", "{} layers"), ("n_head", "{} heads"), ("n_embd", "n_embd {}"))
            if model.get(k) is not None]
    size_text = f" ({', '.join(size)})" if size else ""
    corpus = data.get("corpus")
    corpus = Path(corpus).stem if isinstance(corpus, str) and corpus != "bible" else corpus
    return (f"{model.get('name')}{size_text} on {corpus} ({data.get('tokenizer')} "
            f"tokenizer, {data.get('block_size')} tokens per sequence); canaries: {data.get('canaries')} per format "
            f"({listed(data.get('canary_formats'))}) and repeat count ({listed(data.get('repeats'))}), as many held "
            "out")


# ----------------------------------------------------------------------------- an audit

def describe_removal(result) -> list[str]:
    s = result.summary

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    b, a, c = s["heldout_perplexity_before"], s["heldout_perplexity_after"], s["perplexity_cost"]
    cost = "not measured (no held-out text)" if c is None else f"{b:.2f} -> {a:.2f} ({100 * c:+.2f}%)"
    lines = [f"removal ({s['method']}, {s['zeroed']} of {s['units']} units zeroed): {s['targeted']} targeted sequences "
             f"extracted {pct(s['targeted_extracted_before'])} -> {pct(s['targeted_extracted_after'])}; held-out "
             f"perplexity {cost}"]
    if s["other_memorized"]:
        lines.append(f"  the other {s['other_memorized']} extracted sequences: {pct(1.0)} -> "
                     f"{pct(s['other_memorized_extracted_after'])}")
    if s["reached"] is False:
        lines.append(f"  the goal (at most {pct(s['until'])} extracted within {pct(s['max_cost'])} perplexity) was "
                     "not reached: the edit shown is the largest within the cost")
    aurocs = [f"{n} {q['auroc_before']:.2f} -> {q['auroc_after']:.2f}" for n, q in s["membership"].items()
              if q.get("auroc_before") is not None and q.get("auroc_after") is not None]
    if aurocs:
        lines.append("  membership AUROC: " + ", ".join(aurocs))
    return lines


def classifier_audit_sections(run: RunDir) -> list[Section]:
    """A classifier's audit, first screen: which training examples the model fits against the evidence (the
    detection's suspects it predicts with their given label), where (the layers the flipped examples' units lie in,
    prediction depth, the most critical layer rewound), from the run's files."""
    sec = Section("Audit: which training examples the classifier memorizes, and where")
    metrics = run.read_metrics()
    last = metrics[-1] if metrics else {}
    det_file = run.path / "probes" / "detection" / "summary.json"
    if not det_file.exists():
        sec.missing = f"the audit has not finished: `memloc audit --resume {run.path}`"
        return [sec]
    det = ProbeResult.load(run, "detection")
    a, summ = det.arrays, det.summary
    names = [str(n) for n in a["score_names"]]
    given, pred = np.asarray(a["given_label"]), a.get("predicted_label")
    fitted = None if pred is None else np.asarray(pred) == given
    noisy = np.asarray(a["is_noisy"], dtype=bool) if "is_noisy" in a else None
    n = len(given)
    if noisy is None or not noisy.any():
        sec.notes.append(f"The audited model predicts {_pct(last.get('clean_train_acc'))} of its training examples "
                         f"with their given label; test accuracy {_pct(last.get('test_acc'))}.")
    else:
        sec.notes.append(f"The audited model predicts {_pct(last.get('clean_train_acc'))} of the clean training "
                         f"examples and {_pct(last.get('noisy_train_acc'))} of the {int(noisy.sum())} known "
                         "mislabeled ones with their (wrong) given label: those it memorized; test accuracy "
                         f"{_pct(last.get('test_acc'))}.")
    rank = summ.get("rank_by", "aum")
    k = int(noisy.sum()) if noisy is not None and noisy.any() else max(1, n // 20)
    top = np.asarray(a["ranking"])[:k]
    if fitted is not None:
        memo = top[fitted[top]]
        sec.notes.append(f"Memorized, by the evidence: of the {k} most suspicious examples ({rank}; "
                         + ("as many as are known to be mislabeled" if noisy is not None and noisy.any()
                            else "the top 5%") + f"), the model predicts {len(memo)} with their given label"
                         + (f", {int(noisy[memo].sum())} of them known mislabeled" if noisy is not None else "")
                         + ". probes/detection/suspects.csv ranks every example, with its given and predicted label.")
    best = summ.get("best")
    if best:
        auroc = next((r.get("auroc") for r in summ.get("quality") or [] if r.get("score") == best), None)
        sec.notes.append(f"The best score for finding the known mislabeled examples: {best}"
                         + (f" (AUROC {auroc:.3f})." if auroc is not None else "."))
    flip_file = run.path / "probes" / "flipping" / "summary.json"
    if flip_file.exists():
        fr = ProbeResult.load(run, "flipping")
        counts = np.asarray(fr.arrays.get("layer_counts", np.zeros((0, 0))), dtype=np.float64)
        layer_names = [str(x) for x in fr.arrays.get("layer_names", [])]
        flipped = np.asarray(fr.arrays.get("flipped", np.zeros(0)), dtype=bool)
        if counts.size and flipped.any() and counts[flipped].sum() > 0:
            share = counts[flipped].sum(0) / counts[flipped].sum()
            order = np.argsort(-share)[:3]
            sec.notes.append("Where: the units whose removal flips the examples searched lie mostly in "
                             + ", ".join(f"{layer_names[i]} ({100 * share[i]:.0f}%)" for i in order if share[i] > 0)
                             + f"; {int(flipped.sum())} of {len(flipped)} searched examples flipped within the "
                             "budget (the flipping section below has them by kind).")
    if (run.path / "probes" / "depth" / "summary.json").exists():
        ds = ProbeResult.load(run, "depth").summary.get("depth") or {}
        med = {kd: v.get("median") for kd, v in ds.items() if isinstance(v, dict) and v.get("median") is not None}
        if med:
            sec.notes.append("Prediction depth (the layer from which the model has decided an example), median: "
                             + ", ".join(f"{kd.replace('_', '-')} {v:g}" for kd, v in med.items()) + ".")
    table = []
    col = {nm: i for i, nm in enumerate(names)}
    raw = np.asarray(a["raw"])
    for i in np.asarray(a["ranking"])[:20]:
        row = {"example": int(i), "given": int(given[i])}
        if pred is not None:
            row.update(predicted=int(pred[i]), fitted=bool(fitted[i]))
        if noisy is not None:
            row["known_mislabeled"] = bool(noisy[i])
        row.update({nm: (None if not np.isfinite(raw[i, j]) else round(float(raw[i, j]), 4)) for nm, j in col.items()})
        table.append(row)
    sec.tables.append(Table("audit_suspects", f"The 20 most suspicious training examples ({rank}), with every "
                            "score", table))
    return [sec]


def _token_scan_note(s: dict) -> str:
    """The streaming scan of a token file in a few words: what the rest of the audit section is a sample of."""
    share = "–" if s.get("extracted_share") is None else f"{100 * s['extracted_share']:.2f}%"
    q = s.get("membership") or {}
    aurocs = ", ".join(f"{n} {v['auroc']:.3f}" for n, v in q.items() if v.get("auroc") is not None)
    return (f"The whole token file {s.get('file')} was scanned: {s.get('extracted', 0):,} of its "
            f"{s.get('sequences', 0):,} sequences are extracted ({share} of the members and those of unknown "
            f"membership), membership AUROC over all of it: {aurocs or 'not enough data'} (probes/scan/scan.csv, a "
            f"row per sequence). Below: the {s.get('kept', 0):,} it keeps, every extracted one and a seeded sample of "
            "the others.")


def audit_sections(run: RunDir) -> list[Section]:
    """The audit's first screen: which sequences the model memorizes (extraction, membership), where (the layers of
    the removal's edit), and what the removal did, from the run's files."""
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}%"
    sec = Section("Audit: which sequences the model memorizes, and where")
    probes_dir = run.path / "probes"
    if not (probes_dir / "memorization" / "summary.json").exists():
        sec.missing = f"the scan has not finished: `memloc audit ... --out {run.path}` again"
        return [sec]
    if (probes_dir / "scan" / "summary.json").exists():  # a token file, scanned streaming
        sec.notes.append(_token_scan_note(run.read_json("probes/scan/summary.json")))
    scan = ProbeResult.load(run, "memorization")
    rows = scan.rows
    members = [r for r in rows if str(r.get("member")) == "True"]
    unknown = [r for r in rows if r.get("member") in (None, "", "None")]
    extracted = [r for r in rows if str(r.get("extracted")) == "True" and str(r.get("trained")) == "True"]
    sec.notes.append(f"{len(extracted)} of {len(members) + len(unknown)} audited sequences ({len(members)} known "
                     f"members, {len(unknown)} of unknown membership) are extracted: greedy decoding from the prefix "
                     "reproduces the suffix exactly.")
    quality = scan.summary.get("membership") or {}
    aurocs = [f"{n} {q['auroc']:.2f}" for n, q in quality.items() if q.get("auroc") is not None]
    if quality:
        first = next(iter(quality.values()))
        sec.notes.append(f"Membership inference, {first.get('members')} members against {first.get('non_members')} "
                         "non-members, AUROC: " + (", ".join(aurocs) or first.get("reason", "not enough data")) + ".")
    if (probes_dir / HISTORY / "summary.json").exists():
        hist = ProbeResult.load(run, HISTORY).summary
        steps = ", ".join(f"{Path(c['folder']).name} {pct(v)}" for c, v in zip(hist["checkpoints"], hist["extracted"]))
        sec.notes.append(f"When: the audited sequences extracted at each checkpoint (the audited model last): {steps}; "
                         f"{hist['forgotten']} extracted earlier and forgotten since. Layer rewinding to each "
                         "checkpoint: below.")
    if (probes_dir / "localize" / "summary.json").exists():
        loc = ProbeResult.load(run, "localize").summary
        where = [f"{layer['name']} {layer['zeroed']} of {layer['units']}" for layer in loc.get("layers", [])
                 if layer.get("zeroed")]
        sec.notes.append(f"Where ({loc.get('method')}): the {loc.get('zeroed')} units that carry the extracted "
                         f"sequences, by layer: {', '.join(where) or 'none'}.")
    if (probes_dir / REMOVAL / "summary.json").exists():
        removal = ProbeResult.load(run, REMOVAL)
        sec.notes.extend(describe_removal(removal))
        sweep = removal.summary.get("sweep") or []
        if len(sweep) > 1:
            plt = pyplot()
            fig, ax = plt.subplots(figsize=(6.4, 3.6))
            ks = [max(s["k"], 0.5) for s in sweep]
            ax.plot(ks, [100 * s["extracted"] for s in sweep], marker="o", color="tab:red",
                    label="targeted sequences extracted (%)")
            costs = [(k, 100 * s["cost"]) for k, s in zip(ks, sweep) if s.get("cost") is not None]
            if costs:
                ax.plot(*zip(*costs), marker="s", color="tab:blue", label="held-out perplexity change (%)")
            ax.axhline(100 * (removal.summary.get("until") or 0), ls="--", color="tab:red", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("units zeroed (0 drawn at 0.5)")
            ax.legend(fontsize=7)
            sec.figures.append(Figure("audit_removal", "The removal's edit grown until the targeted sequences are no "
                                      "longer extracted: extraction and the perplexity cost at each size.", png(fig)))
    table = []
    for r in sorted(rows, key=lambda r: (str(r.get("extracted")) != "True", float(r.get("loss") or np.inf))):
        where = "index" if "index" in r else "line"  # a token file's sequences: their positions in it
        table.append({where: r.get(where, r.get("canary")), "member": r.get("member"),
                      "extracted": r.get("extracted"),
                      **{k: r[k] for k in r if str(k).startswith("extracted_k")},
                      "loss": r.get("loss"), "mi_min_k_pp": r.get("mi_min_k_pp"),
                      "text": (str(r.get("prefix", "")) + " | " + str(r.get("secret", "")))[:120]})
    sec.tables.append(Table("audit_sequences", "Every audited sequence, the extracted ones first (| marks where "
                            "the suffix starts)", table))
    return [sec]
