"""The paper's whole study on CIFAR-10, read from a local folder.

    python examples/cifar10_study.py --data-root ~/data            # ~/data/cifar-10-batches-py/
    python examples/cifar10_study.py --data-root ~/data --preset paper --seeds 0,1,2

Expected runtime (estimated, not measured: no CIFAR-10 offline): `--preset default` (full-width
ResNet-9 on a GPU, 40 epochs, every probe, example-tied dropout, detection) tens of minutes on
one H100; on 2 CPU cores, days (try `--preset smoke --train-size 2000 --epochs 5` there).
Needs CIFAR-10's python pickles (cifar-10-python.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html, extracted), or `--download` with internet. A
missing folder fails at once with one line (what the test suite checks).

Writes STUDY/ (every run, every probe, report/report.html); prints the report's path.
"""

from __future__ import annotations

import argparse
import sys

import memloc
from memloc.study.run import run_study, study_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True, help="folder holding cifar-10-batches-py/")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-root first")
    p.add_argument("--preset", default="default", choices=["smoke", "default", "paper"])
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--noise", default="0.1", help="comma-separated noise fractions, e.g. 0.05,0.1,0.2")
    p.add_argument("--train-size", type=int, default=None, help="stratified subset of the 50,000 images")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--out", default="runs/study-cifar10")
    args = p.parse_args(argv)
    try:
        data = {"dataset": "cifar10", "data_root": args.data_root, "download": args.download}
        if args.train_size:
            data["train_size"] = args.train_size
        # read the data once before the study: a missing or broken folder fails here, in one line
        memloc.load_data(memloc.DataConfig(**data, noise=0.0))
        overrides = {"data": data, "model": {"name": "resnet9"}}
        if args.epochs:
            overrides["train"] = {"epochs": args.epochs}
        cfg = study_config(args.preset, base_overrides=overrides,
                           seeds=tuple(int(s) for s in args.seeds.split(",")),
                           noise_levels=tuple(float(n) for n in args.noise.split(",")))
        path = run_study(cfg, args.out, progress=True, log=print)
    except memloc.MemlocError as err:
        print(f"cifar10_study: error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
