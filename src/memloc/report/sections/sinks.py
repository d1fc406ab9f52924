"""The memorization sinks section (language models): the canaries before (tied) and after (drop) removing the
sinks."""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from ...core.figures import png, pyplot
from ..html import Figure, Section, Table
from ..words import _fixed, _float, _num, _pct
from .memorization import _by_repeats, _repeats_axis

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
