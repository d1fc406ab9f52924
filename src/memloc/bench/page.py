"""The page of `memloc bench-localize` (OUT/report/index.html), rebuilt from the dict it writes to bench.json alone.

`write_bench_report(out, info)` writes one self-contained HTML file (every figure a PNG data URI, no other file
beside it) from `info`, bench.json's dict: the summary lines as the intro, the trade-off figures, the rows as
tables (methods as rows, the published numbers beside them) and the settings, machine and date. It never runs a
model. Values that are None, missing or not numbers are drawn as gaps and shown as "—"; a row with a "note"
(tinymem: a layer count with no memorized artifact) is left out of the figures and its note is shown.

* tinymem: the artifacts still memorized after zeroing the top fraction of the MLP neurons against the relative
  perplexity change and against the relative clean accuracy loss, one panel per layer count.
* inj: recall@k of the injected neurons pooled over layers per method and ratio, and per layer.
* del: the memorized sequences' own teacher-forced accuracy after the edit against the relative perplexity change,
  and the drop of their own accuracy against the drop of the other memorized sequences' (specificity).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.figures import png, pyplot
from ..core.files import _jsonable, write_text
from ..report.html import Figure, Section, Table, render_html
from ..report.sections.sinks import _change
from ..report.words import _fixed, _float, _pct, _points

TITLES = {"tinymem": "TinyMem arithmetic (noise artifacts)", "inj": "INJ: injected sequences (MemPi)",
          "del": "DEL: naturally memorized sequences (MemPi)"}
PAGE_ROWS = 40  # render_html shows at most this many rows of a table: longer tables are split
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
          "tab:cyan", "black")
RANDOM = "random"  # the baseline method: grey and dashed in every figure


# ----------------------------------------------------------------------------- reading the rows

def _as_json(info) -> dict:
    """`info` as bench.json holds it (tuples as lists, numpy numbers as Python ones), so that the page built from
    the dict in memory and the page rebuilt from the file are the same; {} unless a dict."""
    return json.loads(json.dumps(info, default=_jsonable)) if isinstance(info, dict) else {}


def _rows(info: dict) -> list[dict]:
    """The rows of bench.json that are dicts (anything else is ignored); a weight edit's method named "M (weights)",
    so that it is a line and a table row of its own beside the same method on neurons."""
    rows = info.get("rows")
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    return [dict(r, method=f"{r.get('method')} (weights)") if r.get("unit_kind") == "weights" else r for r in rows]


def _drawn(rows: list[dict]) -> list[dict]:
    """The rows the figures draw: those without a note (tinymem: a layer count with no memorized artifact)."""
    return [r for r in rows if "note" not in r]


def _order(v) -> tuple:
    """Sort key of a value that should be a number (layer count, fraction) but may be anything."""
    f = _float(v)
    return (f is None, f if f is not None else 0.0, str(v))


def _by(rows: list[dict], key: str) -> dict:
    """The rows grouped by `key`, groups in numeric order, rows in their own order."""
    groups: dict = {}
    for r in sorted(rows, key=lambda r: _order(r.get(key))):
        v = r.get(key)
        groups.setdefault(v if v is None or isinstance(v, (int, float, str)) else str(v), []).append(r)
    return groups


def _methods(info: dict, rows: list[dict]) -> list[str]:
    """The methods in the settings' order, then any other method of the rows, random last."""
    listed = (info.get("settings") or {}).get("methods") if isinstance(info.get("settings"), dict) else None
    out = [str(m) for m in listed] if isinstance(listed, list) else []
    out += [m for m in dict.fromkeys(str(r.get("method")) for r in rows) if m not in out]
    return [m for m in out if m != RANDOM] + ([RANDOM] if RANDOM in out else [])


def _styles(methods: list[str]) -> dict[str, dict]:
    """Each method's color and line: a color of its own in `methods`' order; random grey and dashed."""
    styles, others = {}, [m for m in methods if m != RANDOM]
    for i, m in enumerate(others):
        styles[m] = {"color": COLORS[i % len(COLORS)], "ls": "-"}
    styles[RANDOM] = {"color": "tab:gray", "ls": "--"}
    if f"{RANDOM} (weights)" in styles:  # random weights: the baseline too, dotted
        styles[f"{RANDOM} (weights)"] = {"color": "tab:gray", "ls": ":"}
    return styles


def _share(v) -> str:
    """A share of the neurons in percent: 0.005 -> "0.5%"."""
    f = _float(v)
    return "—" if f is None else f"{100 * f:g}%"


def _signed(v) -> str:
    """A relative change in percent with its sign: -0.0064 -> "-0.64%"."""
    f = _float(v)
    return "—" if f is None else f"{100 * f:+.2f}%"


def _rel(after, before) -> float | None:
    """after / before - 1 (None unless both are numbers and before > 0)."""
    a, b = _float(after), _float(before)
    return None if a is None or b is None or b <= 0 else a / b - 1.0


def _drop(r: dict, key: str) -> float | None:
    """The fall {key}_before - {key}_after of a rate (None unless both are numbers)."""
    b, a = _float(r.get(f"{key}_before")), _float(r.get(f"{key}_after"))
    return None if a is None or b is None else b - a


def _mean(values) -> float | None:
    vals = [v for v in (_float(x) for x in values) if v is not None]
    return float(np.mean(vals)) if vals else None


def _pc(v) -> str:
    return _pct(_float(v))


def _tables(name: str, caption: str, rows: list[dict]) -> list[Table]:
    """`rows` as tables of at most PAGE_ROWS rows each (render_html cuts longer ones), all shown on the page."""
    parts = [rows[i:i + PAGE_ROWS] for i in range(0, len(rows), PAGE_ROWS)]
    return [Table(f"summary_{name}" + (f"_{i + 1}" if len(parts) > 1 else ""),
                  caption + (f" (part {i + 1} of {len(parts)})" if len(parts) > 1 else ""), part)
            for i, part in enumerate(parts)]


# ----------------------------------------------------------------------------- figures

def _legend_axis(ax, handles: list) -> None:
    """An axis of its own (right of the panels) holding the legend."""
    ax.axis("off")
    ax.legend(handles=handles, loc="center left", fontsize=7, frameon=False)


def _lines_figure(panels: list[tuple[str, list[dict], float | None]], *, x: Callable[[dict], float | None],
                  y: Callable[[dict], float | None], share: str, share_words: str, methods: list[str], xlabel: str,
                  ylabel: str, diagonal: bool = False):
    """One panel per (title, rows, before): per method, a marker per row at (100 x(row), 100 y(row)) and a line
    through them in the order of `share` (the fraction or ratio zeroed; the larger, the bigger the marker); a dashed
    horizontal line at 100 before (None: none); with `diagonal`, the line y = x. Rows whose x or y is None are
    left out."""
    from matplotlib.lines import Line2D
    plt = pyplot()
    shares = sorted({s for _, rows, _ in panels for r in rows if (s := _float(r.get(share))) is not None})
    size = {s: 16.0 + 34.0 * i for i, s in enumerate(shares)}  # marker area (points^2)
    styles = _styles(methods)
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.4 * len(panels) + 1.9, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0] * len(panels) + [0.42]})
    drawn = set()
    for ax, (title, rows, before) in zip(axes[0], panels):
        ys, xs = [], []
        for m in methods:
            pts = [(_float(r.get(share)), x(r), y(r)) for r in rows if str(r.get("method")) == m]
            pts = sorted(((s, 100 * a, 100 * b) for s, a, b in pts if a is not None and b is not None),
                         key=lambda p: -1.0 if p[0] is None else p[0])
            if not pts:
                continue
            st = styles[m]
            px, py = [p[1] for p in pts], [p[2] for p in pts]
            ax.plot(px, py, color=st["color"], ls=st["ls"], lw=1.2, zorder=2)
            ax.scatter(px, py, s=[size.get(p[0], 16.0) for p in pts], color=st["color"], zorder=3)
            xs += px
            ys += py
            drawn.add(m)
        if before is not None:
            ax.axhline(100 * before, color="black", ls="--", lw=0.9, zorder=1)
            ax.annotate(f"before {_pct(before)}", (1.0, 100 * before), xycoords=("axes fraction", "data"),
                        xytext=(-3, 3), textcoords="offset points", ha="right", va="bottom", fontsize=7)
            ys.append(100 * before)
        if diagonal and xs:
            lo, hi = min(xs + ys + [0.0]), max(xs + ys + [0.0])
            ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls=":", zorder=1)
        ax.axvline(0, color="black", lw=0.6, ls=":", zorder=1)
        if ys:
            ax.set_ylim(min(ys + [0.0]) - 2, min(max(ys + [0.0]) * 1.08 + 2, 103 if min(ys) >= 0 else np.inf))
        if not xs:
            ax.text(0.5, 0.5, "no row to draw", ha="center", va="center", transform=ax.transAxes, color="tab:gray")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel(ylabel)
    handles = [Line2D([], [], marker="o", markersize=5, label=m, **styles[m]) for m in methods if m in drawn]
    handles += [Line2D([], [], ls="", marker="o", color="tab:gray", markersize=float(np.sqrt(size[s])),
                       label=f"{_share(s)} {share_words}") for s in shares]
    if any(before is not None for _, _, before in panels):
        handles.append(Line2D([], [], color="black", ls="--", lw=0.9, label="before the edit"))
    if diagonal:
        handles.append(Line2D([], [], color="black", ls=":", lw=0.8, label="self drop = others drop"))
    _legend_axis(axes[0][-1], handles)
    return fig


def _recall_figure(panels: list[tuple[str, list[dict]]], methods: list[str]):
    """One panel per (title, rows): a group of bars per ratio, one bar per method (random hatched), the height the
    mean recall_pooled of its rows; a dashed grey line across each group at random's recall."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    plt = pyplot()
    styles = _styles(methods)
    groups = max(len(_by(rows, "ratio")) for _, rows in panels)
    width = max(4.4, 0.12 * len(methods) * groups + 1.5)  # of a panel: bars stay readable with many methods
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(width * len(panels) + 1.9, 3.8), squeeze=False,
                             gridspec_kw={"width_ratios": [width] * len(panels) + [1.9]})
    w = 0.8 / max(1, len(methods))
    for ax, (title, rows) in zip(axes[0], panels):
        ratios = _by(rows, "ratio")
        for g, part in enumerate(ratios.values()):
            for i, m in enumerate(methods):
                v = _mean(r.get("recall_pooled") for r in part if str(r.get("method")) == m)
                if v is not None:
                    ax.bar(g + (i - (len(methods) - 1) / 2) * w, v, w, color=styles[m]["color"],
                           hatch="//" if m == RANDOM else None, edgecolor="white" if m == RANDOM else None)
            rv = _mean(r.get("recall_pooled") for r in part if r.get("method") == RANDOM)
            if rv is not None:
                ax.hlines(rv, g - 0.45, g + 0.45, color="tab:gray", ls="--", lw=1.2, zorder=3)
        ks = [next((r.get("k_per_layer") for r in part if r.get("k_per_layer") is not None), None)
              for part in ratios.values()]
        ax.set_xticks(range(len(ratios)), [f"ratio {_share(ratio)}" + ("" if k is None else f"\n(k = {k} per layer)")
                                           for ratio, k in zip(ratios, ks)])
        ax.set_ylim(-0.02, 1.05)  # random's line at 0 stays in view
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("recall@k of the injected neurons (pooled)")
    handles = [Patch(facecolor=styles[m]["color"], edgecolor="white" if m == RANDOM else styles[m]["color"],
                     hatch="//" if m == RANDOM else None, label=m) for m in methods]
    handles.append(Line2D([], [], color="tab:gray", ls="--", lw=1.2, label="random's recall"))
    _legend_axis(axes[0][-1], handles)
    return fig


def _per_layer_figure(panels: list[tuple[str, list[dict]]], methods: list[str]):
    """One panel per (title, rows): recall@k per layer (columns) and method (rows), the mean over the method's rows;
    entries that are not numbers are left blank."""
    plt = pyplot()
    layers = max(len(r["recall_per_layer"]) for _, rows in panels for r in rows)
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=((0.45 * layers + 2.6) * len(panels) + 0.8, 0.3 * len(methods) + 1.6))
    im = None
    for ax, (title, rows) in zip(axes[0], panels):
        grid = np.full((len(methods), layers), np.nan)  # (methods, layers)
        for i, m in enumerate(methods):
            per = [r["recall_per_layer"] for r in rows if str(r.get("method")) == m]
            for j in range(layers):
                v = _mean(p[j] for p in per if j < len(p))
                grid[i, j] = np.nan if v is None else v
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        if grid.size <= 300:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.5 else "black")
        ax.set_xticks(range(layers), [str(j + 1) for j in range(layers)])
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
        ax.grid(False)
    fig.colorbar(im, ax=axes[0][-1], label="recall@k in the layer")
    return fig


def _add_figure(sec: Section, name: str, caption: str, draw: Callable, *args, **kwargs) -> None:
    """Append the figure `draw(*args, **kwargs)` makes, or a note saying why it could not be drawn: the page is
    rewritten while a benchmark runs, and a value it did not expect must cost a figure, not the benchmark."""
    plt = pyplot()
    open_before = set(plt.get_fignums())
    try:
        fig = draw(*args, **kwargs)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as err:
        for num in set(plt.get_fignums()) - open_before:  # the half-drawn figure only
            plt.close(num)
        sec.notes.append(f"The figure {name} could not be drawn ({type(err).__name__}: {err}).")
        return
    sec.figures.append(Figure(name, caption, png(fig)))


# ----------------------------------------------------------------------------- sections per benchmark

def _tinymem_sections(info: dict, rows: list[dict]) -> list[Section]:
    methods = _methods(info, rows)
    fig_sec = Section("Trade-off: memorization left against its cost")
    layers = _by(rows, "n_layer")
    for n, part in layers.items():
        notes = list(dict.fromkeys(str(r["note"]) for r in part if "note" in r))
        for note in notes:
            fig_sec.notes.append(f"{n} layers (memorized before: {_pc(part[0].get('memorized_before'))}): {note}; "
                                 "left out of the figures.")
    panels = []
    for n, part in layers.items():
        drawn = _drawn(part)
        if drawn:
            units = next((r.get("units") for r in drawn if r.get("units") is not None), None)
            panels.append((f"{n} layers" + ("" if units is None else f", {units} MLP neurons"), drawn,
                           _mean(r.get("memorized_before") for r in drawn)))
    if panels:
        common = dict(y=lambda r: _float(r.get("memorized_after")), share="fraction",
                      share_words="of the neurons zeroed", methods=methods,
                      ylabel="trained artifacts still memorized (%)")
        _add_figure(fig_sec, "tinymem_tradeoff_perplexity", "Share of the trained noise artifacts still memorized "
                    "(their 50-token continuation reproduced from the prompt) after zeroing each method's top "
                    "fraction of the MLP neurons (pooled over layers; the larger the marker, the larger the "
                    "fraction), against the relative change of the held-out clean perplexity, ppl after / ppl "
                    "before − 1. One line per method, one panel per layer count; dashed: memorized before the "
                    "edit; grey dashed: random neurons (the baseline). Best is low and left.",
                    _lines_figure, panels, x=lambda r: _rel(r.get("ppl_after"), r.get("ppl_before")),
                    xlabel="relative perplexity change (%)", **common)
        _add_figure(fig_sec, "tinymem_tradeoff_accuracy", "The same edits against the relative loss of held-out "
                    "clean next-token accuracy (teacher-forced, every position), 1 − acc after / acc before "
                    "(TinyMem's \"relative accuracy change\" with the sign flipped: right is worse).",
                    _lines_figure, panels, x=lambda r: None if (v := _float(r.get("rel_acc_change"))) is None else -v,
                    xlabel="relative clean accuracy loss (%)", **common)
    else:
        fig_sec.notes.append("No row to draw: no layer count has a memorized artifact to localize yet.")
    tab_sec = Section("Results per layer count (methods as rows)")
    for n, part in layers.items():
        train = next((r.get("train_s") for r in part if "train_s" in r), None)
        caption = (f"{n} layers: memorized before {_pc(part[0].get('memorized_before'))} of "
                   f"{_fixed(part[0].get('artifacts'), 0)} trained artifacts; "
                   + (f"trained in {_fixed(train, 0)} s" if _float(train) is not None else "model reused or not "
                      "timed")
                   + "; zeroed: k neurons (share of the MLP neurons, pooled); scoring: the method's localization "
                   "time; TinyMem: the published result of the method (math noise, best settings)")
        tab_sec.tables += _tables(f"tinymem_{n}l", caption, [_tinymem_row(r) for r in part])
    return [fig_sec, tab_sec]


def _tinymem_row(r: dict) -> dict:
    """A tinymem row for the table, like results.md: rates in %, before → after."""
    noted = "note" in r
    return {"method": str(r.get("method")),
            "zeroed": "—" if noted else f"{_fixed(r.get('k'), 0)} ({_share(r.get('fraction'))})",
            "memorized before": _pc(r.get("memorized_before")), "memorized after": _pc(r.get("memorized_after")),
            "removed": _pc(r.get("removed")), "clean accuracy": "—" if noted else _change(r, "acc", _pc),
            "rel. accuracy change": _signed(r.get("rel_acc_change")),
            "perplexity": "—" if noted else (f"{_change(r, 'ppl', lambda v: _fixed(v, 3))} "
                                             f"({_signed(_rel(r.get('ppl_after'), r.get('ppl_before')))})"),
            "clean extraction": "—" if noted else _change(r, "clean_extraction", _pc),
            "scoring (s)": _fixed(r.get("scoring_s"), 1),
            "TinyMem (published)": str(r["note"]) if noted else str(r.get("published") or "—")}


def _inj_sections(info: dict, rows: list[dict]) -> list[Section]:
    methods = _methods(info, rows)
    fig_sec = Section("Recall of the injected neurons")
    layers = _by(rows, "n_layer")
    panels = [(f"{n} layers", part) for n, part in layers.items()]
    _add_figure(fig_sec, "inj_recall", "Recall@k of the injected neurons: the share of the neurons each held-out "
                "sequence was fine-tuned into that are among the method's top k × layers neurons (pooled over "
                "layers), mean over the injected sequences; one group per ratio (the share of each layer's neurons "
                "injected, k = ceil(ratio × width) per layer). Grey hatched bar and dashed line: random neurons, "
                "the baseline.", _recall_figure, panels, methods)
    per = [(f"{n} layers, ratio {_share(ratio)}", [r for r in rr if isinstance(r.get("recall_per_layer"), list)])
           for n, part in layers.items() for ratio, rr in _by(part, "ratio").items()]
    per = [(t, rr) for t, rr in per if rr and any(r["recall_per_layer"] for r in rr)]
    if per:
        _add_figure(fig_sec, "inj_recall_per_layer", "Recall@k within each layer (the top k of the layer's "
                    "neurons against the neurons injected there), per method and layer, mean over the sequences.",
                    _per_layer_figure, per, methods)
    published = list(dict.fromkeys(str(r["published"]) for r in rows if r.get("published")))
    tab_sec = Section("Results (methods as rows)")
    tab_sec.notes += [f"MemPi (published): {p}." for p in published]
    tab_sec.tables += _tables("inj", "Per layer count, method and ratio: recall@k pooled and per layer (mean over "
                              "the sequences), the share of injected sequences extracted before localization, the "
                              "scoring time and the method's place in MemPi's ranking (1: best)",
                              [_inj_row(r) for r in rows])
    return [fig_sec, tab_sec]


def _inj_row(r: dict) -> dict:
    per = r.get("recall_per_layer")
    return {"layers": _fixed(r.get("n_layer"), 0), "method": str(r.get("method")), "ratio": _share(r.get("ratio")),
            "k / layer": _fixed(r.get("k_per_layer"), 0), "sequences": _fixed(r.get("sequences"), 0),
            "injected extracted": _pc(r.get("injected_extracted")),
            "recall@k pooled": _fixed(r.get("recall_pooled"), 3),
            "recall@k per layer": ", ".join(_fixed(v, 2) for v in per) if isinstance(per, list) else "—",
            "scoring (s)": _fixed(r.get("scoring_s"), 1), "MemPi rank": _fixed(r.get("mempi_rank"), 0)}


def _del_sections(info: dict, rows: list[dict]) -> list[Section]:
    methods = _methods(info, rows)
    fig_sec = Section("Trade-off and specificity")
    layers = _by(rows, "n_layer")
    def title(n) -> str:
        return "the LM run's model" if n is None else f"{n} layers"
    common = dict(share="ratio", share_words="of each layer's neurons zeroed", methods=methods)
    _add_figure(fig_sec, "del_tradeoff", "The memorized sequences' own teacher-forced accuracy on their secret after "
                "zeroing each method's top ceil(ratio × width) neurons of every layer (each sequence localized "
                "alone; mean over the sequences; the larger the marker, the larger the ratio), against the relative "
                "change of the held-out corpus perplexity. One line per method; dashed: the accuracy before the "
                "edit; grey dashed: random neurons (the baseline). Best is low and left.",
                _lines_figure, [(title(n), part, _mean(r.get("self_acc_before") for r in part))
                                for n, part in layers.items()],
                x=lambda r: _float(r.get("rel_ppl_change")) if _float(r.get("rel_ppl_change")) is not None
                else _rel(r.get("ppl_after"), r.get("ppl_before")),
                y=lambda r: _float(r.get("self_acc_after")), xlabel="relative perplexity change (%)",
                ylabel="own accuracy after the edit (%)", **common)
    _add_figure(fig_sec, "del_specificity", "Specificity: the fall of the sequence's own teacher-forced accuracy "
                "(self drop) against the fall of the other memorized sequences' (others drop), in points, per "
                "method and ratio; specificity = self drop − others drop, the height above the dotted diagonal. "
                "Best is high and left.",
                _lines_figure, [(title(n), part, None) for n, part in layers.items()],
                x=lambda r: _drop(r, "others_acc"), y=lambda r: _drop(r, "self_acc"),
                xlabel="others drop (points)", ylabel="self drop (points)", diagonal=True, **common)
    tab_sec = Section("Results (methods as rows)")
    for key, words in (("run", "Model: the language-model run"), ("memorized", "Memorized sequences in the run")):
        for v in dict.fromkeys(str(r[key]) for r in rows if r.get(key) is not None):
            tab_sec.notes.append(f"{words}: {v}.")
    tab_sec.tables += _tables("del", "Per method and ratio, means over the sequences: own (self) and the other "
                              "memorized sequences' (others) teacher-forced accuracy and extraction before → after "
                              "the edit, specificity (self drop − others drop), held-out perplexity, the scoring "
                              "time and the method's place in MemPi's ranking (1: best)", [_del_row(r) for r in rows])
    return [fig_sec, tab_sec]


def _del_row(r: dict) -> dict:
    out = {"layers": _fixed(r.get("n_layer"), 0)} if r.get("n_layer") is not None else {}
    spec = _float(r.get("specificity"))
    return out | {"method": str(r.get("method")), "ratio": _share(r.get("ratio")),
                  "k / layer": _fixed(r.get("k_per_layer"), 0), "sequences": _fixed(r.get("sequences"), 0),
                  "self accuracy": _change(r, "self_acc", _pc), "self extracted": _change(r, "self_extracted", _pc),
                  "others accuracy": _change(r, "others_acc", _pc),
                  "others extracted": _change(r, "others_extracted", _pc),
                  "specificity": "—" if spec is None else _points(spec),
                  "perplexity": f"{_change(r, 'ppl', lambda v: _fixed(v, 3))} ({_signed(r.get('rel_ppl_change'))})",
                  "scoring (s)": _fixed(r.get("scoring_s"), 1), "MemPi rank": _fixed(r.get("mempi_rank"), 0)}


SECTIONS = {"tinymem": _tinymem_sections, "inj": _inj_sections, "del": _del_sections}


# ----------------------------------------------------------------------------- settings and assembly

def _value(v) -> str:
    """A setting as one line: lists joined by commas, dicts as key=value."""
    if isinstance(v, dict):
        return "; ".join(f"{k}={_value(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return "—" if v is None else str(v)


def _settings_section(info: dict) -> Section:
    sec = Section("Settings, machine and date")
    run = [("benchmark", info.get("benchmark")), ("preset", info.get("preset")),
           ("finished", info.get("done")), ("date", info.get("date")),
           ("elapsed", None if _float(info.get("elapsed_s")) is None else f"{_fixed(info['elapsed_s'], 0)} s"),
           ("scale", info.get("scale"))]
    sec.tables.append(Table("summary_run", "The benchmark", [{"field": k, "value": _value(v)} for k, v in run
                                                              if v is not None]))
    for key, caption in (("settings", "Settings (bench.json's \"settings\")"),
                         ("machine", "Machine (bench.json's \"machine\")")):
        d = info.get(key)
        if isinstance(d, dict) and d:
            sec.tables += _tables(key, caption, [{"field": str(k), "value": _value(v)} for k, v in d.items()])
    return sec


def bench_sections(info: dict) -> list[Section]:
    """The sections of a bench-localize page from bench.json's dict: the benchmark's figures and its table of rows
    (or one section saying there are no rows), then the settings, machine and date."""
    info = _as_json(info)
    bench, rows = info.get("benchmark"), _rows(info)
    raw = info.get("rows")
    if bench not in SECTIONS:
        sections = [Section("Results", missing=f"unknown benchmark {bench!r}: bench.json's \"benchmark\" should be "
                            f"one of {', '.join(SECTIONS)}")]
    elif not rows:
        why = ("no rows yet: the benchmark has not finished a layer count (del: a sequence)" if not raw
               else f"no rows: bench.json's rows is a {type(raw).__name__}, not a list" if not isinstance(raw, list)
               else f"no rows: none of the {len(raw)} entries of bench.json's rows is a row (a dict)")
        sections = [Section("Results", missing=why)]
    else:
        sections = SECTIONS[bench](info, rows)
        if isinstance(raw, list) and len(raw) > len(rows):
            sections[0].notes.append(f"{len(raw) - len(rows)} of bench.json's {len(raw)} rows are not dicts: left "
                                     "out.")
    return sections + [_settings_section(info)]


def _intro(info: dict) -> list[str]:
    bench = info.get("benchmark")
    lines = [f"`memloc bench-localize --benchmark {bench}`, preset {info.get('preset')}, started {info.get('date')}"
             + ("" if _float(info.get("elapsed_s")) is None else
                f", {_fixed(info.get('elapsed_s'), 0)} s " + ("in all" if info.get("done") is True else "so far"))
             + ". Rebuilt from bench.json alone; nothing was recomputed."]
    if info.get("done") is not True:
        lines.append("Not finished: the rows so far (the page is rewritten as the benchmark goes on).")
    summary = info.get("summary")
    lines += [str(s) for s in summary] if isinstance(summary, list) else []
    if isinstance(info.get("published"), str) and info["published"]:
        lines.append(f"Published: {info['published']}.")
    return lines


def write_bench_report(out: str | Path, info: dict) -> Path:
    """Write OUT/report/index.html from bench.json's dict `info` (figures inline, no other file); return its path."""
    info = _as_json(info)
    bench = info.get("benchmark")
    title = f"memloc bench-localize: {TITLES[bench]}" if bench in TITLES else "memloc bench-localize"
    page = Path(out) / "report" / "index.html"
    write_text(page, render_html(title, _intro(info), bench_sections(info)))
    return page


__all__ = ["bench_sections", "write_bench_report"]
