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
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import RunError
from .runs import FORMAT_VERSION, RunDir, atomic_write, write_text


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


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: str | None = None  # why there is nothing here, and the command that makes it


# ----------------------------------------------------------------------------- plotting helpers

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 100, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: rebuilds are identical
    plt.close(fig)
    return buf.getvalue()


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.1f}%"


SUBSET_STYLE = {"clean_train": ("clean-train", "tab:blue"), "noisy_train": ("noisy-train", "tab:red"),
                "rare_train": ("rare-train", "tab:purple"), "test": ("test", "tab:green")}


# ----------------------------------------------------------------------------- sections of a run

def learning_curves(run: RunDir) -> Section:
    sec = Section("Learning curves")
    metrics = run.read_metrics()
    if not metrics:
        sec.missing = f"no metrics.jsonl: train with `memloc train --out {run.path}`"
        return sec
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [m["epoch"] for m in metrics]
    for key, (label, color) in SUBSET_STYLE.items():
        vals = [m.get(f"{key}_acc") for m in metrics]
        if any(v is not None for v in vals):
            ax.plot(epochs, [np.nan if v is None else 100 * v for v in vals], label=label, color=color)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%) against the given labels")
    ax.set_ylim(-2, 102)
    ax.legend(loc="lower right")
    ax.set_title("accuracy after each epoch (eval mode)")
    sec.figures.append(Figure("learning_curves", "Clean-train, noisy-train (memorized given labels) and test accuracy "
                              "after each epoch.", _png(fig)))
    sec.tables.append(Table("metrics", "Per-epoch metrics", metrics))
    return sec


def _windows(epochs: int) -> list[tuple[int, int]]:
    k = max(1, int(np.ceil(epochs / 4)))
    return [(a, min(a + k, epochs)) for a in range(0, epochs, k)]


def gradient_accounting(run: RunDir) -> Section:
    sec = Section("Gradient accounting")
    if not run.has("gradients.npz"):
        sec.missing = "no gradients.npz: the run was trained with --no-gradient-accounting or has no noisy examples"
        return sec
    g = run.load_arrays("gradients.npz")
    names, clean, noisy, cos = list(g["layer_names"]), g["clean_norm"], g["noisy_norm"], g["cosine"]
    epochs = clean.shape[1]
    plt = _pyplot()
    wins = _windows(epochs)
    fig, axes = plt.subplots(1, len(wins), figsize=(3.2 * len(wins), 3.4), sharey=True, squeeze=False)
    x = np.arange(len(names))
    for ax, (a, b) in zip(axes[0], wins):
        ax.bar(x - 0.2, clean[:, a:b].mean(1), 0.4, label="clean", color="tab:blue")
        ax.bar(x + 0.2, noisy[:, a:b].mean(1), 0.4, label="noisy", color="tab:red")
        ax.set_xticks(x, [str(i + 1) for i in x])
        ax.set_xlabel("layer")
        ax.set_title(f"epochs {a + 1}–{b}")
    axes[0][0].set_ylabel("summed gradient norm / sqrt(#params)")
    axes[0][0].legend()
    sec.figures.append(Figure("gradient_norms", "Norm of the epoch-summed gradient of the clean and of the noisy "
                              "examples per layer, divided by sqrt(number of parameters), averaged over epoch windows.",
                              _png(fig)))
    fig, ax = plt.subplots(figsize=(max(5, 0.15 * epochs + 2), 0.35 * len(names) + 1.5))
    im = ax.imshow(cos, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest",
                   extent=(0.5, epochs + 0.5, len(names) + 0.5, 0.5))
    ax.set_xlabel("epoch")
    ax.set_ylabel("layer")
    ax.set_yticks(range(1, len(names) + 1), [f"{i + 1} {n}" for i, n in enumerate(names)])
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="cosine(clean gradient, noisy gradient)")
    sec.figures.append(Figure("gradient_cosine", "Cosine similarity between the clean and the noisy epoch-summed "
                              "gradient, per layer and epoch.", _png(fig)))
    rows = [{"layer": n, "epoch": e + 1, "clean_norm": float(clean[i, e]), "noisy_norm": float(noisy[i, e]),
             "cosine": float(cos[i, e])} for i, n in enumerate(names) for e in range(epochs)]
    sec.tables.append(Table("gradients", "Per layer and epoch", rows))
    sec.notes.append(f"Share of (layer, epoch) cells with cosine below −0.75: {100 * (cos < -0.75).mean():.0f}%.")
    return sec


def _probe(run: RunDir, probe: str, command: str, title: str) -> tuple[Section, dict | None, dict | None]:
    sec = Section(title)
    d = run.path / "probes" / probe
    if not (d / "summary.json").exists():
        sec.missing = f"not run: `memloc {command} {run.path}`"
        return sec, None, None
    summary = json.loads((d / "summary.json").read_text())
    with np.load(d / "arrays.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return sec, summary, arrays


def rewinding(run: RunDir) -> Section:
    sec, summary, arrays = _probe(run, "rewinding", "rewind", "Layer rewinding")
    if summary is None:
        return sec
    acc, names, epochs, subsets = arrays["accuracy"], list(arrays["layer_names"]), arrays["epochs"], list(arrays["subsets"])
    plt = _pyplot()
    shown = [s for s in ("clean_train", "noisy_train", "test") if s in subsets and not np.all(np.isnan(acc[:, :, subsets.index(s)]))]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 0.35 * len(names) + 1.8), squeeze=False)
    for ax, s in zip(axes[0], shown):
        im = ax.imshow(100 * acc[:, :, subsets.index(s)], aspect="auto", cmap="viridis", vmin=0, vmax=100,
                       interpolation="nearest")
        step = max(1, len(epochs) // 8)
        ax.set_xticks(range(0, len(epochs), step), [str(e) for e in epochs[::step]])
        ax.set_yticks(range(len(names)), [f"{i + 1} {n}" for i, n in enumerate(names)])
        ax.set_xlabel("epoch the layer is rewound to")
        ax.set_title(SUBSET_STYLE[s][0] + " accuracy (%)")
        ax.grid(False)
        fig.colorbar(im, ax=ax)
    axes[0][0].set_ylabel("rewound layer")
    sec.figures.append(Figure("rewinding", "Accuracy of the final model with one layer (rows) put back to its "
                              "weights and BatchNorm statistics at an earlier epoch (columns).", _png(fig)))
    rows = [{"layer": n, "epoch": int(e), **{f"{s}_acc": float(acc[i, j, k]) for k, s in enumerate(subsets)}}
            for i, n in enumerate(names) for j, e in enumerate(epochs)]
    sec.tables.append(Table("rewinding", "Accuracy per rewound layer and epoch", rows))
    return sec


def retraining(run: RunDir) -> Section:
    sec, summary, arrays = _probe(run, "retraining", "retrain", "Layer retraining")
    if summary is None:
        return sec
    acc, names, epochs, subsets = arrays["accuracy"], list(arrays["layer_names"]), arrays["epochs"], list(arrays["subsets"])
    plt = _pyplot()
    cols = min(5, len(names))
    rws = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rws, cols, figsize=(2.6 * cols, 2.2 * rws + 0.4), sharex=True, sharey=True, squeeze=False)
    for i, n in enumerate(names):
        ax = axes[i // cols][i % cols]
        for s in ("clean_train", "noisy_train", "test"):
            if s in subsets:
                ax.plot(epochs, 100 * acc[i, :, subsets.index(s)], color=SUBSET_STYLE[s][1], label=SUBSET_STYLE[s][0])
        ax.set_title(f"{i + 1} {n}", fontsize=8)
        ax.set_ylim(-2, 102)
    for j in range(len(names), rws * cols):
        axes[j // cols][j % cols].axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("retraining epoch")
    for r in axes:
        r[0].set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize=7)
    sec.figures.append(Figure("retraining", "Each layer reset to its initialisation and retrained alone on the clean "
                              "examples only (every other layer frozen): accuracy per retraining epoch.", _png(fig)))
    rows = [{"layer": n, "epoch": int(e), **{f"{s}_acc": float(acc[i, j, k]) for k, s in enumerate(subsets)}}
            for i, n in enumerate(names) for j, e in enumerate(epochs)]
    sec.tables.append(Table("retraining", "Accuracy per retrained layer and epoch", rows))
    return sec


RUN_SECTIONS: list[Callable[[RunDir], Section]] = [learning_curves, gradient_accounting, rewinding, retraining]


# ----------------------------------------------------------------------------- assembly

def _table_html(rows: list[dict], limit: int = 40) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(k))}</td>" for k in keys) + "</tr>" for r in rows[:limit])
    more = f"<p class='note'>{len(rows) - limit} more rows in the CSV.</p>" if len(rows) > limit else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.9em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;text-align:right}
th{background:#f4f4f4}.missing{color:#a60}.note{color:#555;font-size:.9em}.holds{color:#070}.fails{color:#b00}"""


def render_html(title: str, intro: list[str], sections: list[Section]) -> str:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p class='note'>{line}</p>" for line in intro]
    toc = "".join(f"<li><a href='#s{i}'>{html.escape(s.title)}</a>{' (missing)' if s.missing else ''}</li>"
                  for i, s in enumerate(sections))
    parts.append(f"<ul>{toc}</ul>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.missing:
            parts.append(f"<p class='missing'>Missing: {html.escape(s.missing)}</p>")
        for note in s.notes:
            parts.append(f"<p class='note'>{note}</p>")
        for f in s.figures:
            data = base64.b64encode(f.png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(f.name)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
        for t in s.tables:
            if t.name.startswith("summary") or len(t.rows) <= 40:
                parts.append(f"<p class='note'>{html.escape(t.caption)}</p>{_table_html(t.rows)}")
            else:
                parts.append(f"<p class='note'>{html.escape(t.caption)}: {len(t.rows)} rows in tables/{t.name}.csv</p>")
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
    try:
        for s in sections:
            for f in s.figures:
                png = f.png
                atomic_write(out_dir / "figures" / f"{f.name}.png", lambda p, png=png: p.write_bytes(png))
            for t in s.tables:
                _write_csv(out_dir / "tables" / f"{t.name}.csv", t.rows)
        page = out_dir / "report.html"
        write_text(page, render_html(title, intro, sections))
    except OSError as err:
        raise RunError(f"could not write the report into {out_dir} ({err.strerror or err}): free some disk space "
                       "or choose another folder; files already there are unchanged") from None
    return page


def run_sections(run: RunDir, extra: list[Callable[[RunDir], Section]] | None = None) -> list[Section]:
    return [f(run) for f in RUN_SECTIONS + (extra or [])]


def build_report(path: str | Path) -> Path:
    """Rebuild the report of a run directory from its files; returns the path of report.html."""
    path = Path(path)
    run = RunDir.open(path)
    cfg = run.read_json("config.json") if run.has("config.json") else {}
    data, model = cfg.get("data", {}), cfg.get("model", {})
    intro = [f"Run <code>{html.escape(str(path))}</code>: {html.escape(str(model.get('name')))} "
             f"(width {model.get('width')}) on {html.escape(str(data.get('dataset')))}, noise {data.get('noise')}. "
             f"Run format version {FORMAT_VERSION}. Rebuilt from the run's files; nothing was recomputed."]
    return write_report(path / "report", "memloc report", intro, run_sections(run))
