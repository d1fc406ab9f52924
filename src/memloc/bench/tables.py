"""The localization benchmarks' tables: each benchmark's columns, its markdown table beside the published numbers,
the summary lines, the CSV, and the best row within an accuracy bound.
"""

from __future__ import annotations

import csv
import io

import numpy as np

# what the papers published, set beside each table
TINYMEM_PUBLISHED = {
    "balanced-subnet": "0% left at +0.2..-0.5% rel. acc. (2-16 layers)",
    "greedy": "0-3.5% left at up to -20% rel. acc.",
    "hard-concrete": "0-3% left at 2-4 layers; 16-34% at 8-16",
    "slimming": "0-3% left at 2-4 layers; 16-34% at 8-16",
    "zero-out": "12-33% left at 4-8 layers",
    "activations": "0% left at -8..-20% rel. acc.",
    "ig": "0% left at -8..-20% rel. acc.",
    "random": "",
}


TINYMEM_BEFORE = "memorized before the edit: ~1% (2 layers), 17-31% (4), 31-43% (8)"


MEMPI_RANK = {"hard-concrete": 1, "slimming": 2, "ig": 3, "zero-out": 3, "activations": 3, "random": 6}


MEMPI_PUBLISHED = "ranking HardConcrete >= Slimming > IG / Zero-Out / Activations > Random (no numbers in " \
                  "REFERENCE_LM.md)"

TINYMEM_COLUMNS = ("n_layer", "method", "unit_kind", "fraction", "k", "memorized_before", "memorized_after", "removed",
                   "acc_before", "acc_after", "rel_acc_change", "ppl_before", "ppl_after", "clean_extraction_before",
                   "clean_extraction_after", "scoring_s", "wall_s", "published")


INJ_COLUMNS = ("n_layer", "method", "ratio", "k_per_layer", "sequences", "injected_extracted", "recall_pooled",
               "recall_per_layer", "scoring_s", "mempi_rank", "published")


DEL_COLUMNS = ("n_layer", "method", "ratio", "k_per_layer", "sequences", "memorized", "self_acc_before",
               "self_acc_after", "self_extracted_after", "others_acc_before", "others_acc_after",
               "others_extracted_after", "specificity", "ppl_before", "ppl_after", "rel_ppl_change", "scoring_s",
               "mempi_rank", "run")


COLUMNS = {"tinymem": TINYMEM_COLUMNS, "inj": INJ_COLUMNS, "del": DEL_COLUMNS}


def method_label(row: dict) -> str:
    """A row's method, "M (weights)" for a weight edit."""
    return f"{row['method']} (weights)" if row.get("unit_kind") == "weights" else str(row["method"])


def _pct(v, sign: bool = False) -> str:
    return "-" if v is None else f"{100 * v:+.2f}%" if sign else f"{100 * v:.1f}%"


def markdown_table(benchmark: str, rows: list[dict]) -> str:
    if benchmark == "tinymem":
        head = ("| layers | method | zeroed | memorized before | after | removed | clean acc | rel. change | "
                "perplexity | scoring | TinyMem (published) |\n|---|---|---|---|---|---|---|---|---|---|---|")
        lines = [head]
        for r in rows:
            if "memorized_after" not in r:
                lines.append(f"| {r['n_layer']} | {method_label(r)} | - | {_pct(r['memorized_before'])} | - | - | - "
                             f"| - | - | - | {r.get('note', '')} |")
                continue
            lines.append(f"| {r['n_layer']} | {method_label(r)} | {r['k']} ({_pct(r['fraction'])}) | "
                         f"{_pct(r['memorized_before'])} | {_pct(r['memorized_after'])} | {_pct(r['removed'])} | "
                         f"{_pct(r['acc_before'])} -> {_pct(r['acc_after'])} | {_pct(r['rel_acc_change'], True)} | "
                         f"{r['ppl_before']:.3f} -> {r['ppl_after']:.3f} | {r['scoring_s']:.1f}s | {r['published']} |")
        return "\n".join(lines) + f"\n\nTinyMem: {TINYMEM_BEFORE}.\n"
    if benchmark == "del":
        head = ("| method | ratio | k / layer | self acc. | self extracted | others acc. | others extracted | "
                "specificity | perplexity | scoring | MemPi rank |\n|---|---|---|---|---|---|---|---|---|---|---|")
        lines = [head] + [f"| {r['method']} | {r['ratio']:g} | {r['k_per_layer']} | {_pct(r['self_acc_before'])} -> "
                          f"{_pct(r['self_acc_after'])} | {_pct(r['self_extracted_after'])} | "
                          f"{_pct(r['others_acc_before'])} -> {_pct(r['others_acc_after'])} | "
                          f"{_pct(r['others_extracted_after'])} | {_pct(r['specificity'])} | {r['ppl_before']:.3f} -> "
                          f"{r['ppl_after']:.3f} ({_pct(r['rel_ppl_change'], True)}) | {r['scoring_s']:.1f}s | "
                          f"{r['mempi_rank'] or '-'} |" for r in rows]
        return "\n".join(lines) + f"\n\nMemPi: {MEMPI_PUBLISHED}.\n"
    head = ("| layers | method | ratio | k / layer | recall@k pooled | recall@k per layer | injected extracted | "
            "scoring | MemPi rank |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r['n_layer']} | {r['method']} | {r['ratio']} | {r['k_per_layer']} | "
                      f"{r['recall_pooled']:.3f} | {', '.join(f'{v:.2f}' for v in r['recall_per_layer'])} | "
                      f"{_pct(r['injected_extracted'])} | {r['scoring_s']:.1f}s | {r['mempi_rank'] or '-'} |"
                      for r in rows]
    return "\n".join(lines) + f"\n\nMemPi: {MEMPI_PUBLISHED}.\n"


def summarize(benchmark: str, rows: list[dict]) -> list[str]:
    """The lines the goal asks about: tinymem, per depth, the best method within 1% and 5% relative accuracy loss
    and greedy's cost; inj, per ratio, the mean pooled recall of MemPi's three groups."""
    lines = []
    if benchmark == "tinymem":
        for n in sorted({r["n_layer"] for r in rows if "removed" in r}):
            part = [r for r in rows if r["n_layer"] == n and "removed" in r]
            for bar in (0.01, 0.05):
                b = best_row(part, max_rel_acc_loss=bar)
                if b is not None:
                    lines.append(f"{n} layers, within {bar:.0%} relative accuracy loss: {method_label(b)} (k {b['k']}) "
                                 f"leaves {b['memorized_after']:.1%} memorized (removes {b['removed']:.1%}) at "
                                 f"{b['rel_acc_change']:+.2%}")
            g = [r for r in part if r["method"] == "greedy"]
            if g:
                worst = min(r["rel_acc_change"] for r in g)
                lines.append(f"{n} layers, greedy: removes {max(r['removed'] for r in g):.1%} at most, relative "
                             f"accuracy change {worst:+.2%} at worst (TinyMem: up to -20%)")
        return lines
    groups = {"hard-concrete / slimming": ("hard-concrete", "slimming"),
              "ig / zero-out / activations": ("ig", "zero-out", "activations"), "random": ("random",)}
    key, what = ("recall_pooled", "mean pooled recall") if benchmark == "inj" else ("specificity", "mean specificity")
    for ratio in sorted({r["ratio"] for r in rows}):
        means = []
        for name, ms in groups.items():
            v = [r[key] for r in rows if r["ratio"] == ratio and r["method"] in ms and r.get(key) is not None]
            if v:
                means.append((name, float(np.mean(v))))
        order = [n for n, _ in sorted(means, key=lambda t: -t[1])]
        holds = order == [n for n, _ in means]
        if benchmark == "del":
            best = max((r for r in rows if r["ratio"] == ratio), key=lambda r: r["specificity"])
            lines.append(f"ratio {ratio:g}: most specific {best['method']}: self accuracy "
                         f"{best['self_acc_before']:.1%} -> {best['self_acc_after']:.1%}, others "
                         f"{best['others_acc_before']:.1%} -> {best['others_acc_after']:.1%}, perplexity "
                         f"{best['rel_ppl_change']:+.2%}")
        lines.append(f"ratio {ratio:g}: {what} " + ", ".join(f"{n} {v:.3f}" for n, v in means)
                     + f": MemPi's ranking {'reproduces' if holds else 'does not reproduce'}")
    return lines


def rows_csv(rows: list[dict], columns) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: (";".join(str(v) for v in r[c]) if isinstance(r.get(c), list) else r.get(c, ""))
                    for c in columns})
    return buf.getvalue()


def best_row(rows: list[dict], *, max_rel_acc_loss: float) -> dict | None:
    """The tinymem row that leaves the fewest artifacts memorized (TinyMem's measure and the goal's: an edit can make
    artifacts memorized that were not), then removes the most of those memorized before, then costs the least, within
    `max_rel_acc_loss` relative accuracy loss."""
    ok = [r for r in rows if "removed" in r and r["method"] != "random" and -r["rel_acc_change"] <= max_rel_acc_loss]
    return max(ok, key=lambda r: (-r["memorized_after"], r["removed"], r["rel_acc_change"]), default=None)
