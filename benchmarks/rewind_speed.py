"""Layer rewinding speed: memloc's sweep against a naive, paper-faithful loop, in the same run.

The paper's ResNet-9 on synthetic CIFAR-shaped data (uint8, resident on the
device), with E checkpoints made by perturbing the weights (no training: the
speed does not depend on what the weights are). Both sides evaluate every
(layer, epoch) pair on the training and the test images and restore BatchNorm
statistics with the weights; both use the same precision (bf16 autocast and
channels_last on CUDA).

- memloc: `probes.rewinding.rewind_model`, the rewinding probe's compute (per layer, each batch goes through the layers
  before the rewound one once, then through the rest once per epoch).
- naive (what the published code does, with its BatchNorm bug fixed): for
  each layer, for each epoch, load the layer's tensors, then a full forward
  pass over the data, fed batch by batch from pinned host memory like a
  DataLoader, with a host sync per batch for the accuracy counts.

    python benchmarks/rewind_speed.py                                  # GPU: 50k + 10k images, 51 checkpoints
    python benchmarks/rewind_speed.py --n 2000 --n-test 500 --epochs-saved 6 --width 0.25   # CPU

`--baseline-pairs K` times the naive loop on K (layer, epoch) pairs only and
extrapolates (each pair costs one full forward pass); the default runs them all.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from memloc.core.precision import autocast
from memloc.probes.rewinding import rewind_model
from memloc.probes.sweep import layer_keys
from memloc.tasks.classification.data import Dataset, model_input
from memloc.tasks.classification.models import build_model, layers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(n: int, n_test: int, device, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    noisy = torch.rand(n, generator=g) < 0.1
    xt = torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g)
    yt = torch.randint(0, 10, (n_test,), generator=g)
    d = Dataset("synthetic", x, y, y.clone(), noisy, torch.zeros(n, dtype=torch.bool), xt, yt, 10)
    return d.to(device)


def checkpoints(model, epochs: int, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Epoch e = the final weights plus noise shrinking to 0 at the last epoch (host tensors, like loaded files)."""
    g = torch.Generator().manual_seed(seed)
    final = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out = {}
    for e in range(epochs):
        scale = 0.2 * (1 - e / max(1, epochs - 1))
        s = {}
        for k, v in final.items():
            if not v.is_floating_point():
                s[k] = v.clone()
            elif k.endswith("running_var"):
                s[k] = v * torch.exp(scale * torch.randn(v.shape, generator=g))  # stays positive
            else:
                s[k] = v + scale * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=g)
        out[e] = s
    return out


@torch.no_grad()
def naive(model, data: Dataset, states, pairs, batch_size: int, device) -> dict:
    """The straightforward loop: one full evaluation per (layer, epoch)."""
    host = {k: getattr(data, k).cpu().pin_memory() if device.type == "cuda" else getattr(data, k).cpu()
            for k in ("x_train", "y_train", "is_noisy", "x_test", "y_test")}
    own = model.state_dict()
    final = {k: v.clone() for k, v in own.items()}
    model.eval()
    out = {}
    for layer, e in pairs:
        keys = layer_keys(model, layer)
        for k in keys:
            own[k].copy_(states[e][k])
        counts = {"clean": 0, "noisy": 0, "test": 0}
        for split in ("train", "test"):
            x, y = (host["x_train"], host["y_train"]) if split == "train" else (host["x_test"], host["y_test"])
            for s in range(0, len(x), batch_size):
                xb = x[s:s + batch_size].to(device, non_blocking=True)
                yb = y[s:s + batch_size].to(device, non_blocking=True)
                with autocast(device):
                    pred = model(model_input(xb, device)).float().argmax(1)
                ok = pred == yb
                if split == "train":
                    nb = host["is_noisy"][s:s + batch_size].to(device, non_blocking=True)
                    counts["clean"] += int((ok & ~nb).sum())
                    counts["noisy"] += int((ok & nb).sum())
                else:
                    counts["test"] += int(ok.sum())
        n_noisy = int(host["is_noisy"].sum())
        out[(layer.name, e)] = [counts["clean"] / (len(host["x_train"]) - n_noisy), counts["noisy"] / max(1, n_noisy),
                                counts["test"] / max(1, len(host["x_test"]))]
        for k in keys:
            own[k].copy_(final[k])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50000, help="training images (default 50000)")
    ap.add_argument("--n-test", type=int, default=10000, help="test images (default 10000)")
    ap.add_argument("--epochs-saved", type=int, default=51, help="checkpoints, epoch 0..E-1 (default 51)")
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-9 width (default 1: the paper's)")
    ap.add_argument("--batch-size", type=int, default=1024, help="memloc's evaluation batch")
    ap.add_argument("--baseline-batch-size", type=int, default=512, help="the naive loop's batch (the paper's 512)")
    ap.add_argument("--baseline-pairs", type=int, default=None, help="time the naive loop on this many pairs only")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("resnet9", input_shape=(3, 32, 32), num_classes=10, width=args.width)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    data = synthetic(args.n, args.n_test, device)
    states = checkpoints(model, args.epochs_saved)
    all_layers = layers(model)
    epochs = list(range(args.epochs_saved))

    # warm-up (cudnn autotuning, allocator) for both, on a slice
    warm = Dataset("w", data.x_train[:2048], data.y_train[:2048], data.y_true[:2048], data.is_noisy[:2048],
                   data.is_rare[:2048], data.x_test[:512], data.y_test[:512], 10)
    rewind_model(model, warm, states, epochs=epochs[:2], batch_size=args.batch_size)
    naive(model, warm, states, [(all_layers[0], 0)], args.baseline_batch_size, device)

    sync(device)
    t = time.perf_counter()
    res = rewind_model(model, data, states, epochs=epochs, batch_size=args.batch_size)
    sync(device)
    ours = time.perf_counter() - t

    pairs = [(l, e) for l in all_layers for e in epochs]
    timed = pairs
    if args.baseline_pairs is not None and args.baseline_pairs < len(pairs):
        rng = np.random.default_rng(0)
        timed = [pairs[i] for i in sorted(rng.choice(len(pairs), args.baseline_pairs, replace=False))]
    sync(device)
    t = time.perf_counter()
    base = naive(model, data, states, timed, args.baseline_batch_size, device)
    sync(device)
    base_s = (time.perf_counter() - t) * len(pairs) / len(timed)

    # the two agree (bf16 on GPU may flip a near-tie: allow a few examples)
    names = [l.name for l in all_layers]
    worst = 0.0
    for (lname, e), accs in base.items():
        got = res.arrays["accuracy"][names.index(lname), epochs.index(e)]
        worst = max(worst, float(np.nanmax(np.abs(np.array([got[0], got[1], got[3]]) - np.array(accs)))))
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "train_images": args.n, "test_images": args.n_test,
              "layers": len(all_layers), "checkpoints": len(epochs), "width": args.width,
              "memloc_s": round(ours, 2), "naive_s": round(base_s, 2),
              "naive_extrapolated_from_pairs": len(timed), "speedup": round(base_s / ours, 2),
              "max_accuracy_difference": worst}
    print(f"rewinding {len(all_layers)} layers x {len(epochs)} checkpoints over {args.n} + {args.n_test} images "
          f"on {report['device']}: memloc {ours:.1f}s, naive {base_s:.1f}s"
          f"{' (extrapolated from %d pairs)' % len(timed) if len(timed) < len(pairs) else ''}: "
          f"{base_s / ours:.1f}x; max accuracy difference {worst:.2e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
