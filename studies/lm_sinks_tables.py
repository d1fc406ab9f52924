"""Memorization sinks' numbers for RESULTS.md, from finished `memloc dropout-grid --task lm` folders.

    memloc dropout-grid --task lm --pairs '0.5,0.1;0.5,0.3;0.7,0.1;0.3,0.2' --no-baselines --out runs/lm-sinks-grid
    memloc dropout-grid --task lm --pairs '0.5,0.1' --out runs/lm-sinks-baselines
    python studies/lm_sinks_tables.py runs/lm-sinks-grid runs/lm-sinks-baselines \
        --seeds runs/lm-sinks-grid/etd-0.5-0.1 runs/lm-sinks-seed1 runs/lm-sinks-seed2

Reads each cell's `probes/dropout/summary.json` (what `memloc evaluate RUN --drop-memorization` writes; the
grid evaluates every cell, baselines included) and prints: the grid (one row per cell: the canaries repeated
>= 16 times before and after, loss gap closed, perplexity), the table method x repeat count (extraction in
context and from the own prefix, exposure, loss gap, perplexity), and the spread of the gap closed over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def pct(v) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}"


def num(v, fmt=".2f") -> str:
    return "–" if v is None else format(float(v), fmt)


def cells(folders: list[Path]) -> list[tuple[str, dict]]:
    out = []
    for folder in folders:
        found = [folder] if (folder / "probes" / "dropout" / "summary.json").exists() else \
            sorted(p for p in folder.iterdir() if (p / "probes" / "dropout" / "summary.json").exists())
        for cell in found:
            out.append((f"{folder.name}/{cell.name}", json.loads((cell / "probes" / "dropout" / "summary.json")
                                                                 .read_text())))
    return out


def grid_table(rows: list[tuple[str, dict]], plain_gap: float | None) -> None:
    print("| cell | p_gen, p_mem | extracted in context, 16x+ % (tied → drop) | from own prefix % | loss gap 16x+ "
          "(nats, tied → drop) | gap closed % | gap after vs plain model's % | exposure 16x+ (bits) | "
          "held-out perplexity eval → drop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        b, a = s["repeated_before"], s["repeated_after"]
        fr = f"{s['p_gen']}, {s['p_mem']}" if s.get("p_gen") is not None else "–"
        vs_plain = None
        if plain_gap and a["loss_gap"] is not None:
            vs_plain = 1 - a["loss_gap"] / plain_gap
        print(f"| {name} | {fr} | {pct(b['in_context'])} → {pct(a['in_context'])} | {pct(b['extracted'])} → "
              f"{pct(a['extracted'])} | {num(b['loss_gap'])} → {num(a['loss_gap'])} | {pct(s['gap_closed'])} | "
              f"{pct(vs_plain)} | {num(b['exposure'], '.1f')} → {num(a['exposure'], '.1f')} | "
              f"{num(s['heldout_perplexity_eval'], '.3f')} → {num(s['heldout_perplexity_drop'], '.3f')} |")


def repeats_table(rows: list[tuple[str, dict]]) -> None:
    print("\n| cell | repeats | in context % (tied → drop) | own prefix % | held-out % | loss trained (tied → drop) "
          "| loss held-out | gap (tied → drop) | gap closed % | exposure trained |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        for r in s["by_repeats"]:
            if r["format"] != "all":
                continue
            print(f"| {name} | {r['repeats']} | {pct(r['in_context_extracted_before'])} → "
                  f"{pct(r['in_context_extracted_after'])} | {pct(r['trained_extracted_before'])} → "
                  f"{pct(r['trained_extracted_after'])} | {pct(r['heldout_extracted_after'])} | "
                  f"{num(r['trained_loss_before'])} → {num(r['trained_loss_after'])} | "
                  f"{num(r['heldout_loss_before'])} → {num(r['heldout_loss_after'])} | "
                  f"{num(r['loss_gap_before'])} → {num(r['loss_gap_after'])} | {pct(r['gap_closed'])} | "
                  f"{num(r['trained_exposure_before'], '.1f')} → {num(r['trained_exposure_after'], '.1f')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path, help="grid folders")
    ap.add_argument("--seeds", nargs="*", type=Path, default=[], help="grid folders or cell runs of one pair, one per "
                    "seed (the spread of the gap closed)")
    args = ap.parse_args()
    rows = cells(args.folders)
    plain = next((s for n, s in rows if n.endswith("/plain")), None)
    plain_gap = plain["repeated_before"]["loss_gap"] if plain else None
    grid_table(rows, plain_gap)
    repeats_table(rows)
    if args.seeds:
        seeds = cells(args.seeds)
        for key in ("gap_closed", "perplexity_rise"):
            vals = [s[key] for _, s in seeds if s.get(key) is not None]
            if len(vals) > 1:
                print(f"\n{key} over {len(vals)} seeds: mean {statistics.mean(vals):.3f}, "
                      f"sd {statistics.stdev(vals):.3f}, values {', '.join(f'{v:.3f}' for v in vals)}")


if __name__ == "__main__":
    main()
