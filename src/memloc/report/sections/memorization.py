"""The memorization section (language models): canary extraction and exposure by repeat count."""

from __future__ import annotations

import numpy as np

from ...core.errors import RunError
from ...core.figures import png, pyplot
from ...core.runs import RunDir
from ...probes.base import ProbeResult
from ..html import Figure, Section, Table
from ..words import _fixed, _float, _pct
from .generic import _probe


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
