"""Probes 2-3 of the paper (layer rewinding, layer retraining) on one run, as tables for RESULTS.md.

    python studies/probes_study.py --run RUN            # an existing run with per-epoch checkpoints
    python studies/probes_study.py --train runs/default  # first train the CPU default (`memloc train`)

Prints, per layer: accuracy on clean and noisy training examples and on the
test set when the layer is rewound to a few epochs, and before/after the
layer is retrained on clean examples only. Results stay in RUN/probes/.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from memloc.probes.retraining import RetrainConfig, retrain
from memloc.probes.rewinding import rewind
from memloc.tasks.experiment import RunConfig, open_run, run_training


def pct(v) -> str:
    return "  -  " if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:5.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="existing run directory")
    src.add_argument("--train", metavar="OUT", help="train the CPU default run into OUT first")
    ap.add_argument("--every", type=int, default=1, help="rewind to every K-th saved epoch (default 1: all)")
    ap.add_argument("--retrain-epochs", type=int, default=20)
    ap.add_argument("--peak-epoch", type=float, default=None, help="default: half of --retrain-epochs")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--layers", help="comma-separated layers (default all)")
    ap.add_argument("--skip-rewind", action="store_true")
    ap.add_argument("--skip-retrain", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    path = args.run
    if args.train:
        path = run_training(RunConfig(), args.train, progress=not args.quiet).path
    loaded = open_run(path)
    layers = args.layers.split(",") if args.layers else None
    m = loaded.run.read_metrics()
    print(f"run {loaded.run.path}: {loaded.config.model.name} width {loaded.config.model.width:g}, "
          f"{loaded.data.name}, {loaded.data.num_train} train ({int(loaded.data.is_noisy.sum())} noisy), "
          f"{len(m)} epochs, lr {loaded.config.train.lr:g}")
    noisy_by_epoch = [(r["epoch"], r["noisy_train_acc"]) for r in m]
    print("noisy-train accuracy during training: " +
          ", ".join(f"ep{e} {pct(a).strip()}" for e, a in noisy_by_epoch if e % 5 == 0 or e == 1))

    if not args.skip_rewind:
        t = time.perf_counter()
        r = rewind(loaded, layers=layers, every=args.every, progress=not args.quiet)
        acc, epochs, names = r.arrays["accuracy"], list(r.arrays["epochs"]), list(r.arrays["layer_names"])
        show = [e for e in (0, 5, 10, 15, 20, 25, 30, 40) if e in epochs]
        print(f"\n## Layer rewinding ({time.perf_counter() - t:.0f}s): noisy-train % (clean-train %) "
              f"with one layer rewound to epoch e; final model noisy {pct(r.summary['final']['noisy_train_acc'])} "
              f"clean {pct(r.summary['final']['clean_train_acc'])} test {pct(r.summary['final']['test_acc'])}")
        print("| layer | " + " | ".join(f"e={e}" for e in show) + " |")
        print("|---|" + "---|" * len(show))
        for li, n in enumerate(names):
            cells = [f"{pct(acc[li, epochs.index(e), 1]).strip()} ({pct(acc[li, epochs.index(e), 0]).strip()})"
                     for e in show]
            print(f"| {li}: {n} | " + " | ".join(cells) + " |")

    if not args.skip_retrain:
        t = time.perf_counter()
        peak = args.peak_epoch if args.peak_epoch is not None else args.retrain_epochs / 2
        cfg = RetrainConfig(epochs=args.retrain_epochs, lr=args.lr, peak_epoch=peak)
        r = retrain(loaded, cfg=replace(cfg, layers=tuple(layers) if layers else None), progress=not args.quiet)
        acc, names = r.arrays["accuracy"], list(r.arrays["layer_names"])
        print(f"\n## Layer retraining ({time.perf_counter() - t:.0f}s): reset to init, {cfg.epochs} epochs on clean "
              f"examples only (one-cycle, lr {cfg.lr:g} at epoch {peak:g})")
        print("| layer | after reset: clean / noisy / test | after retraining: clean / noisy / test |")
        print("|---|---|---|")
        for li, n in enumerate(names):
            a, b = acc[li, 0], acc[li, -1]
            print(f"| {li}: {n} | {pct(a[0]).strip()} / {pct(a[1]).strip()} / {pct(a[3]).strip()} | "
                  f"{pct(b[0]).strip()} / {pct(b[1]).strip()} / {pct(b[3]).strip()} |")


if __name__ == "__main__":
    main()
