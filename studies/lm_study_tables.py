"""The language-model study's numbers for RESULTS.md, from a finished `memloc run --task lm` run directory.

    memloc run --task lm --out runs/lm-default        # the CPU default (docs/lm.md)
    python studies/lm_study_tables.py runs/lm-default  # prints the markdown tables

Reads only the run's files: the memorization probe's per-canary arrays, gradients.npz,
and the rewinding, retraining and flipping arrays. Prints, per paper question:
memorization by repeat count; the canaries' share of each layer's update; each layer
rewound to epoch 0 and retrained; units to remove per canary by repeat count, and where.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.1f}"


def num(v, fmt=".2f") -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(float(v), fmt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    args = ap.parse_args()
    run = Path(args.run)
    probes = run / "probes"
    mem = json.loads((probes / "memorization" / "summary.json").read_text())
    print(f"held-out perplexity {mem['heldout_perplexity']:.2f}; corpus suffixes extracted "
          f"{pct(mem['corpus_extracted'])}%\n")
    print("| repeats | format | canaries | extracted from own prefix % | extracted in context % | held-out extracted % "
          "| loss trained / held-out (nats) | gap | exposure trained / held-out (bits) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in mem["by_repeats"]:
        print(f"| {r['repeats']} | {r['format']} | {r['n']} | {pct(r['trained_extracted'])} | "
              f"{pct(r['in_context_extracted'])} | {pct(r['heldout_extracted'])} | {num(r['trained_loss'])} / "
              f"{num(r['heldout_loss'])} | {num(r['loss_gap'])} | {num(r['trained_exposure'], '.1f')} / "
              f"{num(r['heldout_exposure'], '.1f')} |")

    g = np.load(run / "gradients.npz")
    names = list(g["layer_names"])
    e = g["cosine"].shape[1]
    window = slice(0, max(1, e // 4))
    print(f"\nGradient accounting (first quarter of training, epochs 1-{max(1, e // 4)}; all epochs in brackets):\n")
    print("| layer | canary / corpus gradient norm | cosine |")
    print("|---|---|---|")
    for i, n in enumerate(names):
        ratio = g["noisy_norm"][i] / np.maximum(g["clean_norm"][i], 1e-30)
        print(f"| {n} | {ratio[window].mean():.2f} ({ratio.mean():.2f}) | {g['cosine'][i][window].mean():.2f} "
              f"({g['cosine'][i].mean():.2f}) |")

    for probe, title in (("rewinding", "each layer rewound to epoch 0"), ("retraining", "each layer retrained")):
        z = np.load(probes / probe / "arrays.npz")
        subsets = list(z["subsets"])
        acc = z["accuracy"]
        k_can, k_test = subsets.index("canary_train"), subsets.index("test")
        final = z["final"]
        print(f"\n{probe.capitalize()} ({title}; final model: canary-train {pct(final[k_can])}%, "
              f"held-out token accuracy {pct(final[k_test])}%):\n")
        print("| layer | canary-train extraction % | held-out token accuracy % |")
        print("|---|---|---|")
        for i, n in enumerate(z["layer_names"]):
            col = 0 if probe == "rewinding" else -1
            print(f"| {n} | {pct(acc[i, col, k_can])} | {pct(acc[i, col, k_test])} |")

    f = np.load(probes / "flipping" / "arrays.npz")
    mz = np.load(probes / "memorization" / "arrays.npz")
    group = dict(zip(mz["canary_id"].tolist(), mz["repeat_group"].tolist()))
    keys = [k for k in f.files]
    units = f["num_units"] if "num_units" in keys else None
    flipped = f["flipped"] if "flipped" in keys else None
    wrong = f["already_wrong"] if "already_wrong" in keys else None
    label = f["label"]
    print("\nGreedy removal per canary sequence (extractable in context before removal):\n")
    print("| repeats | searched | flipped | median units | mean units |")
    print("|---|---|---|---|---|")
    reps = np.array([group.get(int(c), 0) for c in label])
    for r in sorted(set(reps.tolist())):
        sel = (reps == r) & ~wrong
        done = sel & flipped
        med = np.median(units[done]) if done.any() else float("nan")
        mean = units[done].mean() if done.any() else float("nan")
        print(f"| {r} | {int(sel.sum())} | {int(done.sum())} | {num(med, '.1f')} | {num(mean, '.1f')} |")
    names = [str(n) for n in f["layer_names"]]
    position = {int(i): k for k, i in enumerate(f["layer_index"])}  # model layer index -> candidate position
    counts = np.zeros(len(names))
    removed = f["unit_layer"][flipped & ~wrong]
    for layer in removed[removed >= 0]:
        counts[position[int(layer)]] += 1
    total = counts.sum()
    print("\nWhere the removed units are (share of all removed units, flipped canaries):\n")
    print("| layer | units removed | share % |")
    print("|---|---|---|")
    for n, c in zip(names, counts):
        print(f"| {n} | {int(c)} | {pct(c / total if total else None)} |")
    summ = json.loads((probes / "flipping" / "summary.json").read_text())
    for kind, k in summ["kinds"].items():
        print(f"\n{kind}: " + ", ".join(f"{a} {b}" for a, b in k.items() if not isinstance(b, (list, dict))))

if __name__ == "__main__":
    main()
