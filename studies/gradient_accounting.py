"""Summarize a run's learning dynamics and gradient accounting against the paper's claims (probe 1).

    memloc train --out runs/default          # the CPU default: resnet9 width 0.25, mnist5k, 10% noise
    python studies/gradient_accounting.py runs/default

Prints: final accuracies; the epochs in which the noisy examples were learned
(noisy-train accuracy crossing 25%, 50%, 90%); per layer and epoch window the
ratio of the noisy to the clean gradient norm (the paper: comparable, although
noisy examples are 10% of the data) and the mean cosine between the clean and
noisy gradients (the paper: below -0.75 most of the time).
"""

from __future__ import annotations

import argparse

import numpy as np

from memloc.core.runs import RunDir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--window", type=int, default=10, help="epochs per window")
    args = p.parse_args()
    run = RunDir.open(args.run)
    metrics = run.read_metrics()
    last = metrics[-1]
    print(f"final: clean-train {100 * last['clean_train_acc']:.1f}%  noisy-train {100 * last['noisy_train_acc']:.1f}%  "
          f"test {100 * last['test_acc']:.1f}%  ({last['epoch']} epochs)")
    noisy = np.array([m["noisy_train_acc"] for m in metrics])
    for level in (0.25, 0.5, 0.9):
        hit = np.nonzero(noisy >= level)[0]
        print(f"noisy-train accuracy first >= {100 * level:.0f}% at epoch {hit[0] + 1 if len(hit) else 'never'}")
    g = run.load_arrays("gradients.npz")
    names, clean, nois, cos = g["layer_names"], g["clean_norm"], g["noisy_norm"], g["cosine"]
    epochs = clean.shape[1]
    windows = [(a, min(a + args.window, epochs)) for a in range(0, epochs, args.window)]
    head = "".join(f"  ep {a + 1:>2}-{b:<3}" for a, b in windows)
    print("\nnoisy / clean gradient norm (summed over the window)\nlayer            " + head)
    for i, n in enumerate(names):
        print(f"{n:16s} " + "".join(f"  {nois[i, a:b].sum() / clean[i, a:b].sum():9.2f}" for a, b in windows))
    print("\nmean cosine(clean, noisy)\nlayer            " + head)
    for i, n in enumerate(names):
        print(f"{n:16s} " + "".join(f"  {cos[i, a:b].mean():9.2f}" for a, b in windows))
    print(f"\nshare of (layer, epoch) cells with cosine < -0.75: {100 * (cos < -0.75).mean():.0f}%; "
          f"< 0: {100 * (cos < 0).mean():.0f}%")


if __name__ == "__main__":
    main()
