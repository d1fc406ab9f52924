"""Neurons against weights on TinyMem (issue #33): `memloc bench-localize --units neurons,weights`, one table.

    # the 2-layer model of RESULTS.md's CPU tables (every artifact 4 times): ~8 min on one CPU core once trained
    python studies/weight_units.py --layers 2
    # and the 4-layer one (25 epochs, as RESULTS.md's): its training takes ~15 min more
    python studies/weight_units.py --layers 2,4
    # TinyMem's main setting: every artifact written once, trained longer (the log says the share memorized
    # every 5 epochs)
    python studies/weight_units.py --layers 4 --repeats 1 --epochs 100 --out runs/weight-units-nodup
    # the edit sizes between the defaults', on the 4-layer model trained above (--models reuses it)
    python studies/weight_units.py --layers 4 --methods balanced-subnet,subnet,attribution \
        --fractions 0.03,0.04 --weight-fractions 0.0006,0.0007,0.0008 --models runs/weight-units/models \
        --out runs/weight-units-between

Each depth is one `bench_localize` run of the full preset (TinyMem's data scaled for a CPU, `--repeats 4`, the
4- and 8-layer models 25 epochs as RESULTS.md's), methods on neurons (MLP neurons, pooled top 1%, 2%, 5%) and on
weights (every weight of the MLP's in and out projections, pooled top 0.05%, 0.1%, 0.2%), the same trained model
and the same localized artifacts for both. Models are kept in OUT/models and reused. Writes OUT/tinymem-<n>l/ (the
benchmark's bench.json, results.md, report) and OUT/results.md: per depth, every row of both kinds sorted by the
trade-off, and per kind the row that removes the most within 1% relative accuracy loss (the issue's goal: at most
1% of the artifacts memorized at at most 1% relative accuracy loss on the 4-layer model). OUT defaults to
runs/weight-units, relative to where it is run.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from memloc.bench.benchmarks import BenchConfig, bench_localize, best_row
from memloc.core.flags import floats_arg

NEURON_METHODS = ("balanced-subnet", "hard-concrete", "slimming", "ig", "attribution", "random")  # greedy and
# zero-out left out for time (2-4 min each per depth on one core: RESULTS.md's tables have them)
WEIGHT_METHODS = ("balanced-subnet", "subnet", "durable", "random")
GOAL = (0.01, 0.01)  # at most 1% memorized at at most 1% relative accuracy loss


def label(r: dict) -> str:
    return f"{r['method']} ({r.get('unit_kind', 'neurons')})"


def table(rows: list[dict]) -> str:
    lines = ["| layers | method (units) | zeroed | memorized before | after | removed | rel. clean acc. | perplexity | "
             "scoring |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted((r for r in rows if "removed" in r), key=lambda r: (r["n_layer"], r["memorized_after"],
                                                                        -r["rel_acc_change"])):
        lines.append(f"| {r['n_layer']} | {label(r)} | {r['k']} ({100 * r['fraction']:g}%) | "
                     f"{100 * r['memorized_before']:.1f}% | {100 * r['memorized_after']:.1f}% | "
                     f"{100 * r['removed']:.1f}% | {100 * r['rel_acc_change']:+.2f}% | "
                     f"{r['ppl_before']:.3f} -> {r['ppl_after']:.3f} | {r['scoring_s']:.1f}s |")
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for n in sorted({r["n_layer"] for r in rows}):
        for kind in ("neurons", "weights"):
            part = [r for r in rows if r["n_layer"] == n and r.get("unit_kind") == kind and "removed" in r]
            b = best_row(part, max_rel_acc_loss=GOAL[1])
            if b is None:
                out.append(f"{n} layers, {kind}: no edit within {GOAL[1]:.0%} relative accuracy loss")
                continue
            met = b["memorized_after"] <= GOAL[0]
            out.append(f"{n} layers, {kind}: within {GOAL[1]:.0%} relative accuracy loss the best is {b['method']} "
                       f"at {b['k']} ({100 * b['fraction']:g}%): {100 * b['memorized_after']:.1f}% left, removed "
                       f"{100 * b['removed']:.1f}%, {100 * b['rel_acc_change']:+.2f}%: goal (<= 1% left) "
                       f"{'met' if met else 'not met'}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2", help="depths, comma-separated (2: 30 epochs, deeper: 25)")
    p.add_argument("--methods", default=",".join(dict.fromkeys(NEURON_METHODS + WEIGHT_METHODS)),
                   help="each on every kind it has (balanced-subnet and random: both)")
    p.add_argument("--repeats", type=int, default=4, help="training copies of each artifact (1: TinyMem's main "
                   "setting, no duplication)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 30 at 2 layers, 25 deeper)")
    p.add_argument("--fractions", type=floats_arg, help="pooled shares of the MLP neurons zeroed (default the full "
                   "preset's 0.01,0.02,0.05)")
    p.add_argument("--weight-fractions", type=floats_arg, help="pooled shares of the MLP weights zeroed (default "
                   "0.0005,0.001,0.002)")
    p.add_argument("--models", default=None, help="trained models kept and reused (default OUT/models)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model's initialization and training "
                   "order, and the localized artifacts")
    p.add_argument("--table-only", action="store_true", help="only write OUT/results.md from the finished depths")
    p.add_argument("--threads", type=int, default=1, help="torch threads (RESULTS.md's timings: 1)")
    p.add_argument("--out", default="runs/weight-units")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    methods = tuple(args.methods.split(","))
    for n in () if args.table_only else (int(v) for v in args.layers.split(",")):
        cfg = BenchConfig(benchmark="tinymem", preset="full", n_layers=(n,), units=("neurons", "weights"),
                          seed=args.seed, methods=methods, epochs=args.epochs or (30 if n == 2 else 25),
                          fractions=args.fractions, weight_fractions=args.weight_fractions)
        cfg.data = replace(cfg.data, repeats=args.repeats)
        bench_localize(cfg, out / f"tinymem-{n}l", models=Path(args.models) if args.models else out / "models",
                       log=print)
    rows = [r for f in sorted(out.glob("tinymem-*l/bench.json")) for r in json.loads(f.read_text())["rows"]]
    text = "# TinyMem: neurons and weights side by side\n\n" + table(rows) + "\n" + "".join(
        f"- {line}\n" for line in verdicts(rows))
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
