"""An audit's first screen: which training examples (a classifier) or sequences (a language model) the audited
model memorizes, where, and what a removal did."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...core.figures import png, pyplot
from ...core.runs import RunDir
from ...probes.base import ProbeResult
from ...tasks.experiment import HISTORY, REMOVAL
from ..html import Figure, Section, Table
from ..words import _pct


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
