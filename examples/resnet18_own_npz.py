"""A torchvision ResNet-18 on your own .npz: train it, then ask where it memorizes.

    python examples/resnet18_own_npz.py --npz my_data.npz --out runs/resnet18
    python examples/resnet18_own_npz.py --demo-npz runs/demo.npz --out runs/resnet18   # writes a demo file first

The .npz holds `x` (N, C, H, W) or (N, H, W[, C]) images (uint8 0..255 or float in [0, 1]) and
`y` (N,) labels; optionally `x_test`, `y_test`, and `noise_mask` (N,) (1 = mislabeled). Without a
noise mask the example injects `--noise` (default 10%) label noise itself, so that the probes have
known noisy examples to look at.

Expected runtime: the test suite's `--train-size 64 --test-size 64 --epochs 1 --flip-examples 1`
takes about 25 s on 2 CPU cores (measured). The defaults (2,000 examples, 10 epochs) are
estimated at 20-30 minutes on 2 CPU cores, rewinding all 21 layers to all 11 epochs being most
of it, and a few minutes on a GPU (not measured).

Writes OUT/ (a run directory: checkpoints, per-example records, probes/flipping, probes/rewinding,
probes/detection, report/report.html) and prints the headline numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import memloc


def read_npz(path: str) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise memloc.DataError(f"{path} does not exist: pass --npz FILE holding arrays x and y (or --demo-npz)")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    if "x" not in arrays or "y" not in arrays:
        raise memloc.DataError(f"{path} holds {sorted(arrays)}: it needs arrays named x and y")
    for k in ("x", "x_test"):
        if k in arrays and arrays[k].ndim == 3:
            arrays[k] = arrays[k][:, None]  # (N, H, W) -> (N, 1, H, W)
        elif k in arrays and arrays[k].ndim == 4 and arrays[k].shape[-1] in (1, 3) and arrays[k].shape[1] not in (1, 3):
            arrays[k] = arrays[k].transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    return arrays


def write_demo(path: str) -> None:
    """Real digits (mnist5k, shipped offline) as a stand-in for your own file."""
    d = memloc.load_data(memloc.DataConfig(dataset="mnist5k", noise=0.0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=d.x_train.numpy(), y=d.y_train.numpy(), x_test=d.x_test.numpy(), y_test=d.y_test.numpy())


def resnet18(in_channels: int, num_classes: int, seed: int) -> torch.nn.Module:
    import torchvision
    with torch.random.fork_rng():  # the initialization is seeded without touching the caller's random state
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(num_classes=num_classes)
        if in_channels != 3:  # grey images: the same stem, taking one channel
            model.conv1 = torch.nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--npz", help="your data: x, y[, x_test, y_test, noise_mask]")
    src.add_argument("--demo-npz", help="write a demo .npz of real digits here and use it")
    p.add_argument("--out", default="runs/resnet18")
    p.add_argument("--noise", type=float, default=0.1, help="label noise to inject when the file has no noise_mask")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--flip-examples", type=int, default=20, help="per kind (clean, noisy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.demo_npz:
            write_demo(args.demo_npz)
        arrays = read_npz(args.npz or args.demo_npz)
        # a seeded subset (files are often sorted by class, so not the first N)
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(arrays["y"]))[: args.train_size])
        x, y = arrays["x"][keep], arrays["y"][keep]
        for k in ("x_test", "y_test"):
            if k in arrays:
                arrays[k] = arrays[k][: args.test_size]
        num_classes = int(max(y.max(), arrays.get("y_test", y).max())) + 1
        if "noise_mask" in arrays:
            given, mask = y, arrays["noise_mask"][keep].astype(bool)
            data = memloc.wrap_data(x, given, arrays.get("x_test"), arrays.get("y_test"), noise_mask=mask,
                                    num_classes=num_classes, name=Path(args.npz).stem)
        else:
            given, mask = memloc.corrupt_labels(y, num_classes, args.noise, seed=args.seed)
            data = memloc.wrap_data(x, given, arrays.get("x_test"), arrays.get("y_test"), true_labels=y,
                                    num_classes=num_classes, name=Path(args.npz or args.demo_npz).stem)
        model = resnet18(data.input_shape[0], data.num_classes, args.seed)
        print(f"{data.num_train} training examples {data.input_shape}, {int(data.is_noisy.sum())} noisy; "
              f"{len(memloc.prepare(model, data))} layers in ResNet-18")
        run = memloc.RunDir.create(args.out, overwrite=args.overwrite)
        # batches of 128, or the whole set when it is smaller (a batch larger than the data is refused)
        history = memloc.train(model, data, epochs=args.epochs, batch_size=min(128, data.num_train), lr=0.05,
                               seed=args.seed, run=run, log=print)
        last = history.metrics[-1]
        print(f"trained: clean-train {100 * last['clean_train_acc']:.1f}%, noisy-train "
              f"{100 * last['noisy_train_acc']:.1f}%")

        flip = memloc.flip(model, data, examples=args.flip_examples, others=min(256, data.num_train),
                           eval_subsample=min(512, data.num_train), max_units=50)
        flip.save(run)
        for kind, k in flip.summary["kinds"].items():
            if not k["searched"]:  # every one already predicted wrongly: nothing to flip
                print(f"flipping, {kind}: none searched ({k['already_wrong']} already predicted wrongly)")
                continue
            print(f"flipping, {kind}: median units to flip {k['median_units']:g}, {k['flipped']} of {k['searched']} "
                  f"flipped ({100 * k['flipped_share']:.1f}%)")

        rewind = memloc.rewind(model, data, states=run)  # training history: the run's per-epoch checkpoints
        rewind.save(run)
        detect = memloc.detect(model, data, history=history)
        detect.save(run)
        best = max((q for q in detect.summary["quality"] or [] if q["auroc"] is not None),
                   key=lambda q: q["auroc"], default=None)
        if best:
            print(f"detection: best score {best['score']} (AUROC {best['auroc']:.3f})")
        print(f"report: {memloc.build_report(run)}")
    except memloc.MemlocError as err:
        print(f"resnet18_own_npz: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
