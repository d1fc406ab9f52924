"""Cost of example-tied dropout in a training epoch, against the same model without it, in one run.

Trains one epoch (after a warm-up epoch) of the paper's ResNet-9 on in-memory
CIFAR-shaped data three ways: no per-block layer, standard channel dropout
(the baseline), and example-tied dropout after every block; prints seconds per
epoch, the ratios to the plain model, and peak GPU memory. The issue's bound:
example-tied dropout adds <= 10% to an epoch on a GPU and keeps no memory per
example (its masks are a hash of (seed, layer, example, unit); the layer holds
no buffers).

    python benchmarks/dropout_speed.py                      # GPU: width 1, 50,000 images, batch 512
    python benchmarks/dropout_speed.py --device cpu         # CPU: width 0.25, 2,048 images
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from memloc.core.dropout import ChannelDropout, ExampleTiedDropout, example_indices, expected_active_fraction
from memloc.core.precision import autocast
from memloc.tasks.classification.data import model_input
from memloc.tasks.classification.models import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make(kind: str, width: float, p_gen: float, p_mem: float, device: torch.device) -> torch.nn.Module:
    after = {
        "plain": None,
        "dropout": lambda pos, units: ChannelDropout(expected_active_fraction(p_gen, p_mem)),
        "example_tied": lambda pos, units: ExampleTiedDropout(p_gen, p_mem, seed=0, layer_id=pos),
    }[kind]
    torch.manual_seed(0)  # a script, not library code: the same initialization for the three models
    model = build_model("resnet9", input_shape=(3, 32, 32), num_classes=10, width=width, after_block=after)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def epoch(model, opt, x, y, batch_size: int, device: torch.device, forward=None) -> float:
    """Seconds for one pass over (x, y) in shuffled batches, examples' dataset indices handed to the layer."""
    order = torch.randperm(len(x), device=device)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(x), batch_size):
        idx = order[start:start + batch_size]  # (B,) dataset positions
        with example_indices(model, idx), autocast(device):
            loss = F.cross_entropy((model if forward is None else forward)(model_input(x[idx], device)).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=float, help="default 1 on GPU, 0.25 on CPU")
    p.add_argument("--examples", type=int, help="default 50000 on GPU, 2048 on CPU")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (median reported)")
    p.add_argument("--p-gen", type=float, default=0.4)
    p.add_argument("--p-mem", type=float, default=0.1)
    p.add_argument("--compile", action="store_true",
                   help="also time the three models under torch.compile (what `memloc train --compile` does)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    width = args.width or (1.0 if gpu else 0.25)
    n = args.examples or (50_000 if gpu else 2048)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen).to(device)  # (N, 3, 32, 32)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    print(f"resnet9 width {width:g}, {n} images 3x32x32, batch {args.batch_size}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if gpu else ''}, "
          f"p_gen {args.p_gen} p_mem {args.p_mem}, median of {args.repeats} epochs after 1 warm-up")
    times, memory = {}, {}
    # interleave the variants' epochs so that drifting clocks or a busy machine hit all of them alike
    kinds = ("plain", "dropout", "example_tied")
    models = {k: make(k, width, args.p_gen, args.p_mem, device) for k in kinds}
    forwards = {k: models[k] for k in kinds}
    if args.compile:
        for k in kinds:
            models[k + "+compile"] = make(k, width, args.p_gen, args.p_mem, device)
            forwards[k + "+compile"] = torch.compile(models[k + "+compile"])
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                               fused=gpu or None)
            for k, m in models.items()}
    for k in models:  # warm-up (and compilation)
        epoch(models[k], opts[k], x, y, args.batch_size, device, forwards[k])
    samples = {k: [] for k in models}
    for _ in range(args.repeats):
        for k in models:
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            samples[k].append(epoch(models[k], opts[k], x, y, args.batch_size, device, forwards[k]))
            if gpu:
                memory[k] = torch.cuda.max_memory_allocated(device) / 2**20
    for k in models:
        times[k] = statistics.median(samples[k])
    etd_state = sum(t.numel() for m in models["example_tied"].modules() if isinstance(m, ExampleTiedDropout)
                    for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    print(f"{'variant':22s} {'s/epoch':>9s} {'ratio':>7s}" + (f" {'peak MiB':>9s}" if gpu else ""))
    for k in models:
        base = "plain+compile" if k.endswith("+compile") else "plain"
        line = f"{k:22s} {times[k]:9.3f} {times[k] / times[base]:7.3f}"
        print(line + (f" {memory[k]:9.0f}" if gpu else ""))
    print(f"example-tied dropout state: {etd_state} stored numbers (no per-example mask table)")
    for suffix in [""] + (["+compile"] if args.compile else []):
        ratio = times["example_tied" + suffix] / times["plain" + suffix]
        print(f"example-tied{suffix} / plain{suffix} = {ratio:.3f} "
              f"({'within' if ratio <= 1.10 else 'ABOVE'} the 1.10 bound)")

if __name__ == "__main__":
    main()
